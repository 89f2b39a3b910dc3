//! Issue 4 scenarios: Istio-compatible mTLS between a VM and a pod, each with its own
//! interceptor; real TLS (rustls on both ends, openssl as an independent client, Envoy
//! configured as Istio configures a sidecar as the independent peer both ways), real apps.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::envoy::{self, Envoy};
use interceptor_tests::wire::{tcp_payloads, Tcpdump};
use interceptor_tests::{sh, try_sh, wait_for, Interceptor, Net, Node, Subnet, Topology};

const TD: &str = "spiffe://cluster.local/ns/default/sa";
const HOST: &str = "product.default.svc.cluster.local";
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

/// The pod as the VM's table knows it.
fn pod_workload(sa: &str) -> String {
    workload("product-pod", "10.77.0.2", sa, 1)
}

struct Mesh {
    ca: Ca,
    vm_certs: PathBuf,
    pod_certs: PathBuf,
    resolv: PathBuf,
    pod_mesh: PathBuf,
    t: Net,
}

impl Mesh {
    fn new() -> Self {
        Self::on(Topology::vm_pod())
    }

    fn on(t: Net) -> Self {
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
            ca,
            vm_certs,
            pod_certs,
            resolv,
            pod_mesh,
            t,
        }
    }

    fn vm_node(&self) -> &Node {
        self.t.node("vm")
    }

    fn pod_node(&self) -> &Node {
        self.t.node("pod")
    }

    fn vm(&self, mesh: &str) -> Interceptor {
        let mesh = self.t.write("vm-mesh.yaml", mesh);
        self.vm_node()
            .interceptor()
            .mesh(&mesh)
            .resolv(&self.resolv)
            .certs(&self.vm_certs)
            .start()
    }

    /// The interceptor serving inbound 8080 and 8443 on `node`.
    fn inbound(&self, node: &Node, certs: &Path, extra: &[&str], log: &str) -> Interceptor {
        node.interceptor()
            .mesh(&self.pod_mesh)
            .resolv(&self.resolv)
            .certs(certs)
            .args(["--inbound-ports", "8080,8443"])
            .args(extra.iter().copied())
            .log(log)
            .start()
    }

    fn pod(&self, extra: &[&str], log: &str) -> Interceptor {
        self.inbound(self.pod_node(), &self.pod_certs, extra, log)
    }

    /// The pod's interceptor following the test control plane at 10.77.0.2:15012 (the Istio
    /// VM bundle of `default/product`, labels app=product), serving inbound 8080 and 8443.
    fn pod_following_istiod(&self) -> Interceptor {
        use interceptor_tests::bundle::{write_bundle, Spec};
        let mut spec = Spec::new("default", "product", "10.77.0.2", &self.ca.pem());
        spec.token = "pod-token".into();
        spec.labels.insert("app".into(), "product".into());
        let bundle = write_bundle(&self.t.path("pod-root"), &spec);
        self.ca
            .issue(&bundle.join("etc/certs"), &spec.identity(), Key::Rsa);
        self.pod_node()
            .interceptor()
            .resolv(&self.resolv)
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&bundle)
            .args(["--inbound-ports", "8080,8443"])
            .log("pod-ic")
            .start()
    }

    /// curl by service name from the VM's captured cgroup (DNS and connection captured).
    fn curl(&self, path: &str) -> (bool, String) {
        let (ok, out, err) = try_sh(&mut self.vm_node().with_resolv(
            &self.resolv,
            &format!("exec curl -sS -m 5 http://{HOST}:8080{path}"),
        ));
        (ok, out + &err)
    }

    /// openssl s_client from the VM namespace (not captured) straight at the pod's port.
    fn s_client(&self, certs: &Path, extra: &[&str], request: &str) -> String {
        let (chain, key, root) = (
            certs.join("cert-chain.pem"),
            certs.join("key.pem"),
            certs.join("root-cert.pem"),
        );
        let mut args = vec!["-servername", SNI, "-cert"];
        args.push(chain.to_str().expect("utf-8 path"));
        args.extend(["-key", key.to_str().expect("utf-8 path")]);
        args.extend(["-CAfile", root.to_str().expect("utf-8 path")]);
        args.extend(extra);
        self.openssl(&args, request)
    }

    /// openssl s_client to the pod's 8080 with `args`, sending `request`; its whole output.
    fn openssl(&self, args: &[&str], request: &str) -> String {
        let mut c = self.vm_node().cmd(
            "openssl",
            &["s_client", "-connect", "10.77.0.2:8080", "-ign_eof"],
        );
        c.args(args);
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

/// Inbound connections the pod's interceptor served for `client` (its proved SPIFFE id).
fn served_for(pod: &Interceptor, client: &str) -> f64 {
    pod.counter(
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination"), ("source_principal", client)],
    )
}

fn refused(ic: &Interceptor, reason: &str) -> f64 {
    ic.counter("interceptor_inbound_refused_total", &[("reason", reason)])
}

fn wait(secs: f64, f: impl Fn() -> bool) -> bool {
    wait_for(secs, || f().then_some(())).is_some()
}

#[test]
fn curl_by_name_reaches_the_pod_through_both_interceptors() {
    let m = Mesh::new();
    let app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&[], "pod-ic");
    let vm_ic = m.vm(&vm_mesh(&pod_workload("product")));

    let (ok, out) = m.curl("/hello");
    assert!(ok, "{out}");
    // The app sees the sidecar's source address, not the VM's.
    assert!(out.starts_with("pod GET /hello from 127.0.0.6:"), "{out}");
    assert!(app.output().contains("GET /hello from 127.0.0.6"));
    // Each side proved who the other is.
    assert!(
        wait(5.0, || vm_ic.counter(
            "istio_tcp_connections_closed_total",
            &[
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", &format!("{TD}/vm")),
                ("destination_principal", &format!("{TD}/product")),
            ]
        ) == 1.0),
        "{}",
        vm_ic.metrics().0
    );
    assert!(
        wait(5.0, || served_for(&pod_ic, &format!("{TD}/vm")) == 1.0),
        "{}",
        pod_ic.log()
    );
    assert!(pod_ic.log().contains("mode=Some(Mtls)"), "{}", pod_ic.log());
}

#[test]
fn the_wire_shows_a_client_hello_with_istio_sni_and_alpn_and_no_plaintext() {
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let _pod_ic = m.pod(&[], "pod-ic");
    let _vm_ic = m.vm(&vm_mesh(&pod_workload("product")));
    let dump = Tcpdump::start(
        &m.pod_node().ns,
        m.pod_node().iface("a"),
        "tcp port 8080",
        m.t.path("wire.pcap"),
    );

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
    // A second endpoint: another VM on the same network.
    let m = Mesh::on(
        Topology::new()
            .network("a")
            .node("vm", &["a"])
            .node("pod", &["a"])
            .node("vm2", &["a"])
            .build(),
    );
    let vm2 = m.t.node("vm2");
    let vm2_certs =
        m.ca.issue(&m.t.path("vm2-certs"), &format!("{TD}/product"), Key::Ecdsa);
    let _pod_app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let _pod_ic = m.pod(&[], "pod-ic");
    let vm2_app = vm2.http("vm2", &["10.77.0.3:8080"]);
    let vm2_ic = m.inbound(vm2, &vm2_certs, &[], "vm2-ic");
    let mesh = vm_mesh(
        &(workload("product-pod", "10.77.0.2", "product", 1)
            + &workload("product-vm2", "10.77.0.3", "product", 3)),
    );
    let _vm_ic = m.vm(&mesh);
    let dump = WholeRun::start(&m);

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
    dump.assert_no_plaintext(50);
}

/// tcpdump on the VM's own interface for a whole scenario: nothing of a request to a mesh
/// mTLS service may leave the VM in the clear, retries, hedges and failovers included.
struct WholeRun {
    dump: Tcpdump,
}

impl WholeRun {
    fn start(m: &Mesh) -> Self {
        let vm = m.vm_node();
        Self {
            dump: Tcpdump::start(&vm.ns, vm.iface("a"), "tcp", m.t.path("whole-run.pcap")),
        }
    }

