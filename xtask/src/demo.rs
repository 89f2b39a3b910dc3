//! `cargo xtask demo`: a VM namespace whose `curl` to a mesh service name is captured (DNS and
//! connection) and served by an endpoint in a pod namespace.

use interceptor_tests::{sh, Subnet, VmPod};

use crate::{build, setup};

const MESH: &str = r#"# The mesh as the VM sees it: one Kubernetes-style service and the pod behind it.
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
metadata: {name: product-pod-1, namespace: default}
spec:
  address: 10.77.0.2
  labels: {app: product}
"#;

pub fn run() -> anyhow::Result<()> {
    setup::ensure()?;
    let dir = build(false)?;
    std::env::set_var("INTERCEPTOR_BIN", dir.join("interceptor"));
    let t = VmPod::new();
    let mesh = t.write("mesh.yaml", MESH);
    // The VM's resolver points at a nameserver that does not exist: every answer below comes
    // from the interceptor.
    let resolv = t.write(
        "resolv.conf",
        &format!("nameserver {}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions timeout:2 attempts:1\n", Subnet::FAKE_NS),
    );
    let _pod = t.pod_http("product-pod-1", &["10.77.0.2:8080"]);
    let ic = t.start_interceptor(&mesh, &resolv, &[]);

    println!("\n== mesh table (interceptor check)");
    print!(
        "{}",
        sh(std::process::Command::new(dir.join("interceptor"))
            .args(["check", "--mesh"])
            .arg(&mesh))
    );
    for url in [
        "http://product.default.svc.cluster.local:8080/hello",
        "http://product:8080/short-name",
    ] {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec curl -sS -m 5 {url}",
            resolv.display()
        );
        println!("\n== curl {url}   (in the VM's captured cgroup)");
        print!(
            "{}",
            sh(&mut t.in_cgroup("unshare", &["-m", "sh", "-c", &script]))
        );
    }
    ic.wait_log_count("outbound connection closed", 2, 5.0);
    println!("\n== interceptor log");
    for line in ic
        .log()
        .lines()
        .filter(|l| l.contains("outbound connection") || l.contains("capture attached"))
    {
        println!("{line}");
    }
    println!("\ndemo done: namespaces, cgroup and processes are removed now");
    Ok(())
}
