//! Issue 6 scenarios: operating the daemon. Readiness, metrics that move with real traffic, the
//! config dump, `interceptor explain` and `status` against the running daemon, and the ports that
//! are never captured.

use std::fmt::Write as _;

use interceptor_tests::{
    interceptor_bin, sh, try_sh, wait_for, Interceptor, Net, Proc, Subnet, Topology,
};

const PRODUCT: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: product, namespace: default}
spec:
  hosts: [product.default.svc.cluster.local]
  addresses: [240.240.1.1]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.77.0.2}]
"#;

/// `count` more services with two ports each: a capture map large enough that syncing it takes
/// a while after the admin endpoint is up.
fn many_services(count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        let _ = write!(
            out,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  hosts: [s{i}.default.svc.cluster.local]\n  ports: [{{number: 80, name: http}}, {{number: 443, name: https}}]\n  resolution: STATIC\n  endpoints: [{{address: 10.77.0.2}}]\n"
        );
    }
    out
}

/// The body of `http://127.0.0.1:15020{path}` from inside the vm namespace, by curl.
fn admin(t: &Net, path: &str) -> String {
    sh(&mut t.node("vm").cmd(
        "curl",
        &["-sS", "-m", "5", &format!("http://127.0.0.1:15020{path}")],
    ))
}

fn cli(t: &Net, args: &[&str]) -> String {
    let mut c = t
        .node("vm")
        .ns
        .cmd(interceptor_bin().to_str().expect("utf-8"));
    c.args(args);
    sh(&mut c)
}

