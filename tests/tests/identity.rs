//! Issue 12: the VM's identity from the Istio CA. The test control plane's CA (behaving as
//! istiod's: the SAN is the caller's identity, chain leaf first, root last) issues short
//! certificates; a real Envoy sidecar in front of the pod's apps logs the identity and serial
//! every connection presents.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{uri_sans, Ca, Key};
use interceptor_tests::envoy::{inbound_config, Envoy};
use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh, Service};
use interceptor_tests::istiod_ca::CaFault;
use interceptor_tests::notify::NotifySocket;
use interceptor_tests::{sh, try_sh, wait_for, Interceptor, Net, Proc, Run, Topology};

const TOKEN: &str = "vm-bootstrap-token";
const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const REVIEWS_ID: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const VM_ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/vm-sa";

struct World {
    cp: ControlPlane,
    bundle: PathBuf,
    resolv: PathBuf,
    envoy_http: Envoy,
    _envoy_tcp: Envoy,
    _apps: Vec<Proc>,
    t: Net,
}

impl World {
    /// reviews (9080 HTTP, 7001 echo) behind Envoy on the pod; a VM bundle with no certificate
    /// at all (only root-cert.pem): the CA must issue it. Certificates live `lifetime`.
    fn new(lifetime: Duration) -> Self {
        let t = Topology::new()
            .network("a")
            .node("vm", &["a"])
            .node("pod", &["a"])
            .node("istiod", &["a"])
            .build();
        let ca = Ca::new("mesh root");
        let istiod_ip = t.node("istiod").ip("a").to_string();
        let mut reviews = Service::new(REVIEWS, "240.240.5.5", 9080);
        reviews.ports.push(7001);
        reviews.sans = vec![REVIEWS_ID.into()];
        reviews.endpoints = vec![Endpoint::new("10.77.0.2", 9080)];
        let cp = ControlPlane::start(
            &t.node("istiod").ns.handle(),
            format!("{istiod_ip}:15012").parse().unwrap(),
            &ca,
            TOKEN,
            Mesh {
                services: vec![reviews],
                ..Default::default()
            },
        );
        *cp.ca_state().token_identity.lock().unwrap() = VM_ID.into();
        *cp.ca_state().lifetime.lock().unwrap() = Some(lifetime);
        let pod = t.node("pod");
        let echo = {
            let mut c = pod
                .ns
                .cmd(interceptor_tests::helper_bin("tcp-echo").to_str().unwrap());
            c.arg("127.0.0.1:7101");
            let mut p = Proc::spawn("tcp-echo", c, t.path("echo.log"));
            p.wait_for_output("listening", 10.0);
            p
        };
        let apps = vec![pod.http("pod", &["127.0.0.1:9180"]), echo];
        let pod_certs = ca.issue(&t.path("pod-certs"), REVIEWS_ID, Key::Ecdsa);
        let envoy_http = Envoy::start(
            pod,
            "envoy-9080",
            &inbound_config(&pod_certs, "10.77.0.2", 9080, 9180, 15000),
            15000,
        );
        let envoy_tcp = Envoy::start(
            pod,
            "envoy-7001",
            &inbound_config(&pod_certs, "10.77.0.2", 7001, 7101, 15001),
            15001,
        );
        let mut s = Spec::new("vm-ns", "vm-sa", &istiod_ip, &ca.pem());
        s.token = TOKEN.into();
        let bundle = write_bundle(&t.path("vm-root"), &s);
        let resolv = t.write(
            "resolv.conf",
            "nameserver 10.77.0.2\noptions timeout:1 attempts:1\n",
        );
        Self {
            cp,
            bundle,
            resolv,
            envoy_http,
            _envoy_tcp: envoy_tcp,
            _apps: apps,
            t,
        }
    }

