//! Issue 22: a DestinationRule's SIMPLE and MUTUAL TLS originate TLS to a service outside the
//! mesh. The application speaks plaintext to a ServiceEntry's VIP; the interceptor leaves
//! encrypted to a real `openssl s_server` that requires the SNI `api.example.com` (a fatal
//! alert otherwise) and, on a second port, a client certificate. The rule comes from the mesh
//! files, and from the test control plane as istiod renders it (file-SDS secret names).

use std::path::{Path, PathBuf};

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh, Service};
use interceptor_tests::{sh, wait_for, Interceptor, Net, Proc, Topology};

const TOKEN: &str = "vm-bootstrap-token";
const API: &str = "api.example.com";
const SECURE: &str = "secure.example.com";
const API_VIP: &str = "240.240.9.9";
const SECURE_VIP: &str = "240.240.9.10";
const EXT: &str = "10.77.0.30";

/// The two ServiceEntries: `api` on 9443 (server auth only), `secure` on 9444 (client
/// certificates required); both answered by the same host.
fn entries() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: egress}}
spec:
  hosts: [{API}]
  addresses: [{API_VIP}]
  ports: [{{number: 9443, name: tcp-api, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {EXT}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: egress}}
spec:
  hosts: [{SECURE}]
  addresses: [{SECURE_VIP}]
  ports: [{{number: 9444, name: tcp-secure, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {EXT}}}]
"
    )
}

fn rules(api_tls: &str, secure_tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: egress}}
spec:
  host: {API}
  trafficPolicy: {{tls: {api_tls}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: egress}}
spec:
  host: {SECURE}
  trafficPolicy: {{tls: {secure_tls}}}
"
    )
}

fn cp_mesh(api_tls: &str, secure_tls: &str) -> Mesh {
    let mut services = Vec::new();
    for (host, vip, port) in [(API, API_VIP, 9443), (SECURE, SECURE_VIP, 9444)] {
        let mut s = Service::new(host, vip, port);
        s.namespace = "egress".into();
        let mut e = Endpoint::new(EXT, port);
        e.mtls = false;
        s.endpoints.push(e);
        services.push(s);
    }
    Mesh {
        services,
        traffic: rules(api_tls, secure_tls),
        ..Default::default()
    }
}

struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    client: (PathBuf, PathBuf),
}

struct World {
    t: Net,
    pki: Pki,
    _servers: Vec<Proc>,
}

impl World {
    fn new() -> Self {
        let t = Topology::new()
            .network("a")
            .node("vm", &["a"])
            .node("ext", &["a"])
            .address("a", EXT)
            .node("istiod", &["a"])
            .build();
        let dir = t.path("pki");
        let (ca, other, client_ca) = (
            Ca::new("external root"),
            Ca::new("another root"),
            Ca::new("client root"),
        );
        let pem = |name: &str, ca: &Ca| {
            let p = dir.join(name);
            std::fs::create_dir_all(&dir).expect("pki dir");
            std::fs::write(&p, ca.pem()).expect("CA file");
            p
        };
        let pki = Pki {
            ca: pem("ca.pem", &ca),
            other_ca: pem("other-ca.pem", &other),
            client: client_ca.write_leaf(&dir, "client", "vm-client", true),
        };
        let client_ca_file = pem("client-ca.pem", &client_ca);
        let api = ca.write_leaf(&dir, "api", API, false);
        let fallback = ca.write_leaf(&dir, "fallback", "fallback.invalid", false);
        let ext = t.node("ext");
        let server = |name: &str, port: u16, extra: &[&str]| {
            let accept = format!("{EXT}:{port}");
            let mut args = vec![
                "s_server",
                "-accept",
                &accept,
                "-www",
                "-cert",
                path(&fallback.0),
                "-key",
                path(&fallback.1),
                "-servername",
                API,
                "-servername_fatal",
                "-cert2",
                path(&api.0),
                "-key2",
                path(&api.1),
            ];
            args.extend_from_slice(extra);
            let mut p = Proc::spawn(
                name,
                ext.cmd("openssl", &args),
                t.path(&format!("{name}.log")),
            );
            p.wait_for_output("ACCEPT", 10.0);
            p
        };
        let servers = vec![
            server("api", 9443, &[]),
            server(
                "secure",
                9444,
                &["-Verify", "1", "-CAfile", path(&client_ca_file)],
            ),
        ];
        Self {
            t,
            pki,
            _servers: servers,
        }
    }

