//! Issue 13 scenarios: HBONE (SPEC 11). VM to VM through both interceptors (pooling, many
//! streams on one connection, a large transfer, a reset that spares its siblings), refusals at
//! our 15008, and Envoy as the independent HBONE peer both ways: as a terminator (Istio's
//! waypoint: HTTP/2 CONNECT over mTLS) behind our outbound, and as an originator (Istio's
//! sidecar towards ambient pods: tcp_proxy tunneling_config) in front of our 15008.

use std::path::PathBuf;

use hyper::Method;
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::envoy::{self, Envoy};
use interceptor_tests::hbone::{statuses, ClientCert};
use interceptor_tests::wire::{tcp_payloads, Tcpdump};
use interceptor_tests::{
    helper_bin, sh, try_sh, wait_for, Interceptor, Net, Node, Proc, Run, Subnet, Topology,
};

const TD: &str = "spiffe://cluster.local/ns/default/sa";
const HOST: &str = "product.default.svc.cluster.local";
const VIP: &str = "240.240.0.10";
const POD: &str = "10.77.0.2";

/// The VM's table: `product` (HTTP 8080, echo 9000) on the pod, marked as Istio marks HBONE
/// workloads (`marker` is the label or the annotation).
fn vm_mesh(marker: &str) -> String {
    let (labels, annotations) = match marker {
        "annotation" => (
            "{app: product}",
            "\n  annotations: {ambient.istio.io/redirection: enabled}",
        ),
        "label" => ("{app: product, networking.istio.io/tunnel: http}", ""),
        _ => ("{app: product, security.istio.io/tlsMode: istio}", ""),
    };
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: product, namespace: default}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  ports: [{{number: 8080, name: http, protocol: HTTP}}, {{number: 9000, name: echo, protocol: TCP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: product}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: product-pod
  namespace: default{annotations}
spec:
  address: {POD}
  labels: {labels}
  serviceAccount: product
"#
    )
}

struct Mesh {
    ca: Ca,
    vm_certs: PathBuf,
    pod_certs: PathBuf,
    resolv: PathBuf,
    t: Net,
}

impl Mesh {
    fn new() -> Self {
        let t = Topology::vm_pod();
        let ca = Ca::new("cluster.local root");
        let vm_certs = ca.issue(&t.path("vm-certs"), &format!("{TD}/vm"), Key::Ecdsa);
        let pod_certs = ca.issue(&t.path("pod-certs"), &format!("{TD}/product"), Key::Rsa);
        let resolv = t.write(
            "resolv.conf",
            &format!(
                "nameserver {}\noptions timeout:2 attempts:1\n",
                Subnet::FAKE_NS
            ),
        );
        Self {
            ca,
            vm_certs,
            pod_certs,
            resolv,
            t,
        }
    }

    fn vm_node(&self) -> &Node {
        self.t.node("vm")
    }

    fn pod_node(&self) -> &Node {
        self.t.node("pod")
    }

    fn vm(&self, marker: &str) -> Interceptor {
        self.vm_run(marker).start()
    }

    /// The VM's interceptor with `vm_mesh(marker)`, not started yet (for more flags).
    fn vm_run(&self, marker: &str) -> Run {
        let mesh = self.t.write("vm-mesh.yaml", &vm_mesh(marker));
        self.vm_node()
            .interceptor()
            .mesh(&mesh)
            .resolv(&self.resolv)
            .certs(&self.vm_certs)
    }

    /// The pod's interceptor: no inbound ports listed, so 15008 is all sk_lookup steers.
    fn pod(&self, extra: &[&str]) -> Interceptor {
        let mesh = self
            .t
            .write("pod-mesh.yaml", "# the pod only serves inbound\n");
        self.pod_node()
            .interceptor()
            .mesh(&mesh)
            .resolv(&self.resolv)
            .certs(&self.pod_certs)
            .args(extra.iter().copied())
            .log("pod-ic")
            .start()
    }

    /// The apps: HTTP on 8080, the stream checker on 9000.
    fn apps(&self) -> (Proc, Proc) {
        let pod = self.pod_node();
        let http = pod.http("pod", &[&format!("{POD}:8080")]);
        let c = pod.cmd(
            helper("stream-check").as_str(),
            &["serve", &format!("{POD}:9000")],
        );
        let mut streams = Proc::spawn("stream-check", c, pod.path("stream-check.log"));
        streams.wait_for_output("listening", 10.0);
        (http, streams)
    }

    fn curl(&self, path: &str) -> (bool, String) {
        let (ok, out, err) = try_sh(&mut self.vm_node().with_resolv(
            &self.resolv,
            &format!("exec curl -sS -m 5 http://{HOST}:8080{path}"),
        ));
        (ok, out + &err)
    }

