//! Issue 4 scenarios: Istio-compatible mTLS between a VM and a pod, each with its own
//! interceptor; real TLS (rustls on both ends, openssl as an independent client), real apps.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::wire::{tcp_payloads, Tcpdump};
use interceptor_tests::{
    sh, try_sh, wait_for, Interceptor, Netns, Proc, Subnet, TestCgroup, Veth, VmPod,
};

const TD: &str = "spiffe://cluster.local/ns/default/sa";
const SNI: &str = "outbound_.8080_._.product.default.svc.cluster.local";

fn vm_mesh(workloads: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: product, namespace: default}}
spec:
  hosts: [product.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: product}}}}
{workloads}"#
    )
}

fn workload(name: &str, addr: &str, sa: &str, weight: u32) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  address: {addr}\n  labels: {{app: product, security.istio.io/tlsMode: istio}}\n  serviceAccount: {sa}\n  weight: {weight}\n"
    )
}

struct Mesh {
    t: VmPod,
    ca: Ca,
    vm_certs: PathBuf,
    pod_certs: PathBuf,
    resolv: PathBuf,
    pod_mesh: PathBuf,
}

impl Mesh {
    fn new() -> Self {
        let t = VmPod::new();
        let ca = Ca::new("cluster.local root");
        let vm_certs = ca.issue(&t.path("vm-certs"), &format!("{TD}/vm"), Key::Ecdsa);
        // The pod side uses RSA: both key types in every run.
        let pod_certs = ca.issue(&t.path("pod-certs"), &format!("{TD}/product"), Key::Rsa);
        let resolv = t.write(
            "resolv.conf",
            &format!(
                "nameserver {}\noptions timeout:2 attempts:1\n",
                Subnet::FAKE_NS
            ),
        );
        let pod_mesh = t.write("pod-mesh.yaml", "# the pod only serves inbound\n");
        Self {
            t,
            ca,
            vm_certs,
            pod_certs,
            resolv,
            pod_mesh,
        }
    }

    fn vm(&self, mesh: &str) -> Interceptor {
        let mesh = self.t.write("vm-mesh.yaml", mesh);
        let certs = self.vm_certs.to_str().unwrap();
        self.t
            .start_interceptor(&mesh, &self.resolv, &["--certs", certs])
    }

    fn pod(&self, ns: &Netns, certs: &Path, extra: &[&str], log: &str) -> Interceptor {
        let mut args = vec![
            "--certs",
            certs.to_str().unwrap(),
            "--inbound-ports",
            "8080,8443",
        ];
        args.extend_from_slice(extra);
        Interceptor::start(
            self.t
                .pod_interceptor_cmd(ns, &self.pod_mesh, &self.resolv, &args),
            self.t.path(log),
        )
    }

    /// curl by service name from the VM's captured cgroup (DNS and connection captured).
    fn curl(&self, path: &str) -> (bool, String) {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec curl -sS -m 5 http://product.default.svc.cluster.local:8080{path}",
            self.resolv.display()
        );
        let (ok, out, err) = try_sh(&mut self.t.in_cgroup("unshare", &["-m", "sh", "-c", &script]));
        (ok, out + &err)
    }

    /// openssl s_client from the VM namespace (not captured) straight at the pod's port.
    fn s_client(&self, certs: &Path, extra: &[&str], request: &str) -> String {
        let mut c = self.t.outside(
            "openssl",
            &[
                "s_client",
                "-connect",
                "10.77.0.2:8080",
                "-servername",
                SNI,
                "-ign_eof",
            ],
        );
        c.arg("-cert")
            .arg(certs.join("cert-chain.pem"))
            .arg("-key")
            .arg(certs.join("key.pem"));
        c.arg("-CAfile")
            .arg(certs.join("root-cert.pem"))
            .args(extra);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("openssl");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

#[test]
fn curl_by_name_reaches_the_pod_through_both_interceptors() {
    let m = Mesh::new();
    let app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&m.t.pod, &m.pod_certs, &[], "pod-ic.log");
    let vm_ic = m.vm(&vm_mesh(&workload(
        "product-pod",
        "10.77.0.2",
        "product",
        1,
    )));

    let (ok, out) = m.curl("/hello");
    assert!(ok, "{out}");
    // The app sees the sidecar's source address, not the VM's.
    assert!(out.starts_with("pod GET /hello from 127.0.0.6:"), "{out}");
    assert!(app.output().contains("GET /hello from 127.0.0.6"));
    assert!(vm_ic.wait_log_count("mtls=true", 1, 5.0), "{}", vm_ic.log());
    assert!(
        pod_ic.wait_log_count(&format!("identity=\"{TD}/vm\""), 1, 5.0),
        "{}",
        pod_ic.log()
    );
    assert!(
        pod_ic.log().contains("mode=Some(Mtls)") && pod_ic.log().contains("result=\"ok\""),
        "{}",
        pod_ic.log()
    );
}