    /// A plaintext `GET /` from the VM's application to `vip:port`: the server's status page,
    /// or "- failed".
    fn get(&self, vip: &str, port: u16) -> String {
        let script = format!("curl -s -m 5 http://{vip}:{port}/ || echo '- failed'");
        sh(&mut self.t.node("vm").in_cgroup("bash", &["-c", &script]))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// What explain says of a service's cluster TLS.
fn tls_of(ic: &Interceptor, vip: &str, port: u16) -> String {
    let v = ic.json(&format!("/explain?target={vip}:{port}"));
    v["connections"][0]["clusters"][0]["policy"]["tls"].to_string()
}

enum Source {
    Files(PathBuf),
    Istiod(Box<ControlPlane>),
}

impl Source {
    fn start(w: &World, files: bool, api: &str, secure: &str) -> (Source, Interceptor) {
        let node = w.t.node("vm");
        if files {
            let mesh = w.t.write(
                "mesh.yaml",
                &format!("{}---\n{}", entries(), rules(api, secure)),
            );
            let ic = node.interceptor().mesh(&mesh).start();
            return (Source::Files(mesh), ic);
        }
        let ca = Ca::new("mesh root");
        let ip = w.t.node("istiod").ip("a").to_string();
        let cp = ControlPlane::start(
            &w.t.node("istiod").ns.handle(),
            format!("{ip}:15012").parse().expect("address"),
            &ca,
            TOKEN,
            cp_mesh(api, secure),
        );
        let spec = Spec::new("vm-ns", "vm-sa", &ip, &ca.pem());
        let bundle = write_bundle(&w.t.path("vm-root"), &spec);
        ca.issue(&bundle.join("etc/certs"), &spec.identity(), Key::Ecdsa);
        let ic = node
            .interceptor()
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&bundle)
            .start();
        (Source::Istiod(Box::new(cp)), ic)
    }

    /// Puts the rules in force; returns once explain shows `expect` in api's TLS and
    /// `expect_secure` in secure's.
    fn apply(
        &self,
        ic: &Interceptor,
        (api, expect): (&str, &str),
        (secure, expect_secure): (&str, &str),
    ) {
        match self {
            Source::Files(p) => {
                std::fs::write(p, format!("{}---\n{}", entries(), rules(api, secure)))
                    .expect("mesh file")
            }
            Source::Istiod(cp) => cp.update(|m| *m = cp_mesh(api, secure)),
        }
        let seen = wait_for(20.0, || {
            (tls_of(ic, API_VIP, 9443).contains(expect)
                && tls_of(ic, SECURE_VIP, 9444).contains(expect_secure))
            .then_some(())
        });
        assert!(
            seen.is_some(),
            "{api} / {secure} never in force: {} / {}",
            tls_of(ic, API_VIP, 9443),
            tls_of(ic, SECURE_VIP, 9444)
        );
    }
}

fn simple(ca: &Path, extra: &str) -> String {
    format!("{{mode: SIMPLE, caCertificates: {}{extra}}}", path(ca))
}

fn originates(files: bool) {
    let w = World::new();
    let who = if files { "files" } else { "istiod" };
    let p = &w.pki;
    let mutual = format!(
        "{{mode: MUTUAL, sni: {API}, caCertificates: {}, clientCertificate: {}, privateKey: {}}}",
        path(&p.ca),
        path(&p.client.0),
        path(&p.client.1)
    );
    let (source, ic) = Source::start(&w, files, &simple(&p.ca, ""), &mutual);
    let shown = wait_for(20.0, || {
        let t = tls_of(&ic, API_VIP, 9443);
        t.contains("SIMPLE").then_some(t)
    });
    assert!(
        shown.is_some(),
        "{who}: no SIMPLE rule in force: {}",
        ic.log()
    );

    // SIMPLE: the app's plaintext leaves as TLS with SNI api.example.com (s_server would send
    // a fatal alert otherwise), the server checked against the rule's CA and the SNI name.
    let page = w.get(API_VIP, 9443);
    assert!(
        page.contains("no client certificate available"),
        "{who}: SIMPLE through {API_VIP}:9443 did not reach s_server over TLS: {page}\n{}",
        ic.log()
    );
    // MUTUAL: our client certificate from the rule's files is what the server saw.
    let page = w.get(SECURE_VIP, 9444);
    assert!(
        page.contains("Client certificate") && page.contains("vm-client"),
        "{who}: MUTUAL did not present the rule's client certificate: {page}"
    );

    // A CA that did not sign the server: refused before a byte of the app's is sent.
    let failures = |ic: &Interceptor| {
        ic.counter(
            "interceptor_endpoint_failures_total",
            &[("reason", "server_certificate")],
        )
    };
    let before = failures(&ic);
    source.apply(
        &ic,
        (&simple(&p.other_ca, ""), "other-ca.pem"),
        (&mutual, "MUTUAL"),
    );
    let page = w.get(API_VIP, 9443);
    assert!(
        page.contains("- failed"),
        "{who}: a server the CA did not sign was accepted: {page}"
    );
    assert!(
        failures(&ic) > before,
        "{who}: the refused certificate is not counted"
    );

    // subjectAltNames the server's certificate does not carry: refused too.
    let before = failures(&ic);
    source.apply(
        &ic,
        (
            &simple(&p.ca, ", subjectAltNames: [billing.example.com]"),
            "billing.example.com",
        ),
        (&mutual, "MUTUAL"),
    );
    let page = w.get(API_VIP, 9443);
    assert!(
        page.contains("- failed"),
        "{who}: a wrong SAN was accepted: {page}"
    );
    assert!(
        failures(&ic) > before,
        "{who}: the wrong SAN is not counted"
    );

    // ...and the right one accepted.
    let api_san = format!("\"subject_alt_names\":[\"{API}\"]");
    source.apply(
        &ic,
        (
            &simple(&p.ca, &format!(", subjectAltNames: [{API}]")),
            &api_san,
        ),
        (&mutual, "MUTUAL"),
    );
    let page = w.get(API_VIP, 9443);
    assert!(
        page.contains("no client certificate available"),
        "{who}: the right SAN was refused: {page}"
    );

    // Another SNI, with our check of the server off: the server itself refuses (it names only
    // api.example.com), so the SNI on the wire is the rule's.
    source.apply(
        &ic,
        (
            &simple(&p.ca, ", sni: other.example.com, insecureSkipVerify: true"),
            "other.example.com",
        ),
        (&mutual, "MUTUAL"),
    );
    let page = w.get(API_VIP, 9443);
    assert!(
        page.contains("- failed"),
        "{who}: s_server accepted another SNI: {page}"
    );

    // MUTUAL's port without the client certificate (SIMPLE there): the server refuses.
    source.apply(
        &ic,
        (&simple(&p.ca, ""), "SIMPLE"),
        (&simple(&p.ca, &format!(", sni: {API}")), "SIMPLE"),
    );
    let refused = wait_for(10.0, || {
        w.get(SECURE_VIP, 9444).contains("- failed").then_some(())
    });
    assert!(
        refused.is_some(),
        "{who}: s_server -Verify 1 accepted a client without a certificate"
    );

    // DISABLE: plaintext to a TLS server, which answers with a TLS alert, never the page.
    source.apply(&ic, ("{mode: DISABLE}", "DISABLE"), (&mutual, "MUTUAL"));
    let page = w.get(API_VIP, 9443);
    assert!(
        !page.contains("client certificate"),
        "{who}: DISABLE still originated TLS: {page}"
    );
    eprintln!("{who}: SIMPLE, MUTUAL, wrong CA, wrong SAN, wrong SNI, no client cert, DISABLE as Istio means");
}

#[test]
fn tls_origination_simple_and_mutual_from_the_mesh_files() {
    originates(true);
}

#[test]
fn tls_origination_simple_and_mutual_from_istiod() {
    originates(false);
}