    /// The stream checker from the VM's captured cgroup, its JSON answer.
    fn check(&self, args: &[&str]) -> serde_json::Value {
        let out = sh(&mut self
            .vm_node()
            .in_cgroup(helper("stream-check").as_str(), args));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

fn helper(name: &str) -> String {
    helper_bin(name).to_str().expect("utf-8 path").to_string()
}

fn wait(secs: f64, f: impl Fn() -> bool) -> bool {
    wait_for(secs, || f().then_some(())).is_some()
}

fn hbone(ic: &Interceptor, what: &str, direction: &str) -> f64 {
    ic.counter(
        &format!("interceptor_hbone_{what}_total"),
        &[("direction", direction)],
    )
}

#[test]
fn vm_to_vm_over_hbone_pools_two_hundred_connections_into_at_most_two_handshakes() {
    let m = Mesh::new();
    let (app, _streams) = m.apps();
    let pod_ic = m.pod(&[]);
    let vm_ic = m.vm("label");

    let (ok, out) = m.curl("/hello");
    assert!(ok, "{out}\n{}\n{}", vm_ic.log(), pod_ic.log());
    // The app sees the connection from 127.0.0.6, as from the sidecar wire.
    assert!(out.starts_with("pod GET /hello from 127.0.0.6:"), "{out}");
    assert!(app.output().contains("GET /hello from 127.0.0.6"));

    let r = m.check(&["sequential", &format!("{VIP}:9000"), "200"]);
    assert_eq!(r["echoed"], 200, "{r}\n{}", pod_ic.log());
    assert!(
        pod_ic.wait_counter(
            "interceptor_hbone_streams_total",
            &[("direction", "inbound")],
            201.0,
            10.0
        ),
        "{}",
        pod_ic.metrics().0
    );
    let handshakes = hbone(&pod_ic, "connections", "inbound");
    assert!(
        (1.0..=2.0).contains(&handshakes),
        "{handshakes} TLS handshakes for 201 connections"
    );
    assert!(hbone(&vm_ic, "connections", "outbound") <= 2.0);
    // The pooled connection stays open for the next stream, on both sides.
    let open = |ic: &Interceptor, direction: &str| {
        ic.counter(
            "interceptor_hbone_open_connections",
            &[("direction", direction)],
        )
    };
    assert_eq!(
        open(&vm_ic, "outbound"),
        hbone(&vm_ic, "connections", "outbound"),
        "{}",
        vm_ic.metrics().0
    );
    assert_eq!(open(&pod_ic, "inbound"), handshakes);
    assert_eq!(hbone(&vm_ic, "streams", "outbound"), 201.0);
    // Each side proved who the other is, per stream.
    assert!(wait(5.0, || pod_ic.counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &format!("{TD}/vm")),
            ("destination_principal", &format!("{TD}/product")),
        ]
    ) == 201.0));
    assert!(wait(5.0, || vm_ic.counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("connection_security_policy", "mutual_tls"),
            ("destination_principal", &format!("{TD}/product")),
        ]
    ) == 201.0));
    // explain says what the data path did.
    let mut c = m.vm_node().cmd(
        interceptor_tests::interceptor_bin()
            .to_str()
            .expect("utf-8"),
        &["explain", &format!("{VIP}:9000")],
    );
    let out = sh(&mut c);
    assert!(
        out.contains(&format!("-> {POD}:15008 via direct weight 1.00 HBONE")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "CONNECT {POD}:9000 over TLS 1.3 ALPN h2, server must be one of [{TD}/product]"
        )),
        "{out}"
    );
}

#[test]
fn a_hundred_concurrent_streams_share_one_connection_and_a_reset_spares_its_siblings() {
    let m = Mesh::new();
    let _apps = m.apps();
    let pod_ic = m.pod(&[]);
    let _vm_ic = m.vm("annotation");
    let r = m.check(&["concurrent", &format!("{VIP}:9000"), "100"]);
    assert_eq!(r["echoed_before"], 100, "{r}");
    assert_eq!(r["echoed_after_reset"], 99, "{r}\n{}", pod_ic.log());
    assert_eq!(
        hbone(&pod_ic, "connections", "inbound"),
        1.0,
        "{}",
        pod_ic.metrics().0
    );
    assert!(pod_ic.wait_counter(
        "interceptor_hbone_streams_total",
        &[("direction", "inbound")],
        100.0,
        5.0
    ));
}

#[test]
fn a_gibibyte_crosses_one_stream_intact() {
    let m = Mesh::new();
    let _apps = m.apps();
    let pod_ic = m.pod(&[]);
    let _vm_ic = m.vm("label");
    let gib = (1u64 << 30).to_string();
    let r = m.check(&["bulk", &format!("{VIP}:9000"), &gib]);
    assert_eq!(r["match"], true, "{r}\n{}", pod_ic.log());
    eprintln!("1 GiB over HBONE (debug build): {r}");
}

#[test]
fn the_wire_carries_only_tls_1_3_with_alpn_h2_and_no_sni_to_15008() {
    let m = Mesh::new();
    let _apps = m.apps();
    let _pod_ic = m.pod(&[]);
    let _vm_ic = m.vm("label");
    let pod = m.pod_node();
    let dump = Tcpdump::start(&pod.ns, pod.iface("a"), "tcp", m.t.path("wire.pcap"));
    let (ok, out) = m.curl("/secret-plaintext-marker");
    assert!(ok, "{out}");
    let pcap = dump.stop();
    let to_app = tcp_payloads(&pcap, "tcp and not port 15008");
    assert!(to_app.is_empty(), "traffic besides 15008: {}", to_app.len());
    let payloads = tcp_payloads(&pcap, "dst port 15008");
    assert!(!payloads.is_empty(), "nothing to 15008");
    let hello = interceptor::tls::parse_client_hello(&payloads[0])
        .expect("a TLS ClientHello")
        .expect("complete in the first segment");
    assert_eq!(hello.sni, None, "HBONE clients send no SNI");
    assert_eq!(hello.alpn, vec![b"h2".to_vec()]);
    let all: Vec<u8> = tcp_payloads(&pcap, "port 15008").concat();
    let text = String::from_utf8_lossy(&all);
    assert!(
        !text.contains("secret-plaintext-marker") && !text.contains("CONNECT"),
        "plaintext on the wire"
    );
}

