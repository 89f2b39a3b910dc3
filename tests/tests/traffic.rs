//! Issue 22: the mesh's traffic intent on the VM. One Istio YAML (a DestinationRule with
//! subsets v1/v2, a VirtualService splitting TCP 80/20) is read from the mesh files, and turned
//! into LDS, subset clusters and their EDS by the test control plane as istiod does; real
//! kernel capture, real sockets. A real Envoy fed the same xDS (iptables REDIRECT to its
//! virtualOutbound, as istio-init does) serves the same client traffic, and both must split
//! as Istio means it.

use std::path::PathBuf;

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::envoy::Envoy;
use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh, Service};
use interceptor_tests::{sh, wait_for, Interceptor, Net, Proc, Topology};

const TOKEN: &str = "vm-bootstrap-token";
const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const VIP: &str = "240.240.5.5";
const V1: &str = "10.77.0.20";
const V2: &str = "10.77.0.21";

fn intent(w1: u32, w2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  tcp:
  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {w1}}}
    - {{destination: {{host: reviews, subset: v2}}, weight: {w2}}}
"
    )
}

/// The same service as a ServiceEntry, for the file source.
fn service_entry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [{REVIEWS}]
  addresses: [{VIP}]
  ports: [{{number: 9080, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints:
  - {{address: {V1}, labels: {{version: v1}}}}
  - {{address: {V2}, labels: {{version: v2}}}}
"
    )
}

fn control_plane_mesh(w1: u32, w2: u32) -> Mesh {
    let mut s = Service::new(REVIEWS, VIP, 9080);
    for (ip, version) in [(V1, "v1"), (V2, "v2")] {
        let mut e = Endpoint::new(ip, 9080);
        e.mtls = false;
        e.labels.insert("version".into(), version.into());
        s.endpoints.push(e);
    }
    Mesh {
        services: vec![s],
        traffic: intent(w1, w2),
        ..Default::default()
    }
}

struct World {
    t: Net,
    v1: Proc,
    v2: Proc,
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
            .node("envoy", &["a"])
            .build();
        let pod = t.node("pod");
        let v1 = pod.http("v1", &[&format!("{V1}:9080")]);
        let v2 = pod.http("v2", &[&format!("{V2}:9080")]);
        Self { t, v1, v2 }
    }

    /// Connections each version answered so far.
    fn answered(&self) -> (usize, usize) {
        let count = |p: &Proc| p.output().lines().filter(|l| l.contains(" GET /")).count();
        (count(&self.v1), count(&self.v2))
    }

    /// `seconds` of new connections (one request each) to the service from `run`'s command,
    /// and what each version answered of them.
    fn load(&self, mut cmd: std::process::Command) -> (usize, usize) {
        let before = self.answered();
        let out = sh(&mut cmd);
        let report: serde_json::Value = serde_json::from_str(out.trim()).expect("loadgen JSON");
        assert_eq!(report["errors"], 0, "failed connections: {report}");
        let done = report["connections"].as_u64().unwrap_or(0) as usize;
        // The servers print each answer just before sending it.
        let after = wait_for(5.0, || {
            let a = self.answered();
            (a.0 + a.1 - before.0 - before.1 >= done).then_some(a)
        })
        .unwrap_or_else(|| self.answered());
        (after.0 - before.0, after.1 - before.1)
    }

    fn loadgen(&self, node: &str, captured: bool, secs: &str) -> std::process::Command {
        let bin = interceptor_tests::helper_bin("loadgen");
        let addr = format!("{VIP}:9080");
        let args = [addr.as_str(), secs, "4"];
        let n = self.t.node(node);
        if captured {
            n.in_cgroup(bin.to_str().expect("utf-8"), &args)
        } else {
            n.cmd(bin.to_str().expect("utf-8"), &args)
        }
    }
}

fn assert_split(who: &str, (v1, v2): (usize, usize), share: f64) {
    let total = v1 + v2;
    assert!(total >= 1000, "{who}: only {total} connections");
    let got = v1 as f64 / total as f64;
    eprintln!("{who}: v1 {v1}, v2 {v2} ({got:.3} to v1)");
    assert!(
        (got - share).abs() <= 0.04,
        "{who}: v1 took {got:.3} of {total} connections, the route says {share}"
    );
}