/// The value of the sample `line_prefix` in a Prometheus text exposition.
fn sample(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix) && l[line_prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn readiness_waits_for_attach_and_the_table_and_metrics_count_real_traffic() {
    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let mesh = t.write("mesh.yaml", &(PRODUCT.to_string() + &many_services(10_000)));
    let resolv = t.write("resolv.conf", &format!("nameserver {}\n", Subnet::FAKE_NS));
    let _server = t.node("pod").http("server", &["10.77.0.2:8080"]);
    // Poll readiness from before the daemon starts until it is ready.
    let probe_log = t.path("probe.log");
    let mut probe = vm.ns.cmd("sh");
    probe.args([
        "-c",
        "for i in $(seq 3000); do code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' http://127.0.0.1:15020/healthz/ready); echo $code; [ \"$code\" = 200 ] && exit 0; done",
    ]);
    let mut probe = Proc::spawn("probe", probe, probe_log.clone());
    let ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    assert!(
        probe.wait_exit(20.0).is_some_and(|s| s.success()),
        "never ready: {}",
        probe.output()
    );
    let codes: Vec<String> = probe.output().lines().map(str::to_string).collect();
    // Refused (000) until the admin endpoint binds, 503 while programs attach and the capture map
    // fills, then 200 for good.
    let first_up = codes
        .iter()
        .position(|c| c != "000")
        .expect("admin answered");
    assert!(
        codes[first_up..].iter().all(|c| c == "503" || c == "200"),
        "{codes:?}"
    );
    assert_eq!(
        codes[first_up], "503",
        "ready before attach and sync: {codes:?}"
    );
    let not_ready = codes.iter().filter(|c| *c == "503").count();
    eprintln!("readiness probe: {not_ready} x 503 before 200");
    assert_eq!(admin(&t, "/healthz/ready").trim(), "ready");

    // Known traffic: 5 connections to the service VIP, 3 DNS queries answered from the table,
    // 1 forwarded (and failing: nobody answers at the fake nameserver).
    for i in 0..5 {
        let out = sh(&mut vm.in_cgroup(
            "curl",
            &["-sS", "-m", "5", &format!("http://240.240.1.1:8080/m{i}")],
        ));
        assert!(out.starts_with(&format!("server GET /m{i}")), "{out}");
    }
    for _ in 0..3 {
        sh(&mut vm.in_cgroup(
            "dig",
            &[
                "+short",
                "+tries=1",
                "@10.77.0.53",
                "product.default.svc.cluster.local",
            ],
        ));
    }
    let _ = try_sh(&mut vm.in_cgroup(
        "dig",
        &[
            "+tries=1",
            "+time=8",
            "@10.77.0.53",
            "elsewhere.example",
            "A",
        ],
    ));
    assert!(
        ic.wait_counter(
            "istio_tcp_connections_closed_total",
            &[("reporter", "source")],
            5.0,
            5.0
        ),
        "{}",
        ic.log()
    );

    let text = admin(&t, "/stats/prometheus");
    // Istio's names and label set; the VM has no workload name (unknown) in namespace
    // default; the endpoint is the ServiceEntry's inline one.
    let labels = "{reporter=\"source\",source_principal=\"unknown\",destination_principal=\"unknown\",destination_service=\"product.default.svc.cluster.local\",connection_security_policy=\"none\",destination_version=\"latest\",source_workload=\"unknown\",source_workload_namespace=\"default\",source_app=\"unknown\",source_version=\"unknown\",source_canonical_service=\"unknown\",source_canonical_revision=\"latest\",source_cluster=\"unknown\",destination_workload=\"product\",destination_workload_namespace=\"default\",destination_app=\"product\",destination_canonical_service=\"product\",destination_canonical_revision=\"latest\",destination_cluster=\"unknown\",destination_service_name=\"product\",destination_service_namespace=\"default\"}";
    assert_eq!(
        sample(
            &text,
            &format!("istio_tcp_connections_opened_total{labels}")
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("istio_tcp_connections_closed_total{labels}")
        ),
        Some(5.0),
        "{text}"
    );
    // Each request is one GET line plus headers; each response carries "server GET /mN from ...".
    let received = sample(&text, &format!("istio_tcp_received_bytes_total{labels}")).unwrap_or(0.0);
    let sent = sample(&text, &format!("istio_tcp_sent_bytes_total{labels}")).unwrap_or(0.0);
    assert!(
        received > 5.0 * 50.0 && sent > 5.0 * 60.0,
        "received {received} sent {sent}"
    );
    assert_eq!(
        sample(&text, "interceptor_dns_requests_total{result=\"table\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "interceptor_dns_requests_total{result=\"servfail\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "interceptor_mesh_services"), Some(10_001.0));
    // One VIP for product (port 8080); two auto VIPs (v4, v6) x two ports for every other service.
    assert_eq!(
        sample(&text, "interceptor_capture_vips"),
        Some(1.0 + 10_000.0 * 4.0)
    );
    assert_eq!(sample(&text, "interceptor_capture_programs"), Some(9.0));
    assert_eq!(sample(&text, "interceptor_ready"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "interceptor_mesh_reload_errors_total{reason=\"invalid\"}"
        ),
        Some(0.0)
    );
}

#[test]
fn config_dump_follows_a_file_edit_and_explain_and_status_tell_the_truth() {
    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let mesh = t.write("mesh.yaml", PRODUCT);
    let resolv = t.write("resolv.conf", &format!("nameserver {}\n", Subnet::FAKE_NS));
    let ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();

    let dump: serde_json::Value = serde_json::from_str(&admin(&t, "/config_dump")).expect("JSON");
    assert_eq!(dump["mesh"]["version"], 1);
    assert_eq!(
        dump["mesh"]["services"][0]["host"],
        "product.default.svc.cluster.local"
    );
    assert_eq!(
        dump["status"]["capture"]["programs"]
            .as_array()
            .map(Vec::len),
        Some(9)
    );
    std::fs::write(&mesh, PRODUCT.replace("product", "review")).expect("edit");
    assert!(ic.wait_table_after(1, 10.0), "{}", ic.log());
    let dump: serde_json::Value = serde_json::from_str(&admin(&t, "/config_dump")).expect("JSON");
    assert_eq!(dump["mesh"]["version"], 2);
    assert_eq!(
        dump["mesh"]["services"][0]["host"],
        "review.default.svc.cluster.local"
    );

    // A captured VIP by name: DNS from the table, captured, straight to the endpoint.
    let out = cli(&t, &["explain", "review.default.svc.cluster.local:8080"]);
    assert!(out.contains("DNS: review.default.svc.cluster.local is answered from the mesh table (service review.default.svc.cluster.local): 240.240.1.1"), "{out}");
    assert!(out.contains("connect 240.240.1.1:8080: CAPTURED"), "{out}");
    assert!(
        out.contains("-> 10.77.0.2:8080 via direct weight 1.00 plaintext"),
        "{out}"
    );
    // The same address, another port; an address outside the mesh; a name outside the mesh.
    let out = cli(&t, &["explain", "240.240.1.1:9999"]);
    assert!(
        out.contains("connect 240.240.1.1:9999: not captured"),
        "{out}"
    );
    let out = cli(&t, &["explain", "10.77.0.3:80"]);
    assert!(
        out.contains("not captured (not a mesh service address"),
        "{out}"
    );
    let out = cli(&t, &["explain", "www.example.org"]);
    assert!(
        out.contains("not in the mesh: forwarded upstream to 10.77.0.53:53"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&cli(&t, &["explain", "--json", "[2001:db8::1]:53"])).expect("JSON");
    assert_eq!(v["connections"][0]["captured"], true, "{v}");

    let out = cli(&t, &["status"]);
    assert!(out.contains("ready: yes"), "{out}");
    assert!(
        out.contains(&format!(
            "capture: 9 program(s) on cgroup {}",
            vm.cgroup.path().display()
        )),
        "{out}"
    );
    assert!(out.contains("mesh table: version 2, 1 services"), "{out}");
    assert!(out.contains("captured (VIP, port) entries: 1"), "{out}");
}

#[test]
fn ssh_and_the_admin_port_are_never_captured_inbound_whatever_the_config_says() {
    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let mesh = t.write("mesh.yaml", "# inbound only\n");
    let resolv = t.write("resolv.conf", &format!("nameserver {}\n", Subnet::FAKE_NS));
    // Apps on the VM: "SSH" on 22 and a service on 8080.
    let apps = vm.http("vm-app", &["10.77.0.1:22", "10.77.0.1:8080"]);
    // Every port, nothing excluded, the admin endpoint on the VM's address.
    let ic: Interceptor = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .args(["--inbound-ports", "*", "--exclude-inbound-ports", ""])
        .admin("10.77.0.1:15020")
        .start();
    let from_pod = |port: u16, path: &str| {
        sh(&mut t.node("pod").cmd(
            "curl",
            &["-sS", "-m", "5", &format!("http://10.77.0.1:{port}{path}")],
        ))
    };
    let inbound = |service: &str| {
        ic.counter(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("destination_service", service),
            ],
        )
    };
    // 8080 is captured: our inbound relays it (the app sees the sidecar's 127.0.0.6).
    assert!(from_pod(8080, "/app").starts_with("vm-app GET /app from 127.0.0.6"));
    assert!(
        interceptor_tests::wait_for(5.0, || (inbound("10.77.0.1:8080") == 1.0).then_some(()))
            .is_some()
    );
    // SSH and the admin port are not: the app sees the pod itself, the admin answers directly,
    // and our inbound never counted them.
    assert!(from_pod(22, "/ssh").starts_with("vm-app GET /ssh from 10.77.0.2"));
    assert_eq!(from_pod(15020, "/healthz/ready").trim(), "ready");
    assert_eq!(inbound("10.77.0.1:22"), 0.0);
    assert_eq!(inbound("10.77.0.1:15020"), 0.0);
    assert!(apps.output().contains("GET /ssh from 10.77.0.2"));
}

/// The admin endpoint listens on loopback only by default (the VM's own address is refused),
/// and nothing it serves carries key material: not the PEM, not the key's bytes.
#[test]
fn the_admin_endpoint_is_loopback_only_and_never_shows_key_material() {
    use interceptor_tests::certs::{Ca, Key};
    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let mesh = t.write("mesh.yaml", PRODUCT);
    let resolv = t.write("resolv.conf", &format!("nameserver {}\n", Subnet::FAKE_NS));
    let certs = Ca::new("cluster.local root").issue(
        &t.path("certs"),
        "spiffe://cluster.local/ns/default/sa/vm",
        Key::Ecdsa,
    );
    let ic = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .certs(&certs)
        .start();
    assert!(ic.json("/status")["identity"]["spiffe"]
        .as_str()
        .is_some_and(|s| s.ends_with("/sa/vm")));
    let (ok, _, err) = try_sh(&mut vm.cmd(
        "curl",
        &["-sS", "-m", "3", "http://10.77.0.1:15020/config_dump"],
    ));
    assert!(!ok, "the admin endpoint answered on the VM's address");
    assert!(
        err.contains("refused") || err.contains("Couldn't connect"),
        "{err}"
    );

    let key = std::fs::read_to_string(certs.join("key.pem")).expect("key");
    // The key's base64 lines, each long enough to be unmistakable.
    let key_lines: Vec<&str> = key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .collect();
    assert!(!key_lines.is_empty());
    for path in [
        "/config_dump",
        "/status",
        "/stats/prometheus",
        "/explain?target=product.default.svc.cluster.local:8080",
    ] {
        let body = admin(&t, path);
        assert!(!body.is_empty(), "{path}");
        assert!(!body.contains("PRIVATE KEY"), "{path} shows a private key");
        for l in &key_lines {
            assert!(!body.contains(l), "{path} shows the key's bytes");
        }
    }
}

/// The admin endpoint is capped (128 connections) and times out a client that sends no
/// request: local clients holding connections cannot take the daemon's descriptors, and once
/// they go, scrapes are served again.
#[test]
fn idle_admin_clients_are_capped_and_the_endpoint_recovers() {
    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let mesh = t.write("mesh.yaml", PRODUCT);
    let ic = vm.interceptor().mesh(&mesh).start();
    let (held, refused) = vm.ns.run(|| {
        use std::io::Read;
        let held: Vec<std::net::TcpStream> = (0..128)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:15020").expect("connect"))
            .collect();
        // One more: accepted by the kernel, then reset by the daemon at its cap.
        let mut extra = std::net::TcpStream::connect("127.0.0.1:15020").expect("connect");
        extra
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let refused = matches!(extra.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        (held.len(), refused)
    });
    assert_eq!(held, 128);
    assert!(refused, "the 129th admin connection was not reset");
    // The held ones were dropped with the closure: the endpoint serves again.
    let n = wait_for(10.0, || {
        let n = ic.counter(
            "interceptor_limit_refused_total",
            &[("limit", "admin_connections")],
        );
        (n >= 1.0).then_some(n)
    });
    assert_eq!(n, Some(1.0), "{}", ic.log());
    assert_eq!(ic.readiness(), Some(200));
    // A client that connects and says nothing is closed by the header timeout.
    let closed = vm.ns.run(|| {
        use std::io::Read;
        let mut idle = std::net::TcpStream::connect("127.0.0.1:15020").expect("connect");
        idle.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        idle.read(&mut buf).map_err(|e| e.kind())
    });
    assert!(
        matches!(closed, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
        "{closed:?}"
    );
}