    /// No segment the VM sent carries HTTP; at least `requests` connections were seen.
    fn assert_no_plaintext(self, requests: usize) {
        let pcap = self.dump.stop();
        let sent = tcp_payloads(&pcap, "tcp and src net 10.77.0.1");
        let hellos = sent
            .iter()
            .filter(|p| matches!(interceptor::tls::parse_client_hello(p), Ok(Some(_))))
            .count();
        let all = sent.concat();
        let text = String::from_utf8_lossy(&all);
        eprintln!(
            "whole run: {} segments from the VM, {hellos} ClientHellos, {} bytes, no plaintext",
            sent.len(),
            all.len()
        );
        assert!(
            !text.contains("HTTP/1.1") && !text.contains("GET /"),
            "plaintext left the VM"
        );
        assert!(
            hellos >= requests,
            "{hellos} ClientHellos for {requests} requests"
        );
    }
}

/// Endpoint faults, one service each beside a good endpoint (the pod): one that takes the
/// connection and never answers TLS (a sink), one that resets (a closed port), one that
/// blackholes SYNs (an address nobody answers for). Every request succeeds; a silent endpoint
/// costs one request the hedge delay, not a timeout; outlier detection then tries the bad one
/// last, so it is dialed only a few times in 30 requests. Prints p50 and max per fault.
#[test]
fn silent_resetting_and_blackholed_endpoints_cost_little_and_are_ejected() {
    use interceptor_tests::{helper_bin, Proc};
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let _pod_ic = m.pod(&[], "pod-ic");
    let checker = helper_bin("stream-check");
    let mut sink = Proc::spawn(
        "sink",
        m.pod_node().cmd(
            checker.to_str().expect("utf-8 path"),
            &["serve", "10.77.0.2:9443"],
        ),
        m.t.path("sink.log"),
    );
    sink.wait_for_output("listening", 10.0);
    let service = |name: &str, bad: &str, port: u16| {
        format!(
            r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: {name}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}-good, namespace: default}}
spec:
  address: 10.77.0.2
  labels: {{app: {name}, security.istio.io/tlsMode: istio}}
  serviceAccount: product
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}-bad, namespace: default}}
spec:
  address: {bad}
  ports: {{http: {port}}}
  labels: {{app: {name}, security.istio.io/tlsMode: istio}}
  serviceAccount: product
"#
        )
    };
    let mesh = service("silent", "10.77.0.2", 9443)
        + &service("resets", "10.77.0.2", 9444)
        + &service("blackholed", "10.77.0.99", 8080);
    let vm_ic = m.vm(&mesh);
    let dump = WholeRun::start(&m);
    let failures = || vm_ic.counter("interceptor_endpoint_failures_total", &[]);
    for name in ["silent", "resets", "blackholed"] {
        let before = failures();
        let script = format!(
            "for i in $(seq 30); do curl -sS -m 20 -o /dev/null -w '%{{http_code}} %{{time_total}}\n' \
             http://{name}.default.svc.cluster.local:8080/$i; done"
        );
        let out = sh(&mut m.vm_node().with_resolv(&m.resolv, &script));
        let mut times: Vec<f64> = out
            .lines()
            .map(|l| {
                let (code, t) = l.split_once(' ').unwrap_or_default();
                assert_eq!(code, "200", "{name}: a request failed: {out}");
                t.parse().expect("time_total")
            })
            .collect();
        assert_eq!(times.len(), 30, "{out}");
        times.sort_by(f64::total_cmp);
        let dialed_bad = failures() - before;
        eprintln!(
            "endpoint fault {name}: p50 {:.1} ms, max (p99 of 30) {:.1} ms; the bad endpoint failed {dialed_bad} times in 30 requests",
            times[14] * 1000.0,
            times[29] * 1000.0
        );
        assert!(
            (1.0..=3.0).contains(&dialed_bad),
            "{name}: outlier detection did not keep the bad endpoint last: {dialed_bad} failures\n{}",
            vm_ic.log()
        );
    }
    assert!(
        vm_ic.counter(
            "interceptor_endpoint_failures_total",
            &[("reason", "outpaced")]
        ) >= 2.0
    );
    assert!(
        vm_ic.counter(
            "interceptor_endpoint_failures_total",
            &[("reason", "connect")]
        ) >= 1.0
    );
    dump.assert_no_plaintext(90);
}

/// curl by name through both interceptors `n` times; each request's seconds, sorted.
fn timed_curls(m: &Mesh, n: usize, what: &str) -> Vec<f64> {
    let script = format!(
        "for i in $(seq {n}); do curl -sS -m 20 -o /dev/null -w '%{{http_code}} %{{time_total}}\\n' http://{HOST}:8080/$i; done"
    );
    let out = sh(&mut m.vm_node().with_resolv(&m.resolv, &script));
    let mut times: Vec<f64> = out
        .lines()
        .map(|l| {
            let (code, t) = l.split_once(' ').unwrap_or_default();
            assert_eq!(code, "200", "{what}: a request failed: {out}");
            t.parse().expect("time_total")
        })
        .collect();
    assert_eq!(times.len(), n, "{out}");
    times.sort_by(f64::total_cmp);
    times
}

/// Inbound slowloris: 2 000 connections each sending a ClientHello a byte a second. The
/// handshake timeout closes every one; memory stays bounded; other clients are served
/// throughout (their p50 and worst case are printed beside the figures before the attack).
#[test]
fn two_thousand_slowloris_connections_are_closed_and_other_clients_are_served() {
    use interceptor_tests::{helper_bin, Proc};
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&["--mtls-mode", "strict"], "pod-ic");
    let _vm_ic = m.vm(&vm_mesh(&pod_workload("product")));
    let before = timed_curls(&m, 30, "before");
    let rss_before = pod_ic.proc.rss_kib();
    assert!(rss_before > 0, "no VmRSS for the pod daemon");

    let slow = helper_bin("slowloris");
    let mut attack = Proc::spawn(
        "slowloris",
        m.vm_node().cmd(
            slow.to_str().expect("utf-8 path"),
            &["10.77.0.2:8080", "2000", "14"],
        ),
        m.t.path("slowloris.log"),
    );
    attack.wait_for_output("opened", 60.0);
    let pending = || {
        pod_ic.counter(
            "interceptor_limit_in_use",
            &[("limit", "pending_handshakes")],
        )
    };
    assert!(
        wait(10.0, || pending() >= 2000.0),
        "the slow connections are not pending: {}",
        pending()
    );
    let during = timed_curls(&m, 30, "during");
    let rss_during = pod_ic.proc.rss_kib();
    assert!(attack.wait_exit(60.0).is_some());
    let out = attack.output();
    let report: serde_json::Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no report: {out}"));
    eprintln!(
        "slowloris: {report}; others p50 {:.1} -> {:.1} ms, max {:.1} -> {:.1} ms; RSS {} -> {} KiB",
        before[14] * 1000.0,
        during[14] * 1000.0,
        before[29] * 1000.0,
        during[29] * 1000.0,
        rss_before,
        rss_during
    );
    assert_eq!(report["closed_by_server"], 2000, "{report}");
    assert!(wait(10.0, || pending() == 0.0), "{}", pending());
    assert!(
        refused(&pod_ic, "malformed_strict") >= 2000.0,
        "{}",
        pod_ic.metrics().0
    );
    assert!(
        rss_during < rss_before + 64 * 1024,
        "2 000 slow clients took {} KiB",
        rss_during - rss_before
    );
}