/// A connection opened through the VIP now that only speaks after `wait` (its upstream is
/// chosen at connect): it must still be answered after the route changed.
fn held_connection(t: &Net) -> std::process::Child {
    held_from(t, Client::Vm)
}

/// Where a client runs: the VM's captured application, or a process beside the reference
/// Envoy (whose VIP traffic iptables hands to Envoy).
#[derive(Clone, Copy, Debug)]
enum Client {
    Vm,
    Envoy,
}

fn bash(t: &Net, client: Client, script: &str) -> std::process::Command {
    match client {
        Client::Vm => t.node("vm").in_cgroup("bash", &["-c", script]),
        Client::Envoy => t.node("envoy").cmd("bash", &["-c", script]),
    }
}

fn held_from(t: &Net, client: Client) -> std::process::Child {
    let script = format!(
        "exec 3<>/dev/tcp/{VIP}/9080 || exit 1; echo connected; read go; printf 'GET /held HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let mut c = bash(t, client, &script);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    c.spawn().expect("bash")
}

fn finish_held(mut held: std::process::Child) -> String {
    use std::io::Write;
    let mut stdin = held.stdin.take().expect("stdin");
    writeln!(stdin).expect("go");
    drop(stdin);
    let out = held.wait_with_output().expect("held connection");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn wait_connected(held: &mut std::process::Child) {
    use std::io::{BufRead, BufReader};
    let stdout = held.stdout.as_mut().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("held");
    assert_eq!(line.trim(), "connected", "the held connection did not open");
}

fn route_weights(ic: &Interceptor) -> String {
    let v = ic.json(&format!("/explain?target={VIP}:9080"));
    v["connections"][0]["clusters"].to_string()
}

#[test]
fn a_weighted_tcp_split_from_the_mesh_files_and_a_live_shift() {
    let w = World::new();
    let mesh = w.t.write(
        "mesh.yaml",
        &format!("{}---\n{}", service_entry(), intent(80, 20)),
    );
    let ic = w.t.node("vm").interceptor().mesh(&mesh).start();
    let weights = route_weights(&ic);
    assert!(
        weights.contains("outbound|9080|v1|reviews.shop.svc.cluster.local"),
        "{weights}"
    );
    let split = w.load(w.loadgen("vm", true, "3"));
    assert_split("interceptor (files)", split, 0.8);
    // Istio's request metrics name the version that answered (the endpoint's `version` label).
    let opened = |v: &str| {
        ic.counter(
            "istio_tcp_connections_opened_total",
            &[("destination_service", REVIEWS), ("destination_version", v)],
        ) as usize
    };
    assert_eq!(
        (opened("v1"), opened("v2")),
        split,
        "destination_version counts differ from what each version answered"
    );

    let mut held = held_connection(&w.t);
    wait_connected(&mut held);
    let version = ic.table_version();
    std::fs::write(&mesh, format!("{}---\n{}", service_entry(), intent(0, 100)))
        .expect("mesh file");
    assert!(
        ic.wait_table_after(version, 10.0),
        "the shift never took effect"
    );
    let answer = finish_held(held);
    assert!(
        answer.contains("GET /held"),
        "the held connection broke: {answer:?}"
    );
    let (v1, v2) = w.load(w.loadgen("vm", true, "1"));
    assert_eq!(
        v1, 0,
        "after the shift to 0/100, v1 still took {v1} (v2 {v2})"
    );
    assert!(v2 > 0);
}

struct Istiod {
    cp: ControlPlane,
    bundle: PathBuf,
    ca: Ca,
}

fn istiod(w: &World, mesh: Mesh) -> Istiod {
    let ca = Ca::new("mesh root");
    let ip = w.t.node("istiod").ip("a").to_string();
    let cp = ControlPlane::start(
        &w.t.node("istiod").ns.handle(),
        format!("{ip}:15012").parse().expect("address"),
        &ca,
        TOKEN,
        mesh,
    );
    let spec = Spec::new("vm-ns", "vm-sa", &ip, &ca.pem());
    let bundle = write_bundle(&w.t.path("vm-root"), &spec);
    ca.issue(&bundle.join("etc/certs"), &spec.identity(), Key::Ecdsa);
    Istiod { cp, bundle, ca }
}

#[test]
fn the_same_split_from_istiod_and_a_real_envoy_fed_the_same_xds_agrees() {
    let w = World::new();
    let cp = istiod(&w, control_plane_mesh(80, 20));
    let ic =
        w.t.node("vm")
            .interceptor()
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&cp.bundle)
            .start();
    let routed = wait_for(20.0, || {
        let r = route_weights(&ic);
        r.contains("outbound|9080|v2|").then_some(r)
    });
    assert!(
        routed.is_some(),
        "istiod's route never in force: {}",
        ic.log()
    );
    assert_split(
        "interceptor (istiod)",
        w.load(w.loadgen("vm", true, "3")),
        0.8,
    );

    // The reference: Envoy as istiod's sidecar, traffic redirected as istio-init does. It
    // takes a virtualInbound too (a mesh-wide STRICT, an ALLOW by namespace), so the
    // inbound chains and RBAC the control plane writes are shown to be Envoy's config.
    cp.cp.update(|m| {
        m.traffic.push_str(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mesh, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-shop, namespace: shop}\nspec:\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {ports: ['9080']}}]\n  - to: [{operation: {ports: ['9081'], methods: [GET], paths: [/public*, '*.css', /exact], hosts: ['Shop.example']}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-evil, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - when: [{key: 'request.headers[x-evil]', values: ['*']}]\n",
        );
        // 9081 is an HTTP port: HTTP chains with HTTP RBAC (methods, paths, hosts, a header).
        m.inbound = Some(interceptor_tests::istiod_traffic::InboundWorkload {
            namespace: "shop".into(),
            labels: Default::default(),
            ports: vec![9080, 9081],
            http_ports: vec![9081],
        });
    });
    let envoy = envoy_sidecar(&w, &cp);
    assert_split("Envoy", w.load(w.loadgen("envoy", false, "3")), 0.8);

    // A shift applied live: both follow, a held connection stays.
    let mut held = held_connection(&w.t);
    wait_connected(&mut held);
    cp.cp.update(|m| m.traffic = intent(0, 100));
    let shifted = wait_for(10.0, || {
        let r = route_weights(&ic);
        (!r.contains("|v1|")).then_some(())
    });
    assert!(
        shifted.is_some(),
        "the shift never reached the VM: {}",
        route_weights(&ic)
    );
    let answer = finish_held(held);
    assert!(
        answer.contains("GET /held"),
        "the held connection broke: {answer:?}"
    );
    assert_eq!(
        w.load(w.loadgen("vm", true, "1")).0,
        0,
        "v1 still routed to"
    );
    let envoy_shifted = wait_for(10.0, || {
        (envoy.stat("listener_manager.lds.update_success") >= 2).then_some(())
    });
    assert!(envoy_shifted.is_some(), "Envoy never took the shift");
    assert_eq!(
        envoy.stat("listener_manager.lds.update_rejected"),
        0,
        "Envoy refused a listener the control plane wrote (virtualInbound's HTTP chains?)"
    );
    assert_eq!(
        w.load(w.loadgen("envoy", false, "1")).0,
        0,
        "Envoy still routes to v1"
    );
}

