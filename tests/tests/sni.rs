//! Issue 22: VirtualService `tls` routes. On a TLS port the application's own TLS passes
//! through untouched and its ClientHello's SNI picks the route (`sniHosts`, exact before
//! wildcard, as Envoy's server_names); an SNI no rule names is refused. Real `openssl s_client`
//! in the VM, real `openssl s_server` backends that say who they are by their certificate; the
//! rules from the mesh files and, as istiod renders them, from the test control plane's SNI
//! filter chains.

use std::process::Stdio;

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh, Service};
use interceptor_tests::{wait_for, Interceptor, Net, Proc, Topology};

const TOKEN: &str = "vm-bootstrap-token";
const FRONT: &str = "front.example.com";
const VIP: &str = "240.240.9.20";
const V1: &str = "10.77.0.20";
const V2: &str = "10.77.0.21";

/// v2.front.example.com goes to v2; every other name under front.example.com (and the name
/// itself) to v1.
fn intent() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: front, namespace: web}}
spec:
  host: {FRONT}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front, namespace: web}}
spec:
  hosts: [{FRONT}, '*.{FRONT}']
  tls:
  - match: [{{sniHosts: ['*.{FRONT}', {FRONT}]}}]
    route: [{{destination: {{host: {FRONT}, subset: v1}}}}]
  - match: [{{sniHosts: [v2.{FRONT}]}}]
    route: [{{destination: {{host: {FRONT}, subset: v2}}}}]
"
    )
}

fn entry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: front, namespace: web}}
spec:
  hosts: [{FRONT}]
  addresses: [{VIP}]
  ports: [{{number: 8443, name: tls-front, protocol: TLS}}]
  resolution: STATIC
  endpoints:
  - {{address: {V1}, labels: {{version: v1}}}}
  - {{address: {V2}, labels: {{version: v2}}}}
"
    )
}

fn cp_mesh() -> Mesh {
    let mut s = Service::new(FRONT, VIP, 8443);
    s.namespace = "web".into();
    s.tls_ports = vec![8443];
    for (ip, version) in [(V1, "v1"), (V2, "v2")] {
        let mut e = Endpoint::new(ip, 8443);
        e.mtls = false;
        e.labels.insert("version".into(), version.into());
        s.endpoints.push(e);
    }
    Mesh {
        services: vec![s],
        traffic: intent(),
        ..Default::default()
    }
}

struct World {
    t: Net,
    _backends: Vec<Proc>,
}

impl World {
    fn new() -> Self {
        let t = Topology::new()
            .network("a")
            .node("vm", &["a"])
            .node("pod", &["a"])
            .address("a", V1)
            .address("a", V2)
            .node("istiod", &["a"])
            .build();
        let ca = Ca::new("backends");
        let dir = t.path("pki");
        let pod = t.node("pod");
        let backends = [("v1", V1), ("v2", V2)]
            .into_iter()
            .map(|(name, ip)| {
                let (cert, key) = ca.write_leaf(&dir, name, &format!("{name}-server"), false);
                let accept = format!("{ip}:8443");
                let args = [
                    "s_server",
                    "-accept",
                    &accept,
                    "-www",
                    "-cert",
                    cert.to_str().expect("utf-8"),
                    "-key",
                    key.to_str().expect("utf-8"),
                ];
                let mut p = Proc::spawn(
                    name,
                    pod.cmd("openssl", &args),
                    t.path(&format!("{name}.log")),
                );
                p.wait_for_output("ACCEPT", 10.0);
                p
            })
            .collect();
        Self {
            t,
            _backends: backends,
        }
    }

    /// The application's own TLS to the VIP with `sni` (None: no SNI): which backend's
    /// certificate answered, or "-" when the connection was refused.
    fn answered_by(&self, sni: Option<&str>) -> String {
        let connect = format!("{VIP}:8443");
        let mut args = vec!["s_client", "-connect", &connect];
        match sni {
            Some(s) => args.extend(["-servername", s]),
            None => args.push("-noservername"),
        }
        let out = self
            .t
            .node("vm")
            .in_cgroup("openssl", &args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client");
        let text = String::from_utf8_lossy(&out.stdout);
        ["v1-server", "v2-server"]
            .into_iter()
            .find(|n| text.contains(n))
            .unwrap_or("-")
            .to_string()
    }
}

fn start(w: &World, files: bool) -> (Interceptor, Option<ControlPlane>) {
    let node = w.t.node("vm");
    if files {
        let mesh =
            w.t.write("mesh.yaml", &format!("{}---\n{}", entry(), intent()));
        return (node.interceptor().mesh(&mesh).start(), None);
    }
    let ca = Ca::new("mesh root");
    let ip = w.t.node("istiod").ip("a").to_string();
    let cp = ControlPlane::start(
        &w.t.node("istiod").ns.handle(),
        format!("{ip}:15012").parse().expect("address"),
        &ca,
        TOKEN,
        cp_mesh(),
    );
    let spec = Spec::new("vm-ns", "vm-sa", &ip, &ca.pem());
    let bundle = write_bundle(&w.t.path("vm-root"), &spec);
    ca.issue(&bundle.join("etc/certs"), &spec.identity(), Key::Ecdsa);
    let ic = node
        .interceptor()
        .args(["--control-plane", "istiod", "--istio-dir"])
        .arg(&bundle)
        .start();
    (ic, Some(cp))
}

fn routes_by_sni(files: bool) {
    let w = World::new();
    let who = if files { "files" } else { "istiod" };
    let (ic, _cp) = start(&w, files);
    // In force once explain routes v2's SNI to the v2 subset.
    let route = |sni: &str| {
        ic.json(&format!("/explain?target={VIP}:8443&sni={sni}"))["connections"][0]["clusters"]
            .to_string()
    };
    let ready = wait_for(20.0, || {
        route(&format!("v2.{FRONT}"))
            .contains(&format!("outbound|8443|v2|{FRONT}"))
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "{who}: the tls routes never in force: {}\n{}",
        route(&format!("v2.{FRONT}")),
        ic.log()
    );

    assert_eq!(
        w.answered_by(Some(&format!("v2.{FRONT}"))),
        "v2-server",
        "{who}: exact SNI"
    );
    assert_eq!(
        w.answered_by(Some(&format!("shop.{FRONT}"))),
        "v1-server",
        "{who}: wildcard SNI"
    );
    assert_eq!(
        w.answered_by(Some(FRONT)),
        "v1-server",
        "{who}: the host itself"
    );
    // Envoy has no filter chain for these: the connection is closed, never sent somewhere.
    assert_eq!(
        w.answered_by(Some("other.example.org")),
        "-",
        "{who}: an SNI no rule names"
    );
    assert_eq!(w.answered_by(None), "-", "{who}: no SNI at all");
    assert!(
        ic.counter(
            "interceptor_outbound_refused_total",
            &[("reason", "black_hole")]
        ) >= 2.0,
        "{who}: the refusals are not counted"
    );
    eprintln!("{who}: v2 by exact SNI, v1 by wildcard and by the host, others refused");
}

#[test]
fn tls_routes_by_sni_from_the_mesh_files() {
    routes_by_sni(true);
}

#[test]
fn tls_routes_by_sni_from_istiod() {
    routes_by_sni(false);
}