/// AuthorizationPolicy on HBONE streams, as on the sidecar wire: a mesh-wide DENY of one
/// principal beats the workload's ALLOW of port 8080; a port no ALLOW rule names gets 401.
/// A stream to an HTTP port of the pod (its own service declares 8080 HTTP) is served request
/// by request after its 200, as the sidecar's inbound HTTP chains take HBONE's inner streams:
/// each request counted in Istio's request metrics with the client's proved identity.
#[test]
fn hbone_streams_to_an_http_port_are_served_request_by_request() {
    let m = Mesh::new();
    let _apps = m.apps();
    let _vm_ic = m
        .vm_run("label")
        .args(["--label", "app=ratings", "--label", "version=v3"])
        .start();
    let own = m.t.write("pod-own.yaml", &vm_mesh("label"));
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&own)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .log("pod-ic")
        .start();
    for i in 0..3 {
        let (ok, out) = m.curl(&format!("/over-hbone-{i}"));
        assert!(
            ok && out.contains(&format!("pod GET /over-hbone-{i}")),
            "{out}"
        );
    }
    assert!(
        wait(5.0, || pod_ic.counter(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &format!("{TD}/vm")),
                ("destination_service", HOST),
                ("request_protocol", "http"),
                ("connection_security_policy", "mutual_tls"),
                // The client's workload as its baggage named it.
                ("source_canonical_service", "ratings"),
                ("source_canonical_revision", "v3"),
                ("source_workload_namespace", "default"),
                ("response_code", "200"),
            ]
        ) == 3.0),
        "{}",
        pod_ic.metrics().0
    );
    assert!(hbone(&pod_ic, "streams", "inbound") >= 3.0);
}

/// A port of the pod's own service with no declared protocol (a ServiceEntry port without
/// `protocol`: sniffed, as istiod's Auto listeners): an HBONE stream's first bytes, inside the
/// stream, decide after its 200 — HTTP is served request by request (Istio's request metrics,
/// reporter destination, the client's proved identity), other bytes reach the app byte-exact
/// with what was read to tell replayed first.
#[test]
fn hbone_streams_to_a_port_of_no_declared_protocol_are_sniffed() {
    let m = Mesh::new();
    let _apps = m.apps();
    let vm_ic = m.vm("label");
    let own = vm_mesh("label")
        .replace(", protocol: HTTP", "")
        .replace(", protocol: TCP", "");
    let own = m.t.write("pod-own.yaml", &own);
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&own)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .log("pod-ic")
        .start();
    for i in 0..3 {
        let (ok, out) = m.curl(&format!("/sniffed-{i}"));
        assert!(
            ok && out.contains(&format!("pod GET /sniffed-{i}")),
            "{out}\n{}\n{}",
            vm_ic.log(),
            pod_ic.log()
        );
    }
    assert!(
        wait(5.0, || pod_ic.counter(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &format!("{TD}/vm")),
                ("request_protocol", "http"),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", "200"),
            ]
        ) == 3.0),
        "{}",
        pod_ic.metrics().0
    );
    let detected = |protocol: &str| {
        pod_ic.counter(
            "interceptor_protocol_detected_total",
            &[("direction", "inbound"), ("protocol", protocol)],
        )
    };
    assert!(detected("http1") >= 1.0, "{}", pod_ic.metrics().0);
    let r = m.check(&["sequential", &format!("{VIP}:9000"), "20"]);
    assert_eq!(r["echoed"], 20, "{r}\n{}", pod_ic.log());
    assert_eq!(detected("tcp"), 20.0, "{}", pod_ic.metrics().0);
    // The bytes made no requests.
    assert_eq!(
        pod_ic.counter("istio_requests_total", &[("reporter", "destination")]),
        3.0
    );
}

#[test]
fn hbone_streams_obey_authorization_policy() {
    let m = Mesh::new();
    let _apps = m.apps();
    let other =
        m.ca.issue(&m.t.path("other-certs"), &format!("{TD}/other"), Key::Ecdsa);
    let policy = m.t.write(
        "pod-policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-8080, namespace: default}\nspec:\n  selector: {matchLabels: {app: product}}\n  rules:\n  - to: [{operation: {ports: ['8080']}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-other, namespace: istio-system}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/other]}}]\n",
    );
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&policy)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .args(["--label", "app=product"])
        .log("pod-ic")
        .start();
    let server = format!("{POD}:15008").parse().expect("addr");
    let vm = m.vm_node();
    let ask = |cert, targets: &[&str]| {
        let reqs: Vec<(Method, &str)> = targets.iter().map(|t| (Method::CONNECT, *t)).collect();
        vm.ns
            .run(|| statuses(server, ClientCert::Files(cert), &reqs))
    };
    let (http, echo) = (format!("{POD}:8080"), format!("{POD}:9000"));
    assert_eq!(
        ask(&m.vm_certs, &[&http, &echo]),
        Ok(vec![200, 401]),
        "{}",
        pod_ic.log()
    );
    assert_eq!(ask(&other, &[&http]), Ok(vec![401]));
    let refused = |r: &str| pod_ic.counter("interceptor_inbound_refused_total", &[("reason", r)]);
    assert_eq!(refused("policy_not_allowed"), 1.0, "{}", pod_ic.metrics().0);
    assert_eq!(refused("policy_denied"), 1.0, "{}", pod_ic.metrics().0);
}