/// The inbound caps at work. `--max-pending-handshakes 2`: two slow ClientHellos hold both
/// handshake slots, so a mesh client arriving meanwhile is reset at once and counted; once the
/// hello timeout closes them it is served. `--max-inbound-connections 3`: three plaintext
/// connections held open (PERMISSIVE passes them to the app) fill the cap, the next two are
/// reset and counted while the three go on echoing; when they go, mesh clients are served.
#[test]
fn at_the_inbound_caps_new_connections_are_refused_and_counted_and_held_ones_go_on() {
    use interceptor_tests::{helper_bin, Proc};
    let m = Mesh::new();
    let pod = m.pod_node();
    let _app = pod.http("pod", &["10.77.0.2:8080"]);
    let checker = helper_bin("stream-check");
    let checker = checker.to_str().expect("utf-8 path");
    let mut echo = Proc::spawn(
        "stream-check",
        pod.cmd(checker, &["serve", "10.77.0.2:8443"]),
        m.t.path("stream-check.log"),
    );
    echo.wait_for_output("listening", 10.0);
    let pod_ic = m.pod(
        &[
            "--max-pending-handshakes",
            "2",
            "--max-inbound-connections",
            "3",
        ],
        "pod-ic",
    );
    let _vm_ic = m.vm(&vm_mesh(&pod_workload("product")));
    let in_use = |limit: &str| pod_ic.counter("interceptor_limit_in_use", &[("limit", limit)]);
    let refused_at =
        |limit: &str| pod_ic.counter("interceptor_limit_refused_total", &[("limit", limit)]);
    assert!(m.curl("/before").0);

    // Two unfinished hellos: every handshake slot taken.
    let slow = helper_bin("slowloris");
    let mut attack = Proc::spawn(
        "slowloris",
        m.vm_node().cmd(
            slow.to_str().expect("utf-8 path"),
            &["10.77.0.2:8080", "2", "8"],
        ),
        m.t.path("slowloris.log"),
    );
    attack.wait_for_output("opened", 10.0);
    assert!(
        wait(10.0, || in_use("pending_handshakes") == 2.0),
        "{}",
        pod_ic.metrics().0
    );
    let (ok, out) = m.curl("/during-slow-hellos");
    assert!(!ok, "served with every handshake slot taken: {out}");
    assert!(
        refused_at("pending_handshakes") >= 1.0,
        "{}",
        pod_ic.metrics().0
    );
    assert!(attack.wait_exit(30.0).is_some(), "slowloris did not finish");
    assert!(wait(10.0, || in_use("pending_handshakes") == 0.0));
    let (ok, out) = m.curl("/after-slow-hellos");
    assert!(ok, "{out}");

    // Three held connections: the inbound cap.
    let mut holder = Proc::spawn(
        "hold",
        m.vm_node().cmd(checker, &["hold", "10.77.0.2:8443", "5"]),
        m.t.path("hold.log"),
    );
    holder.wait_for_output("echoed", 30.0);
    let held: serde_json::Value =
        serde_json::from_str(holder.output().trim()).expect("hold prints JSON");
    assert_eq!(
        (&held["echoed"], &held["refused"], &held["still"]),
        (&3.into(), &2.into(), &3.into()),
        "{held}"
    );
    assert_eq!(refused_at("inbound_connections"), 2.0);
    assert_eq!(in_use("inbound_connections"), 3.0);
    let (ok, out) = m.curl("/during-held");
    assert!(!ok, "served beyond the inbound cap: {out}");
    holder.signal(libc::SIGTERM);
    holder.wait_exit(10.0).expect("holder exits");
    assert!(wait(10.0, || in_use("inbound_connections") == 0.0));
    let (ok, out) = m.curl("/after-held");
    assert!(ok, "{out}");
    eprintln!(
        "inbound caps: refused {} at pending_handshakes=2, {} at inbound_connections=3",
        refused_at("pending_handshakes"),
        refused_at("inbound_connections")
    );
    assert_eq!(pod_ic.readiness(), Some(200));
}

#[test]
fn permissive_passes_plaintext_and_foreign_tls_strict_refuses_plaintext() {
    let m = Mesh::new();
    let pod = m.pod_node();
    let _app = pod.http("pod", &["10.77.0.2:8080"]);
    // A TLS app of the pod's own (not Istio): must pass through untouched in PERMISSIVE.
    let app_certs = m.ca.issue(
        &m.t.path("app-certs"),
        "spiffe://app.example/own",
        Key::Ecdsa,
    );
    let mut tls_app = pod.ns.cmd("openssl");
    tls_app
        .args(["s_server", "-accept", "8443", "-www", "-cert"])
        .arg(app_certs.join("cert-chain.pem"))
        .arg("-key")
        .arg(app_certs.join("key.pem"));
    let mut tls_app = interceptor_tests::Proc::spawn("tls-app", tls_app, m.t.path("tls-app.log"));
    tls_app.wait_for_output("ACCEPT", 10.0);
    let pod_ic = m.pod(&[], "pod-ic");

    let vm = m.vm_node();
    let out = sh(&mut vm.cmd("curl", &["-sS", "-m", "5", "http://10.77.0.2:8080/plain"]));
    assert!(
        out.starts_with("pod GET /plain from 127.0.0.6"),
        "plaintext passes through: {out}"
    );
    let out = sh(&mut vm.cmd("curl", &["-sSk", "-m", "5", "https://10.77.0.2:8443/"]));
    assert!(
        out.contains("s_server"),
        "foreign TLS reaches the app's own TLS server: {out}"
    );
    // Both relayed as they were: no mTLS, no identity.
    assert!(wait(5.0, || pod_ic.counter(
        "istio_tcp_connections_closed_total",
        &[
            ("destination_service", "10.77.0.2:8443"),
            ("connection_security_policy", "none")
        ]
    ) == 1.0));
    assert!(pod_ic.log().contains("mode=Some(TlsPassthrough)"));
    drop(pod_ic);

    let strict = m.pod(&["--mtls-mode", "strict"], "pod-strict");
    let (ok, out, _) =
        try_sh(&mut vm.cmd("curl", &["-sS", "-m", "5", "http://10.77.0.2:8080/plain"]));
    assert!(
        !ok && !out.contains("pod GET"),
        "STRICT let plaintext through: {out}"
    );
    assert!(wait(5.0, || refused(&strict, "plaintext_strict") == 1.0));
    // mTLS from the VM still works in STRICT.
    let _vm_ic = m.vm(&vm_mesh(&pod_workload("product")));
    let (ok, out) = m.curl("/strict-mtls");
    assert!(ok && out.starts_with("pod GET /strict-mtls"), "{out}");
}

#[test]
fn openssl_client_with_istio_alpn_completes_the_handshake() {
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&[], "pod-ic");
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
    assert!(wait(5.0, || served_for(&pod_ic, &format!("{TD}/vm")) == 1.0));
}

#[test]
fn foreign_roots_disallowed_identities_and_wrong_server_identity_are_refused() {
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&["--inbound-allow", &format!("{TD}/vm")], "pod-ic");

    // A client certificate from another root.
    let other =
        Ca::new("another root").issue(&m.t.path("other-certs"), &format!("{TD}/vm"), Key::Ecdsa);
    let out = m.s_client(&other, &["-alpn", "istio"], "GET /foreign HTTP/1.0\r\n\r\n");
    assert!(!out.contains("pod GET /foreign"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "client_cert_untrusted") == 1.0));

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
    assert!(wait(5.0, || refused(&pod_ic, "not_allowed") == 1.0));

    // The allowed identity gets through.
    let out = m.s_client(
        &m.vm_certs,
        &["-alpn", "istio"],
        "GET /allowed HTTP/1.0\r\n\r\n",
    );
    assert!(out.contains("pod GET /allowed"), "{out}");

    // Outbound: the pod answers as sa/product, the table says the workload runs as sa/billing.
    let vm_ic = m.vm(&vm_mesh(&pod_workload("billing")));
    let (ok, out) = m.curl("/wrong-identity");
    assert!(!ok && !out.contains("pod GET"), "{out}");
    assert!(wait(5.0, || vm_ic.counter(
        "interceptor_endpoint_failures_total",
        &[("reason", "server_certificate")]
    ) >= 1.0));
    let refusal = vm_ic
        .log()
        .lines()
        .find(|l| l.contains("is not one of"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        refusal.contains(&format!("{TD}/product")) && refusal.contains(&format!("{TD}/billing")),
        "the log names what was presented and what was expected: {refusal}"
    );
}

