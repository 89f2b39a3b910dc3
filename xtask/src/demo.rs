//! `cargo xtask demo`: the product end to end on this machine, in test namespaces. A VM whose
//! `curl` to mesh service names is captured (DNS and connection) and carried over Istio mTLS:
//! to a pod in the VM's network directly, and to a pod in another network through
//! `interceptor gateway`. Then what an operator sees: `explain`, `status`, metrics.

use std::path::Path;
use std::process::Command;

use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::{sh, Subnet, Topology};

use crate::{build, setup};

const TD: &str = "spiffe://cluster.local/ns/default/sa";
/// pod-b in network B, and the gateway's leg in network A.
const POD_B: &str = "10.88.0.2";
const GW_A: &str = "10.77.0.3";

/// The mesh as the VM (and the gateway) see it: `product` has a pod in the VM's network,
/// `reviews` only one in network B. Both pods run a sidecar (tlsMode istio).
fn mesh() -> String {
    let service = |name: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{name}.default.svc.cluster.local]\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  workloadSelector: {{labels: {{app: {name}}}}}\n"
        )
    };
    let pod = |name: &str, app: &str, addr: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  address: {addr}\n  labels: {{app: {app}, security.istio.io/tlsMode: istio}}\n  serviceAccount: {app}\n"
        )
    };
    [
        "# The mesh as the VM sees it.\n".to_string(),
        service("product"),
        service("reviews"),
        pod("product-pod-a", "product", "10.77.0.2"),
        pod("reviews-pod-b", "reviews", POD_B),
    ]
    .concat()
}

fn show(title: &str, text: &str) {
    println!("\n== {title}");
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
}

pub fn run() -> anyhow::Result<()> {
    setup::ensure()?;
    let dir = build(false)?;
    let bin = dir.join("interceptor");
    std::env::set_var("INTERCEPTOR_BIN", &bin);
    let b = Topology::new()
        .network("a")
        .network("b")
        .node("vm", &["a"])
        .node("pod", &["a"])
        .node("gw", &["a", "b"])
        .node("pod-b", &["b"])
        .build();
    let vm = b.node("vm");
    let ca = Ca::new("cluster.local root");
    let vm_certs = ca.issue(&b.path("vm-certs"), &format!("{TD}/vm"), Key::Ecdsa);
    let a_certs = ca.issue(&b.path("a-certs"), &format!("{TD}/product"), Key::Ecdsa);
    let b_certs = ca.issue(&b.path("b-certs"), &format!("{TD}/reviews"), Key::Ecdsa);
    let mesh = b.write("mesh.yaml", &mesh());
    let networks = b.write(
        "networks.yaml",
        &format!(
            "networks:\n  network-a:\n    endpoints: [{{fromCidr: 10.77.0.0/24}}]\n  network-b:\n    endpoints: [{{fromCidr: 10.88.0.0/24}}]\n    gateways: [{{address: {GW_A}, port: 15443}}]\n"
        ),
    );
    // The VM's resolver points at a nameserver that does not exist: every answer below comes
    // from the interceptor.
    let resolv = b.write(
        "resolv.conf",
        &format!("nameserver {}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions timeout:2 attempts:1\n", Subnet::FAKE_NS),
    );
    let inbound_only = b.write("pod-mesh.yaml", "# pods only serve inbound\n");

    // The pods: an app behind a sidecar (interceptor with inbound mTLS) each.
    let _apps = [
        b.node("pod").http("product-pod-a", &["10.77.0.2:8080"]),
        b.node("pod-b")
            .http("reviews-pod-b", &[&format!("{POD_B}:8080")]),
    ];
    let sidecar = |node: &str, certs: &Path| {
        b.node(node)
            .interceptor()
            .mesh(&inbound_only)
            .resolv(&resolv)
            .certs(certs)
            .args(["--inbound-ports", "8080"])
            .log(&format!("{node}-sidecar"))
            .start()
    };
    let sidecars = [sidecar("pod", &a_certs), sidecar("pod-b", &b_certs)];
    let gw = b
        .node("gw")
        .gateway(&mesh, &networks, "network-b", &format!("{GW_A}:15443"));
    let ic = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .certs(&vm_certs)
        .arg("--mesh-networks")
        .arg(&networks)
        .args(["--network", "network-a"])
        .start();

    show(
        "mesh table (interceptor check)",
        &sh(Command::new(&bin)
            .args(["check", "--mesh"])
            .arg(&mesh)
            .arg("--mesh-networks")
            .arg(&networks)),
    );
    for url in [
        "http://product.default.svc.cluster.local:8080/hello",
        "http://product:8080/short-name",
        "http://reviews:8080/across-networks",
    ] {
        show(
            &format!(
                "curl {url}   (in the VM's captured cgroup; the app sees its sidecar, 127.0.0.6)"
            ),
            &sh(&mut vm.with_resolv(&resolv, &format!("exec curl -sS -m 5 {url}"))),
        );
    }
    ic.wait_counter(
        "istio_tcp_connections_closed_total",
        &[("reporter", "source")],
        3.0,
        5.0,
    );
    let pick = |log: &str, needles: &[&str]| -> String {
        log.lines()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    show(
        "VM interceptor log",
        &pick(&ic.log(), &["capture attached", "outbound connection "]),
    );
    show(
        "gateway log (routes by SNI, never decrypts)",
        &pick(&gw.log(), &["gateway connection "]),
    );
    show(
        "pod-b sidecar log (the VM's identity arrived intact)",
        &pick(&sidecars[1].log(), &["inbound connection"]),
    );
    let cli = |args: &[&str]| {
        let mut c = vm.ns.cmd(bin.to_str().unwrap_or_default());
        c.args(args);
        sh(&mut c)
    };
    show(
        "interceptor explain reviews:8080",
        &cli(&["explain", "reviews:8080"]),
    );
    show("interceptor status", &cli(&["status"]));
    show(
        "curl 127.0.0.1:15020/stats/prometheus | grep istio_tcp_connections_opened",
        &pick(&ic.metrics().0, &["istio_tcp_connections_opened_total{"]),
    );
    println!("\ndemo done: namespaces, cgroups and processes are removed now");
    Ok(())
}