#[test]
fn our_15008_refuses_open_proxying_strangers_policy_and_a_closed_app() {
    let m = Mesh::new();
    let _apps = m.apps();
    let other =
        m.ca.issue(&m.t.path("other-certs"), &format!("{TD}/other"), Key::Ecdsa);
    let foreign =
        Ca::new("another root").issue(&m.t.path("foreign"), &format!("{TD}/vm"), Key::Ecdsa);
    let pod_ic = m.pod(&["--inbound-allow", &format!("{TD}/vm")]);
    let server = format!("{POD}:15008").parse().expect("addr");
    let vm = m.vm_node();
    let codes = vm.ns.run(|| {
        statuses(
            server,
            ClientCert::Files(&m.vm_certs),
            &[
                (Method::CONNECT, &format!("{POD}:8080")),
                (Method::CONNECT, "10.77.0.1:8080"),
                (Method::CONNECT, "product:8080"),
                (Method::CONNECT, "product"),
                (Method::GET, &format!("{POD}:8080")),
                (Method::CONNECT, &format!("{POD}:8081")),
            ],
        )
    });
    // 200 for the VM's own address; 400 for another address (never an open proxy), for a
    // service this VM does not serve, for no port and for anything but CONNECT; 503 where the
    // app refuses.
    assert_eq!(
        codes,
        Ok(vec![200, 400, 400, 400, 400, 503]),
        "{}",
        pod_ic.log()
    );
    // The allow-list: a mesh identity that is not allowed gets 401.
    let codes = vm.ns.run(|| {
        statuses(
            server,
            ClientCert::Files(&other),
            &[(Method::CONNECT, &format!("{POD}:8080"))],
        )
    });
    assert_eq!(codes, Ok(vec![401]));
    // No certificate, another root: no HTTP/2 at all.
    for cert in [ClientCert::None, ClientCert::Files(&foreign)] {
        let r = vm
            .ns
            .run(|| statuses(server, cert, &[(Method::CONNECT, &format!("{POD}:8080"))]));
        assert!(r.is_err(), "{r:?}");
    }
    // Plaintext to 15008: closed without an answer.
    let (_, out, _) = try_sh(&mut vm.cmd(
        "curl",
        &[
            "-sS",
            "-m",
            "5",
            "--http1.1",
            &format!("http://{POD}:15008/"),
        ],
    ));
    assert!(out.is_empty(), "{out}");
    for reason in [
        "hbone_not_local",
        "hbone_bad_authority",
        "hbone_not_connect",
        "app_unreachable",
        "not_allowed",
    ] {
        assert!(
            pod_ic.counter("interceptor_inbound_refused_total", &[("reason", reason)]) >= 1.0,
            "{reason}: {}",
            pod_ic.metrics().0
        );
    }
    // The failed handshakes, each by its own reason.
    let refused = |r: &str| pod_ic.counter("interceptor_inbound_refused_total", &[("reason", r)]);
    assert!(
        refused("no_client_certificate") >= 1.0,
        "{}",
        pod_ic.metrics().0
    );
    assert!(
        refused("client_cert_untrusted") >= 1.0,
        "{}",
        pod_ic.metrics().0
    );
    let handshakes: f64 = [
        "handshake",
        "no_client_certificate",
        "client_cert_untrusted",
        "tls_incompatible",
    ]
    .into_iter()
    .map(refused)
    .sum();
    assert!(handshakes >= 3.0, "{}", pod_ic.metrics().0);
}

/// Our outbound to Envoy configured as Istio configures a waypoint: HTTP/2 CONNECT over
/// TLS 1.3 with client certificates, tunnelled to the stream's authority.
#[test]
fn envoy_as_hbone_terminator_takes_our_streams_and_sees_our_identity() {
    let m = Mesh::new();
    let (app, _streams) = m.apps();
    let waypoint = Envoy::start(
        m.pod_node(),
        "envoy-hbone",
        &envoy::hbone_terminator_config(&m.pod_certs, POD, 15008, 15000),
        15000,
    );
    let vm_ic = m.vm("label");
    for i in 0..3 {
        let (ok, out) = m.curl(&format!("/waypoint{i}"));
        assert!(
            ok && out.starts_with(&format!("pod GET /waypoint{i} from {POD}")),
            "{out}\n{}",
            waypoint.log()
        );
    }
    assert_eq!(app.output().matches("GET /waypoint").count(), 3);
    let r = m.check(&["bulk", &format!("{VIP}:9000"), "33554432"]);
    assert_eq!(r["match"], true, "{r}");
    // Envoy saw CONNECT streams for the endpoint's IP:port from our proven identity.
    assert!(
        wait(5.0, || waypoint
            .log()
            .matches(&format!(
                "hbone method=CONNECT authority={POD}:8080 status=200 peer_san={TD}/vm"
            ))
            .count()
            == 3),
        "{}",
        waypoint.log()
    );
    // `forwarded` names the application's address as the peer can route it (issue 25: it was
    // the loopback hop capture made) and the service.
    assert!(
        waypoint
            .log()
            .contains(&format!("forwarded=for=\"{}:", m.vm_node().ip("a"))),
        "{}",
        waypoint.log()
    );
    // One TLS handshake for all four streams, and we checked Envoy's identity.
    assert_eq!(waypoint.stat("listener.10.77.0.2_15008.ssl.handshake"), 1);
    assert!(wait(5.0, || vm_ic.counter(
        "istio_tcp_connections_closed_total",
        &[("destination_principal", &format!("{TD}/product"))]
    ) == 4.0));
}

