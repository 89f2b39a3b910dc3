//! Issue 2 scenarios: the kernel capture spine on the real kernel, in namespaces and a child
//! cgroup. Each test builds its own `vm`/`pod` topology and removes it on drop.

use std::path::Path;
use std::process::Command;

use interceptor_tests::{interceptor_bin, sh, try_sh, wait_for, Net, Subnet, Topology};

/// product: selected WorkloadEntry in the pod (auto VIPs). db: a real address (10.77.0.3) whose
/// traffic the mesh sends elsewhere, so capture and fail-open are told apart by who answers.
/// self: the endpoint address is itself a captured VIP, so only the daemon's self-exclusion keeps
/// its own connection from looping.
const MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: product, namespace: default}
spec:
  hosts: [product.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: product}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: product-pod, namespace: default}
spec:
  address: 10.77.0.2
  labels: {app: product}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example.internal]
  addresses: [10.77.0.3]
  ports: [{number: 9090, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.77.0.2, ports: {tcp: 9091}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: self, namespace: default}
spec:
  hosts: [self.example.internal]
  addresses: [10.77.0.2]
  ports: [{number: 8081, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.77.0.2}]
"#;

const POD_ADDRS: [&str; 4] = [
    "10.77.0.2:8080",
    "[fd00:77::2]:8080",
    "10.77.0.2:9091",
    "10.77.0.2:8081",
];

/// (v4, v6) VIPs of `host`, from `interceptor check --json`.
fn vips(mesh: &Path, host: &str) -> (String, String) {
    let out = sh(Command::new(interceptor_bin())
        .args(["check", "--json", "--mesh"])
        .arg(mesh));
    let table: serde_json::Value = serde_json::from_str(&out).expect("check --json prints JSON");
    let svc = table["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == host)
        .expect("service in table");
    let v = svc["vips"].as_array().unwrap();
    (
        v[0].as_str().unwrap().to_string(),
        v[1].as_str().unwrap().to_string(),
    )
}

fn curl(cmd: &mut Command) -> String {
    sh(cmd)
}

fn setup() -> (Net, std::path::PathBuf, std::path::PathBuf) {
    let t = Topology::vm_pod();
    let mesh = t.write("mesh.yaml", MESH);
    let resolv = t.write("resolv.conf", "nameserver 10.77.0.2\n");
    (t, mesh, resolv)
}

/// Connections the daemon relayed and closed, from its metrics.
fn closed(ic: &interceptor_tests::Interceptor) -> f64 {
    ic.counter(
        "istio_tcp_connections_closed_total",
        &[("reporter", "source")],
    )
}

#[test]
fn captured_connection_reaches_the_endpoint_v4_and_v6() {
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let pod = pod_node.http("pod", &POD_ADDRS);
    let ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    let (v4, v6) = vips(&mesh, "product.default.svc.cluster.local");

    let out = curl(&mut vm.in_cgroup(
        "curl",
        &["-sS", "-m", "5", &format!("http://{v4}:8080/over-v4")],
    ));
    assert!(
        out.starts_with(&format!("pod GET /over-v4 from {}:", "10.77.0.1")),
        "{out}"
    );
    let out = curl(&mut vm.in_cgroup(
        "curl",
        &[
            "-sS",
            "-g",
            "-m",
            "5",
            &format!("http://[{v6}]:8080/over-v6"),
        ],
    ));
    assert!(out.starts_with("pod GET /over-v6 from"), "{out}");

    let served = pod.output();
    assert!(
        served.contains("GET /over-v4") && served.contains("GET /over-v6"),
        "{served}"
    );
    assert!(ic.wait_counter(
        "istio_tcp_connections_closed_total",
        &[("reporter", "source")],
        2.0,
        5.0
    ));
    // The access log names the original destination of each connection.
    let log = ic.log();
    assert!(
        log.contains(&format!("original={v4}:8080")),
        "interceptor did not log the original VIP:\n{log}"
    );
    assert!(
        log.contains(&format!("original=[{v6}]:8080")),
        "interceptor did not log the original v6 VIP:\n{log}"
    );
}

#[test]
fn dns_to_any_nameserver_is_answered_from_the_table() {
    let (t, mesh, resolv) = setup();
    let vm = t.node("vm");
    let _ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    let (v4, v6) = vips(&mesh, "product.default.svc.cluster.local");
    let ns = format!("@{}", Subnet::FAKE_NS);

    // dig: connected UDP; dig checks the reply's source itself.
    let out = sh(&mut vm.in_cgroup(
        "dig",
        &[
            "+short",
            "+time=2",
            "+tries=1",
            &ns,
            "product.default.svc.cluster.local",
        ],
    ));
    assert_eq!(out.trim(), v4);
    // dig +tcp
    let out = sh(&mut vm.in_cgroup(
        "dig",
        &[
            "+short",
            "+tcp",
            "+time=2",
            "+tries=1",
            &ns,
            "product.default",
            "AAAA",
        ],
    ));
    assert_eq!(out.trim(), v6);
    // Unconnected UDP (sendto/recvfrom): the reply must come from the nameserver asked.
    let q = env!("CARGO_BIN_EXE_udp-query");
    let out = sh(&mut vm.in_cgroup(
        q,
        &[
            &format!("{}:53", Subnet::FAKE_NS),
            "product.default.svc.cluster.local",
        ],
    ));
    assert_eq!(
        out.trim(),
        format!(
            "from={}:53 id=16962 rcode=No Error answers={v4}",
            Subnet::FAKE_NS
        )
    );
    let out = sh(&mut vm.in_cgroup(
        q,
        &[
            "[fd00:77::53]:53",
            "product.default.svc.cluster.local",
            "AAAA",
        ],
    ));
    assert_eq!(
        out.trim(),
        format!("from=[fd00:77::53]:53 id=16962 rcode=No Error answers={v6}")
    );
    // glibc, through /etc/resolv.conf.
    let glibc_resolv = t.write(
        "glibc-resolv.conf",
        &format!(
            "nameserver {}\noptions timeout:2 attempts:1\n",
            Subnet::FAKE_NS
        ),
    );
    let out = sh(&mut vm.getent(&glibc_resolv, "product.default.svc.cluster.local"));
    assert!(
        out.starts_with(&v4) || out.starts_with(&v6),
        "getent: {out}"
    );
    assert!(
        out.contains("product.default.svc.cluster.local"),
        "getent: {out}"
    );
}

#[test]
fn uncaptured_processes_and_the_interceptor_itself_are_left_alone() {
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let pod = pod_node.http("pod", &POD_ADDRS);
    let dnsmasq = pod_node.dnsmasq("10.77.0.2", &["ext.example.org,192.0.2.77"]);
    let ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");

    // Outside the cgroup: the VIP is just an unroutable address, the fake nameserver is silent.
    let (ok, _, _) =
        try_sh(&mut vm.cmd("curl", &["-sS", "-m", "2", &format!("http://{v4}:8080/")]));
    assert!(!ok, "a process outside the cgroup was captured");
    let (ok, out, _) = try_sh(&mut vm.cmd(
        "dig",
        &[
            "+short",
            "+time=1",
            "+tries=1",
            &format!("@{}", Subnet::FAKE_NS),
            "product.default",
        ],
    ));
    assert!(
        !ok || out.trim().is_empty() || out.contains("timed out"),
        "DNS outside the cgroup was answered: {out}"
    );
    assert_eq!(
        closed(&ic),
        0.0,
        "a connection from outside the cgroup was relayed"
    );

    // The interceptor runs inside the captured cgroup. Its upstream query to port 53 would come
    // back to itself if it were captured; dnsmasq answering proves it was not.
    let out = sh(&mut vm.in_cgroup(
        "dig",
        &[
            "+short",
            "+time=3",
            "+tries=1",
            &format!("@{}", Subnet::FAKE_NS),
            "ext.example.org",
        ],
    ));
    assert_eq!(out.trim(), "192.0.2.77");
    assert!(
        dnsmasq
            .output()
            .contains("query[A] ext.example.org from 10.77.0.1"),
        "{}",
        dnsmasq.output()
    );

    // An endpoint whose address is itself a captured VIP: the daemon's own connect is not
    // captured again, so the client reaches the server instead of looping.
    let out = sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", "http://10.77.0.2:8081/self"]));
    assert!(out.starts_with("pod GET /self"), "{out}");
    assert!(
        pod.output().matches("GET /self").count() == 1,
        "{}",
        pod.output()
    );
    assert!(ic.wait_counter(
        "istio_tcp_connections_closed_total",
        &[("destination_service", "self.example.internal")],
        1.0,
        5.0
    ));
    assert!(ic.log().contains("original=10.77.0.2:8081"));
}

/// After the interceptor stops (by `sig`), no program is left on the cgroup and traffic goes to
/// its original destination: the real server at the db address, the real nameserver.
fn fail_open_after(sig: i32) -> Option<std::process::ExitStatus> {
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let _pod = pod_node.http("pod", &POD_ADDRS);
    let _direct = pod_node.http("direct", &["10.77.0.3:9090"]);
    let _dnsmasq = pod_node.dnsmasq(
        "10.77.0.2",
        &["product.default.svc.cluster.local,192.0.2.99"],
    );
    let mut ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");
    let dig = [
        "+short",
        "+time=2",
        "+tries=1",
        "@10.77.0.2",
        "product.default.svc.cluster.local",
    ];
    let db = ["-sS", "-m", "5", "http://10.77.0.3:9090/db"];

    assert!(vm.cgroup.attached_programs() >= 9, "programs not attached");
    assert!(sh(&mut vm.in_cgroup("curl", &db)).starts_with("pod GET /db"));
    assert_eq!(sh(&mut vm.in_cgroup("dig", &dig)).trim(), v4);

    ic.proc.signal(sig);
    let status = ic.proc.wait_exit(10.0);
    assert!(
        status.is_some(),
        "interceptor did not exit after signal {sig}"
    );
    let detached = wait_for(5.0, || (vm.cgroup.attached_programs() == 0).then_some(()));
    assert!(
        detached.is_some(),
        "programs still attached after exit:\n{}",
        sh(Command::new("bpftool")
            .arg("cgroup")
            .arg("show")
            .arg(vm.cgroup.path()))
    );

    assert!(
        sh(&mut vm.in_cgroup("curl", &db)).starts_with("direct GET /db"),
        "traffic did not go to its original destination"
    );
    assert_eq!(sh(&mut vm.in_cgroup("dig", &dig)).trim(), "192.0.2.99");
    status
}

/// SIGKILL under load: 200 relayed connections held, 2 000 DNS queries a second for a name
/// outside the mesh, new connections to a non-mesh address. The programs detach; the name keeps
/// resolving through the VM's own nameserver (the longest gap between answers is printed); no
/// non-mesh connection fails; every held connection is closed (EOF or reset), none left
/// hanging; after a restart capture and mesh answers are back.
#[test]
fn sigkill_under_load_strands_nothing_and_a_restart_brings_capture_back() {
    use interceptor_tests::{helper_bin, Proc};
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let _pod = pod_node.http("pod", &POD_ADDRS[..2]);
    let _dnsmasq = pod_node.dnsmasq("10.77.0.2", &["outside.example,192.0.2.7"]);
    let checker = helper_bin("stream-check");
    let mut streams = Proc::spawn(
        "stream-check",
        pod_node.cmd(
            checker.to_str().expect("utf-8 path"),
            &["serve", "10.77.0.2:9091"],
        ),
        t.path("stream-check.log"),
    );
    streams.wait_for_output("listening", 10.0);
    let mut ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    let chaos = helper_bin("chaos-load");
    let mut load = Proc::spawn(
        "chaos-load",
        vm.in_cgroup(
            chaos.to_str().expect("utf-8 path"),
            &[
                "8",
                "10.77.0.2:53",
                "outside.example",
                "2000",
                "10.77.0.2:8080",
                "10.77.0.3:9090",
                "200",
            ],
        ),
        t.path("chaos-load.log"),
    );
    load.wait_for_output("warm", 60.0);
    assert_eq!(
        ic.counter(
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")]
        ),
        200.0,
        "the held connections are relayed"
    );
    let killed = std::time::Instant::now();
    ic.proc.signal(libc::SIGKILL);
    assert!(ic.proc.wait_exit(10.0).is_some(), "SIGKILL did not end it");
    assert!(
        wait_for(5.0, || (vm.cgroup.attached_programs() == 0).then_some(())).is_some(),
        "programs still attached after SIGKILL"
    );
    let detached = killed.elapsed();
    assert!(load.wait_exit(60.0).is_some(), "the load did not finish");
    let out = load.output();
    let report: serde_json::Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no report: {out}"));
    eprintln!("SIGKILL under load: programs detached {detached:?} after the signal; {report}");
    assert_eq!(report["connects"]["failed"], 0, "{report}");
    assert!(report["connects"]["ok"].as_u64() > Some(0), "{report}");
    assert_eq!(report["held"]["echoed"], 200, "{report}");
    assert_eq!(
        report["held"]["hung"], 0,
        "a relayed connection was left hanging: {report}"
    );
    assert!(report["dns"]["ok"].as_u64() > Some(0), "{report}");
    let dig_outside = [
        "+short",
        "+time=2",
        "+tries=1",
        "@10.77.0.2",
        "outside.example",
    ];
    assert_eq!(
        sh(&mut vm.in_cgroup("dig", &dig_outside)).trim(),
        "192.0.2.7",
        "the VM's own nameserver answers once we are gone"
    );

    // Restarted: capture and mesh answers are back.
    let _ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");
    let url = format!("http://{v4}:8080/back");
    assert!(sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", &url])).starts_with("pod GET /back"));
    let dig_mesh = ["+short", "+time=2", "+tries=1", "@10.77.0.2", "product"];
    assert_eq!(sh(&mut vm.in_cgroup("dig", &dig_mesh)).trim(), v4);
    assert_eq!(
        sh(&mut vm.in_cgroup("dig", &dig_outside)).trim(),
        "192.0.2.7"
    );
}

#[test]
fn sigkill_leaves_nothing_attached_and_traffic_flows_as_before() {
    fail_open_after(libc::SIGKILL);
}

#[test]
fn sigterm_detaches_and_exits_zero() {
    let status = fail_open_after(libc::SIGTERM).expect("exited");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn bad_mesh_file_at_start_fails_with_file_and_field() {
    let (t, _, resolv) = setup();
    let vm = t.node("vm");
    let bad = t.write("bad.yaml", &MESH.replace("number: 9090", "number: 90900"));
    let mut p = vm.interceptor().mesh(&bad).resolv(&resolv).spawn();
    let status = p
        .wait_exit(20.0)
        .expect("interceptor exits on a bad mesh file");
    assert!(!status.success());
    let out = p.output();
    assert!(
        out.contains("bad.yaml: document 3: spec.ports[0].number"),
        "{out}"
    );
    assert_eq!(vm.cgroup.attached_programs(), 0);
}

#[test]
fn bad_edit_while_running_keeps_the_last_good_table() {
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let _pod = pod_node.http("pod", &POD_ADDRS);
    let ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");
    let url = format!("http://{v4}:8080/still");
    let rejected = |ic: &interceptor_tests::Interceptor| {
        ic.counter("interceptor_mesh_reload_errors_total", &[])
    };
    assert_eq!(rejected(&ic), 0.0);
    let version = ic.table_version();

    std::fs::write(
        &mesh,
        MESH.replace(
            "resolution: STATIC\n  workloadSelector",
            "resolution: STATC\n  workloadSelector",
        ),
    )
    .unwrap();
    assert!(
        wait_for(10.0, || (rejected(&ic) == 1.0).then_some(())).is_some(),
        "{}",
        ic.log()
    );
    assert_eq!(ic.table_version(), version, "a bad edit replaced the table");
    // The log says which file, document and field.
    assert!(
        ic.log().contains("mesh.yaml: document 1: spec.resolution"),
        "{}",
        ic.log()
    );
    assert!(sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", &url])).starts_with("pod GET /still"));
    let ns = format!("@{}", Subnet::FAKE_NS);
    assert_eq!(
        sh(&mut vm.in_cgroup("dig", &["+short", "+time=2", "+tries=1", &ns, "product"])).trim(),
        v4
    );

    // A good edit is applied: a new service appears in DNS and in the capture map.
    std::fs::write(
        &mesh,
        MESH.replace("db.example.internal", "db2.example.internal"),
    )
    .unwrap();
    assert!(ic.wait_table_after(version, 10.0), "{}", ic.log());
    assert_eq!(
        sh(&mut vm.in_cgroup(
            "dig",
            &["+short", "+time=2", "+tries=1", &ns, "db2.example.internal"]
        ))
        .trim(),
        "10.77.0.3"
    );
}

/// Disk faults a deploy or an operator causes, with the mesh as a directory: a file made
/// unreadable, a file truncated mid-write, the whole directory removed. Each time the last good
/// table keeps serving (DNS and capture), the metric counts it by reason and `status` says why;
/// the directory made again is watched again and its content taken in.
#[test]
fn an_unreadable_truncated_or_removed_mesh_directory_keeps_the_last_good_table() {
    use std::os::unix::fs::PermissionsExt;
    let (t, _, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let _pod = pod_node.http("pod", &POD_ADDRS);
    let dir = t.path("mesh.d");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, MESH).unwrap();
    let ic = vm.interceptor().mesh(&dir).resolv(&resolv).start();
    let (v4, _) = vips(&file, "product.default.svc.cluster.local");
    let url = format!("http://{v4}:8080/still");
    let ns = format!("@{}", Subnet::FAKE_NS);
    let version = ic.table_version();
    let still_serving = |what: &str| {
        assert_eq!(ic.table_version(), version, "{what} replaced the table");
        assert!(
            sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", &url])).starts_with("pod GET /still"),
            "{what}: capture stopped"
        );
        assert_eq!(
            sh(&mut vm.in_cgroup("dig", &["+short", "+time=2", "+tries=1", &ns, "product"])).trim(),
            v4,
            "{what}: DNS stopped answering"
        );
    };
    let refused = |reason: &str| {
        assert!(
            ic.wait_counter(
                "interceptor_mesh_reload_errors_total",
                &[("reason", reason)],
                1.0,
                10.0
            ),
            "no {reason} rejection counted: {}",
            ic.log()
        );
        ic.json("/status")["sources"]["files"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    // The daemon holds no CAP_DAC_OVERRIDE: mode 000 is unreadable to it, as to istio-proxy.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    let why = refused("permission");
    assert!(
        why.contains("mesh.yaml") && why.contains("ermission denied"),
        "{why}"
    );
    still_serving("an unreadable file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(ic.wait_table_after(version, 10.0), "{}", ic.log());
    let version = ic.table_version();

    // Cut inside a key, as a writer that died mid-write leaves it.
    let cut = MESH.find("resolution: STATIC").unwrap() + 5;
    std::fs::write(&file, &MESH[..cut]).unwrap();
    let why = refused("invalid");
    assert!(why.contains("mesh.yaml"), "{why}");
    let still_serving = |what: &str| {
        assert_eq!(ic.table_version(), version, "{what} replaced the table");
        assert!(
            sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", &url])).starts_with("pod GET /still"),
            "{what}: capture stopped"
        );
    };
    still_serving("a truncated file");

    std::fs::remove_dir_all(&dir).unwrap();
    let why = refused("missing");
    assert!(why.contains("mesh.d"), "{why}");
    still_serving("a removed directory");
    let status = sh(&mut vm.cmd(interceptor_bin().to_str().expect("utf-8 path"), &["status"]));
    assert!(status.contains("last load refused"), "{status}");

    // Made again (a deploy replacing the directory): watched again, its content in force.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        &file,
        MESH.replace("db.example.internal", "db2.example.internal"),
    )
    .unwrap();
    assert!(ic.wait_table_after(version, 10.0), "{}", ic.log());
    assert_eq!(
        sh(&mut vm.in_cgroup(
            "dig",
            &["+short", "+time=2", "+tries=1", &ns, "db2.example.internal"]
        ))
        .trim(),
        "10.77.0.3"
    );
    assert!(ic.json("/status")["sources"]["files"]["last_error"].is_null());
}

/// Resource caps: at `--max-outbound-connections` a new captured connection is reset at once
/// and counted while the ones held keep echoing; at `--max-dns-tcp-connections` a new DNS TCP
/// connection is refused while UDP answers on; below the cap again, both serve.
#[test]
fn at_a_cap_new_work_is_refused_and_counted_and_work_in_progress_goes_on() {
    use interceptor_tests::{helper_bin, Proc};
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let _pod = pod_node.http("pod", &POD_ADDRS[..2]);
    let checker = helper_bin("stream-check");
    let checker = checker.to_str().expect("utf-8 path");
    let mut streams = Proc::spawn(
        "stream-check",
        pod_node.cmd(checker, &["serve", "10.77.0.2:9091"]),
        t.path("stream-check.log"),
    );
    streams.wait_for_output("listening", 10.0);
    let ic = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .args([
            "--max-outbound-connections",
            "3",
            "--max-dns-tcp-connections",
            "2",
        ])
        .start();
    let in_use = |limit: &str| ic.counter("interceptor_limit_in_use", &[("limit", limit)]);
    let refused = |limit: &str| ic.counter("interceptor_limit_refused_total", &[("limit", limit)]);
    assert_eq!(
        ic.counter("interceptor_limit_max", &[("limit", "pending_handshakes")]),
        4096.0,
        "the default"
    );

    let mut holder = Proc::spawn(
        "hold",
        vm.in_cgroup(checker, &["hold", "10.77.0.3:9090", "5"]),
        t.path("hold.log"),
    );
    holder.wait_for_output("echoed", 30.0);
    let held: serde_json::Value =
        serde_json::from_str(holder.output().trim()).expect("hold prints JSON");
    assert_eq!(
        (&held["echoed"], &held["refused"], &held["still"]),
        (&3.into(), &2.into(), &3.into()),
        "{held}"
    );
    assert_eq!(refused("outbound_connections"), 2.0);
    assert_eq!(in_use("outbound_connections"), 3.0);
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");
    let url = format!("http://{v4}:8080/capped");
    let (ok, out, _) = try_sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", &url]));
    assert!(!ok, "a fourth connection was served: {out}");
    holder.signal(libc::SIGTERM);
    holder.wait_exit(10.0).expect("holder exits");
    assert!(
        wait_for(10.0, || (in_use("outbound_connections") == 0.0)
            .then_some(()))
        .is_some(),
        "held connections are still counted"
    );
    assert!(sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", &url])).starts_with("pod GET /capped"));

    // DNS over TCP: two connections held (silent), a third refused, UDP unaffected.
    let mut holder = Proc::spawn(
        "hold-dns",
        vm.cmd(checker, &["hold", "127.0.0.1:15053", "2", "silent"]),
        t.path("hold-dns.log"),
    );
    holder.wait_for_output("echoed", 30.0);
    assert!(
        wait_for(10.0, || (in_use("dns_tcp_connections") == 2.0)
            .then_some(()))
        .is_some(),
        "{}",
        ic.log()
    );
    let dig = |tcp: &str| {
        let (_, out, _) = try_sh(&mut vm.cmd(
            "dig",
            &[
                "+short",
                tcp,
                "+time=2",
                "+tries=1",
                "-p",
                "15053",
                "@127.0.0.1",
                "product",
            ],
        ));
        out.trim().to_string()
    };
    let over_tcp = dig("+tcp");
    assert_ne!(over_tcp, v4, "a third DNS TCP connection was answered");
    assert!(refused("dns_tcp_connections") >= 1.0);
    assert_eq!(dig("+notcp"), v4, "UDP answers");
    holder.signal(libc::SIGTERM);
    holder.wait_exit(10.0).expect("holder exits");
    assert!(
        wait_for(10.0, || (in_use("dns_tcp_connections") == 0.0)
            .then_some(()))
        .is_some(),
        "held DNS connections are still counted"
    );
    assert_eq!(dig("+tcp"), v4, "TCP answers again");
    assert!(
        ic.log().contains("at the cap") && ic.log().contains("below the cap again"),
        "{}",
        ic.log()
    );
}

/// Another product's cgroup programs (connect4 and sockops, attached by bpftool with
/// multi-attach before we start) keep running while we are attached and after we detach; we
/// leave them attached, and detach only what we attached.
#[test]
fn another_products_cgroup_programs_keep_working_while_we_attach_and_after_we_detach() {
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let _pod = pod_node.http("pod", &POD_ADDRS);
    let obj = t.path("foreign.o");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/foreign.c");
    let multiarch = sh(Command::new("gcc").arg("-print-multiarch"));
    sh(Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-I"])
        .arg(format!("/usr/include/{}", multiarch.trim()))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj));
    // Pinned in a bpffs of a private mount namespace, gone when the shell exits; the cgroup
    // attachments keep the programs alive, as an agent's would.
    let pins = t.path("bpffs");
    std::fs::create_dir(&pins).unwrap();
    let cg = vm.cgroup.path().display().to_string();
    let script = format!(
        "set -e; mount -t bpf bpf {pins}; bpftool prog loadall {obj} {pins}/p; \
         bpftool cgroup attach {cg} connect4 pinned {pins}/p/foreign_connect4 multi; \
         bpftool cgroup attach {cg} sock_ops pinned {pins}/p/foreign_sockops multi; \
         bpftool -j prog show pinned {pins}/p/foreign_connect4",
        pins = pins.display(),
        obj = obj.display(),
    );
    let prog: serde_json::Value = serde_json::from_str(&sh(
        Command::new("unshare").args(["-m", "sh", "-c", &script])
    ))
    .expect("bpftool prints JSON");
    let map = prog["map_ids"][0].as_u64().expect("the program's map");
    let count = |i: u8| -> u64 {
        let out = sh(Command::new("bpftool")
            .args(["-j", "map", "lookup", "id", &map.to_string(), "key"])
            .args([i.to_string().as_str(), "0", "0", "0"]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("lookup JSON");
        v["formatted"]["value"].as_u64().unwrap_or_else(|| {
            // Without BTF: little-endian bytes as hex strings.
            v["value"]
                .as_array()
                .expect("value bytes")
                .iter()
                .rev()
                .fold(0, |n, b| {
                    n << 8
                        | u64::from_str_radix(
                            b.as_str().unwrap_or("0").trim_start_matches("0x"),
                            16,
                        )
                        .unwrap_or(0)
                })
        })
    };
    let foreign_ids = || -> Vec<u64> {
        let out = sh(Command::new("bpftool").args(["-j", "cgroup", "show", &cg]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("cgroup JSON");
        v.as_array()
            .expect("a list")
            .iter()
            .filter(|p| {
                p["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("foreign_"))
            })
            .filter_map(|p| p["id"].as_u64())
            .collect()
    };
    let theirs = foreign_ids();
    assert_eq!(theirs.len(), 2, "both foreign programs attached");
    let direct =
        || sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", "http://10.77.0.2:8080/direct"]));
    assert!(direct().starts_with("pod GET /direct"));
    let (c0, s0) = (count(0), count(1));
    assert!(c0 >= 1 && s0 >= 1, "the foreign programs run: {c0} {s0}");

    let mut ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    assert_eq!(vm.cgroup.attached_programs(), 2 + 9, "ours beside theirs");
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");
    let out = sh(&mut vm.in_cgroup(
        "curl",
        &["-sS", "-m", "5", &format!("http://{v4}:8080/captured")],
    ));
    assert!(out.starts_with("pod GET /captured"), "{out}");
    let (c1, s1) = (count(0), count(1));
    assert!(
        c1 > c0 && s1 > s0,
        "theirs still run beside ours: {c1} {s1}"
    );

    ic.proc.signal(libc::SIGTERM);
    assert!(ic.proc.wait_exit(10.0).is_some_and(|s| s.success()));
    assert_eq!(foreign_ids(), theirs, "we detached theirs");
    assert_eq!(vm.cgroup.attached_programs(), 2, "ours are all gone");
    assert!(direct().starts_with("pod GET /direct"));
    assert!(
        count(0) > c1 && count(1) > s1,
        "theirs still run after we left"
    );
}

/// `--local-hop sockmap`: the app <-> outbound hop skips loopback TCP (of 256 MiB, next to
/// nothing on lo's 15001), while bytes, half-close and short connections behave as
/// over TCP, IPv6 included; the daemon's death strands nothing (new connections fail open).
#[test]
fn local_hop_sockmap_moves_the_bytes_off_loopback_tcp_and_keeps_them_intact() {
    use interceptor_tests::wire::{tcp_payloads, Tcpdump};
    use interceptor_tests::{helper_bin, Proc};
    let (t, mesh, resolv) = setup();
    let (vm, pod_node) = (t.node("vm"), t.node("pod"));
    let pod = pod_node.http("pod", &POD_ADDRS[..2]);
    let checker = helper_bin("stream-check");
    let checker = checker.to_str().expect("utf-8 path");
    let mut streams = Proc::spawn(
        "stream-check",
        pod_node.cmd(checker, &["serve", "10.77.0.2:9091"]),
        t.path("stream-check.log"),
    );
    streams.wait_for_output("listening", 10.0);
    let ic = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .args(["--local-hop", "sockmap"])
        .start();
    let status = sh(&mut vm.cmd(interceptor_bin().to_str().expect("utf-8 path"), &["status"]));
    assert!(status.contains("local_hop_redirect"), "{status}");

    let dump = Tcpdump::start(&vm.ns, "lo", "tcp port 15001", t.path("lo.pcap"));
    let check = |args: &[&str]| -> serde_json::Value {
        let out = sh(&mut vm.in_cgroup(checker, args));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let r = check(&["bulk", "10.77.0.3:9090", "268435456"]);
    assert_eq!(r["match"], true, "{r}");
    // Not asserted: whether the kernel wakes a blocking reader with no data is a race
    // (README, `--local-hop`); the bytes are what must hold.
    eprintln!("local hop bulk: {r}");
    let r = check(&["sequential", "10.77.0.3:9090", "100"]);
    assert_eq!(r["echoed"], 100, "{r}");
    let (_, v6) = vips(&mesh, "product.default.svc.cluster.local");
    let out = curl(&mut vm.in_cgroup(
        "curl",
        &[
            "-sS",
            "-g",
            "-m",
            "5",
            &format!("http://[{v6}]:8080/hop-v6"),
        ],
    ));
    assert!(out.starts_with("pod GET /hop-v6 from"), "{out}");
    let pcap = dump.stop();
    // A message sent before the other end is in the map (the first bytes of a connection,
    // racing the proxy's accept) takes TCP, as it must; the bulk of 256 MiB must not.
    let payloads = tcp_payloads(&pcap, "tcp port 15001");
    let on_tcp: usize = payloads.iter().map(Vec::len).sum();
    eprintln!(
        "local hop: {} payload segments, {on_tcp} bytes on loopback TCP",
        payloads.len()
    );
    assert!(on_tcp < 1 << 20, "{on_tcp} bytes crossed loopback TCP");
    assert!(pod.output().contains("GET /hop-v6"));

    // Fail-open: with the daemon gone, nothing is left redirecting.
    drop(ic);
    let (ok, out, err) =
        try_sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", "http://10.77.0.2:8080/after"]));
    assert!(ok && out.starts_with("pod GET /after"), "{out}{err}");
}