    fn vm(&self) -> Run {
        self.t
            .node("vm")
            .interceptor()
            .resolv(&self.resolv)
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&self.bundle)
    }

    fn certs(&self) -> PathBuf {
        self.bundle.join("etc/certs")
    }

    fn curl(&self, path: &str) -> (bool, String) {
        let (ok, out, err) = try_sh(&mut self.t.node("vm").with_resolv(
            &self.resolv,
            &format!("exec curl -sS -m 5 http://{REVIEWS}:9080{path}"),
        ));
        (ok, out + &err)
    }

    fn access_log(&self) -> Vec<String> {
        self.envoy_http
            .log()
            .lines()
            .filter(|l| l.contains("peer_serial="))
            .map(str::to_string)
            .collect()
    }

    /// Curls `path` and returns the serial Envoy saw on that connection: its access-log line
    /// is the one added after the curl (one line per connection, written when it closes).
    fn curl_serial(&self, path: &str) -> String {
        let before = self.access_log().len();
        let (ok, out) = self.curl(path);
        assert!(ok && out.contains(&format!("GET {path}")), "{out}");
        let line = wait_for(5.0, || self.access_log().get(before).cloned())
            .expect("an access-log line for the connection");
        assert!(line.contains(&format!("peer_san={VM_ID}")), "{line}");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("peer_serial="))
            .unwrap_or_default()
            .to_ascii_lowercase()
    }
}

/// A PEM certificate's notBefore and notAfter.
fn validity(pem: &str) -> (std::time::SystemTime, std::time::SystemTime) {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<
        _,
    >>::from_der(&der)
    .unwrap();
    let at = |t: i64| std::time::UNIX_EPOCH + Duration::from_secs(t as u64);
    let v = cert.validity();
    (at(v.not_before.timestamp()), at(v.not_after.timestamp()))
}

fn serial(ic: &Interceptor) -> String {
    ic.json("/status")["identity"]["serial"]
        .as_str()
        .unwrap_or_default()
        .replace(':', "")
        .to_ascii_lowercase()
}

fn ca_status(ic: &Interceptor) -> serde_json::Value {
    ic.json("/status")["ca"].clone()
}

fn renewals(ic: &Interceptor) -> u64 {
    ca_status(ic)["renewals"].as_u64().unwrap_or(0)
}

