//! Issue 26: ports that declare no protocol, told apart per connection as Istio tells them
//! (sheet 1.2 "unnamed / unknown"; 4.2 "Auto"). Outbound, where a VirtualService has HTTP
//! rules for such a port, a connection whose first bytes are an HTTP/1.x request line or the
//! HTTP/2 preface is routed request by request, and anything else takes the port's TCP route;
//! inbound, a plaintext connection to such a port of this VM is served per request when it
//! speaks HTTP and as bytes when not, and an mTLS one as its ALPN says.
//!
//! The upstream protocol as istiod's `setUpstreamProtocol` picks it (sheet 7.2): a sniffed
//! port's requests go as they came; a DestinationRule's `useClientProtocol` does the same on a
//! declared HTTP port (gRPC to a port named `http`), and `h2UpgradePolicy: UPGRADE` sends
//! HTTP/1.1 clients' requests as HTTP/2.
//!
//! The reference: a real Envoy sidecar fed the listeners, routes and clusters the test control
//! plane makes as istiod does for sniffed ports (`<VIP>_<port>` with an HTTP chain taking RDS
//! `"<fqdn>:<port>"` beside the TCP default chain, the HTTP inspector with no timeout, the
//! clusters' `use_downstream_protocol_config`) serves the same clients, and every check runs
//! against it, the VM following the files and the VM following that control plane.

use std::process::Command;

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::envoy::Envoy;
use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh, Service};
use interceptor_tests::{helper_bin, wait_for, Interceptor, Net, Proc, Topology};

const STOCK: &str = "stock.shop.svc.cluster.local";
const STOCK_VIP: &str = "240.240.6.1";
const LEDGER: &str = "ledger.shop.svc.cluster.local";
const LEDGER_VIP: &str = "240.240.6.2";
const V1: &str = "10.77.0.20";
const V2: &str = "10.77.0.21";
const LEDGER_IP: &str = "10.77.0.22";
/// The ledger's client-first port (bytes echoed) and its server-first one (a greeting first).
const ECHO_PORT: u16 = 7071;
const GREETING_PORT: u16 = 7072;
const GREETING: &str = "220 ledger ready";
/// A gRPC service (h2c) on an unnamed port, as most gRPC services in Kubernetes are.
const HEALTH: &str = "health.shop.svc.cluster.local";
const HEALTH_VIP: &str = "240.240.6.3";
const GRPC_PORT: u16 = 7073;
/// The same gRPC server behind ports declared HTTP (HTTP/1.1): with `useClientProtocol`, and
/// with `h2UpgradePolicy: UPGRADE`.
const AS_CLIENT: &str = "as-client.shop.svc.cluster.local";
const AS_CLIENT_VIP: &str = "240.240.6.4";
const UPGRADED: &str = "upgraded.shop.svc.cluster.local";
const UPGRADED_VIP: &str = "240.240.6.5";

/// Both services as ServiceEntries whose ports name no protocol.
fn service_entries() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: stock, namespace: shop}}
spec:
  hosts: [{STOCK}]
  addresses: [{STOCK_VIP}]
  ports: [{{number: 7070, name: web}}]
  resolution: STATIC
  endpoints:
  - {{address: {V1}, labels: {{version: v1}}}}
  - {{address: {V2}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ledger, namespace: shop}}
spec:
  hosts: [{LEDGER}]
  addresses: [{LEDGER_VIP}]
  ports: [{{number: {ECHO_PORT}, name: echo}}, {{number: {GREETING_PORT}, name: greeting}}]
  resolution: STATIC
  endpoints:
  - {{address: {LEDGER_IP}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: health, namespace: shop}}
spec:
  hosts: [{HEALTH}]
  addresses: [{HEALTH_VIP}]
  ports: [{{number: {GRPC_PORT}, name: checks}}]
  resolution: STATIC
  endpoints:
  - {{address: {LEDGER_IP}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: as-client, namespace: shop}}
spec:
  hosts: [{AS_CLIENT}]
  addresses: [{AS_CLIENT_VIP}]
  ports: [{{number: {GRPC_PORT}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {LEDGER_IP}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upgraded, namespace: shop}}
spec:
  hosts: [{UPGRADED}]
  addresses: [{UPGRADED_VIP}]
  ports: [{{number: {GRPC_PORT}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {LEDGER_IP}}}
"
    )
}