#[test]
fn the_wire_shows_a_client_hello_with_istio_sni_and_alpn_and_no_plaintext() {
    let m = Mesh::new();
    let _app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    let _pod_ic = m.pod(&m.t.pod, &m.pod_certs, &[], "pod-ic.log");
    let _vm_ic = m.vm(&vm_mesh(&workload(
        "product-pod",
        "10.77.0.2",
        "product",
        1,
    )));
    let veth = format!("ic{:x}p", m.t.id);
    let dump = Tcpdump::start(&m.t.pod, &veth, "tcp port 8080", m.t.path("wire.pcap"));

    let (ok, out) = m.curl("/secret-plaintext-marker");
    assert!(
        ok && out.contains("pod GET /secret-plaintext-marker"),
        "{out}"
    );
    let pcap = dump.stop();

    let payloads = tcp_payloads(&pcap, "dst port 8080");
    assert!(!payloads.is_empty(), "no client payload captured");
    let hello = interceptor::tls::parse_client_hello(&payloads[0])
        .expect("a TLS ClientHello")
        .expect("complete in the first segment");
    assert_eq!(hello.sni.as_deref(), Some(SNI));
    assert_eq!(
        hello.alpn,
        vec![b"istio".to_vec()],
        "offers exactly `istio`"
    );
    let all: Vec<u8> = payloads.concat();
    let text = String::from_utf8_lossy(&all);
    assert!(
        !text.contains("secret-plaintext-marker") && !text.contains("HTTP/1.1"),
        "plaintext on the wire"
    );
}

#[test]
fn weighted_load_balancing_and_failover_between_a_pod_and_a_vm() {
    let m = Mesh::new();
    // A second endpoint: another VM, reached from the first over its own link.
    let vm2 = Netns::new(format!("ic{:x}-vm2", m.t.id));
    Veth::connect(
        &m.t.vm,
        &format!("ic{:x}w", m.t.id),
        &["10.78.0.1/24"],
        &vm2,
        &format!("ic{:x}x", m.t.id),
        &["10.78.0.2/24"],
    );
    let vm2_cgroup = TestCgroup::new(&format!("interceptor-test-{:x}-vm2", m.t.id));
    let vm2_certs =
        m.ca.issue(&m.t.path("vm2-certs"), &format!("{TD}/product"), Key::Ecdsa);
    let _pod_app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    let _pod_ic = m.pod(&m.t.pod, &m.pod_certs, &[], "pod-ic.log");
    let vm2_app = m.t.http_in(&vm2, "vm2", &["10.78.0.2:8080"]);
    let mut c = vm2.cmd(interceptor_tests::interceptor_bin().to_str().unwrap());
    c.args([
        "run",
        "--inbound-ports",
        "8080",
        "--certs",
        vm2_certs.to_str().unwrap(),
        "--mesh",
    ])
    .arg(&m.pod_mesh)
    .arg("--resolv-conf")
    .arg(&m.resolv)
    .arg("--cgroup")
    .arg(vm2_cgroup.path());
    let vm2_ic = Interceptor::start(vm2_cgroup.wrap(&c), m.t.path("vm2-ic.log"));
    let mesh = vm_mesh(
        &(workload("product-pod", "10.77.0.2", "product", 1)
            + &workload("product-vm2", "10.78.0.2", "product", 3)),
    );
    let _vm_ic = m.vm(&mesh);

    let (mut pod, mut vm) = (0, 0);
    for i in 0..40 {
        let (ok, out) = m.curl(&format!("/lb{i}"));
        assert!(ok, "request {i}: {out}");
        if out.starts_with("pod ") {
            pod += 1;
        } else if out.starts_with("vm2 ") {
            vm += 1;
        }
    }
    assert_eq!(pod + vm, 40);
    assert!(pod >= 2 && vm > pod, "weights 1:3, got pod {pod} vm2 {vm}");

    // The VM endpoint goes away entirely: every request still succeeds, through the pod.
    drop(vm2_ic);
    drop(vm2_app);
    for i in 0..10 {
        let (ok, out) = m.curl(&format!("/failover{i}"));
        assert!(
            ok && out.starts_with("pod GET /failover"),
            "request {i}: {out}"
        );
    }
    drop(vm2_cgroup);
}