/// Envoy's tcp_proxy tunnelling over HTTP/2 + mTLS, as Istio's sidecar reaches ambient pods, to
/// our 15008; it checks our identity, we check its.
#[test]
fn envoy_as_hbone_originator_reaches_our_15008_and_both_sides_check_identities() {
    let m = Mesh::new();
    let (app, _streams) = m.apps();
    let pod_ic = m.pod(&[]);
    let vm = m.vm_node();
    let originator = Envoy::start(
        vm,
        "envoy-originate",
        &envoy::hbone_originator_config(
            &m.vm_certs,
            &[(15101, &format!("{POD}:8080"))],
            POD,
            15008,
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
            "{out}\n{}",
            pod_ic.log()
        );
    }
    assert_eq!(app.output().matches("GET /from-envoy").count(), 3);
    assert!(
        wait(5.0, || pod_ic.counter(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &format!("{TD}/vm"))
            ]
        ) == 3.0),
        "{}",
        pod_ic.metrics().0
    );
    assert!(hbone(&pod_ic, "connections", "inbound") >= 1.0);
    assert!(
        originator.stat("cluster.hbone.ssl.handshake") >= 1,
        "{}",
        originator.log()
    );
    // Envoy expecting another identity refuses us.
    let wrong = Envoy::start(
        vm,
        "envoy-wrong-san",
        &envoy::hbone_originator_config(
            &m.vm_certs,
            &[(15102, &format!("{POD}:8080"))],
            POD,
            15008,
            &format!("{TD}/billing"),
            15001,
        ),
        15001,
    );
    let (ok, out, _) =
        try_sh(&mut vm.cmd("curl", &["-sS", "-m", "5", "http://127.0.0.1:15102/wrong"]));
    assert!(!ok || !out.contains("pod GET"), "{out}");
    assert!(
        wrong.wait_stat("cluster.hbone.ssl.fail_verify_san", 1, 5.0),
        "{}",
        wrong.log()
    );
    assert_eq!(app.output().matches("GET /wrong").count(), 0);
}

/// Sidecar and HBONE endpoints in one service: each is reached the way it speaks.
#[test]
fn one_service_with_a_sidecar_and_an_hbone_endpoint_reaches_both() {
    let m = Mesh::new();
    let (app, _streams) = m.apps();
    let pod_ic = m.pod(&["--inbound-ports", "8080"]);
    let mesh = vm_mesh("label").replace(
        "  serviceAccount: product\n",
        "  serviceAccount: product\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: product-sidecar, namespace: default}\nspec:\n  address: 10.77.0.2\n  ports: {http: 8080}\n  labels: {app: product, security.istio.io/tlsMode: istio}\n  serviceAccount: product\n  network: ''\n",
    );
    // The same pod twice, once as a sidecar, once as HBONE: both kinds in one service.
    let mesh = m.t.write("vm-mesh.yaml", &mesh);
    let _vm_ic = m
        .vm_node()
        .interceptor()
        .mesh(&mesh)
        .resolv(&m.resolv)
        .certs(&m.vm_certs)
        .start();
    for i in 0..20 {
        let (ok, out) = m.curl(&format!("/both{i}"));
        assert!(
            ok && out.starts_with(&format!("pod GET /both{i} from 127.0.0.6")),
            "{out}"
        );
    }
    assert_eq!(app.output().matches("GET /both").count(), 20);
    let served = pod_ic.counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("destination_service", "10.77.0.2:8080"),
        ],
    );
    let hbone_streams = hbone(&pod_ic, "streams", "inbound");
    assert_eq!(served, 20.0);
    // Weighted 1:1, twenty connections all of one kind would be a one-in-half-a-million event.
    assert!(
        (1.0..20.0).contains(&hbone_streams),
        "{hbone_streams} of 20 over HBONE"
    );
}

