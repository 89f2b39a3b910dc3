//! Issue 5 scenarios: a VM in network A reaches services in network B only through
//! `interceptor gateway` (SNI routing, mTLS end to end), and endpoints in both networks share
//! the load.

use std::path::PathBuf;
use std::process::Stdio;

use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::wire::{tcp_payloads, Tcpdump};
use interceptor_tests::{try_sh, wait_for, Interceptor, Net, Proc, Topology};

const TD: &str = "spiffe://cluster.local/ns/default/sa";
const ONLY_B: &str = "onlyb.default.svc.cluster.local";
const SNI_ONLY_B: &str = "outbound_.8080_._.onlyb.default.svc.cluster.local";
/// pod-b's address in network B, and the gateway's leg in network A.
const POD_B: &str = "10.88.0.2";
const GW_A: &str = "10.77.0.3";

/// `product` has an endpoint in each network; `onlyb` only in B. pod_b's service account is
/// `sa_b` as far as the VM's table says (a test can lie here to check the identity).
fn mesh(sa_b: &str) -> String {
    let entry = |name: &str, app: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{name}.default.svc.cluster.local]\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  workloadSelector: {{labels: {{app: {app}}}}}\n"
        )
    };
    let workload = |name: &str, addr: &str, app: &str, sa: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  address: {addr}\n  labels: {{app: {app}, security.istio.io/tlsMode: istio}}\n  serviceAccount: {sa}\n"
        )
    };
    [
        entry("product", "product"),
        entry("onlyb", "onlyb"),
        workload("product-a", "10.77.0.2", "product", "product-a"),
        workload("product-b", POD_B, "product", sa_b),
        workload("onlyb", POD_B, "onlyb", sa_b),
    ]
    .concat()
}

/// Networks by address; B's gateway is the gw's leg in A.
fn networks() -> String {
    format!(
        "networks:\n  network-a:\n    endpoints: [{{fromCidr: 10.77.0.0/24}}]\n  network-b:\n    endpoints: [{{fromCidr: 10.88.0.0/24}}]\n    gateways: [{{address: {GW_A}, port: 15443}}]\n"
    )
}

/// SPEC section 9's multi-network topology: vm and pod (pod-a) in A, pod-b in B, gw in both.
fn topology() -> Net {
    Topology::new()
        .network("a")
        .network("b")
        .node("vm", &["a"])
        .node("pod", &["a"])
        .node("gw", &["a", "b"])
        .node("pod-b", &["b"])
        .build()
}

struct Mesh {
    vm_certs: PathBuf,
    resolv: PathBuf,
    vm_mesh: PathBuf,
    networks: PathBuf,
    /// http-echo "pod-a" and "pod-b", each behind its own interceptor (inbound mTLS).
    _apps: Vec<Proc>,
    sidecars: Vec<Interceptor>,
    t: Net,
}

impl Mesh {
    fn new() -> Self {
        let t = topology();
        let ca = Ca::new("cluster.local root");
        let vm_certs = ca.issue(&t.path("vm-certs"), &format!("{TD}/vm"), Key::Ecdsa);
        let a_certs = ca.issue(&t.path("a-certs"), &format!("{TD}/product-a"), Key::Ecdsa);
        let b_certs = ca.issue(&t.path("b-certs"), &format!("{TD}/product-b"), Key::Rsa);
        let resolv = t.write(
            "resolv.conf",
            "nameserver 10.77.0.53\noptions timeout:2 attempts:1\n",
        );
        let pod_mesh = t.write("pod-mesh.yaml", "# pods only serve inbound\n");
        let vm_mesh = t.write("vm-mesh.yaml", &mesh("product-b"));
        let networks = t.write("networks.yaml", &networks());
        let (pod_a, pod_b) = (t.node("pod"), t.node("pod-b"));
        let apps = vec![
            pod_a.http("pod-a", &["10.77.0.2:8080"]),
            pod_b.http("pod-b", &[&format!("{POD_B}:8080")]),
        ];
        let sidecar = |node: &interceptor_tests::Node, certs: &PathBuf| {
            node.interceptor()
                .mesh(&pod_mesh)
                .resolv(&resolv)
                .certs(certs)
                .args(["--inbound-ports", "8080"])
                .start()
        };
        let sidecars = vec![sidecar(pod_a, &a_certs), sidecar(pod_b, &b_certs)];
        Self {
            vm_certs,
            resolv,
            vm_mesh,
            networks,
            _apps: apps,
            sidecars,
            t,
        }
    }

    fn vm(&self) -> Interceptor {
        self.t
            .node("vm")
            .interceptor()
            .mesh(&self.vm_mesh)
            .resolv(&self.resolv)
            .certs(&self.vm_certs)
            .arg("--mesh-networks")
            .arg(&self.networks)
            .args(["--network", "network-a"])
            .start()
    }