/// The refusal matrix on the sidecar wire (STRICT, with an allow-list), each refusal counted by
/// its own reason: an expired client certificate, one not valid yet, one from another root,
/// one of another trust domain (same root), an identity off the allow-list, no client
/// certificate, plaintext, TLS 1.2 with a weak suite, and a hello whose SNI names a service the
/// pod's table says it does not serve. None reaches the app; the allowed client does.
#[test]
fn each_bad_client_is_refused_and_counted_by_its_own_reason() {
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let billing = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: billing, namespace: default}\nspec:\n  hosts: [billing.default.svc.cluster.local]\n  ports: [{number: 8080, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 10.77.0.9}]\n";
    let served = m.t.write(
        "pod-served.yaml",
        &(vm_mesh(&pod_workload("product")) + billing),
    );
    let foreign_td = "spiffe://other.domain/ns/default/sa/vm";
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&served)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .args(["--inbound-ports", "8080", "--mtls-mode", "strict"])
        .args(["--inbound-allow", &format!("{TD}/vm")])
        .args(["--inbound-allow", foreign_td])
        .log("pod-ic")
        .start();
    let cert = |name: &str, spiffe: &str| m.ca.issue(&m.t.path(name), spiffe, Key::Ecdsa);
    let vm_id = format!("{TD}/vm");
    let expired =
        m.ca.issue_with(&m.t.path("expired"), &vm_id, Key::Ecdsa, true);
    let not_yet =
        m.ca.issue_not_yet_valid(&m.t.path("not-yet"), &vm_id, Key::Ecdsa);
    let other_root = Ca::new("another root").issue(&m.t.path("other-root"), &vm_id, Key::Ecdsa);
    let other_td = cert("other-td", foreign_td);
    let intruder = cert("intruder", &format!("{TD}/intruder"));
    let istio = ["-alpn", "istio"];
    let billing_sni = "outbound_.8080_._.billing.default.svc.cluster.local";
    let root = m.vm_certs.join("root-cert.pem");
    let root = root.to_str().expect("utf-8 path");
    let weak_tls12 = ["-tls1_2", "-cipher", "AES128-SHA", "-alpn", "istio"];

    let mut expected = 0.0;
    let mut refused_as = |reason: &str, out: String| {
        assert!(
            !out.contains("pod GET"),
            "{reason}: the app was reached: {out}"
        );
        expected += 1.0;
        assert!(
            wait(5.0, || refused(&pod_ic, reason) == 1.0),
            "{reason} not counted once: {}\n{out}",
            pod_ic.metrics().0
        );
    };
    let req = "GET /bad HTTP/1.0\r\n\r\n";
    refused_as("client_cert_expired", m.s_client(&expired, &istio, req));
    refused_as(
        "client_cert_not_yet_valid",
        m.s_client(&not_yet, &istio, req),
    );
    refused_as(
        "client_cert_untrusted",
        m.s_client(&other_root, &istio, req),
    );
    refused_as("foreign_trust_domain", m.s_client(&other_td, &istio, req));
    refused_as("not_allowed", m.s_client(&intruder, &istio, req));
    refused_as(
        "no_client_certificate",
        m.openssl(
            &["-servername", SNI, "-CAfile", root, "-alpn", "istio"],
            req,
        ),
    );
    refused_as(
        "tls_incompatible",
        m.s_client(&m.vm_certs, &weak_tls12, req),
    );
    refused_as(
        "sni_not_served",
        m.s_client(
            &m.vm_certs,
            &["-alpn", "istio", "-servername", billing_sni],
            req,
        ),
    );
    let (ok, out, _) = try_sh(
        &mut m
            .vm_node()
            .cmd("curl", &["-sS", "-m", "5", "http://10.77.0.2:8080/plain"]),
    );
    assert!(
        !ok || !out.contains("pod GET"),
        "plaintext got through: {out}"
    );
    refused_as("plaintext_strict", out);
    let total = pod_ic.counter("interceptor_inbound_refused_total", &[]);
    assert_eq!(total, expected, "{}", pod_ic.metrics().0);

    // The allowed client, with the SNI of the service this pod serves.
    let out = m.s_client(&m.vm_certs, &istio, "GET /allowed HTTP/1.0\r\n\r\n");
    assert!(out.contains("pod GET /allowed"), "{out}");
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