/// A real Envoy as istiod's sidecar on the `envoy` node, fed by `cp`, and the VIPs redirected
/// to it as istio-init does.
fn envoy_sidecar(w: &World, cp: &Istiod) -> Envoy {
    let certs = w.t.path("envoy-certs");
    cp.ca.issue(
        &certs,
        "spiffe://cluster.local/ns/shop/sa/envoy",
        Key::Ecdsa,
    );
    let istiod = format!("{}:15012", w.t.node("istiod").ip("a"));
    interceptor_tests::envoy::sidecar(w.t.node("envoy"), &cp.cp, &istiod, &certs, 2)
}

#[test]
fn a_listener_push_that_cannot_be_applied_is_nacked_and_the_last_intent_serves() {
    let w = World::new();
    let cp = istiod(&w, control_plane_mesh(80, 20));
    let ic =
        w.t.node("vm")
            .interceptor()
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&cp.bundle)
            .start();
    assert!(wait_for(20.0, || route_weights(&ic).contains("|v2|").then_some(())).is_some());
    cp.cp.update(|m| {
        m.traffic = intent(0, 100);
        m.corrupt_listener = Some("10.96.99.1_80".into());
    });
    let nack = cp.cp.wait_seen(10.0, |s| {
        s.type_url == interceptor_proto::type_url::LISTENER && s.error.is_some()
    });
    let nack = nack.expect("the bad listener push was not NACKed");
    let reason = nack.error.unwrap_or_default();
    assert!(
        reason.contains("10.96.99.1_80") && reason.contains("tcp_proxy"),
        "{reason}"
    );
    // The last good intent (80/20) still serves.
    assert!(
        route_weights(&ic).contains("|v1|"),
        "{}",
        route_weights(&ic)
    );
    assert_split("after a NACK", w.load(w.loadgen("vm", true, "3")), 0.8);
}