    /// The gateway of network B, reading the same mesh files as the VM.
    fn gateway(&self) -> Interceptor {
        self.t.node("gw").gateway(
            &self.vm_mesh,
            &self.networks,
            "network-b",
            &format!("{GW_A}:15443"),
        )
    }

    /// `n` requests by name from the VM's captured cgroup, one connection each: the output
    /// lines, one per request ("<server> GET <path> from <peer>" or a curl error).
    fn curl(&self, host: &str, path: &str, n: usize) -> Vec<String> {
        let script = format!(
            "for i in $(seq {n}); do curl -sS -m 5 http://{host}:8080{path} 2>&1 || echo FAILED; done"
        );
        let (_, out, err) = try_sh(&mut self.t.node("vm").with_resolv(&self.resolv, &script));
        assert!(err.is_empty(), "{err}");
        out.lines().map(str::to_string).collect()
    }
}

fn gateway_refused(gw: &Interceptor, reason: &str) -> f64 {
    gw.counter("interceptor_gateway_refused_total", &[("reason", reason)])
}

#[test]
fn a_service_only_in_network_b_is_reached_through_the_gateway_with_tls_only_on_its_legs() {
    let m = Mesh::new();
    let gw = m.gateway();
    let vm = m.vm();
    // The VM has no way to network B but the gateway.
    let (routed, _, err) = try_sh(&mut m.t.node("vm").cmd("ip", &["route", "get", POD_B]));
    assert!(!routed, "the vm must have no route to network B");
    assert!(err.contains("unreachable"), "{err}");

    let gw_node = m.t.node("gw");
    let dump_a = Tcpdump::start(
        &gw_node.ns,
        gw_node.iface("a"),
        "tcp",
        m.t.path("leg-a.pcap"),
    );
    let dump_b = Tcpdump::start(
        &gw_node.ns,
        gw_node.iface("b"),
        "tcp",
        m.t.path("leg-b.pcap"),
    );
    let out = m.curl(ONLY_B, "/secret-plaintext-marker", 1);
    let (pcap_a, pcap_b) = (dump_a.stop(), dump_b.stop());
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].starts_with("pod-b GET /secret-plaintext-marker from 127.0.0.6:"),
        "{out:?}\n{}",
        vm.log()
    );

    // Both legs carry the VM's own ClientHello (SNI and ALPN untouched) and never plaintext.
    for (leg, pcap, filter) in [
        ("A", &pcap_a, "dst port 15443"),
        ("B", &pcap_b, "dst port 8080"),
    ] {
        let payloads = tcp_payloads(pcap, filter);
        assert!(!payloads.is_empty(), "leg {leg}: nothing captured");
        let hello = interceptor::tls::parse_client_hello(&payloads[0])
            .unwrap_or_else(|e| panic!("leg {leg}: not a ClientHello: {e}"))
            .expect("complete in the first segment");
        assert_eq!(hello.sni.as_deref(), Some(SNI_ONLY_B), "leg {leg}");
        assert_eq!(hello.alpn, vec![b"istio".to_vec()], "leg {leg}");
        let all = tcp_payloads(pcap, "tcp").concat();
        let text = String::from_utf8_lossy(&all);
        assert!(
            !text.contains("secret-plaintext-marker") && !text.contains("HTTP/1.1"),
            "leg {leg}: plaintext on the wire"
        );
    }
    assert!(
        vm.log().contains("gateway_network=\"network-b\""),
        "{}",
        vm.log()
    );
    assert!(
        gw.log().contains(&format!("sni=\"{SNI_ONLY_B}\"")),
        "{}",
        gw.log()
    );
    // pod-b's sidecar terminated the VM's mTLS: the identity crossed the gateway intact.
    let vm_id = format!("{TD}/vm");
    assert!(
        wait_for(5.0, || (m.sidecars[1].counter(
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), ("source_principal", &vm_id)]
        ) == 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        m.sidecars[1].log()
    );
    // Its own admin endpoint counts the relayed connection; it saw neither identity.
    assert!(gw.metrics().0.contains(&format!("istio_tcp_connections_closed_total{{reporter=\"gateway\",source_principal=\"unknown\",destination_principal=\"unknown\",destination_service=\"{ONLY_B}\",connection_security_policy=\"mutual_tls\",destination_version=\"unknown\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",source_app=\"unknown\",source_version=\"unknown\",source_canonical_service=\"unknown\",source_canonical_revision=\"latest\",source_cluster=\"unknown\",destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",destination_app=\"unknown\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"latest\",destination_cluster=\"unknown\",destination_service_name=\"onlyb\",destination_service_namespace=\"default\"}} 1")), "{}", gw.metrics().0);
    // The gateway held no capability at all.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", gw.proc.pid())).expect("gateway status");
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000000000"),
        "{status}"
    );
}