fn serial(ic: &Interceptor) -> String {
    ic.json("/status")["identity"]["serial"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn rotated_certificates_are_used_by_new_connections() {
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&[], "pod-ic");
    let before = presented_cert(&m.s_client(
        &m.vm_certs,
        &["-alpn", "istio", "-showcerts"],
        "GET /a HTTP/1.0\r\n\r\n",
    ));
    let on_disk = std::fs::read_to_string(m.pod_certs.join("cert-chain.pem")).unwrap();
    assert_eq!(before.trim(), on_disk.trim());
    let first = serial(&pod_ic);

    m.ca.issue(&m.pod_certs, &format!("{TD}/product"), Key::Ecdsa);
    assert!(
        wait(10.0, || serial(&pod_ic) != first),
        "the new certificate was not taken: {}",
        pod_ic.log()
    );
    let rotated = std::fs::read_to_string(m.pod_certs.join("cert-chain.pem")).unwrap();
    let out = m.s_client(
        &m.vm_certs,
        &["-alpn", "istio", "-showcerts"],
        "GET /b HTTP/1.0\r\n\r\n",
    );
    assert_eq!(
        presented_cert(&out).trim(),
        rotated.trim(),
        "new connections present the rotated certificate"
    );
    assert!(out.contains("pod GET /b"), "{out}");
}

#[test]
fn resumed_sessions_keep_the_client_identity_and_the_allow_list() {
    let m = Mesh::new();
    let app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(
        &[
            "--inbound-allow",
            &format!("8080={TD}/vm"),
            "--inbound-allow",
            &format!("8443={TD}/someone-else"),
        ],
        "pod-ic",
    );
    let _vm_ic = m.vm(&vm_mesh(&pod_workload("product")));
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
        wait(5.0, || served_for(&pod_ic, &format!("{TD}/vm")) == 4.0),
        "{}",
        pod_ic.log()
    );
    let log = pod_ic.log();
    assert!(
        log.contains("mode=Some(Mtls)") && log.contains("mode=Some(MtlsResumed)"),
        "{log}"
    );
    assert_eq!(app.output().matches("GET /again").count(), 4);

    // A session made on a port the VM may use, resumed on a port it may not: still refused.
    let session = m.t.path("session.pem");
    let s_client = |port: &str, sess: &str| {
        let mut c = m.vm_node().cmd(
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
    assert!(wait(5.0, || refused(&pod_ic, "not_allowed") == 1.0));
    assert!(
        pod_ic.log().contains("service=10.77.0.2:8443"),
        "{}",
        pod_ic.log()
    );
}

/// Our outbound to a real Istio sidecar's inbound: Envoy with a DownstreamTlsContext that
/// requires the client certificate, matching the istio ALPNs as istiod configures it.
#[test]
fn envoy_sidecar_inbound_accepts_our_outbound_mtls_and_sees_our_identity() {
    let m = Mesh::new();
    let pod = m.pod_node();
    let app = pod.http("pod", &["127.0.0.1:9080"]);
    let sidecar = Envoy::start(
        pod,
        "envoy-inbound",
        &envoy::inbound_config(&m.pod_certs, "10.77.0.2", 8080, 9080, 15000),
        15000,
    );
    let vm_ic = m.vm(&vm_mesh(&pod_workload("product")));
    for i in 0..3 {
        let (ok, out) = m.curl(&format!("/envoy{i}"));
        assert!(
            ok && out.starts_with(&format!("pod GET /envoy{i} from 127.0.0.1")),
            "{out}\n{}",
            sidecar.log()
        );
    }
    assert_eq!(app.output().matches("GET /envoy").count(), 3);
    // Envoy verified our certificate and logged the identity it proved.
    assert!(
        wait(5.0, || sidecar
            .log()
            .matches(&format!("peer_san={TD}/vm"))
            .count()
            == 3),
        "{}",
        sidecar.log()
    );
    assert!(sidecar.stat("listener.10.77.0.2_8080.ssl.handshake") >= 1);
    // We verified Envoy's: the server proved it is sa/product.
    assert!(wait(5.0, || vm_ic.counter(
        "istio_tcp_connections_closed_total",
        &[("destination_principal", &format!("{TD}/product"))]
    ) == 3.0));
}

/// A real Istio sidecar's outbound to our inbound in STRICT mode: Envoy's UpstreamTlsContext
/// with the Istio SNI, ALPN `istio-peer-exchange,istio` and an exact SAN match.
#[test]
fn envoy_sidecar_outbound_reaches_our_strict_inbound_and_checks_our_identity() {
    let m = Mesh::new();
    let app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let pod_ic = m.pod(&["--mtls-mode", "strict"], "pod-ic");
    let vm = m.vm_node();
    let sidecar = Envoy::start(
        vm,
        "envoy-outbound",
        &envoy::outbound_config(
            &m.vm_certs,
            15101,
            HOST,
            "10.77.0.2",
            8080,
            &format!("{TD}/product"),
            15000,
        ),
        15000,
    );
    for i in 0..3 {
        let out = sh(&mut vm.cmd(
            "curl",
            &[
                "-sS",
                "-m",
                "5",
                &format!("http://127.0.0.1:15101/from-envoy{i}"),
            ],
        ));
        assert!(
            out.starts_with(&format!("pod GET /from-envoy{i} from 127.0.0.6")),
            "{out}"
        );
    }
    assert_eq!(app.output().matches("GET /from-envoy").count(), 3);
    assert!(
        wait(5.0, || served_for(&pod_ic, &format!("{TD}/vm")) == 3.0),
        "{}",
        pod_ic.log()
    );
    let cluster = format!("cluster.outbound|8080||{HOST}");
    assert!(
        sidecar.stat(&format!("{cluster}.ssl.handshake")) >= 1,
        "{}",
        sidecar.log()
    );
    // Envoy checked the SAN it was told to: a sidecar expecting another identity is refused.
    let wrong = Envoy::start(
        vm,
        "envoy-wrong-san",
        &envoy::outbound_config(
            &m.vm_certs,
            15102,
            HOST,
            "10.77.0.2",
            8080,
            &format!("{TD}/billing"),
            15001,
        ),
        15001,
    );
    let (ok, out, _) =
        try_sh(&mut vm.cmd("curl", &["-sS", "-m", "5", "http://127.0.0.1:15102/wrong"]));
    assert!(!ok || !out.contains("pod GET"), "{out}");
    assert!(
        wrong.wait_stat(&format!("{cluster}.ssl.fail_verify_san"), 1, 5.0),
        "{}",
        wrong.log()
    );
    assert_eq!(app.output().matches("GET /wrong").count(), 0);
}

/// Istio's own policy kinds in the mesh files of the pod's interceptor, selected by its
/// namespace and `--label`: PeerAuthentication (mesh STRICT, a workload's portLevelMtls
/// PERMISSIVE) decides what plaintext gets; AuthorizationPolicy (ALLOW by namespace and by
/// ipBlocks per port, a mesh-wide DENY of one principal on one port) decides who gets in,
/// with real openssl and curl clients; edits apply without restart; an HTTP-only rule fails
/// closed with a clear line; `explain --inbound` names the deciding policy.
#[test]
fn peer_authentication_and_authorization_policy_decide_inbound_with_real_clients() {
    let m = Mesh::new();
    let _app = m
        .pod_node()
        .http("pod", &["10.77.0.2:8080", "10.77.0.2:8443"]);
    let doc = |kind: &str, ns: &str, name: &str, spec: &str| {
        format!("---\napiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
    };
    let peer = doc(
        "PeerAuthentication",
        "istio-system",
        "mesh",
        "  mtls: {mode: STRICT}",
    ) + &doc(
        "PeerAuthentication",
        "default",
        "product",
        "  selector: {matchLabels: {app: product}}\n  portLevelMtls:\n    8443: {mode: PERMISSIVE}",
    ) + &doc(
        // Another workload's: must not apply.
        "PeerAuthentication",
        "default",
        "reviews",
        "  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: DISABLE}",
    );
    let policies = m.t.write("pod-policy.yaml", &peer);
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&policies)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .args(["--inbound-ports", "8080,8443"])
        .args(["--namespace", "default", "--label", "app=product"])
        .log("pod-ic")
        .start();
    let plain = |port: u16, path: &str| -> String {
        let url = format!("http://10.77.0.2:{port}{path}");
        let (_, out, err) = try_sh(&mut m.vm_node().cmd("curl", &["-sS", "-m", "5", &url]));
        out + &err
    };
    let served = |out: &str, path: &str| out.contains(&format!("pod GET {path}"));
    let explain = |port: u16, from: &str| {
        pod_ic.json(&format!(
            "/explain/inbound?port={port}&identity={from}&source=10.77.0.1"
        ))
    };

    // PeerAuthentication: STRICT from the mesh on 8080, PERMISSIVE on the workload's 8443.
    let out = plain(8080, "/strict");
    assert!(!served(&out, "/strict"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "plaintext_strict") == 1.0));
    let out = plain(8443, "/permissive");
    assert!(served(&out, "/permissive"), "{out}");
    let e = explain(8080, "");
    assert_eq!(e["mtls"]["mode"], "strict", "{e}");
    assert_eq!(e["mtls"]["by"], "istio-system/mesh", "{e}");
    let e = explain(8443, "");
    assert_eq!(
        e["mtls"]["by"], "default/product (portLevelMtls 8443)",
        "{e}"
    );

    // AuthorizationPolicy, applied by editing the file.
    let allow = |blocks: &str| {
        doc(
            "AuthorizationPolicy",
            "default",
            "product-allow",
            &format!(
                "  selector: {{matchLabels: {{app: product}}}}\n  rules:\n  - from: [{{source: {{namespaces: [default]}}}}]\n    to: [{{operation: {{ports: ['8080']}}}}]\n  - from: [{{source: {{ipBlocks: [{blocks}]}}}}]\n    to: [{{operation: {{ports: ['8443']}}}}]"
            ),
        )
    };
    let deny = doc(
        "AuthorizationPolicy",
        "istio-system",
        "deny-blocked",
        "  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/blocked]}}]\n    when: [{key: destination.port, values: ['8080']}]",
    );
    let version = pod_ic.table_version();
    std::fs::write(&policies, format!("{peer}{}{deny}", allow("192.0.2.0/24"))).unwrap();
    assert!(pod_ic.wait_table_after(version, 10.0), "{}", pod_ic.log());

    let istio = ["-alpn", "istio"];
    let cert = |name: &str, spiffe: &str| m.ca.issue(&m.t.path(name), spiffe, Key::Ecdsa);
    let blocked = cert("blocked", &format!("{TD}/blocked"));
    let other_ns = cert("other-ns", "spiffe://cluster.local/ns/other/sa/x");
    // ALLOW by namespace: the VM's identity (namespace default) gets 8080.
    let out = m.s_client(&m.vm_certs, &istio, "GET /allowed HTTP/1.0\r\n\r\n");
    assert!(served(&out, "/allowed"), "{out}");
    // DENY beats that ALLOW: same namespace, but the denied principal.
    let out = m.s_client(&blocked, &istio, "GET /blocked HTTP/1.0\r\n\r\n");
    assert!(!served(&out, "/blocked"), "{out}");
    assert!(
        wait(5.0, || refused(&pod_ic, "policy_denied") == 1.0),
        "{}",
        pod_ic.log()
    );
    // No ALLOW rule matches another namespace.
    let out = m.s_client(&other_ns, &istio, "GET /other HTTP/1.0\r\n\r\n");
    assert!(!served(&out, "/other"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "policy_not_allowed") == 1.0));
    // Plaintext on PERMISSIVE 8443 is authorized too: not from 192.0.2.0/24.
    let out = plain(8443, "/plain-denied");
    assert!(!served(&out, "/plain-denied"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "policy_not_allowed") == 2.0));
    let e = explain(8080, &format!("{TD}/blocked"));
    assert_eq!(e["decision"]["reason"], "policy_denied", "{e}");
    assert_eq!(e["decision"]["policy"], "istio-system/deny-blocked", "{e}");
    let e = explain(8080, &format!("{TD}/vm"));
    assert_eq!(e["decision"]["policy"], "default/product-allow", "{e}");
    assert_eq!(e["decision"]["rule"], 0, "{e}");
    // The CLI says the same, in words.
    let bin = interceptor_tests::interceptor_bin();
    let out = sh(&mut m.pod_node().cmd(
        bin.to_str().expect("utf-8 path"),
        &[
            "explain",
            "--inbound",
            "8080",
            "--from",
            &format!("{TD}/blocked"),
        ],
    ));
    assert!(
        out.contains("denied by istio-system/deny-blocked rules[0] (DENY)"),
        "{out}"
    );

    // The VM's subnet in ipBlocks lets plaintext in; an ALLOW rule with an HTTP-only field
    // (paths) never matches at L4, so the other namespace stays out, and the log says why.
    let http_only = doc(
        "AuthorizationPolicy",
        "default",
        "paths",
        "  rules:\n  - from: [{source: {namespaces: [other]}}]\n    to: [{operation: {paths: [/admin]}}]",
    );
    let version = pod_ic.table_version();
    std::fs::write(
        &policies,
        format!("{peer}{}{deny}{http_only}", allow("10.77.0.0/24")),
    )
    .unwrap();
    assert!(pod_ic.wait_table_after(version, 10.0), "{}", pod_ic.log());
    let out = plain(8443, "/plain-allowed");
    assert!(served(&out, "/plain-allowed"), "{out}");
    let out = m.s_client(&other_ns, &istio, "GET /admin HTTP/1.0\r\n\r\n");
    assert!(!served(&out, "/admin"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "policy_not_allowed") == 3.0));
    assert!(
        pod_ic.log().contains("HTTP-only field")
            && pod_ic.log().contains("rules[0].to[0].operation.paths"),
        "{}",
        pod_ic.log()
    );

    // A bad policy edit is refused whole; the last good one keeps deciding.
    let version = pod_ic.table_version();
    let bad = doc(
        "AuthorizationPolicy",
        "default",
        "bad",
        "  rules:\n  - to: [{operation: {ports: ['http']}}]",
    );
    std::fs::write(&policies, format!("{peer}{bad}")).unwrap();
    assert!(wait(10.0, || pod_ic.counter(
        "interceptor_mesh_reload_errors_total",
        &[("reason", "invalid")]
    ) >= 1.0));
    assert_eq!(pod_ic.table_version(), version);
    let out = m.s_client(&blocked, &istio, "GET /still-blocked HTTP/1.0\r\n\r\n");
    assert!(!served(&out, "/still-blocked"), "{out}");
    assert_eq!(pod_ic.readiness(), Some(200));
}