/// Where the VM's mesh comes from, for scenarios run once per source.
enum Source {
    Files(PathBuf),
    Istiod(Box<Istiod>),
}

const DEAD: &str = "10.77.0.22";

/// The service with v1 and v2 (and, with `dead`, a v3 nobody serves on), a DestinationRule
/// with `policy` (YAML, the trafficPolicy's fields) for the service and no VirtualService.
fn policy_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews
  trafficPolicy: {policy}
"
    )
}

fn entry_with(dead: bool) -> String {
    let mut e = service_entry();
    if dead {
        e.push_str(&format!(
            "  - {{address: {DEAD}, labels: {{version: v3}}}}\n"
        ));
    }
    e
}

fn cp_mesh_with(policy: &str, dead: bool) -> Mesh {
    let mut m = control_plane_mesh(0, 0);
    if dead {
        let mut e = Endpoint::new(DEAD, 9080);
        e.mtls = false;
        m.services[0].endpoints.push(e);
    }
    m.traffic = policy_rule(policy);
    m
}

impl Source {
    fn start(w: &World, files: bool) -> (Source, Interceptor) {
        let node = w.t.node("vm");
        if files {
            let mesh = w.t.write(
                "mesh.yaml",
                &format!("{}---\n{}", entry_with(false), policy_rule("{}")),
            );
            let ic = node.interceptor().mesh(&mesh).start();
            (Source::Files(mesh), ic)
        } else {
            let cp = istiod(w, cp_mesh_with("{}", false));
            let ic = node
                .interceptor()
                .args(["--control-plane", "istiod", "--istio-dir"])
                .arg(&cp.bundle)
                .start();
            assert!(
                wait_for(20.0, || (ic.table_version() > 0
                    && route_weights(&ic).contains("outbound|9080||"))
                .then_some(()))
                .is_some(),
                "no table from istiod: {}",
                ic.log()
            );
            (Source::Istiod(Box::new(cp)), ic)
        }
    }

    /// Puts `policy` in force (and the dead endpoint or not); returns once explain shows
    /// `expect` in the cluster's policy.
    fn apply(&self, ic: &Interceptor, policy: &str, dead: bool, expect: &str) {
        match self {
            Source::Files(path) => {
                std::fs::write(
                    path,
                    format!("{}---\n{}", entry_with(dead), policy_rule(policy)),
                )
                .expect("mesh file");
            }
            Source::Istiod(cp) => cp.cp.update(|m| *m = cp_mesh_with(policy, dead)),
        }
        let seen = wait_for(10.0, || {
            let w = route_weights(ic);
            w.contains(expect).then_some(w)
        });
        assert!(
            seen.is_some(),
            "{policy} never in force: {}",
            route_weights(ic)
        );
    }
}

