//! Issue 2 scenarios: the kernel capture spine on the real kernel, in namespaces and a child
//! cgroup. Each test builds its own `vm`/`pod` topology and removes it on drop.

use std::path::Path;
use std::process::Command;

use interceptor_tests::{interceptor_bin, sh, try_sh, wait_for, Proc, Subnet, VmPod};

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

fn setup() -> (VmPod, std::path::PathBuf, std::path::PathBuf) {
    let t = VmPod::new();
    let mesh = t.write("mesh.yaml", MESH);
    let resolv = t.write("resolv.conf", &format!("nameserver {}\n", Subnet::POD4));
    (t, mesh, resolv)
}

#[test]
fn captured_connection_reaches_the_endpoint_v4_and_v6() {
    let (t, mesh, resolv) = setup();
    let pod = t.pod_http("pod", &POD_ADDRS);
    let ic = t.start_interceptor(&mesh, &resolv, &[]);
    let (v4, v6) = vips(&mesh, "product.default.svc.cluster.local");

    let out = curl(&mut t.in_cgroup(
        "curl",
        &["-sS", "-m", "5", &format!("http://{v4}:8080/over-v4")],
    ));
    assert!(
        out.starts_with(&format!("pod GET /over-v4 from {}:", Subnet::VM4)),
        "{out}"
    );
    let out = curl(&mut t.in_cgroup(
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
    assert!(ic.wait_log_count("outbound connection closed", 2, 5.0));
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
    let _ic = t.start_interceptor(&mesh, &resolv, &[]);
    let (v4, v6) = vips(&mesh, "product.default.svc.cluster.local");
    let ns = format!("@{}", Subnet::FAKE_NS);

    // dig: connected UDP; dig checks the reply's source itself.
    let out = sh(&mut t.in_cgroup(
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
    let out = sh(&mut t.in_cgroup(
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
    let out = sh(&mut t.in_cgroup(
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
    let out = sh(&mut t.in_cgroup(
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
    let out = sh(&mut t.getent(&glibc_resolv, "product.default.svc.cluster.local"));
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
    let pod = t.pod_http("pod", &POD_ADDRS);
    let dnsmasq = t.pod_dnsmasq(Subnet::POD4, &["ext.example.org,192.0.2.77"]);
    let ic = t.start_interceptor(&mesh, &resolv, &[]);
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");

    // Outside the cgroup: the VIP is just an unroutable address, the fake nameserver is silent.
    let (ok, _, _) =
        try_sh(&mut t.outside("curl", &["-sS", "-m", "2", &format!("http://{v4}:8080/")]));
    assert!(!ok, "a process outside the cgroup was captured");
    let (ok, out, _) = try_sh(&mut t.outside(
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
    assert!(!ic.log().contains("outbound connection"), "{}", ic.log());

    // The interceptor runs inside the captured cgroup. Its upstream query to port 53 would come
    // back to itself if it were captured; dnsmasq answering proves it was not.
    let out = sh(&mut t.in_cgroup(
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
    let out = sh(&mut t.in_cgroup("curl", &["-sS", "-m", "5", "http://10.77.0.2:8081/self"]));
    assert!(out.starts_with("pod GET /self"), "{out}");
    assert!(
        pod.output().matches("GET /self").count() == 1,
        "{}",
        pod.output()
    );
    assert!(ic.log().contains("original=10.77.0.2:8081"));
}

/// After the interceptor stops (by `sig`), no program is left on the cgroup and traffic goes to
/// its original destination: the real server at the db address, the real nameserver.
fn fail_open_after(sig: i32) -> Option<std::process::ExitStatus> {
    let (t, mesh, resolv) = setup();
    let _pod = t.pod_http("pod", &POD_ADDRS);
    let _direct = t.pod_http("direct", &["10.77.0.3:9090"]);
    let _dnsmasq = t.pod_dnsmasq(
        Subnet::POD4,
        &["product.default.svc.cluster.local,192.0.2.99"],
    );
    let mut ic = t.start_interceptor(&mesh, &resolv, &[]);
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");
    let dig = [
        "+short",
        "+time=2",
        "+tries=1",
        "@10.77.0.2",
        "product.default.svc.cluster.local",
    ];
    let db = ["-sS", "-m", "5", "http://10.77.0.3:9090/db"];

    assert!(t.cgroup.attached_programs() >= 9, "programs not attached");
    assert!(sh(&mut t.in_cgroup("curl", &db)).starts_with("pod GET /db"));
    assert_eq!(sh(&mut t.in_cgroup("dig", &dig)).trim(), v4);

    ic.proc.signal(sig);
    let status = ic.proc.wait_exit(10.0);
    assert!(
        status.is_some(),
        "interceptor did not exit after signal {sig}"
    );
    let detached = wait_for(5.0, || (t.cgroup.attached_programs() == 0).then_some(()));
    assert!(
        detached.is_some(),
        "programs still attached after exit:\n{}",
        sh(Command::new("bpftool")
            .arg("cgroup")
            .arg("show")
            .arg(t.cgroup.path()))
    );

    assert!(
        sh(&mut t.in_cgroup("curl", &db)).starts_with("direct GET /db"),
        "traffic did not go to its original destination"
    );
    assert_eq!(sh(&mut t.in_cgroup("dig", &dig)).trim(), "192.0.2.99");
    status
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
    let bad = t.write("bad.yaml", &MESH.replace("number: 9090", "number: 90900"));
    let cmd = t.interceptor_cmd(&bad, &resolv, &[]);
    let mut p = Proc::spawn("interceptor", cmd, t.path("bad.log"));
    let status = p
        .wait_exit(20.0)
        .expect("interceptor exits on a bad mesh file");
    assert!(!status.success());
    let out = p.output();
    assert!(
        out.contains("bad.yaml: document 3: spec.ports[0].number"),
        "{out}"
    );
    assert_eq!(t.cgroup.attached_programs(), 0);
}

#[test]
fn bad_edit_while_running_keeps_the_last_good_table() {
    let (t, mesh, resolv) = setup();
    let _pod = t.pod_http("pod", &POD_ADDRS);
    let ic = t.start_interceptor(&mesh, &resolv, &[]);
    let (v4, _) = vips(&mesh, "product.default.svc.cluster.local");
    let url = format!("http://{v4}:8080/still");

    std::fs::write(
        &mesh,
        MESH.replace(
            "resolution: STATIC\n  workloadSelector",
            "resolution: STATC\n  workloadSelector",
        ),
    )
    .unwrap();
    assert!(
        ic.wait_log_count("mesh reload rejected", 1, 10.0),
        "{}",
        ic.log()
    );
    assert!(
        ic.log().contains("mesh.yaml: document 1: spec.resolution"),
        "{}",
        ic.log()
    );
    assert!(sh(&mut t.in_cgroup("curl", &["-sS", "-m", "5", &url])).starts_with("pod GET /still"));
    let ns = format!("@{}", Subnet::FAKE_NS);
    assert_eq!(
        sh(&mut t.in_cgroup("dig", &["+short", "+time=2", "+tries=1", &ns, "product"])).trim(),
        v4
    );

    // A good edit is applied: a new service appears in DNS and in the capture map.
    std::fs::write(
        &mesh,
        MESH.replace("db.example.internal", "db2.example.internal"),
    )
    .unwrap();
    assert!(
        ic.wait_log_count("mesh table reloaded", 1, 10.0),
        "{}",
        ic.log()
    );
    assert_eq!(
        sh(&mut t.in_cgroup(
            "dig",
            &["+short", "+time=2", "+tries=1", &ns, "db2.example.internal"]
        ))
        .trim(),
        "10.77.0.3"
    );
}