/// Issue 22: the same intent from istiod. The test control plane composes the
/// PeerAuthentications and builds the RBAC filters of `virtualInbound` as istiod does (sheet
/// 4.1-4.3); the pod follows istiod (no policy file), and the same real clients (curl,
/// openssl with mesh certificates) are let in or refused as Istio means it, by the policy names
/// istiod writes. A change at the control plane is in force without a restart.
#[test]
fn peer_authentication_and_authorization_policy_from_istiod_decide_inbound() {
    use interceptor_tests::istiod::{ControlPlane, Mesh as CpMesh};
    use interceptor_tests::istiod_traffic::InboundWorkload;

    let m = Mesh::new();
    let _app = m
        .pod_node()
        .http("pod", &["10.77.0.2:8080", "10.77.0.2:8443"]);
    let doc = |kind: &str, ns: &str, name: &str, spec: &str| {
        format!("---\napiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
    };
    let peer = doc(
        "PeerAuthentication",
        "istio-system",
        "mesh",
        "  mtls: {mode: STRICT}",
    ) + &doc(
        "PeerAuthentication",
        "default",
        "product",
        "  selector: {matchLabels: {app: product}}\n  portLevelMtls:\n    8443: {mode: PERMISSIVE}",
    );
    let workload = InboundWorkload {
        namespace: "default".into(),
        labels: [("app".to_string(), "product".to_string())].into(),
        ports: vec![8080, 8443],
        http_ports: vec![],
    };
    let cp_mesh = |traffic: String| CpMesh {
        traffic,
        inbound: Some(workload.clone()),
        ..Default::default()
    };
    let cp = ControlPlane::start(
        &m.pod_node().ns.handle(),
        "10.77.0.2:15012".parse().unwrap(),
        &m.ca,
        "pod-token",
        cp_mesh(peer.clone()),
    );
    let pod_ic = m.pod_following_istiod();
    let explain = |port: u16, from: &str| {
        pod_ic.json(&format!(
            "/explain/inbound?port={port}&identity={from}&source=10.77.0.1"
        ))
    };
    assert!(
        wait(20.0, || explain(8080, "")["mtls"]["by"]
            .as_str()
            .is_some_and(|b| b.contains("virtualInbound"))),
        "istiod's virtualInbound never in force: {}",
        pod_ic.log()
    );
    let plain = |port: u16, path: &str| -> String {
        let url = format!("http://10.77.0.2:{port}{path}");
        let (_, out, err) = try_sh(&mut m.vm_node().cmd("curl", &["-sS", "-m", "5", &url]));
        out + &err
    };
    let served = |out: &str, path: &str| out.contains(&format!("pod GET {path}"));

    // STRICT from the mesh-wide PeerAuthentication on 8080, PERMISSIVE on 8443 by port.
    let out = plain(8080, "/strict");
    assert!(!served(&out, "/strict"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "plaintext_strict") == 1.0));
    assert!(served(&plain(8443, "/permissive"), "/permissive"));
    assert_eq!(explain(8080, "")["mtls"]["mode"], "strict");
    assert_eq!(explain(8443, "")["mtls"]["mode"], "permissive");

    // AuthorizationPolicies, pushed live: ALLOW by namespace on 8080 and by ipBlocks on 8443,
    // DENY a principal on 8080 (mesh-wide).
    let allow = doc(
        "AuthorizationPolicy",
        "default",
        "product-allow",
        "  selector: {matchLabels: {app: product}}\n  rules:\n  - from: [{source: {namespaces: [default]}}]\n    to: [{operation: {ports: ['8080']}}]\n  - from: [{source: {ipBlocks: [192.0.2.0/24]}}]\n    to: [{operation: {ports: ['8443']}}]",
    );
    let deny = doc(
        "AuthorizationPolicy",
        "istio-system",
        "deny-blocked",
        "  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/blocked]}}]\n    to: [{operation: {ports: ['8080']}}]",
    );
    cp.update(|c| *c = cp_mesh(format!("{peer}{allow}{deny}")));
    assert!(
        wait(10.0, || !explain(8080, "")["decision"]["applicable"]
            .as_array()
            .is_none_or(|a| a.is_empty())),
        "the policies never reached the pod"
    );
    let istio = ["-alpn", "istio"];
    let cert = |name: &str, spiffe: &str| m.ca.issue(&m.t.path(name), spiffe, Key::Ecdsa);
    let blocked = cert("blocked", &format!("{TD}/blocked"));
    let other_ns = cert("other-ns", "spiffe://cluster.local/ns/other/sa/x");
    let out = m.s_client(&m.vm_certs, &istio, "GET /allowed HTTP/1.0\r\n\r\n");
    assert!(served(&out, "/allowed"), "{out}");
    let out = m.s_client(&blocked, &istio, "GET /blocked HTTP/1.0\r\n\r\n");
    assert!(!served(&out, "/blocked"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "policy_denied") == 1.0));
    let out = m.s_client(&other_ns, &istio, "GET /other HTTP/1.0\r\n\r\n");
    assert!(!served(&out, "/other"), "{out}");
    assert!(wait(5.0, || refused(&pod_ic, "policy_not_allowed") == 1.0));
    let out = plain(8443, "/plain-denied");
    assert!(!served(&out, "/plain-denied"), "{out}");
    let e = explain(8080, &format!("{TD}/blocked"));
    assert_eq!(e["decision"]["reason"], "policy_denied", "{e}");
    assert_eq!(
        e["decision"]["policy"], "ns[istio-system]-policy[deny-blocked]-rule[0]",
        "{e}"
    );
    let e = explain(8080, &format!("{TD}/vm"));
    assert_eq!(
        e["decision"]["policy"], "ns[default]-policy[product-allow]-rule[0]",
        "{e}"
    );
    // The DENY lifted at the control plane: the blocked principal is in (same namespace).
    cp.update(|c| *c = cp_mesh(format!("{peer}{allow}")));
    assert!(wait(10.0, || served(
        &m.s_client(&blocked, &istio, "GET /unblocked HTTP/1.0\r\n\r\n"),
        "/unblocked"
    )));
}