/// HTTP rules on both: the stock's by header, the ledger's a catch-all (its clients that do
/// not speak HTTP take the TCP route).
fn intent() -> String {
    "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: stock, namespace: shop}
spec:
  host: stock
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: stock, namespace: shop}
spec:
  hosts: [stock]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: stock, subset: v2}}]
  - name: everyone
    route: [{destination: {host: stock, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ledger, namespace: shop}
spec:
  hosts: [ledger]
  http:
  - route: [{destination: {host: ledger}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: health, namespace: shop}
spec:
  hosts: [health]
  http:
  - route: [{destination: {host: health}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: as-client, namespace: shop}
spec:
  host: as-client
  trafficPolicy: {connectionPool: {http: {useClientProtocol: true}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: as-client, namespace: shop}
spec:
  hosts: [as-client]
  http:
  - route: [{destination: {host: as-client}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: upgraded, namespace: shop}
spec:
  host: upgraded
  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: upgraded, namespace: shop}
spec:
  hosts: [upgraded]
  http:
  - route: [{destination: {host: upgraded}}]
"
    .to_string()
}

/// The same services as the test control plane serves them: every port sniffed.
fn control_plane_mesh() -> Mesh {
    let mut stock = Service::new(STOCK, STOCK_VIP, 7070);
    stock.auto_ports = vec![7070];
    for (ip, version) in [(V1, "v1"), (V2, "v2")] {
        let mut e = Endpoint::new(ip, 7070);
        e.mtls = false;
        e.labels.insert("version".into(), version.into());
        stock.endpoints.push(e);
    }
    let mut ledger = Service::new(LEDGER, LEDGER_VIP, ECHO_PORT);
    ledger.ports = vec![ECHO_PORT, GREETING_PORT];
    ledger.auto_ports = ledger.ports.clone();
    let mut e = Endpoint::new(LEDGER_IP, ECHO_PORT);
    e.mtls = false;
    ledger.endpoints.push(e);
    let mut health = Service::new(HEALTH, HEALTH_VIP, GRPC_PORT);
    health.auto_ports = vec![GRPC_PORT];
    let mut e = Endpoint::new(LEDGER_IP, GRPC_PORT);
    e.mtls = false;
    health.endpoints.push(e);
    let declared_http = |host: &str, vip: &str| {
        let mut s = Service::new(host, vip, GRPC_PORT);
        s.http_ports = vec![GRPC_PORT];
        let mut e = Endpoint::new(LEDGER_IP, GRPC_PORT);
        e.mtls = false;
        s.endpoints.push(e);
        s
    };
    Mesh {
        services: vec![
            stock,
            ledger,
            health,
            declared_http(AS_CLIENT, AS_CLIENT_VIP),
            declared_http(UPGRADED, UPGRADED_VIP),
        ],
        traffic: intent(),
        ..Default::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Interceptor,
    InterceptorIstiod,
    Envoy,
}

const SIDES: [Side; 3] = [Side::Interceptor, Side::InterceptorIstiod, Side::Envoy];

/// The detection timeout both VMs run with (the default is 5 s): a server-first protocol's
/// greeting comes this late through them.
const DETECTION_MS: u64 = 700;

struct World {
    t: Net,
    _apps: Vec<Proc>,
    ic: Interceptor,
    ic_istiod: Interceptor,
    _cp: ControlPlane,
    envoy: Envoy,
}

impl World {
    fn new() -> Self {
        let t = Topology::new()
            .network("a")
            .node("vm", &["a"])
            .node("pod", &["a"])
            .address("a", V1)
            .address("a", V2)
            .address("a", LEDGER_IP)
            .node("istiod", &["a"])
            .node("envoy", &["a"])
            .node("vm2", &["a"])
            .build();
        let pod = t.node("pod");
        let mut apps = vec![
            pod.http_keepalive("v1", &[&format!("{V1}:7070")]),
            pod.http_keepalive("v2", &[&format!("{V2}:7070")]),
        ];
        for (name, port, greeting) in [
            ("echo", ECHO_PORT, None),
            ("greeter", GREETING_PORT, Some(GREETING)),
        ] {
            let mut cmd = pod
                .ns
                .cmd(helper_bin("tcp-echo").to_str().expect("utf-8 path"));
            cmd.arg(format!("{LEDGER_IP}:{port}"));
            if let Some(g) = greeting {
                cmd.env("TCP_ECHO_GREETING", g);
            }
            let mut p = Proc::spawn(name, cmd, pod.path(&format!("{name}.log")));
            p.wait_for_output("listening", 10.0);
            apps.push(p);
        }
        let mut cmd = pod
            .ns
            .cmd(helper_bin("grpc-health").to_str().expect("utf-8 path"));
        cmd.args(["serve", "ledger", &format!("{LEDGER_IP}:{GRPC_PORT}")]);
        let mut p = Proc::spawn("grpc", cmd, pod.path("grpc.log"));
        p.wait_for_output("listening", 10.0);
        apps.push(p);
        let detection = format!("{DETECTION_MS}ms");
        let file = t.write(
            "mesh.yaml",
            &format!("{}---\n{}", service_entries(), intent()),
        );
        let ic = t
            .node("vm")
            .interceptor()
            .mesh(&file)
            .args(["--protocol-detection-timeout", &detection])
            .start();
        let ca = Ca::new("mesh root");
        let istiod = format!("{}:15012", t.node("istiod").ip("a"));
        let cp = ControlPlane::start(
            &t.node("istiod").ns.handle(),
            istiod.parse().expect("address"),
            &ca,
            "vm-bootstrap-token",
            control_plane_mesh(),
        );
        let spec = Spec::new("vm-ns", "vm-sa", t.node("istiod").ip("a"), &ca.pem());
        let bundle = write_bundle(&t.path("vm2-root"), &spec);
        ca.issue(&bundle.join("etc/certs"), &spec.identity(), Key::Ecdsa);
        let ic_istiod = t
            .node("vm2")
            .interceptor()
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&bundle)
            .args(["--protocol-detection-timeout", &detection])
            .start();
        for (vip, port) in [
            (STOCK_VIP, 7070),
            (LEDGER_VIP, ECHO_PORT),
            (LEDGER_VIP, GREETING_PORT),
            (HEALTH_VIP, GRPC_PORT),
            (AS_CLIENT_VIP, GRPC_PORT),
            (UPGRADED_VIP, GRPC_PORT),
        ] {
            let routed = wait_for(20.0, || {
                let v = ic_istiod.json(&format!("/explain?target={vip}:{port}"));
                v["connections"][0]["http"].is_object().then_some(())
            });
            assert!(
                routed.is_some(),
                "istiod's sniffed HTTP routes for {vip}:{port} never in force: {}",
                ic_istiod.log()
            );
        }
        let certs = t.path("envoy-certs");
        ca.issue(
            &certs,
            "spiffe://cluster.local/ns/shop/sa/envoy",
            Key::Ecdsa,
        );
        // virtualOutbound, the four `<VIP>_<port>` listeners and `0.0.0.0_7073`.
        let envoy = interceptor_tests::envoy::sidecar(t.node("envoy"), &cp, &istiod, &certs, 6);
        Self {
            t,
            _apps: apps,
            ic,
            ic_istiod,
            _cp: cp,
            envoy,
        }
    }

    /// `program` as `side`'s client (captured by the VM's cgroup, or redirected to Envoy).
    fn client(&self, side: Side, program: &str, args: &[&str]) -> Command {
        match side {
            Side::Interceptor => self.t.node("vm").in_cgroup(program, args),
            Side::InterceptorIstiod => self.t.node("vm2").in_cgroup(program, args),
            Side::Envoy => self.t.node("envoy").cmd(program, args),
        }
    }

    fn curl(&self, side: Side, args: &[&str]) -> String {
        let mut all = vec!["-sS", "--max-time", "20"];
        all.extend_from_slice(args);
        let out = self.client(side, "curl", &all).output().expect("curl runs");
        assert!(
            out.status.success(),
            "{side:?}: curl {args:?} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log(side)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Connects to the ledger's `port`, sends `payload` (maybe nothing), and reads for up to
    /// `secs`: how long until the first bytes came (99 if none), and all that came.
    fn raw(&self, side: Side, port: u16, payload: &str, secs: f64) -> (f64, String) {
        let script = format!(
            "import socket, sys, time
s = socket.create_connection(('{LEDGER_VIP}', {port}))
start = time.time()
s.sendall({payload})
s.settimeout(0.3)
got, first = b'', 99.0
while time.time() - start < {secs}:
    try:
        b = s.recv(65536)
    except socket.timeout:
        continue
    if not b:
        break
    if not got:
        first = time.time() - start
    got += b
print('%.3f' % first)
sys.stdout.write(got.decode('latin-1'))
"
        );
        let out = self
            .client(side, "python3", &["-c", &script])
            .output()
            .expect("python3 runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
        (first.trim().parse().unwrap_or(99.0), rest.to_string())
    }

    fn log(&self, side: Side) -> String {
        match side {
            Side::Interceptor => self.ic.log(),
            Side::InterceptorIstiod => self.ic_istiod.log(),
            Side::Envoy => self.envoy.log(),
        }
    }

    fn detected(&self, side: Side, protocol: &str) -> f64 {
        let ic = match side {
            Side::Interceptor => &self.ic,
            Side::InterceptorIstiod => &self.ic_istiod,
            Side::Envoy => return 0.0,
        };
        ic.counter(
            "interceptor_protocol_detected_total",
            &[("direction", "outbound"), ("protocol", protocol)],
        )
    }
}

/// On the stock's unnamed port, HTTP/1.1 requests are routed one by one (the header rule
/// sends `end-user: jason` to v2, the rest to v1); on the health service's, gRPC calls (h2c)
/// are too, and go upstream as HTTP/2 (istiod's `use_downstream_protocol_config`).
fn http_is_routed_per_request(w: &World, side: Side) {
    let url = format!("http://{STOCK_VIP}:7070/items");
    for _ in 0..3 {
        let out = w.curl(side, &[&url]);
        assert!(out.starts_with("v1 GET /items"), "{side:?}: {out}");
        let out = w.curl(side, &["-H", "end-user: jason", &url]);
        assert!(out.starts_with("v2 GET /items"), "{side:?}: {out}");
    }
    // One keep-alive connection, two requests, two routes.
    let out = w.curl(side, &[&url, "--next", "-H", "end-user: jason", &url]);
    assert!(
        out.contains("v1 GET /items") && out.contains("v2 GET /items"),
        "{side:?}: {out}"
    );
    grpc_checks(w, side, HEALTH_VIP);
}

/// Three gRPC health checks through `side` to the ledger's gRPC server at `vip`: all served.
fn grpc_checks(w: &World, side: Side, vip: &str) {
    let out = w
        .client(
            side,
            helper_bin("grpc-health").to_str().expect("utf-8 path"),
            &["check", &format!("http://{vip}:{GRPC_PORT}"), "ledger", "3"],
        )
        .output()
        .expect("grpc-health runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| *l == "ok SERVING").count(),
        3,
        "{side:?} to {vip}: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log(side)
    );
}

/// A DestinationRule picks the upstream protocol on a port declared HTTP (HTTP/1.1):
/// `useClientProtocol` carries gRPC (HTTP/2) through, and `h2UpgradePolicy: UPGRADE` sends an
/// HTTP/1.1 client's request to the gRPC server as HTTP/2 (which answers it in gRPC's terms:
/// only an HTTP/2 server could).
#[test]
fn a_destination_rule_picks_the_upstream_http_protocol_as_envoy_does() {
    let w = World::new();
    for side in SIDES {
        grpc_checks(&w, side, AS_CLIENT_VIP);
        let out = w.curl(
            side,
            &[
                "-i",
                &format!("http://{UPGRADED_VIP}:{GRPC_PORT}/grpc.health.v1.Health/Nope"),
            ],
        );
        assert!(
            out.to_ascii_lowercase().contains("grpc-status"),
            "{side:?}: not answered by the gRPC server over HTTP/2: {out}\n{}",
            w.log(side)
        );
    }
}

/// Bytes that are not HTTP on a port with HTTP rules take the port's TCP route, untouched.
fn other_bytes_are_relayed(w: &World, side: Side) {
    let (_, got) = w.raw(
        side,
        ECHO_PORT,
        "b'\\x00\\x01 not http at all\\r\\n\\xff'",
        2.0,
    );
    assert_eq!(got, "\u{0}\u{1} not http at all\r\n\u{ff}", "{side:?}");
    // A text protocol whose first line is no HTTP request line.
    let (_, got) = w.raw(side, ECHO_PORT, "b'PING\\r\\n'", 2.0);
    assert_eq!(got, "PING\r\n", "{side:?}");
}

#[test]
fn unnamed_ports_are_sniffed_http_routed_per_request_and_the_rest_relayed() {
    let w = World::new();
    for side in SIDES {
        let http = w.detected(side, "http1");
        http_is_routed_per_request(&w, side);
        other_bytes_are_relayed(&w, side);
        if side != Side::Envoy {
            // 3 × 2 single requests, one keep-alive pair: 7 HTTP/1.1 connections; one gRPC
            // connection; two that were not HTTP.
            assert_eq!(w.detected(side, "http1") - http, 7.0, "{side:?}");
            assert!(w.detected(side, "h2c") >= 1.0, "{side:?}");
            assert!(w.detected(side, "tcp") >= 2.0, "{side:?}");
        }
    }
}

/// A server-first protocol on an unnamed port: Istio waits for ever for the client's first
/// bytes (protocolDetectionTimeout 0s), so the greeting never comes through Envoy; ours waits
/// `--protocol-detection-timeout`, then relays it as TCP, and the conversation goes on.
#[test]
fn a_server_first_protocol_on_an_unnamed_port_is_relayed_after_the_detection_timeout() {
    let w = World::new();
    for side in [Side::Interceptor, Side::InterceptorIstiod] {
        let silent = w.detected(side, "silent");
        let (first, got) = w.raw(side, GREETING_PORT, "b''", 3.0);
        assert!(got.starts_with(GREETING), "{side:?}: {got:?}");
        let wait = DETECTION_MS as f64 / 1000.0;
        assert!(
            first >= wait - 0.05 && first < wait + 1.5,
            "{side:?}: greeting after {first} s"
        );
        assert_eq!(w.detected(side, "silent") - silent, 1.0, "{side:?}");
    }
    let (first, got) = w.raw(Side::Envoy, GREETING_PORT, "b''", 3.0);
    assert!(
        got.is_empty() && first == 99.0,
        "Envoy relayed the greeting ({got:?} after {first} s): it should wait for the client"
    );
    // A client that speaks first gets the greeting and its echo through all three.
    for side in SIDES {
        let (_, got) = w.raw(side, GREETING_PORT, "b'EHLO vm\\r\\n'", 2.0);
        assert_eq!(
            got,
            format!("{GREETING}\r\nEHLO vm\r\n"),
            "{side:?}: {}",
            w.log(side)
        );
    }
}

const TD: &str = "spiffe://cluster.local/ns/default/sa";
const INVENTORY_VIP: &str = "240.240.7.1";

/// This VM's own service with two ports that name no protocol, and a catch-all HTTP route
/// (which makes the client VM's outbound sniff them too).
fn inventory_mesh(vm_ip: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: inventory, namespace: default}}
spec:
  hosts: [inventory.default.svc.cluster.local]
  addresses: [{INVENTORY_VIP}]
  ports: [{{number: 7080, name: web}}, {{number: 7081, name: feed}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: inventory}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: inventory-vm, namespace: default}}
spec:
  address: {vm_ip}
  labels: {{app: inventory, security.istio.io/tlsMode: istio}}
  serviceAccount: inventory
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: inventory, namespace: default}}
spec:
  hosts: [inventory.default.svc.cluster.local]
  http:
  - route: [{{destination: {{host: inventory.default.svc.cluster.local}}}}]
"
    )
}

/// A VM serving two ports of no declared protocol (PERMISSIVE): a plaintext client that
/// speaks HTTP is served request by request (counted in Istio's request metrics, reporter
/// destination), one that does not is relayed as bytes; over mTLS from another VM, a
/// connection offering Istio's HTTP ALPN (its outbound found HTTP) is served per request with
/// the caller's identity, one offering `istio` alone (its outbound found bytes) as bytes.
#[test]
fn an_unnamed_port_of_this_vm_serves_http_per_request_and_the_rest_as_bytes() {
    let t = Topology::vm_pod();
    let (vm, pod) = (t.node("vm"), t.node("pod"));
    let pod_ip = pod.ip("a").to_string();
    let ca = Ca::new("cluster.local root");
    let vm_certs = ca.issue(&t.path("vm-certs"), &format!("{TD}/vm"), Key::Ecdsa);
    let pod_certs = ca.issue(&t.path("pod-certs"), &format!("{TD}/inventory"), Key::Ecdsa);
    let _web = pod.http("inventory", &[&format!("{pod_ip}:7080")]);
    let mut cmd = pod
        .ns
        .cmd(helper_bin("tcp-echo").to_str().expect("utf-8 path"));
    cmd.arg(format!("{pod_ip}:7081"));
    let mut feed = Proc::spawn("feed", cmd, pod.path("feed.log"));
    feed.wait_for_output("listening", 10.0);
    let mesh = t.write("mesh.yaml", &inventory_mesh(&pod_ip));
    let pod_ic = pod
        .interceptor()
        .mesh(&mesh)
        .certs(&pod_certs)
        .args(["--inbound-ports", "7080,7081"])
        .args(["--namespace", "default", "--label", "app=inventory"])
        .log("pod-ic")
        .start();
    let vm_ic = vm.interceptor().mesh(&mesh).certs(&vm_certs).start();
    let detected = |protocol: &str| {
        pod_ic.counter(
            "interceptor_protocol_detected_total",
            &[("direction", "inbound"), ("protocol", protocol)],
        )
    };
    let requests = |labels: &[(&str, &str)]| {
        let mut all = vec![("reporter", "destination")];
        all.extend_from_slice(labels);
        pod_ic.counter("istio_requests_total", &all)
    };
    let echo = |cmd: &mut Command| {
        let out = cmd.output().expect("python3 runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let echo_script = |addr: &str| {
        format!(
            "import socket, sys
s = socket.create_connection(('{addr}', 7081))
s.settimeout(5)
s.sendall(b'\\x00\\x01feed bytes\\r\\n')
got = b''
while len(got) < 14:
    b = s.recv(100)
    if not b:
        break
    got += b
sys.stdout.write(repr(got))
"
        )
    };

    // Plaintext, from a client no interceptor captures.
    let out = interceptor_tests::sh(&mut vm.cmd(
        "curl",
        &["-sS", "-m", "10", &format!("http://{pod_ip}:7080/stock")],
    ));
    assert!(out.starts_with("inventory GET /stock"), "{out}");
    assert!(
        pod_ic.wait_counter(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
                ("response_code", "200")
            ],
            1.0,
            5.0
        ),
        "{}",
        pod_ic.log()
    );
    assert_eq!(detected("http1"), 1.0);
    let got = echo(&mut vm.cmd("python3", &["-c", &echo_script(&pod_ip)]));
    assert_eq!(got, "b'\\x00\\x01feed bytes\\r\\n'", "{}", pod_ic.log());
    assert_eq!(detected("tcp"), 1.0);

    // Over mTLS from the other VM: its outbound sniffs, then offers the ALPN that says.
    let vm_principal = format!("{TD}/vm");
    let out = interceptor_tests::sh(&mut vm.in_cgroup(
        "curl",
        &[
            "-sS",
            "-m",
            "10",
            &format!("http://{INVENTORY_VIP}:7080/orders"),
        ],
    ));
    assert!(
        out.starts_with("inventory GET /orders"),
        "{out}\n{}",
        vm_ic.log()
    );
    assert!(
        pod_ic.wait_counter(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &vm_principal),
                ("connection_security_policy", "mutual_tls")
            ],
            1.0,
            5.0
        ),
        "{}",
        pod_ic.log()
    );
    let before = requests(&[]);
    let got = echo(&mut vm.in_cgroup("python3", &["-c", &echo_script(INVENTORY_VIP)]));
    assert_eq!(got, "b'\\x00\\x01feed bytes\\r\\n'", "{}", vm_ic.log());
    assert!(
        pod_ic.wait_counter(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &vm_principal)
            ],
            1.0,
            5.0
        ),
        "{}",
        pod_ic.log()
    );
    assert_eq!(requests(&[]), before, "bytes counted as requests");
    // mTLS is told by its ALPN, never sniffed.
    assert_eq!(detected("http1") + detected("tcp"), 2.0);
    // explain says how the port is served.
    let e = pod_ic.json("/explain/inbound?port=7080&identity=&source=10.77.0.1");
    assert_eq!(e["protocol"], "auto", "{e}");
    let e = vm_ic.json(&format!("/explain?target={INVENTORY_VIP}:7081"));
    assert_eq!(e["connections"][0]["protocol"], "auto", "{e}");
}