/// Bootstrap from the bundle alone, renewals at half-life with new connections presenting the
/// new serial and an open one not cut, then renewal with the certificate when the token is
/// garbage.
#[test]
fn the_ca_issues_from_the_token_renews_at_half_life_and_then_trusts_the_certificate() {
    let w = World::new(Duration::from_secs(20));
    let ic = w.vm().start();

    // The files, Istio's VM layout, the key private.
    let mode = |f: &str| {
        std::fs::metadata(w.certs().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("key.pem"), 0o600);
    let chain = std::fs::read_to_string(w.certs().join("cert-chain.pem")).unwrap();
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM");
    assert_eq!(uri_sans(&leaf), vec![VM_ID.to_string()]);
    let issued = w.cp.ca_state().issued.lock().unwrap().clone();
    assert_eq!(issued.len(), 1);
    assert_eq!(
        (issued[0].identity.as_str(), issued[0].auth),
        (VM_ID, "token")
    );
    assert_eq!(ca_status(&ic)["key"], "ECDSA P-256");

    // Over mTLS with it, as Envoy sees it.
    let first = serial(&ic);
    assert_eq!(w.curl_serial("/first"), first);

    // A connection open across the renewals (100 round trips a second for 25 s).
    let rr = interceptor_tests::helper_bin("rrload");
    let mut long = Proc::spawn(
        "rrload",
        w.t.node("vm")
            .in_cgroup(rr.to_str().unwrap(), &["240.240.5.5:7001", "100", "25"]),
        w.t.path("rrload.log"),
    );

    // Two renewals, each at about half of the 20 s lifetime; the next connection presents
    // each new serial.
    let mut serials = vec![first];
    for round in 2..=3u64 {
        assert!(
            wait_for(20.0, || (renewals(&ic) >= round).then_some(())).is_some(),
            "renewal {round} never came: {}",
            ca_status(&ic)
        );
        let now = serial(&ic);
        assert!(!serials.contains(&now), "serial {now} again");
        assert_eq!(w.curl_serial(&format!("/after-renewal-{round}")), now);
        serials.push(now);
    }
    // Each renewal came at half of the previous certificate's own validity (its notBefore is
    // backdated a second, whole seconds), ±1 % of it, plus the CSR round trip.
    let issued = w.cp.ca_state().issued.lock().unwrap().clone();
    for pair in issued.windows(2) {
        let (nb, na) = validity(&pair[0].leaf_pem);
        let lifetime = na.duration_since(nb).unwrap().as_secs_f64();
        let due = nb + Duration::from_secs_f64(lifetime / 2.0);
        let late = pair[1].at.duration_since(due).map(|d| d.as_secs_f64());
        let off = late.unwrap_or_else(|e| -e.duration().as_secs_f64());
        eprintln!(
            "renewal {off:+.3} s from half-life of a {lifetime} s certificate ({:.1} s after issue)",
            pair[1].at.duration_since(pair[0].at).unwrap_or_default().as_secs_f64()
        );
        assert!(
            (-0.01 * lifetime - 0.05..0.01 * lifetime + 0.5).contains(&off),
            "renewed {off} s from half-life"
        );
    }
    eprintln!(
        "CSR to certificate in force: {} ms",
        ca_status(&ic)["last_renewal_ms"]
    );
    let status = long.wait_exit(30.0).expect("rrload finished");
    assert!(
        status.success(),
        "the open connection was cut: {}",
        long.output()
    );

    // The token turns to garbage: the certificate authenticates the next renewal.
    std::fs::write(
        w.bundle.join("var/run/secrets/tokens/istio-token"),
        "garbage\u{1}\n",
    )
    .unwrap();
    let before = renewals(&ic);
    assert!(
        wait_for(15.0, || (renewals(&ic) > before).then_some(())).is_some(),
        "no renewal with a garbage token: {}",
        ca_status(&ic)
    );
    let last =
        w.cp.ca_state()
            .issued
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap();
    assert_eq!((last.identity.as_str(), last.auth), (VM_ID, "certificate"));
    let (ok, out) = w.curl("/with-renewed-by-certificate");
    assert!(ok, "{out}");
}

/// systemd's READY=1 on a cold start waits for the first certificate, so that a unit ordered
/// after this one finds mesh mTLS working; at most `--startup-wait`: with the CA down for good
/// it comes once the wait is over (capture is attached, `/healthz/ready` still waits).
#[test]
fn ready_waits_for_the_first_certificate_up_to_the_startup_wait() {
    let w = World::new(Duration::from_secs(3600));
    *w.cp.ca_state().fault.lock().unwrap() = CaFault::Down;
    let notify = NotifySocket::bind(w.t.path("notify.sock"));
    let socket = notify.path.to_str().expect("utf-8 path").to_string();
    let ic = w
        .vm()
        .env("NOTIFY_SOCKET", &socket)
        .args(["--startup-wait", "60s"])
        .start_except("certificate");
    // Capture attached, istiod's table in force, no certificate: no READY=1.
    assert!(
        notify.within("READY=1", 3.0).is_none(),
        "READY=1 without a certificate: {}",
        ic.log()
    );
    *w.cp.ca_state().fault.lock().unwrap() = CaFault::None;
    notify.wait_for("READY=1");
    assert!(w.certs().join("cert-chain.pem").exists());
    let (ok, out) = w.curl("/right-after-ready");
    assert!(ok, "mesh mTLS right after READY=1: {out}");
    drop(ic);

    // No certificate on disk and the CA down: READY=1 after the wait all the same.
    for f in ["cert-chain.pem", "key.pem"] {
        std::fs::remove_file(w.certs().join(f)).expect("the issued certificate");
    }
    *w.cp.ca_state().fault.lock().unwrap() = CaFault::Down;
    let notify = NotifySocket::bind(w.t.path("notify-2.sock"));
    let socket = notify.path.to_str().expect("utf-8 path").to_string();
    let ic = w
        .vm()
        .env("NOTIFY_SOCKET", &socket)
        .args(["--startup-wait", "2s"])
        .start_except("certificate");
    assert!(
        notify.within("READY=1", 10.0).is_some(),
        "no READY=1 after --startup-wait: {}",
        ic.log()
    );
    let readiness = ic.json("/status")["readiness"].clone();
    assert_eq!(readiness["conditions"]["certificate"], false, "{readiness}");
}

/// The CA is down past expiry: outbound mTLS is refused with a clear reason, DNS still
/// answers, readiness says why; when the CA returns, everything recovers.
#[test]
fn a_ca_down_past_expiry_refuses_mtls_clearly_and_recovery_follows() {
    let w = World::new(Duration::from_secs(6));
    let ic = w.vm().start();
    *w.cp.ca_state().fault.lock().unwrap() = CaFault::Down;
    let expired = wait_for(15.0, || {
        ca_status(&ic)["expired"]
            .as_bool()
            .unwrap_or(false)
            .then_some(())
    });
    assert!(expired.is_some(), "never expired: {}", ca_status(&ic));
    assert!(
        ca_status(&ic)["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("CA is down"),
        "{}",
        ca_status(&ic)
    );
    assert_eq!(ic.readiness(), Some(503));
    let (_, body) = ic.admin_get("/healthz/ready").unwrap();
    assert!(body.contains("certificate"), "{body}");
    let (ok, out) = w.curl("/while-expired");
    assert!(!ok, "{out}");
    assert!(ic.wait_counter(
        "interceptor_endpoint_failures_total",
        &[("reason", "certificate_expired")],
        1.0,
        5.0
    ));
    assert!(ic.log().contains("certificate expired"), "{}", ic.log());
    // DNS goes on: the name still resolves from the table.
    let dig = sh(&mut w.t.node("vm").in_cgroup(
        "dig",
        &["+short", "+time=2", "+tries=1", "@10.77.0.53", REVIEWS],
    ));
    assert_eq!(dig.trim(), "240.240.5.5");

    *w.cp.ca_state().fault.lock().unwrap() = CaFault::None;
    let back = wait_for(70.0, || {
        (!ca_status(&ic)["expired"].as_bool().unwrap_or(true) && ic.readiness() == Some(200))
            .then_some(())
    });
    assert!(back.is_some(), "no recovery: {}", ca_status(&ic));
    let (ok, out) = w.curl("/recovered");
    assert!(ok && out.starts_with("pod GET /recovered"), "{out}");
}

/// Answers that must not be taken: another identity, a chain of one, a chain to another root.
/// Each is refused with its reason and the current certificate stays; an RSA key on request.
#[test]
fn bad_answers_are_refused_and_the_current_certificate_stays() {
    let w = World::new(Duration::from_secs(16));
    let ic = w.vm().args(["--ca-key", "rsa"]).start();
    let first = serial(&ic);
    assert_eq!(ca_status(&ic)["key"], "RSA 2048");
    let text = sh(std::process::Command::new("openssl").args([
        "x509",
        "-noout",
        "-text",
        "-in",
        w.certs().join("cert-chain.pem").to_str().unwrap(),
    ]));
    assert!(text.contains("rsaEncryption"), "{text}");
    let failures = |ic: &Interceptor| ca_status(ic)["failures"].as_u64().unwrap_or(0);
    for (n, (fault, why)) in [
        (
            CaFault::WrongIdentity,
            "issued for spiffe://cluster.local/ns/other",
        ),
        (CaFault::OneElement, "a chain of 1 certificate"),
        (CaFault::OtherRoot, "does not chain to root-cert.pem"),
    ]
    .into_iter()
    .enumerate()
    {
        *w.cp.ca_state().fault.lock().unwrap() = fault.clone();
        // The first attempt is at half-life (8 s); retries follow at 1, 2 s.
        let refused = wait_for(15.0, || (failures(&ic) > n as u64).then_some(()));
        assert!(
            refused.is_some(),
            "{fault:?} was not tried: {}",
            ca_status(&ic)
        );
        let e = ca_status(&ic)["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(e.contains(why), "{fault:?}: {e}");
        assert_eq!(serial(&ic), first, "{fault:?} replaced the certificate");
        assert_eq!(ic.readiness(), Some(200));
    }
    assert!(
        ic.metrics().sum(
            "interceptor_cert_renewal_failures_total",
            &[("reason", "bad_answer")]
        ) >= 3.0
    );
    *w.cp.ca_state().fault.lock().unwrap() = CaFault::None;
    assert!(wait_for(15.0, || (serial(&ic) != first).then_some(())).is_some());
    let (ok, out) = w.curl("/after-good-answer");
    assert!(ok, "{out}");
}