#[test]
fn permissive_passes_plaintext_and_foreign_tls_strict_refuses_plaintext() {
    let m = Mesh::new();
    let _app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    // A TLS app of the pod's own (not Istio): must pass through untouched in PERMISSIVE.
    let app_certs = m.ca.issue(
        &m.t.path("app-certs"),
        "spiffe://app.example/own",
        Key::Ecdsa,
    );
    let mut tls_app = m.t.pod.cmd("openssl");
    tls_app
        .args(["s_server", "-accept", "8443", "-www", "-cert"])
        .arg(app_certs.join("cert-chain.pem"))
        .arg("-key")
        .arg(app_certs.join("key.pem"));
    let mut tls_app = Proc::spawn("tls-app", tls_app, m.t.path("tls-app.log"));
    tls_app.wait_for_output("ACCEPT", 10.0);
    let pod_ic = m.pod(&m.t.pod, &m.pod_certs, &[], "pod-ic.log");

    let out = sh(&mut m
        .t
        .outside("curl", &["-sS", "-m", "5", "http://10.77.0.2:8080/plain"]));
    assert!(
        out.starts_with("pod GET /plain from 127.0.0.6"),
        "plaintext passes through: {out}"
    );
    let out = sh(&mut m
        .t
        .outside("curl", &["-sSk", "-m", "5", "https://10.77.0.2:8443/"]));
    assert!(
        out.contains("s_server"),
        "foreign TLS reaches the app's own TLS server: {out}"
    );
    assert!(
        pod_ic.wait_log_count("mode=Some(TlsPassthrough)", 1, 5.0),
        "{}",
        pod_ic.log()
    );
    drop(pod_ic);

    let strict = m.pod(
        &m.t.pod,
        &m.pod_certs,
        &["--mtls-mode", "strict"],
        "pod-strict.log",
    );
    let (ok, out, _) = try_sh(
        &mut m
            .t
            .outside("curl", &["-sS", "-m", "5", "http://10.77.0.2:8080/plain"]),
    );
    assert!(
        !ok && !out.contains("pod GET"),
        "STRICT let plaintext through: {out}"
    );
    assert!(
        strict.wait_log_count("rejected: plaintext in STRICT mode", 1, 5.0),
        "{}",
        strict.log()
    );
    // mTLS from the VM still works in STRICT.
    let _vm_ic = m.vm(&vm_mesh(&workload(
        "product-pod",
        "10.77.0.2",
        "product",
        1,
    )));
    let (ok, out) = m.curl("/strict-mtls");
    assert!(ok && out.starts_with("pod GET /strict-mtls"), "{out}");
}

#[test]
fn openssl_client_with_istio_alpn_completes_the_handshake() {
    let m = Mesh::new();
    let _app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&m.t.pod, &m.pod_certs, &[], "pod-ic.log");
    let out = m.s_client(
        &m.vm_certs,
        &["-alpn", "istio"],
        "GET /openssl HTTP/1.0\r\n\r\n",
    );
    assert!(out.contains("ALPN protocol: istio"), "{out}");
    assert!(
        out.contains("Verify return code: 0 (ok)"),
        "the pod's chain verifies against root-cert.pem: {out}"
    );
    assert!(out.contains("pod GET /openssl from 127.0.0.6"), "{out}");
    assert!(
        pod_ic.wait_log_count(&format!("identity=\"{TD}/vm\""), 1, 5.0),
        "{}",
        pod_ic.log()
    );
}

#[test]
fn foreign_roots_disallowed_identities_and_wrong_server_identity_are_refused() {
    let m = Mesh::new();
    let _app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(
        &m.t.pod,
        &m.pod_certs,
        &["--inbound-allow", &format!("{TD}/vm")],
        "pod-ic.log",
    );

    // A client certificate from another root.
    let other =
        Ca::new("another root").issue(&m.t.path("other-certs"), &format!("{TD}/vm"), Key::Ecdsa);
    let out = m.s_client(&other, &["-alpn", "istio"], "GET /foreign HTTP/1.0\r\n\r\n");
    assert!(!out.contains("pod GET /foreign"), "{out}");
    assert!(
        pod_ic.wait_log_count("handshake failed", 1, 5.0),
        "{}",
        pod_ic.log()
    );

    // Right root, identity not on the allow-list.
    let intruder = m.ca.issue(
        &m.t.path("intruder-certs"),
        &format!("{TD}/intruder"),
        Key::Ecdsa,
    );
    let out = m.s_client(
        &intruder,
        &["-alpn", "istio"],
        "GET /intruder HTTP/1.0\r\n\r\n",
    );
    assert!(!out.contains("pod GET /intruder"), "{out}");
    assert!(
        pod_ic.wait_log_count("denied: identity not allowed", 1, 5.0),
        "{}",
        pod_ic.log()
    );

    // The allowed identity gets through.
    let out = m.s_client(
        &m.vm_certs,
        &["-alpn", "istio"],
        "GET /allowed HTTP/1.0\r\n\r\n",
    );
    assert!(out.contains("pod GET /allowed"), "{out}");

    // Outbound: the pod answers as sa/product, the table says the workload runs as sa/billing.
    let vm_ic = m.vm(&vm_mesh(&workload(
        "product-pod",
        "10.77.0.2",
        "billing",
        1,
    )));
    let (ok, out) = m.curl("/wrong-identity");
    assert!(!ok && !out.contains("pod GET"), "{out}");
    assert!(
        vm_ic.wait_log_count("is not one of", 1, 5.0),
        "{}",
        vm_ic.log()
    );
    assert!(
        vm_ic.log().contains(&format!("{TD}/billing")),
        "{}",
        vm_ic.log()
    );
}