/// `n` sequential requests through the VIP from the VM's app: who answered each ("-" failed).
fn sequential(w: &World, n: usize, path: &str) -> Vec<String> {
    sequential_from(w, Client::Vm, n, path)
}

fn sequential_from(w: &World, client: Client, n: usize, path: &str) -> Vec<String> {
    let script = format!(
        "for i in $(seq {n}); do curl -s -m 3 http://{VIP}:9080/{path} || echo '- failed'; echo; done"
    );
    sh(&mut bash(&w.t, client, &script))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or("-").to_string())
        .collect()
}

fn policies_from(files: bool) {
    let w = World::new();
    sh(&mut w.t.node("pod").cmd(
        "ip",
        &[
            "addr",
            "add",
            &format!("{DEAD}/24"),
            "dev",
            w.t.node("pod").iface("a"),
        ],
    ));
    let (source, ic) = Source::start(&w, files);
    let who = if files { "files" } else { "istiod" };

    // ROUND_ROBIN: turns.
    source.apply(
        &ic,
        "{loadBalancer: {simple: ROUND_ROBIN}}",
        false,
        "ROUND_ROBIN",
    );
    let turns = sequential(&w, 10, "rr");
    assert_eq!(turns.len(), 10, "{who}: {turns:?}");
    assert!(
        turns.windows(2).all(|p| p[0] != p[1]),
        "{who}: round robin did not alternate: {turns:?}"
    );

    // consistentHash useSourceIp: one endpoint for this VM.
    source.apply(
        &ic,
        "{loadBalancer: {consistentHash: {useSourceIp: true}}}",
        false,
        "SOURCE_IP_HASH",
    );
    let sticky = sequential(&w, 12, "hash");
    assert!(
        sticky.iter().all(|s| *s == sticky[0] && s != "-"),
        "{who}: not sticky: {sticky:?}"
    );

    // The default, least request: a held connection makes its endpoint the busy one.
    source.apply(
        &ic,
        "{loadBalancer: {simple: LEAST_REQUEST}}",
        false,
        "LEAST_REQUEST",
    );
    let mut held = held_connection(&w.t);
    wait_connected(&mut held);
    let while_held = sequential(&w, 8, "lr");
    let held_by = finish_held(held);
    // The body (the last line) names who answered.
    let busy = held_by
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("-")
        .to_string();
    assert!(busy == "v1" || busy == "v2", "{who}: held: {held_by:?}");
    assert!(
        while_held.iter().all(|s| *s != busy && s != "-"),
        "{who}: {busy} was busy, yet: {while_held:?}"
    );

    // maxConnections 1: the second connection is refused while the first is held.
    source.apply(
        &ic,
        "{connectionPool: {tcp: {maxConnections: 1}}}",
        false,
        "\"max_connections\":1",
    );
    let refused_before = ic.counter(
        "interceptor_outbound_refused_total",
        &[("reason", "overflow")],
    );
    let mut held = held_connection(&w.t);
    wait_connected(&mut held);
    let over = sequential(&w, 1, "over");
    assert_eq!(
        over,
        vec!["-"],
        "{who}: the connection over the limit was served"
    );
    assert_eq!(
        ic.counter(
            "interceptor_outbound_refused_total",
            &[("reason", "overflow")]
        ),
        refused_before + 1.0
    );
    assert!(
        finish_held(held).contains("GET /held"),
        "{who}: the held connection broke"
    );
    assert_ne!(
        sequential(&w, 1, "after"),
        vec!["-"],
        "{who}: the limit outlived the connection"
    );

    // Outlier detection: a dead endpoint is ejected after one failure for 1 s, then tried
    // again. Round robin makes sure it comes up.
    source.apply(
        &ic,
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 1s, maxEjectionPercent: 100}}",
        true,
        "\"base_ejection_ms\":1000",
    );
    let failures = || ic.counter("interceptor_endpoint_failures_total", &[]);
    let start = failures();
    let first = wait_for(5.0, || {
        sequential(&w, 1, "od");
        (failures() > start).then(std::time::Instant::now)
    })
    .expect("the dead endpoint was never tried");
    let ejected_failures = failures();
    // Ejected: for the next turns (well within the second), no new failure.
    let during = sequential(&w, 6, "ejected");
    assert!(during.iter().all(|s| s != "-"), "{who}: {during:?}");
    if first.elapsed() < std::time::Duration::from_millis(900) {
        assert_eq!(
            failures(),
            ejected_failures,
            "{who}: the ejected endpoint was tried"
        );
    }
    let again = wait_for(10.0, || {
        sequential(&w, 1, "od2");
        (failures() > ejected_failures).then(std::time::Instant::now)
    })
    .expect("the ejected endpoint never came back");
    let out_for = again - first;
    assert!(
        out_for >= std::time::Duration::from_millis(900),
        "{who}: tried again after {out_for:?}, under the 1 s ejection"
    );
    eprintln!("{who}: ejected endpoint retried after {out_for:?}");
}