#[test]
fn the_vm_checks_pod_b_identity_end_to_end_not_the_gateway() {
    let m = Mesh::new();
    let _gw = m.gateway();
    let vm = m.vm();
    assert!(m.curl(ONLY_B, "/right", 1)[0].starts_with("pod-b GET /right"));
    // The table now says onlyb runs as another service account: pod-b's real certificate no
    // longer matches, and the gateway (which has no certificate) cannot stand in for it.
    let version = vm.table_version();
    std::fs::write(&m.vm_mesh, mesh("impostor")).expect("edit mesh");
    assert!(vm.wait_table_after(version, 10.0), "{}", vm.log());
    let out = m.curl(ONLY_B, "/wrong", 1);
    assert!(!out[0].contains("pod-b GET"), "{out:?}");
    assert!(
        vm.counter(
            "interceptor_endpoint_failures_total",
            &[("reason", "server_certificate")]
        ) >= 1.0,
        "{}",
        vm.log()
    );
    let refusal = vm
        .log()
        .lines()
        .find(|l| l.contains("is not one of"))
        .map(str::to_string);
    let refusal = refusal.unwrap_or_default();
    assert!(
        refusal.contains(&format!("{TD}/product-b")) && refusal.contains(&format!("{TD}/impostor")),
        "{refusal}"
    );
}

#[test]
fn requests_spread_over_both_networks_and_fail_over_to_a_when_the_gateway_stops() {
    let m = Mesh::new();
    let gw = m.gateway();
    let _vm = m.vm();
    let out = m.curl("product.default.svc.cluster.local", "/spread", 40);
    assert_eq!(out.len(), 40, "{out:?}");
    let a = out
        .iter()
        .filter(|l| l.starts_with("pod-a GET /spread"))
        .count();
    let b = out
        .iter()
        .filter(|l| l.starts_with("pod-b GET /spread"))
        .count();
    assert_eq!(a + b, 40, "every request succeeds: {out:?}");
    // Weights 1 (pod-a) and 1 (the gateway, one endpoint behind it).
    assert!(a >= 8 && b >= 8, "spread a {a} b {b}");

    drop(gw);
    let out = m.curl("product.default.svc.cluster.local", "/failover", 20);
    assert!(
        out.iter().all(|l| l.starts_with("pod-a GET /failover")),
        "{out:?}"
    );
}

#[test]
fn the_gateway_refuses_bad_hellos_and_keeps_serving() {
    let m = Mesh::new();
    let gw = m.gateway();
    let _vm = m.vm();
    let gw_addr = format!("{GW_A}:15443");
    // A real TLS client with the VM's certificate and the right SNI: the handshake goes through
    // the gateway to pod-b's sidecar, whose certificate comes back.
    let s_client = |sni: &str, alpn: &str| {
        let mut c = m.t.node("vm").cmd(
            "openssl",
            &[
                "s_client",
                "-connect",
                &gw_addr,
                "-servername",
                sni,
                "-alpn",
                alpn,
                "-showcerts",
            ],
        );
        c.arg("-cert").arg(m.vm_certs.join("cert-chain.pem"));
        c.arg("-key").arg(m.vm_certs.join("key.pem"));
        c.stdin(Stdio::null());
        let out = c.output().expect("openssl");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let ok = s_client(SNI_ONLY_B, "istio");
    assert!(ok.contains("ALPN protocol: istio"), "{ok}");

    let no_alpn = s_client(SNI_ONLY_B, "h2");
    assert!(!no_alpn.contains("Server certificate"), "{no_alpn}");
    let unknown = s_client(
        "outbound_.8080_._.nowhere.default.svc.cluster.local",
        "istio",
    );
    assert!(!unknown.contains("Server certificate"), "{unknown}");
    let port = s_client("outbound_.9999_._.onlyb.default.svc.cluster.local", "istio");
    assert!(!port.contains("Server certificate"), "{port}");
    // A subset no DestinationRule defines: Istio's gateway has no such cluster either.
    let subset = s_client(
        "outbound_.8080_.v9_.onlyb.default.svc.cluster.local",
        "istio",
    );
    assert!(!subset.contains("Server certificate"), "{subset}");
    for garbage in [
        "GET / HTTP/1.1\\r\\n\\r\\n",
        "\\026\\003\\001\\000\\005hello",
    ] {
        let script = format!(
            "exec 3<>/dev/tcp/{GW_A}/15443; printf '{garbage}' >&3; timeout 5 cat <&3; echo closed"
        );
        let (_, out, _) = try_sh(&mut m.t.node("vm").cmd("bash", &["-c", &script]));
        assert_eq!(
            out.trim(),
            "closed",
            "the gateway answered garbage: {out:?}"
        );
    }
    for reason in [
        "no_istio_alpn",
        "unknown_host",
        "unknown_port",
        "unknown_subset",
        "not_tls",
        "malformed_hello",
    ] {
        assert!(
            wait_for(5.0, || (gateway_refused(&gw, reason) == 1.0).then_some(())).is_some(),
            "{reason}: {}",
            gw.log()
        );
    }
    assert_eq!(gw.readiness(), Some(200));
    // Still serving.
    assert!(m.curl(ONLY_B, "/after", 1)[0].starts_with("pod-b GET /after"));
}