/// The first certificate the server presents, as PEM.
fn presented_cert(s_client_output: &str) -> String {
    let start = s_client_output
        .find("-----BEGIN CERTIFICATE-----")
        .expect("certificate in output");
    let end = s_client_output[start..]
        .find("-----END CERTIFICATE-----")
        .expect("end")
        + start
        + 25;
    s_client_output[start..end].to_string()
}

#[test]
fn rotated_certificates_are_used_by_new_connections() {
    let m = Mesh::new();
    let _app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&m.t.pod, &m.pod_certs, &[], "pod-ic.log");
    let before = presented_cert(&m.s_client(
        &m.vm_certs,
        &["-alpn", "istio", "-showcerts"],
        "GET /a HTTP/1.0\r\n\r\n",
    ));
    let on_disk = std::fs::read_to_string(m.pod_certs.join("cert-chain.pem")).unwrap();
    assert_eq!(before.trim(), on_disk.trim());

    m.ca.issue(&m.pod_certs, &format!("{TD}/product"), Key::Ecdsa);
    assert!(
        pod_ic.wait_log_count("identity reloaded", 1, 10.0),
        "{}",
        pod_ic.log()
    );
    let rotated = std::fs::read_to_string(m.pod_certs.join("cert-chain.pem")).unwrap();
    let after = wait_for(5.0, || {
        let out = m.s_client(
            &m.vm_certs,
            &["-alpn", "istio", "-showcerts"],
            "GET /b HTTP/1.0\r\n\r\n",
        );
        let cert = presented_cert(&out);
        (cert.trim() == rotated.trim()).then_some(out)
    });
    let after = after.expect("new connections present the rotated certificate");
    assert!(after.contains("pod GET /b"), "{after}");
}

#[test]
fn resumed_sessions_keep_the_client_identity_and_the_allow_list() {
    let m = Mesh::new();
    let app = m.t.pod_http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(
        &m.t.pod,
        &m.pod_certs,
        &[
            "--inbound-allow",
            &format!("8080={TD}/vm"),
            "--inbound-allow",
            &format!("8443={TD}/someone-else"),
        ],
        "pod-ic.log",
    );
    let _vm_ic = m.vm(&vm_mesh(&workload(
        "product-pod",
        "10.77.0.2",
        "product",
        1,
    )));
    for i in 0..4 {
        let (ok, out) = m.curl(&format!("/again{i}"));
        assert!(
            ok && out.starts_with(&format!("pod GET /again{i}")),
            "{out}"
        );
    }
    // The first connection makes a session, later ones resume it (no certificates sent), and
    // every one still carries the VM's verified identity.
    assert!(
        pod_ic.wait_log_count("result=\"ok\"", 4, 5.0),
        "{}",
        pod_ic.log()
    );
    let log = pod_ic.log();
    assert!(
        log.contains("mode=Some(Mtls)") && log.contains("mode=Some(MtlsResumed)"),
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("identity=\"{TD}/vm\"")).count(),
        4,
        "{log}"
    );
    assert_eq!(app.output().matches("GET /again").count(), 4);

    // A session made on a port the VM may use, resumed on a port it may not: still refused.
    let session = m.t.path("session.pem");
    let s_client = |port: &str, sess: &str| {
        let mut c = m.t.outside(
            "openssl",
            &[
                "s_client",
                "-connect",
                &format!("10.77.0.2:{port}"),
                "-servername",
                SNI,
                "-alpn",
                "istio",
                "-ign_eof",
            ],
        );
        c.arg(sess).arg(&session);
        c.arg("-cert").arg(m.vm_certs.join("cert-chain.pem"));
        c.arg("-key").arg(m.vm_certs.join("key.pem"));
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("openssl");
        use std::io::Write;
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET /session HTTP/1.0\r\n\r\n");
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let first = s_client("8080", "-sess_out");
    assert!(first.contains("pod GET /session"), "{first}");
    let resumed = s_client("8443", "-sess_in");
    assert!(
        resumed.contains("Reused, TLSv1.3"),
        "the session was not resumed: {resumed}"
    );
    assert!(!resumed.contains("pod GET"), "{resumed}");
    assert!(
        pod_ic.wait_log_count("denied: identity not allowed", 1, 5.0),
        "{}",
        pod_ic.log()
    );
    assert!(
        pod_ic.log().contains("service=10.77.0.2:8443"),
        "{}",
        pod_ic.log()
    );
}