#[test]
fn load_balancing_pool_limits_and_ejection_follow_the_destination_rule_from_files() {
    policies_from(true);
}

#[test]
fn load_balancing_pool_limits_and_ejection_follow_the_destination_rule_from_istiod() {
    policies_from(false);
}

/// The reference for L4 traffic policy: the same DestinationRules from the same control plane,
/// served to the interceptor and to a real Envoy sidecar, give the same round-robin turns, the
/// same refusal past maxConnections (Envoy: upstream_cx_overflow), no ejection under the
/// default 10 % maxEjectionPercent with three endpoints, and the ejection of a dead endpoint
/// after one failure once it is raised (Envoy: outlier_detection.ejections_active). Where they
/// differ, on purpose: the connection that meets the dead endpoint is retried elsewhere by
/// us; Envoy's tcp_proxy (max_connect_attempts 1, istiod's default) closes it.
#[test]
fn envoy_and_the_interceptor_agree_on_round_robin_max_connections_and_ejection() {
    let w = World::new();
    sh(&mut w.t.node("pod").cmd(
        "ip",
        &[
            "addr",
            "add",
            &format!("{DEAD}/24"),
            "dev",
            w.t.node("pod").iface("a"),
        ],
    ));
    let rr = "{loadBalancer: {simple: ROUND_ROBIN}}";
    let cp = istiod(&w, cp_mesh_with(rr, false));
    let ic =
        w.t.node("vm")
            .interceptor()
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&cp.bundle)
            .start();
    let envoy = envoy_sidecar(&w, &cp);
    let cluster = format!("cluster.outbound|9080||{REVIEWS}");
    let apply = |policy: &str, dead: bool, expect: &str| {
        let pushes = envoy.stat("cluster_manager.cds.update_success");
        let asked = std::time::Instant::now();
        cp.cp.update(|m| *m = cp_mesh_with(policy, dead));
        // Both take it in well under a second; a changed cluster that Envoy keeps warming
        // (its EDS not sent again) would show here as initial_fetch_timeout's 15 s.
        let both = wait_for(12.0, || {
            (route_weights(&ic).contains(expect)
                && envoy.stat("cluster_manager.cds.update_success") > pushes
                && envoy.stat("cluster_manager.warming_clusters") == 0)
                .then_some(())
        });
        assert!(
            both.is_some(),
            "{policy} never in force on both: interceptor {}; Envoy cds updates {} (before {pushes}), warming {}\n{}",
            route_weights(&ic),
            envoy.stat("cluster_manager.cds.update_success"),
            envoy.stat("cluster_manager.warming_clusters"),
            envoy.log()
        );
        eprintln!("{policy} in force on both after {:?}", asked.elapsed());
    };
    let in_force = wait_for(20.0, || {
        route_weights(&ic).contains("ROUND_ROBIN").then_some(())
    });
    assert!(
        in_force.is_some(),
        "no ROUND_ROBIN from istiod: {}",
        ic.log()
    );

    for client in [Client::Vm, Client::Envoy] {
        let turns = sequential_from(&w, client, 10, "rr");
        assert!(
            turns.len() == 10 && turns.windows(2).all(|p| p[0] != p[1] && p[0] != "-"),
            "{client:?}: round robin did not alternate: {turns:?}"
        );
    }

    apply(
        "{connectionPool: {tcp: {maxConnections: 1}}}",
        false,
        "\"max_connections\":1",
    );
    for client in [Client::Vm, Client::Envoy] {
        let mut held = held_from(&w.t, client);
        wait_connected(&mut held);
        let over = sequential_from(&w, client, 1, "over");
        assert_eq!(
            over,
            vec!["-"],
            "{client:?}: the connection over maxConnections was served"
        );
        assert!(
            finish_held(held).contains("GET /held"),
            "{client:?}: the held connection broke"
        );
        assert_ne!(
            sequential_from(&w, client, 1, "after"),
            vec!["-"],
            "{client:?}: the limit outlived the connection"
        );
    }
    assert_eq!(
        ic.counter(
            "interceptor_outbound_refused_total",
            &[("reason", "overflow")]
        ),
        1.0
    );
    assert_eq!(
        envoy.stat(&format!("{cluster}.upstream_cx_overflow")),
        1,
        "{}",
        envoy.log()
    );

    // Outlier detection at Istio's default maxEjectionPercent (10 %): of three endpoints none
    // may be ejected, so both keep trying the dead one in its turn.
    apply(
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s}}",
        true,
        "\"max_ejection_percent\":10",
    );
    let failures = || ic.counter("interceptor_endpoint_failures_total", &[]);
    let before = failures();
    let ours = sequential_from(&w, Client::Vm, 9, "od");
    assert!(
        ours.iter().all(|s| s != "-"),
        "a connection failed on the dead endpoint: {ours:?}"
    );
    assert!(
        failures() - before >= 2.0,
        "the dead endpoint was ejected past the 10 % cap"
    );
    let theirs = sequential_from(&w, Client::Envoy, 9, "od");
    let envoy_failed = theirs.iter().filter(|s| *s == "-").count();
    assert!(
        envoy_failed >= 2,
        "Envoy: the dead endpoint was not kept in turn: {theirs:?}"
    );
    assert_eq!(
        envoy.stat(&format!("{cluster}.outlier_detection.ejections_active")),
        0
    );

    // maxEjectionPercent 100: one failure ejects it, in both.
    apply(
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}}",
        true,
        "\"max_ejection_percent\":100",
    );
    let before = failures();
    let ours = sequential_from(&w, Client::Vm, 9, "od");
    assert!(
        ours.iter().all(|s| s != "-"),
        "a connection failed on the dead endpoint: {ours:?}"
    );
    assert!(
        failures() - before <= 1.0,
        "the dead endpoint was tried again after its ejection"
    );
    let fails_before = envoy.stat(&format!("{cluster}.upstream_cx_connect_fail"));
    let theirs = sequential_from(&w, Client::Envoy, 9, "od");
    assert!(
        theirs.iter().filter(|s| *s == "-").count() <= 1,
        "Envoy: more than one connection failed: {theirs:?}"
    );
    assert!(
        envoy.stat(&format!("{cluster}.upstream_cx_connect_fail")) - fails_before <= 1,
        "Envoy tried the dead endpoint again"
    );
    assert_eq!(
        envoy.stat(&format!("{cluster}.outlier_detection.ejections_active")),
        1,
        "Envoy did not eject it"
    );
    eprintln!("round robin, maxConnections, the 10 % ejection cap and ejection: the interceptor and Envoy agree (Envoy's clients saw {envoy_failed} failed at the cap; ours none)");
}