/// The HTTP AuthorizationPolicy both pod-side scenarios apply: GET (or HEAD) under /public for
/// anyone, POST /orders for the VM's identity only, and a DENY for any request carrying
/// `x-evil`.
const HTTP_POLICIES: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: product-http, namespace: default}\nspec:\n  selector: {matchLabels: {app: product}}\n  rules:\n  - to: [{operation: {methods: [GET, HEAD], paths: ['/public*']}}]\n  - from: [{source: {principals: [cluster.local/ns/default/sa/vm]}}]\n    to: [{operation: {methods: [POST], paths: [/orders]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-evil, namespace: default}\nspec:\n  action: DENY\n  rules:\n  - when: [{key: 'request.headers[x-evil]', values: ['*']}]\n";

/// Plaintext requests to the pod's HTTP port 8080 under HTTP_POLICIES and what they get:
/// (curl arguments, path, status). Ours and a real Envoy's inbound answer them alike.
const PLAIN_CASES: [(&[&str], &str, u16); 6] = [
    (&[], "/public/a?x=1", 200),
    (&["-X", "POST"], "/public/a", 403),
    (&[], "/admin", 403),
    (&["-H", "x-evil: 1"], "/public/a", 403),
    // A plaintext client has no identity: POST /orders is not for it.
    (&["-X", "POST"], "/orders", 403),
    // HTTP/2 from the client, HTTP/1.1 to the app (the port is HTTP, not HTTP2).
    (&["--http2-prior-knowledge"], "/public/h2", 200),
];

/// Issue 26: requests judged one by one on the pod's HTTP port 8080, as Envoy's HTTP RBAC
/// does: real clients (curl over plaintext HTTP/1.1 and h2c where PERMISSIVE lets them in,
/// curl through the VM's interceptor over Istio mTLS, whose identity a rule names) get the
/// app's answer or Envoy's 403 `RBAC: access denied`, counted in istio_requests_total
/// (reporter destination) and refusals; the app sees the caller in x-forwarded-client-cert.
fn http_policy_decides_each_request(m: &Mesh, pod_ic: &Interceptor) {
    let plain = |args: &[&str]| -> String {
        let mut a = vec!["-sS", "-m", "5", "-w", " status=%{http_code}", "-i"];
        a.extend(args);
        let (_, out, err) = try_sh(&mut m.vm_node().cmd("curl", &a));
        out + &err
    };
    let url = |path: &str| format!("http://10.77.0.2:8080{path}");
    let allowed = |out: &str, what: &str| {
        assert!(out.contains(what) && out.contains("status=200"), "{out}");
    };
    let denied = |out: &str| {
        assert!(
            out.contains("status=403") && out.contains("RBAC: access denied"),
            "{out}"
        );
    };
    for (args, path, status) in PLAIN_CASES {
        let mut a = args.to_vec();
        let u = url(path);
        a.push(&u);
        let out = plain(&a);
        match status {
            200 => allowed(
                &out,
                &format!("pod GET {}", path.split('?').next().unwrap_or(path)),
            ),
            _ => denied(&out),
        }
    }
    assert!(
        wait(5.0, || pod_ic.counter(
            "istio_requests_total",
            &[("reporter", "destination"), ("response_code", "403")]
        ) == 4.0),
        "{}",
        pod_ic.log()
    );
    assert_eq!(
        pod_ic.counter(
            "istio_requests_total",
            &[("reporter", "destination"), ("response_code", "200")]
        ),
        2.0
    );
    assert!(refused(pod_ic, "policy_denied") >= 1.0);
    assert!(refused(pod_ic, "policy_not_allowed") >= 3.0);

    // An upgrade (a websocket's shape) on an allowed path switches and carries bytes.
    let script = "import socket\ns = socket.create_connection(('10.77.0.2', 8080))\ns.settimeout(3)\ns.sendall(b'GET /public/ws HTTP/1.1\\r\\nHost: product\\r\\nConnection: Upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n')\ngot = b''\nwhile b'\\r\\n\\r\\n' not in got:\n    got += s.recv(4096)\ns.sendall(b'ping-after-101')\ntry:\n    while not got.endswith(b'ping-after-101'):\n        b = s.recv(4096)\n        if not b:\n            break\n        got += b\nexcept OSError:\n    pass\nprint(got.decode('latin-1'))\n";
    let (_, out, err) = try_sh(&mut m.vm_node().cmd("python3", &["-c", script]));
    assert!(
        out.starts_with("HTTP/1.1 101") && out.trim_end().ends_with("ping-after-101"),
        "{out}{err}\n{}",
        pod_ic.log()
    );

    // Over mTLS from the VM's interceptor (curl by name in its captured cgroup): the VM's
    // identity may POST /orders; the app sees it in x-forwarded-client-cert.
    let (ok, out) = m.curl("/orders");
    assert!(ok, "{out}");
    assert!(out.contains("RBAC: access denied"), "GET /orders: {out}");
    let (_, out, err) = try_sh(&mut m.vm_node().with_resolv(
        &m.resolv,
        &format!("exec curl -sS -m 5 -i -X POST http://{HOST}:8080/orders"),
    ));
    assert!(out.contains("pod POST /orders"), "{out}{err}");
    let xfcc = format!("x-forwarded-client-cert=By={TD}/product;URI={TD}/vm");
    assert!(out.contains(&xfcc), "{out}");
    assert!(
        pod_ic.counter(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &format!("{TD}/vm")),
                ("connection_security_policy", "mutual_tls"),
                ("request_protocol", "http"),
                ("destination_service", HOST),
                ("response_code", "200")
            ]
        ) >= 1.0,
        "{}",
        pod_ic.log()
    );
    assert!(
        pod_ic.log().contains("inbound request"),
        "no per-request log line"
    );

    // A real Envoy sidecar as the client (the VM's identity, Istio mTLS, HTTP/1.1 upstream):
    // the same verdicts per request, on connections it keeps.
    let sidecar = Envoy::start(
        m.vm_node(),
        "envoy-client",
        &envoy::http_outbound_config(
            &m.vm_certs,
            15101,
            HOST,
            "10.77.0.2",
            8080,
            &format!("{TD}/product"),
            15000,
        ),
        15000,
    );
    let via_envoy = |args: &[&str], path: &str| {
        let mut a = vec!["-sS", "-m", "5", "-w", " status=%{http_code}"];
        a.extend(args);
        let url = format!("http://127.0.0.1:15101{path}");
        a.push(&url);
        sh(&mut m.vm_node().cmd("curl", &a))
    };
    for i in 0..3 {
        allowed(
            &via_envoy(&[], &format!("/public/envoy{i}")),
            &format!("pod GET /public/envoy{i}"),
        );
    }
    allowed(&via_envoy(&["-X", "POST"], "/orders"), "pod POST /orders");
    denied(&via_envoy(&[], "/admin"));
    denied(&via_envoy(&["-H", "x-evil: yes"], "/public/envoy"));
    let cluster = format!("cluster.outbound|8080||{HOST}");
    assert_eq!(
        sidecar.stat(&format!("{cluster}.upstream_rq_403")),
        2,
        "{}",
        sidecar.log()
    );
    // Six requests on fewer upstream connections: ours keeps them open between requests.
    assert!(
        sidecar.stat(&format!("{cluster}.upstream_cx_total")) < 6,
        "{}",
        sidecar.log()
    );
}

/// The same policies on a port that is not HTTP fail closed (as Istio on TCP chains): the
/// ALLOW rules need a request, so none matches, and the DENY rule without its header
/// condition denies everything.
fn the_same_policies_fail_closed_on_a_tcp_port(m: &Mesh, pod_ic: &Interceptor) {
    let (_, out, err) = try_sh(&mut m.vm_node().cmd(
        "curl",
        &["-sS", "-m", "5", "http://10.77.0.2:8443/public/a"],
    ));
    assert!(!out.contains("pod GET"), "{out}{err}");
    let e = pod_ic.json("/explain/inbound?port=8443&identity=&source=10.77.0.1");
    assert_eq!(e["decision"]["allowed"], false, "{e}");
    assert_eq!(e["http_port"], false, "{e}");
}

#[test]
fn http_authorization_policy_from_files_decides_each_request() {
    let m = Mesh::new();
    let _app = m
        .pod_node()
        .http("pod", &["10.77.0.2:8080", "10.77.0.2:8443"]);
    let _vm = m.vm(&vm_mesh(&pod_workload("product")));
    // The pod's table: its own service (port 8080 declared HTTP) and the policies.
    let policies = m.t.write(
        "pod-policy.yaml",
        &format!("{}{HTTP_POLICIES}", vm_mesh(&pod_workload("product"))),
    );
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&policies)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .args(["--inbound-ports", "8080,8443"])
        .args(["--namespace", "default", "--label", "app=product"])
        .log("pod-ic")
        .start();
    http_policy_decides_each_request(&m, &pod_ic);
    the_same_policies_fail_closed_on_a_tcp_port(&m, &pod_ic);
    // explain judges a request as the data path does.
    let e = pod_ic.json(&format!(
        "/explain/inbound?port=8080&identity={TD}/vm&source=10.77.0.1&method=POST&path=/orders"
    ));
    assert_eq!(e["decision"]["allowed"], true, "{e}");
    assert_eq!(e["decision"]["policy"], "default/product-http", "{e}");
    assert_eq!(e["decision"]["rule"], 1, "{e}");
    let e =
        pod_ic.json("/explain/inbound?port=8080&identity=&source=10.77.0.1&method=GET&path=/admin");
    assert_eq!(e["decision"]["reason"], "policy_not_allowed", "{e}");
}