/// Double HBONE (SPEC 11): the VM in network A reaches an HBONE-only endpoint in network B
/// through B's east-west gateway: an outer tunnel to the gateway (its identity checked), and
/// inside it the VM's own TLS to the endpoint (the endpoint's identity checked, end to end).
#[test]
fn double_hbone_through_the_gateway_keeps_the_inner_tls_end_to_end() {
    const POD_B: &str = "10.88.0.2";
    const GW_A: &str = "10.77.0.3";
    const ONLY_B: &str = "onlyb.default.svc.cluster.local";
    let t = Topology::new()
        .network("a")
        .network("b")
        .node("vm", &["a"])
        .node("pod", &["a"])
        .node("gw", &["a", "b"])
        .node("pod-b", &["b"])
        .build();
    let ca = Ca::new("cluster.local root");
    let vm_certs = ca.issue(&t.path("vm-certs"), &format!("{TD}/vm"), Key::Ecdsa);
    let gw_certs = ca.issue(
        &t.path("gw-certs"),
        "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway",
        Key::Ecdsa,
    );
    let b_certs = ca.issue(&t.path("b-certs"), &format!("{TD}/product-b"), Key::Ecdsa);
    let mesh = |sa: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: onlyb, namespace: default}}\nspec:\n  hosts: [{ONLY_B}]\n  addresses: [240.240.0.20]\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  workloadSelector: {{labels: {{app: onlyb}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: onlyb, namespace: default}}\nspec:\n  address: {POD_B}\n  labels: {{app: onlyb, networking.istio.io/tunnel: http}}\n  serviceAccount: {sa}\n"
        )
    };
    let networks = t.write(
        "networks.yaml",
        &format!("networks:\n  network-a:\n    endpoints: [{{fromCidr: 10.77.0.0/24}}]\n  network-b:\n    endpoints: [{{fromCidr: 10.88.0.0/24}}]\n    gateways: [{{address: {GW_A}, port: 15443}}]\n"),
    );
    let shared = t.write("mesh.yaml", &mesh("product-b"));
    let vm_mesh = t.write("vm-mesh.yaml", &mesh("product-b"));
    let resolv = t.write(
        "resolv.conf",
        "nameserver 10.77.0.53\noptions timeout:2 attempts:1\n",
    );
    let pod_b = t.node("pod-b");
    let _app = pod_b.http("pod-b", &[&format!("{POD_B}:8080")]);
    // The destination knows the service (it maps onlyb:8080 to its own port).
    let b_ic = pod_b
        .interceptor()
        .mesh(&shared)
        .args(["--mesh-networks"])
        .arg(&networks)
        .args(["--network", "network-b"])
        // The streams as bytes: their `forwarded`/`baggage` telemetry is what this checks.
        .args(["--inbound-http", "connections"])
        .resolv(&resolv)
        .certs(&b_certs)
        .log("pod-b-ic")
        .start();
    let gw = t.node("gw");
    let gateway = gw.gateway_with(
        &shared,
        &networks,
        "network-b",
        &format!("{GW_A}:15443"),
        &["--certs".as_ref(), gw_certs.as_os_str()],
    );
    let vm = t.node("vm");
    let vm_ic = vm
        .interceptor()
        .mesh(&vm_mesh)
        .args(["--mesh-networks"])
        .arg(&networks)
        .args(["--network", "network-a"])
        .resolv(&resolv)
        .certs(&vm_certs)
        .start();
    let out = sh(&mut vm.cmd(
        interceptor_tests::interceptor_bin()
            .to_str()
            .expect("utf-8"),
        &["explain", &format!("{ONLY_B}:8080")],
    ));
    assert!(
        out.contains(&format!(
            "-> {GW_A}:15008 via gateway of network network-b weight 1.00 double HBONE"
        )),
        "{out}"
    );
    assert!(out.contains("outer CONNECT onlyb.default.svc.cluster.local:8080 to the gateway, which must be one of [spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway]"), "{out}");

    let dump = Tcpdump::start(&gw.ns, gw.iface("b"), "tcp", t.path("gw-b.pcap"));
    let curl = |path: &str| {
        let (ok, out, err) = try_sh(&mut vm.with_resolv(
            &resolv,
            &format!("exec curl -sS -m 5 http://{ONLY_B}:8080{path}"),
        ));
        (ok, out + &err)
    };
    for i in 0..3 {
        let (ok, out) = curl(&format!("/secret-plaintext-marker{i}"));
        assert!(
            ok && out.starts_with(&format!(
                "pod-b GET /secret-plaintext-marker{i} from 127.0.0.6"
            )),
            "{out}\n{}\n{}\n{}",
            vm_ic.log(),
            gateway.log(),
            b_ic.log()
        );
    }
    let pcap = dump.stop();
    // Gateway to endpoint: only 15008, only TLS, and no plaintext, not even the inner CONNECT.
    assert!(tcp_payloads(&pcap, "tcp and not port 15008").is_empty());
    let legs = tcp_payloads(&pcap, "dst port 15008");
    assert!(!legs.is_empty(), "nothing from the gateway to 15008");
    let hello = interceptor::tls::parse_client_hello(&legs[0])
        .expect("a TLS ClientHello")
        .expect("complete in the first segment");
    assert_eq!(
        hello.alpn,
        vec![b"h2".to_vec()],
        "the VM's inner hello, relayed"
    );
    let all: Vec<u8> = tcp_payloads(&pcap, "port 15008").concat();
    let text = String::from_utf8_lossy(&all);
    assert!(
        !text.contains("secret-plaintext-marker") && !text.contains(ONLY_B),
        "plaintext at the gateway"
    );
    // End to end: the endpoint saw the VM's identity (not the gateway's), the VM the endpoint's.
    assert!(
        wait(5.0, || b_ic.counter(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &format!("{TD}/vm"))
            ]
        ) == 3.0),
        "{}",
        b_ic.metrics().0
    );
    assert!(wait(5.0, || vm_ic.counter(
        "istio_tcp_connections_closed_total",
        &[("destination_principal", &format!("{TD}/product-b"))]
    ) == 3.0));
    // The inner CONNECT says what the outer one does (issue 25, as ztunnel): the endpoint
    // names the service from `host=` and the client from `for=`, across the gateway.
    assert_eq!(
        b_ic.counter(
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), ("destination_service", ONLY_B)]
        ),
        3.0,
        "{}",
        b_ic.metrics().0
    );
    let vm_a = vm.ip("a");
    let named = || {
        b_ic.log()
            .lines()
            .filter(|l| {
                l.contains("inbound HBONE stream")
                    && l.contains(&format!("client=\"{vm_a}:"))
                    && l.contains("source_namespace=\"default\"")
            })
            .count()
    };
    assert!(wait(5.0, || named() == 3), "{}", b_ic.log());
    assert!(
        gateway.counter(
            "interceptor_hbone_streams_total",
            &[("direction", "gateway")]
        ) >= 3.0
    );
    assert!(hbone(&vm_ic, "streams", "double") >= 3.0);
    assert_eq!(
        hbone(&vm_ic, "connections", "outbound"),
        1.0,
        "one pooled outer connection"
    );

    // The inner identity check is the VM's own: a table that expects another identity refuses
    // the endpoint even though the gateway is the right one.
    let before = vm_ic.table_version();
    std::fs::write(&vm_mesh, mesh("someone-else")).expect("edit");
    assert!(vm_ic.wait_table_after(before, 10.0));
    let (ok, out) = curl("/wrong");
    assert!(!ok || !out.contains("pod-b GET"), "{out}");
    assert!(
        vm_ic.counter(
            "interceptor_endpoint_failures_total",
            &[("reason", "server_certificate")]
        ) >= 1.0,
        "{}",
        vm_ic.metrics().0
    );
}