const OUTSIDE: &str = "10.77.0.23";
const EXCLUDED: &str = "10.77.0.24";

/// Who answered `GET url` from the VM's app ("-": the connection failed).
fn get(w: &World, url: &str) -> String {
    let script = format!("curl -s -m 3 {url} || echo '- failed'");
    sh(&mut w.t.node("vm").in_cgroup("bash", &["-c", &script]))
        .split_whitespace()
        .next()
        .unwrap_or("-")
        .to_string()
}

/// Servers outside the mesh: `outside` (8080), `ssh` (22) and `excluded` (8080).
fn outside_servers(w: &World) -> Vec<Proc> {
    let pod = w.t.node("pod");
    for ip in [OUTSIDE, EXCLUDED] {
        sh(&mut pod.cmd(
            "ip",
            &["addr", "add", &format!("{ip}/24"), "dev", pod.iface("a")],
        ));
    }
    vec![
        pod.http("outside", &[&format!("{OUTSIDE}:8080")]),
        pod.http("ssh", &[&format!("{OUTSIDE}:22")]),
        pod.http("excluded", &[&format!("{EXCLUDED}:8080")]),
    ]
}

fn refused_registry_only(ic: &Interceptor) -> f64 {
    ic.counter(
        "interceptor_outbound_refused_total",
        &[("reason", "registry_only")],
    )
}