/// Istio's request telemetry names both workloads (the pod's inbound HTTP port is served per
/// request with no policy asking for it): the VM's outbound HTTP path sends its
/// `x-envoy-peer-metadata` headers, the pod's inbound reads and removes them (its metrics name
/// the VM's workload, app and version; the app never sees them) and answers with its own,
/// which the VM reads and removes (its metrics name the pod's workload as the pod says it, not
/// as the VM's table has it; the client never sees them). Both sides carry Istio's 25 labels.
#[test]
fn request_metrics_name_both_workloads_through_the_metadata_exchange() {
    let m = Mesh::new();
    let _app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    // A catch-all http route makes the VM's outbound to the pod per request.
    let route = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: product, namespace: default}}\nspec:\n  hosts: [{HOST}]\n  http:\n  - route: [{{destination: {{host: {HOST}}}}}]\n"
    );
    let vm_file = m.t.write(
        "vm-mesh.yaml",
        &format!("{}{route}", vm_mesh(&pod_workload("product"))),
    );
    let vm_ic = m
        .vm_node()
        .interceptor()
        .mesh(&vm_file)
        .resolv(&m.resolv)
        .certs(&m.vm_certs)
        .args([
            "--workload-name",
            "billing-vms",
            "--label",
            "app=billing",
            "--label",
            "version=v3",
        ])
        .start();
    // The pod's own service declares 8080 HTTP; no policy needs a request: its inbound is
    // served per request by default (`--inbound-http requests`), as an Istio sidecar's.
    let own =
        m.t.write("pod-own.yaml", &vm_mesh(&pod_workload("product")));
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&own)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .args(["--inbound-ports", "8080"])
        .args([
            "--namespace",
            "default",
            "--label",
            "app=product",
            "--label",
            "version=v9",
        ])
        .args(["--workload-name", "product-group"])
        .log("pod-ic")
        .start();
    let dump = Tcpdump::start(
        &m.pod_node().ns,
        m.pod_node().iface("a"),
        "tcp port 8080",
        m.t.path("http-wire.pcap"),
    );
    let (_, out, err) = try_sh(&mut m.vm_node().with_resolv(
        &m.resolv,
        &format!("exec curl -sS -m 5 -i -X POST http://{HOST}:8080/orders"),
    ));
    assert!(out.contains("pod POST /orders"), "{out}{err}");
    assert!(
        !out.to_ascii_lowercase().contains("x-envoy-peer-metadata"),
        "neither the app nor the client sees the exchange's headers: {out}"
    );
    // The HTTP path's mTLS offers Istio's HTTP ALPN first, as Envoy's istio.alpn filter.
    let pcap = dump.stop();
    let payloads = tcp_payloads(&pcap, "dst port 8080");
    let hello = interceptor::tls::parse_client_hello(&payloads[0])
        .expect("a TLS ClientHello")
        .expect("complete in the first segment");
    let alpn: Vec<String> = hello
        .alpn
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect();
    assert_eq!(alpn, ["istio-http/1.1", "istio", "http/1.1"]);
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "billing-vms"),
        ("source_workload_namespace", "default"),
        ("source_app", "billing"),
        ("source_version", "v3"),
        ("source_canonical_service", "billing"),
        ("source_canonical_revision", "v3"),
        ("destination_workload", "product-group"),
        ("destination_workload_namespace", "default"),
        ("destination_app", "product"),
        ("destination_canonical_revision", "v9"),
        ("destination_service", HOST),
        ("destination_service_name", "product"),
        ("destination_service_namespace", "default"),
        ("destination_principal", &format!("{TD}/product")),
        ("response_code", "200"),
    ];
    assert!(
        wait(5.0, || pod_ic.counter("istio_requests_total", &destination)
            == 1.0),
        "the pod's metrics: {}",
        pod_ic.metrics().0
    );
    let (vm_principal, pod_principal) = (format!("{TD}/vm"), format!("{TD}/product"));
    let source = [
        ("reporter", "source"),
        ("source_workload", "billing-vms"),
        ("source_app", "billing"),
        ("destination_workload", "product-group"),
        ("destination_app", "product"),
        // As the pod said (its `version` label), not as the VM's table has it.
        ("destination_version", "v9"),
        ("destination_service_name", "product"),
        // Both principals from the pooled upstream connection's mTLS.
        ("source_principal", &vm_principal),
        ("destination_principal", &pod_principal),
        ("response_code", "200"),
    ];
    assert!(
        wait(5.0, || vm_ic.counter("istio_requests_total", &source)
            == 1.0),
        "the VM's metrics: {}",
        vm_ic.metrics().0
    );
}

#[test]
fn http_authorization_policy_from_istiod_decides_each_request() {
    use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh as CpMesh, Service};
    use interceptor_tests::istiod_traffic::InboundWorkload;

    let m = Mesh::new();
    let _app = m
        .pod_node()
        .http("pod", &["10.77.0.2:8080", "10.77.0.2:8443"]);
    let _vm = m.vm(&vm_mesh(&pod_workload("product")));
    let workload = InboundWorkload {
        namespace: "default".into(),
        labels: [("app".to_string(), "product".to_string())].into(),
        ports: vec![8080, 8443],
        http_ports: vec![8080],
    };
    let mut product = Service::new(HOST, "240.240.7.7", 8080);
    product.endpoints = vec![Endpoint::new("10.77.0.2", 8080)];
    product.http_ports = vec![8080];
    let _cp = ControlPlane::start(
        &m.pod_node().ns.handle(),
        "10.77.0.2:15012".parse().unwrap(),
        &m.ca,
        "pod-token",
        CpMesh {
            traffic: HTTP_POLICIES.into(),
            inbound: Some(workload),
            // The pod's own service, as istiod's CDS/EDS give it (counted under its host).
            services: vec![product],
            ..Default::default()
        },
    );
    let pod_ic = m.pod_following_istiod();
    assert!(
        wait(20.0, || pod_ic.json(
            "/explain/inbound?port=8080&identity=&source=10.77.0.1"
        )["http_port"]
            == true),
        "istiod's HTTP chains never in force: {}",
        pod_ic.log()
    );
    http_policy_decides_each_request(&m, &pod_ic);
    the_same_policies_fail_closed_on_a_tcp_port(&m, &pod_ic);
    let e = pod_ic.json(&format!(
        "/explain/inbound?port=8080&identity={TD}/vm&source=10.77.0.1&method=POST&path=/orders"
    ));
    assert_eq!(e["decision"]["allowed"], true, "{e}");
    assert_eq!(
        e["decision"]["policy"], "ns[default]-policy[product-http]-rule[1]",
        "{e}"
    );
}

/// Envoy is the reference for what istiod's HTTP RBAC means: a real Envoy as the pod's
/// sidecar, fed by the test control plane the same virtualInbound (HTTP chains with the HTTP
/// RBAC of HTTP_POLICIES) and inbound clusters as our istiod scenario, inbound traffic
/// redirected to it as istio-init does, answers the same plaintext requests as ours does
/// (PLAIN_CASES, asserted on ours in the two scenarios above).
#[test]
fn a_real_envoy_sidecar_judges_the_same_requests_alike() {
    use interceptor_tests::istiod::{ControlPlane, Mesh as CpMesh};
    use interceptor_tests::istiod_traffic::InboundWorkload;

    let m = Mesh::new();
    let app = m.pod_node().http("pod", &["10.77.0.2:8080"]);
    let cp = ControlPlane::start(
        &m.pod_node().ns.handle(),
        "10.77.0.2:15012".parse().unwrap(),
        &m.ca,
        "pod-token",
        CpMesh {
            traffic: HTTP_POLICIES.into(),
            inbound: Some(InboundWorkload {
                namespace: "default".into(),
                labels: [("app".to_string(), "product".to_string())].into(),
                ports: vec![8080],
                http_ports: vec![8080],
            }),
            ..Default::default()
        },
    );
    // virtualOutbound and virtualInbound.
    let envoy = envoy::sidecar(m.pod_node(), &cp, "10.77.0.2:15012", &m.pod_certs, 2);
    sh(&mut m.pod_node().cmd(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ],
    ));
    let plain = |args: &[&str], path: &str| -> (u16, String) {
        let url = format!("http://10.77.0.2:8080{path}");
        let mut a = vec!["-sS", "-m", "5", "-w", "\n%{http_code}"];
        a.extend(args);
        a.push(&url);
        let (_, out, err) = try_sh(&mut m.vm_node().cmd("curl", &a));
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), format!("{body}{err}"))
    };
    for (args, path, status) in PLAIN_CASES {
        let (code, body) = plain(args, path);
        assert_eq!(
            code,
            status,
            "Envoy answered {args:?} {path} with {code}: {body}\n{}",
            envoy.log()
        );
        if status == 403 {
            assert_eq!(body.trim(), "RBAC: access denied", "{body}");
        }
    }
    assert_eq!(
        app.output().matches(" /public/").count(),
        2,
        "the app saw: {}",
        app.output()
    );
    assert!(
        envoy.stat("http.inbound_0.0.0.0_8080.rbac.denied") >= 4,
        "{}",
        envoy.log()
    );
}