/// Issue 25: what a peer learns of a stream from us is what ztunnel tells it. Our VM to our
/// pod: the CONNECT's `forwarded` names the application's own address (the VM's, with the
/// app's port, not the loopback hop capture made) and the service it meant; `baggage` names
/// the VM's workload from its labels. The pod's inbound reads both as ztunnel does (the
/// service for its metrics, the client and source workload for its log) and answers with its
/// own baggage, which the VM's access log reports.
#[test]
fn hbone_peers_learn_the_client_the_service_and_the_workload_as_from_ztunnel() {
    let m = Mesh::new();
    let (_app, _streams) = m.apps();
    // The pod knows the service it serves (as istiod would tell it).
    let pod_mesh = m.t.write("pod-mesh.yaml", &vm_mesh("label"));
    let pod_ic = m
        .pod_node()
        .interceptor()
        .mesh(&pod_mesh)
        .resolv(&m.resolv)
        .certs(&m.pod_certs)
        .args(["--label", "app=product", "--label", "version=v2"])
        // The stream as bytes (its HTTP port served per request is another test's).
        .args(["--inbound-http", "connections"])
        .log("pod-ic")
        .start();
    let vm_ic = m
        .vm_run("label")
        .args(["--label", "app=ratings", "--label", "version=v3"])
        .start();
    let (ok, out) = m.curl("/who");
    assert!(ok, "{out}\n{}\n{}", vm_ic.log(), pod_ic.log());
    // Metrics first (observable state), then what the access logs say of the same stream.
    assert!(
        wait(10.0, || pod_ic.counter(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("destination_service", HOST),
                ("source_principal", &format!("{TD}/vm")),
            ]
        ) == 1.0),
        "{}",
        pod_ic.metrics().0
    );
    let vm_ip = m.vm_node().ip("a");
    // The line is written just after the counters move.
    let line = wait_for(5.0, || {
        pod_ic
            .log()
            .lines()
            .find(|l| l.contains("inbound HBONE stream") && l.contains(":8080"))
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no stream line:\n{}", pod_ic.log()));
    assert!(line.contains(&format!("client=\"{vm_ip}:")), "{line}");
    assert!(line.contains(&format!("service={HOST}")), "{line}");
    assert!(line.contains("source_workload=\"ratings\""), "{line}");
    assert!(line.contains("source_namespace=\"default\""), "{line}");
    assert!(line.contains("end=eof"), "{line}");
    // The pod's 200 carried its baggage: the VM knows who answered.
    assert!(
        wait(5.0, || vm_ic.log().contains("peer_workload=\"product\"")),
        "{}",
        vm_ic.log()
    );
}

/// Issue 25: Envoy as the receiving peer logs the exact headers: `forwarded` as ztunnel sends
/// it (`for="<app address>";host=<service>`) and `baggage` from the VM's labels.
#[test]
fn envoy_sees_forwarded_and_baggage_as_ztunnel_sends_them() {
    let m = Mesh::new();
    let (_app, _streams) = m.apps();
    let waypoint = Envoy::start(
        m.pod_node(),
        "envoy-hbone",
        &envoy::hbone_terminator_config(&m.pod_certs, POD, 15008, 15000),
        15000,
    );
    let _vm_ic = m
        .vm_run("label")
        .args([
            "--namespace",
            "default",
            "--label",
            "app=ratings",
            "--label",
            "version=v3",
        ])
        .start();
    let (ok, out) = m.curl("/headers");
    assert!(ok, "{out}\n{}", waypoint.log());
    let vm_ip = m.vm_node().ip("a");
    let line = wait_for(5.0, || {
        waypoint
            .log()
            .lines()
            .find(|l| l.starts_with("hbone method=CONNECT"))
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no access log line:\n{}", waypoint.log()));
    let forwarded = line
        .split(" forwarded=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("{line}"));
    let (for_part, host_part) = forwarded
        .split_once(';')
        .unwrap_or_else(|| panic!("no host= in {forwarded}"));
    assert!(
        for_part.starts_with(&format!("for=\"{vm_ip}:")) && for_part.ends_with('"'),
        "{line}"
    );
    let port: u16 = for_part
        .trim_start_matches(&format!("for=\"{vm_ip}:"))
        .trim_end_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(port > 1024, "the app's own ephemeral port: {line}");
    assert_eq!(host_part, format!("host={HOST}"), "{line}");
    assert!(
        line.contains(
            " baggage=k8s.namespace.name=default,service.name=ratings,service.version=v3 "
        ),
        "{line}"
    );
}

/// Issue 25: a VM that is stopped (SIGTERM) while it holds a connection over HBONE and one over
/// the sidecar wire closes both as a peer expects: the pooled HTTP/2 connection ends with
/// GOAWAY (NO_ERROR) and TLS close_notify, the sidecar mTLS connection with close_notify, the
/// applications' held connections with a clean EOF, and the daemon exits 0 once its grace is
/// over. A recorder on the pod reads what the VM sent, frame by frame.
#[test]
fn a_stopping_vm_ends_its_hbone_and_mtls_connections_with_goaway_and_close_notify() {
    let m = Mesh::new();
    let pod = m.pod_node();
    let mut recorder = Proc::spawn(
        "hbone-record",
        pod.cmd(
            helper("hbone-record").as_str(),
            &[
                m.pod_certs.to_str().expect("utf-8"),
                &format!("{POD}:15008"),
                &format!("{POD}:9000"),
            ],
        ),
        pod.path("hbone-record.log"),
    );
    recorder.wait_for_output("listening", 10.0);
    for (marker, kind) in [("label", "hbone"), ("sidecar", "tls")] {
        let mut vm_ic = m
            .vm_run(marker)
            .args(["--shutdown-grace", "1s"])
            .log(&format!("vm-ic-{kind}"))
            .start();
        // An application holding a connection through the VM's proxy: it waits for EOF.
        let mut held = Proc::spawn(
            "held",
            m.vm_node().in_cgroup(
                "bash",
                &[
                    "-c",
                    &format!("exec 3<>/dev/tcp/{VIP}/9000; echo open; cat <&3; echo \"eof $?\""),
                ],
            ),
            m.vm_node().path(&format!("held-{kind}.log")),
        );
        held.wait_for_output("open", 10.0);
        assert!(
            vm_ic.wait_counter(
                "istio_tcp_connections_opened_total",
                &[("reporter", "source")],
                1.0,
                10.0
            ),
            "{}",
            vm_ic.log()
        );
        let signalled = std::time::Instant::now();
        vm_ic.proc.signal(libc::SIGTERM);
        let status = vm_ic.proc.wait_exit(10.0).expect("exits within the grace");
        let took = signalled.elapsed();
        eprintln!("{kind}: exit {took:?} after SIGTERM, one connection held (grace 1s)");
        assert!(status.success(), "{status:?}\n{}", vm_ic.log());
        // The held connection had its grace before the drain closed it.
        assert!(took >= std::time::Duration::from_millis(900), "{took:?}");
        held.wait_for_output("eof 0", 5.0);
        let needle = format!("closed kind={kind} ");
        let line = wait_for(5.0, || {
            recorder
                .output()
                .lines()
                .find(|l| l.starts_with(&needle))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("the recorder saw no {kind} close:\n{}", recorder.output()));
        assert!(line.contains("tls_end=close_notify"), "{line}");
        if kind == "hbone" {
            assert!(line.contains("goaway=NO_ERROR"), "{line}");
            assert!(line.contains("streams=1"), "{line}");
        }
        assert!(
            vm_ic.log().contains("end=drained"),
            "the held connection was closed by the drain:\n{}",
            vm_ic.log()
        );
    }
}

/// Issue 25: an mTLS client that half-closes without close_notify (as Python's ssl does) while
/// its 1 MiB echo is still coming back: the response is not cut, and the access log and the
/// byte counters say what moved each way and how it ended.
#[test]
fn inbound_counts_both_ways_for_a_client_that_skips_close_notify() {
    let m = Mesh::new();
    let pod = m.pod_node();
    let mut echo = Proc::spawn(
        "tcp-echo",
        pod.cmd(helper("tcp-echo").as_str(), &[&format!("{POD}:9100")]),
        pod.path("tcp-echo.log"),
    );
    echo.wait_for_output("listening", 10.0);
    let pod_ic = m.pod(&["--inbound-ports", "9100"]);
    let script = r#"
import os, socket, ssl, sys
certs, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.load_cert_chain(certs + "/cert-chain.pem", certs + "/key.pem")
ctx.set_alpn_protocols(["istio"])
s = ctx.wrap_socket(socket.create_connection((host, port)))
data = bytes(i % 251 for i in range(1 << 20))
s.sendall(data)
# FIN on the TCP socket itself: no close_notify first.
socket.socket(fileno=os.dup(s.fileno())).shutdown(socket.SHUT_WR)
got = bytearray()
while True:
    try:
        chunk = s.recv(65536)
    except ssl.SSLError as e:
        print("recv error", e)
        break
    if not chunk:
        break
    got += chunk
print("sent", len(data), "got", len(got), "same", bytes(got) == data)
s.close()
"#;
    let out = sh(&mut m.vm_node().cmd(
        "python3",
        &[
            "-c",
            script,
            m.vm_certs.to_str().expect("utf-8"),
            POD,
            "9100",
        ],
    ));
    assert!(
        out.contains("sent 1048576 got 1048576 same True"),
        "{out}\n{}",
        pod_ic.log()
    );
    let labels = [
        ("reporter", "destination"),
        ("destination_service", "10.77.0.2:9100"),
    ];
    assert!(
        pod_ic.wait_counter("istio_tcp_connections_closed_total", &labels, 1.0, 10.0),
        "{}",
        pod_ic.metrics().0
    );
    let metrics = pod_ic.metrics();
    assert_eq!(
        metrics.sum("istio_tcp_received_bytes_total", &labels),
        1_048_576.0
    );
    assert_eq!(
        metrics.sum("istio_tcp_sent_bytes_total", &labels),
        1_048_576.0
    );
    // The line is written just after the counters move.
    let line = wait_for(5.0, || {
        pod_ic
            .log()
            .lines()
            .find(|l| l.contains("inbound connection") && l.contains(":9100"))
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no access log line:\n{}", pod_ic.log()));
    assert!(
        line.contains("received=1048576 sent=1048576 end=tls_no_close_notify"),
        "{line}"
    );
}
