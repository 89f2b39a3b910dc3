//! `cargo xtask demo`: the product end to end on this machine, in test namespaces. A VM whose
//! `curl` to mesh service names is captured (DNS and connection) and carried over Istio mTLS:
//! to a pod in the VM's network directly, and to a pod in another network through
//! `interceptor gateway`. Then what an operator sees: `explain`, `status`, metrics.

use std::path::Path;
use std::process::Command;

use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::{sh, Interceptor, MultiNet, Proc, Subnet};

use crate::{build, setup};

const TD: &str = "spiffe://cluster.local/ns/default/sa";

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
        pod("product-pod-a", "product", Subnet::POD4),
        pod("reviews-pod-b", "reviews", MultiNet::POD_B),
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
    let t = MultiNet::new();
    let b = &t.base;
    let ca = Ca::new("cluster.local root");
    let vm_certs = ca.issue(&b.path("vm-certs"), &format!("{TD}/vm"), Key::Ecdsa);
    let a_certs = ca.issue(&b.path("a-certs"), &format!("{TD}/product"), Key::Ecdsa);
    let b_certs = ca.issue(&b.path("b-certs"), &format!("{TD}/reviews"), Key::Ecdsa);
    let mesh = b.write("mesh.yaml", &mesh());
    let networks = b.write(
        "networks.yaml",
        &format!(
            "networks:\n  network-a:\n    endpoints: [{{fromCidr: 10.77.0.0/24}}]\n  network-b:\n    endpoints: [{{fromCidr: 10.88.0.0/24}}]\n    gateways: [{{address: {}, port: 15443}}]\n",
            MultiNet::GW_A
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
        b.pod_http("product-pod-a", &["10.77.0.2:8080"]),
        b.http_in(
            &t.pod_b,
            "reviews-pod-b",
            &[&format!("{}:8080", MultiNet::POD_B)],
        ),
    ];
    let sidecar = |certs: &Path| {
        let c = certs.to_str().unwrap_or_default().to_string();
        vec![
            "--certs".to_string(),
            c,
            "--inbound-ports".into(),
            "8080".into(),
        ]
    };
    let (a_args, b_args) = (sidecar(&a_certs), sidecar(&b_certs));
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let sidecars = [
        Interceptor::start(
            b.pod_interceptor_cmd(&b.pod, &inbound_only, &resolv, &a_args),
            b.path("pod-a-sidecar.log"),
        ),
        Interceptor::start(
            t.pod_b_interceptor_cmd(&inbound_only, &resolv, &b_args),
            b.path("pod-b-sidecar.log"),
        ),
    ];
    let mut gw = Proc::spawn(
        "gateway",
        t.gateway_cmd(&mesh, &networks, "network-b"),
        b.path("gateway.log"),
    );
    gw.wait_for_output("gateway ready", 20.0);
    let vm_args = [
        "--certs",
        vm_certs.to_str().unwrap_or_default(),
        "--mesh-networks",
        networks.to_str().unwrap_or_default(),
        "--network",
        "network-a",
    ];
    let ic = b.start_interceptor(&mesh, &resolv, &vm_args);

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
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec curl -sS -m 5 {url}",
            resolv.display()
        );
        show(
            &format!(
                "curl {url}   (in the VM's captured cgroup; the app sees its sidecar, 127.0.0.6)"
            ),
            &sh(&mut b.in_cgroup("unshare", &["-m", "sh", "-c", &script])),
        );
    }
    ic.wait_log_count("outbound connection closed", 3, 5.0);
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
        &pick(&gw.output(), &["gateway connection "]),
    );
    show(
        "pod-b sidecar log (the VM's identity arrived intact)",
        &pick(&sidecars[1].log(), &["inbound connection"]),
    );
    let cli = |args: &[&str]| {
        let mut c = b.vm.cmd(bin.to_str().unwrap_or_default());
        c.args(args);
        sh(&mut c)
    };
    show(
        "interceptor explain reviews:8080",
        &cli(&["explain", "reviews:8080"]),
    );
    show("interceptor status", &cli(&["status"]));
    let metrics = sh(&mut b.outside("curl", &["-sS", "http://127.0.0.1:15020/stats/prometheus"]));
    show(
        "curl 127.0.0.1:15020/stats/prometheus | grep istio_tcp_connections_opened",
        &pick(&metrics, &["istio_tcp_connections_opened_total{"]),
    );
    println!("\ndemo done: namespaces, cgroups and processes are removed now");
    Ok(())
}
