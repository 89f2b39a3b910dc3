//! Issue 22: locality load balancing. The VM is in us-east/a/1; `reviews` has an endpoint in
//! its subzone, one in another zone of its region, one in another region. Without outlier
//! detection every endpoint takes traffic (Istio: no locality priorities then). With it, the
//! nearest answers everything, and each failure moves traffic one step out: subzone, zone,
//! region. From the mesh files (we prioritise), and from the test control plane, which
//! prioritises for the locality our node reports as istiod's `applyLocalityFailover` does.

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh, Service};
use interceptor_tests::{sh, wait_for, Interceptor, Net, Proc, Topology};

const TOKEN: &str = "vm-bootstrap-token";
const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const VIP: &str = "240.240.5.5";
const OURS: &str = "us-east/a/1";
/// (server name, address, locality), nearest first.
const ENDPOINTS: [(&str, &str, &str); 3] = [
    ("near", "10.77.0.20", "us-east/a/1"),
    ("zone", "10.77.0.21", "us-east/b/1"),
    ("far", "10.77.0.22", "eu-west/a/1"),
];

fn rule(outlier: bool) -> String {
    let policy = if outlier {
        "{outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s}}"
    } else {
        "{connectionPool: {tcp: {connectTimeout: 2s}}}"
    };
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

fn entry() -> String {
    let mut e = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [{REVIEWS}]
  addresses: [{VIP}]
  ports: [{{number: 9080, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints:
"
    );
    for (_, ip, locality) in ENDPOINTS {
        e.push_str(&format!("  - {{address: {ip}, locality: {locality}}}\n"));
    }
    e
}

fn cp_mesh(outlier: bool) -> Mesh {
    let mut s = Service::new(REVIEWS, VIP, 9080);
    for (_, ip, locality) in ENDPOINTS {
        let mut e = Endpoint::new(ip, 9080);
        e.mtls = false;
        e.locality = locality.into();
        s.endpoints.push(e);
    }
    Mesh {
        services: vec![s],
        traffic: rule(outlier),
        ..Default::default()
    }
}

enum Source {
    Files(std::path::PathBuf),
    Istiod(Box<ControlPlane>),
}

impl Source {
    fn apply(&self, outlier: bool) {
        match self {
            Source::Files(p) => {
                std::fs::write(p, format!("{}---\n{}", entry(), rule(outlier))).expect("mesh file")
            }
            Source::Istiod(cp) => cp.update(|m| *m = cp_mesh(outlier)),
        }
    }
}

fn start(t: &Net, files: bool, outlier: bool) -> (Source, Interceptor) {
    let node = t.node("vm");
    if files {
        let mesh = t.write("mesh.yaml", &format!("{}---\n{}", entry(), rule(outlier)));
        let ic = node
            .interceptor()
            .mesh(&mesh)
            .args(["--locality", OURS])
            .start();
        return (Source::Files(mesh), ic);
    }
    let ca = Ca::new("mesh root");
    let ip = t.node("istiod").ip("a").to_string();
    let cp = ControlPlane::start(
        &t.node("istiod").ns.handle(),
        format!("{ip}:15012").parse().expect("address"),
        &ca,
        TOKEN,
        cp_mesh(outlier),
    );
    let spec = Spec::new("vm-ns", "vm-sa", &ip, &ca.pem());
    let bundle = write_bundle(&t.path("vm-root"), &spec);
    ca.issue(&bundle.join("etc/certs"), &spec.identity(), Key::Ecdsa);
    let ic = node
        .interceptor()
        .args([
            "--control-plane",
            "istiod",
            "--locality",
            OURS,
            "--istio-dir",
        ])
        .arg(&bundle)
        .start();
    (Source::Istiod(Box::new(cp)), ic)
}

/// The priority explain gives each endpoint: (near, zone, far).
fn priorities(ic: &Interceptor) -> Option<(u64, u64, u64)> {
    let v = ic.json(&format!("/explain?target={VIP}:9080"));
    let routes = v["connections"][0]["routes"].as_array()?.clone();
    let of = |ip: &str| {
        routes
            .iter()
            .find(|r| r["connect_to"].as_str().is_some_and(|c| c.starts_with(ip)))
            .and_then(|r| r["priority"].as_u64())
    };
    Some((
        of(ENDPOINTS[0].1)?,
        of(ENDPOINTS[1].1)?,
        of(ENDPOINTS[2].1)?,
    ))
}

/// `n` sequential requests from the VM's app: who answered each ("-" failed).
fn sequential(t: &Net, n: usize) -> Vec<String> {
    let script = format!(
        "for i in $(seq {n}); do curl -s -m 5 http://{VIP}:9080/ || echo '- failed'; echo; done"
    );
    sh(&mut t.node("vm").in_cgroup("bash", &["-c", &script]))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or("-").to_string())
        .collect()
}

fn count(answers: &[String], who: &str) -> usize {
    answers.iter().filter(|a| *a == who).count()
}

fn fails_over_by_locality(files: bool) {
    let mut b = Topology::new()
        .network("a")
        .node("vm", &["a"])
        .node("pod", &["a"]);
    for (_, ip, _) in ENDPOINTS {
        b = b.address("a", ip);
    }
    let t = b.node("istiod", &["a"]).build();
    let pod = t.node("pod");
    let mut servers: Vec<Option<Proc>> = ENDPOINTS
        .iter()
        .map(|(name, ip, _)| Some(pod.http(name, &[&format!("{ip}:9080")])))
        .collect();
    let who = if files { "files" } else { "istiod" };
    let (source, ic) = start(&t, files, false);
    let flat = wait_for(20.0, || priorities(&ic).filter(|p| *p == (0, 0, 0)));
    assert!(
        flat.is_some(),
        "{who}: no flat priorities: {:?}\n{}",
        priorities(&ic),
        ic.log()
    );

    // No outlier detection: no locality priorities, everyone takes a share.
    let answers = sequential(&t, 60);
    for (name, _, _) in ENDPOINTS {
        assert!(
            count(&answers, name) > 0,
            "{who}: {name} took nothing without outlier detection: {answers:?}"
        );
    }

    // Outlier detection on: the subzone first, then the zone, then the other region.
    source.apply(true);
    let ranked = wait_for(20.0, || {
        priorities(&ic).filter(|(near, zone, far)| near < zone && zone < far)
    });
    assert!(
        ranked.is_some(),
        "{who}: never ranked by locality: {:?}",
        priorities(&ic)
    );
    let answers = sequential(&t, 20);
    assert_eq!(
        count(&answers, "near"),
        20,
        "{who}: the same subzone did not take everything: {answers:?}"
    );

    // Each failure moves the traffic one step out, and no request fails on the way.
    for (down, next) in [(0, "zone"), (1, "far")] {
        servers[down] = None;
        let answers = sequential(&t, 20);
        assert_eq!(
            count(&answers, "-"),
            0,
            "{who}: requests failed over {}'s loss: {answers:?}",
            ENDPOINTS[down].0
        );
        assert_eq!(
            count(&answers, next),
            20,
            "{who}: with {} down, {next} did not take over: {answers:?}",
            ENDPOINTS[down].0
        );
    }
    eprintln!("{who}: spread without outlier detection; near, then zone, then far with it");
}

#[test]
fn locality_failover_from_the_mesh_files() {
    fails_over_by_locality(true);
}

#[test]
fn locality_failover_from_istiod() {
    fails_over_by_locality(false);
}