#[test]
fn registry_only_from_istiod_refuses_what_is_outside_the_mesh_and_allow_any_lets_it_by() {
    let w = World::new();
    let _outside = outside_servers(&w);
    let mut mesh = control_plane_mesh(50, 50);
    mesh.registry_only = true;
    let cp = istiod(&w, mesh);
    let ic =
        w.t.node("vm")
            .interceptor()
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(&cp.bundle)
            .start();
    let outside = format!("http://{OUTSIDE}:8080/");
    let refused = wait_for(20.0, || (get(&w, &outside) == "-").then_some(()));
    assert!(refused.is_some(), "REGISTRY_ONLY never refused {outside}");
    assert!(
        ic.wait_counter(
            "interceptor_outbound_refused_total",
            &[("reason", "registry_only")],
            1.0,
            5.0
        ),
        "the refusal was not counted"
    );
    // The mesh and SSH still work.
    let mesh_answer = get(&w, &format!("http://{VIP}:9080/"));
    assert!(mesh_answer == "v1" || mesh_answer == "v2", "{mesh_answer}");
    assert_eq!(get(&w, &format!("http://{OUTSIDE}:22/")), "ssh");

    // Back to ALLOW_ANY, live: the same connection goes where it was aimed, past the proxy.
    cp.cp.update(|m| m.registry_only = false);
    let allowed = wait_for(10.0, || (get(&w, &outside) == "outside").then_some(()));
    assert!(allowed.is_some(), "ALLOW_ANY never let {outside} by");
    let proxied = ic.counter("istio_tcp_connections_opened_total", &[]);
    let before = refused_registry_only(&ic);
    assert_eq!(get(&w, &outside), "outside");
    assert_eq!(
        ic.counter("istio_tcp_connections_opened_total", &[]),
        proxied,
        "a non-mesh connection went through the proxy"
    );
    assert_eq!(refused_registry_only(&ic), before);
}

#[test]
fn registry_only_from_the_flag_keeps_excluded_cidrs_and_loopback() {
    let w = World::new();
    let _outside = outside_servers(&w);
    let local = w.t.node("vm").http("local", &["127.0.0.1:8088"]);
    let mesh = w.t.write(
        "mesh.yaml",
        &format!("{}---\n{}", service_entry(), intent(100, 0)),
    );
    let ic =
        w.t.node("vm")
            .interceptor()
            .mesh(&mesh)
            .args([
                "--outbound-traffic-policy",
                "registry-only",
                "--exclude-outbound-cidrs",
                &format!("{EXCLUDED}/32,192.0.2.0/24"),
            ])
            .start();
    assert_eq!(get(&w, &format!("http://{OUTSIDE}:8080/")), "-");
    let why =
        ic.json(&format!("/explain?target={OUTSIDE}:8080"))["connections"][0]["why"].to_string();
    assert!(why.contains("REGISTRY_ONLY"), "{why}");
    assert_eq!(get(&w, &format!("http://{EXCLUDED}:8080/")), "excluded");
    assert_eq!(get(&w, "http://127.0.0.1:8088/"), "local");
    assert_eq!(get(&w, &format!("http://{VIP}:9080/")), "v1");
    assert!(ic.wait_counter(
        "interceptor_outbound_refused_total",
        &[("reason", "registry_only")],
        1.0,
        5.0
    ));
    drop(local);
}
