//! Issue 12: WorkloadGroup auto-registration and health. The VM's node carries
//! AUTO_REGISTER_GROUP; the bundle's readiness probe runs against the application and every
//! verdict reaches the control plane as a HealthInformation request, again after every
//! reconnect; a clean shutdown closes the stream. In file mode the same probe turns readiness.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::istiod::{ControlPlane, Endpoint, Mesh, Service};
use interceptor_tests::{helper_bin, try_sh, wait_for, Interceptor, Net, Node, Proc, Topology};

const TOKEN: &str = "vm-bootstrap-token";
const VIP: &str = "240.240.5.5";
const PROBE: &str = "application probe";

fn mesh() -> Mesh {
    // Plaintext, so a captured curl from the VM reaches it without certificates on the pod.
    let mut e = Endpoint::new("10.77.0.2", 9080);
    e.mtls = false;
    let mut s = Service::new("reviews.shop.svc.cluster.local", VIP, 9080);
    s.endpoints = vec![e];
    Mesh {
        services: vec![s],
        ..Default::default()
    }
}

struct World {
    ca: Ca,
    cp: Option<ControlPlane>,
    istiod: std::net::SocketAddr,
    _pod: Proc,
    t: Net,
}

impl World {
    fn new() -> Self {
        let t = Topology::new()
            .network("a")
            .node("vm", &["a"])
            .node("pod", &["a"])
            .node("istiod", &["a"])
            .build();
        let ca = Ca::new("mesh root");
        let istiod = format!("{}:15012", t.node("istiod").ip("a"))
            .parse()
            .unwrap();
        let cp = ControlPlane::start(&t.node("istiod").ns.handle(), istiod, &ca, TOKEN, mesh());
        let pod = t.node("pod").http("pod", &["10.77.0.2:9080"]);
        Self {
            ca,
            cp: Some(cp),
            istiod,
            _pod: pod,
            t,
        }
    }

    fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().expect("control plane")
    }

    fn vm(&self) -> &Node {
        self.t.node("vm")
    }

    /// A bundle (under its own directory) whose WorkloadGroup probe is `probe` (YAML).
    fn bundle(&self, name: &str, probe: &str) -> PathBuf {
        let mut s = Spec::new(
            "vm-ns",
            "vm-sa",
            &self.istiod.ip().to_string(),
            &self.ca.pem(),
        );
        s.token = TOKEN.into();
        s.auto_register_group = Some("vm-app".into());
        s.probe = Some(probe.into());
        let root = write_bundle(&self.t.path(name), &s);
        self.ca
            .issue(&root.join("etc/certs"), &s.identity(), Key::Ecdsa);
        root
    }

    /// The daemon from `bundle`, up but for the probe's verdict.
    fn start(&self, bundle: &PathBuf, log: &str) -> Interceptor {
        self.vm()
            .interceptor()
            .args(["--control-plane", "istiod", "--istio-dir"])
            .arg(bundle)
            .log(log)
            .start_except(PROBE)
    }

    /// Waits for the `n`th health report (1-based) and returns it.
    fn report(&self, n: usize) -> (bool, String, SystemTime) {
        wait_for(15.0, || self.cp().health_reports().get(n - 1).cloned()).unwrap_or_else(|| {
            panic!(
                "health report {n} never came; reports so far: {:?}",
                self.cp().health_reports()
            )
        })
    }
}

fn probe_state(ic: &Interceptor) -> serde_json::Value {
    ic.json("/status")["probe"].clone()
}

/// When our status says the verdict last changed.
fn since(ic: &Interceptor) -> SystemTime {
    let ms = probe_state(ic)["since_unix_ms"].as_u64().unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn ms(d: Result<Duration, std::time::SystemTimeError>) -> f64 {
    d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

/// An http-echo on the VM's 127.0.0.1:8080 whose status code is the file's content.
fn app(w: &World, status_file: &std::path::Path) -> Proc {
    let mut c = w.vm().ns.cmd(helper_bin("http-echo").to_str().unwrap());
    c.args(["app", "127.0.0.1:8080"])
        .env("HTTP_ECHO_STATUS_FILE", status_file);
    let mut p = Proc::spawn("app", c, w.t.path("app.log"));
    p.wait_for_output("listening", 10.0);
    p
}

#[test]
fn an_http_probe_drives_health_reports_and_they_are_sent_again_after_a_control_plane_restart() {
    let mut w = World::new();
    let bundle = w.bundle(
        "vm-http",
        "httpGet:\n  port: 8080\n  path: /ready\nperiodSeconds: 1",
    );
    let mut ic = w.start(&bundle, "vm-http");
    // Auto-registration: the node says which WorkloadGroup it belongs to.
    let node = w
        .cp()
        .wait_seen(5.0, |s| !s.metadata.is_empty())
        .expect("a request with node metadata");
    assert_eq!(
        node.metadata.get("AUTO_REGISTER_GROUP").map(String::as_str),
        Some("vm-app")
    );
    assert_eq!(
        node.metadata.get("WORKLOAD_NAME").map(String::as_str),
        Some("vm-app")
    );
    let vm_ip = w.vm().ip("a").to_string();
    assert!(
        node.metadata["INSTANCE_IPS"].contains(&vm_ip),
        "{:?}",
        node.metadata
    );

    // No application yet: unhealthy, and readiness says so.
    let (healthy, message, _) = w.report(1);
    assert!(
        !healthy && message.contains("connect 127.0.0.1:8080"),
        "{message}"
    );
    assert_eq!(ic.readiness(), Some(503));
    let (_, body) = ic.admin_get("/healthz/ready").unwrap();
    assert!(body.contains(PROBE), "{body}");

    // The application starts: healthy.
    let status = w.t.write("app-status", "200");
    let started = SystemTime::now();
    let running = app(&w, &status);
    let (healthy, _, at) = w.report(2);
    assert!(healthy);
    let mut latencies = vec![(
        ms(at.duration_since(started)),
        ms(at.duration_since(since(&ic))),
    )];
    assert!(wait_for(5.0, || (ic.readiness() == Some(200)).then_some(())).is_some());

    // It answers 500: unhealthy, with the reason.
    std::fs::write(&status, "500").unwrap();
    let changed = SystemTime::now();
    let (healthy, message, at) = w.report(3);
    assert!(!healthy && message.contains("500"), "{message}");
    latencies.push((
        ms(at.duration_since(changed)),
        ms(at.duration_since(since(&ic))),
    ));
    assert_eq!(
        ic.metrics().sum("interceptor_probe_healthy", &[]),
        0.0,
        "the metric follows"
    );

    // 200 again, then it stops: healthy, then unhealthy.
    std::fs::write(&status, "200").unwrap();
    assert!(w.report(4).0);
    let stopped = SystemTime::now();
    running.signal(libc::SIGKILL);
    let (healthy, _, at) = w.report(5);
    assert!(!healthy);
    latencies.push((
        ms(at.duration_since(stopped)),
        ms(at.duration_since(since(&ic))),
    ));
    eprintln!(
        "application change to report at the control plane / verdict to report (ms), period 1 s: {latencies:?}"
    );

    // istiod restarts: the new stream is told the last verdict again, unasked.
    w.cp = None;
    w.cp = Some(ControlPlane::start(
        &w.t.node("istiod").ns.handle(),
        w.istiod,
        &w.ca,
        TOKEN,
        mesh(),
    ));
    let (healthy, message, _) = w.report(1);
    assert!(!healthy && message.contains("connect"), "{message}");

    // A clean shutdown closes the stream (istiod's grace period for the WorkloadEntry starts).
    let ended = w.cp().streams_ended();
    ic.proc.signal(libc::SIGTERM);
    assert!(ic.proc.wait_exit(10.0).is_some_and(|s| s.success()));
    assert!(
        wait_for(5.0, || (w.cp().streams_ended() > ended).then_some(())).is_some(),
        "the control plane never saw the stream end"
    );
}

#[test]
fn tcp_and_exec_probes_flip_the_same_way_and_exec_runs_outside_capture() {
    let w = World::new();

    // tcpSocket.
    let bundle = w.bundle("vm-tcp", "tcpSocket:\n  port: 8081\nperiodSeconds: 1");
    let ic = w.start(&bundle, "vm-tcp");
    assert!(!w.report(1).0);
    let listener = {
        let mut c = w.vm().ns.cmd(helper_bin("tcp-echo").to_str().unwrap());
        c.arg("127.0.0.1:8081");
        let mut p = Proc::spawn("tcp-app", c, w.t.path("tcp-app.log"));
        p.wait_for_output("listening", 10.0);
        p
    };
    assert!(w.report(2).0);
    listener.signal(libc::SIGKILL);
    let (healthy, message, _) = w.report(3);
    assert!(!healthy && message.contains("8081"), "{message}");
    drop(ic);

    // exec: healthy only while the flag file exists and its own connection to a mesh VIP is
    // left alone (not captured, so unroutable); the application's is captured as always.
    let flag = w.t.path("flag");
    let script = format!(
        "test -f {f} || {{ echo no flag; exit 1; }}; if curl -s -m 1 -o /dev/null http://{VIP}:9080/; then echo CAPTURED; exit 1; fi",
        f = flag.display()
    );
    let probe = format!(
        "exec:\n  command: [sh, -c, {}]\nperiodSeconds: 1\ntimeoutSeconds: 3",
        serde_json::to_string(&script).unwrap()
    );
    let bundle = w.bundle("vm-exec", &probe);
    let first = w.cp().health_reports().len() + 1;
    let mut ic = w.start(&bundle, "vm-exec");
    let probes_cgroup = w.vm().cgroup.path().join("interceptor-probes");
    assert!(probes_cgroup.is_dir());
    let (healthy, message, _) = w.report(first);
    assert!(!healthy && message.contains("no flag"), "{message}");
    std::fs::write(&flag, "").unwrap();
    let (healthy, message, _) = w.report(first + 1);
    assert!(healthy, "{message}");
    let (ok, out, err) = try_sh(&mut w.vm().in_cgroup(
        "curl",
        &["-sS", "-m", "3", &format!("http://{VIP}:9080/app")],
    ));
    assert!(
        ok && out.starts_with("pod GET /app"),
        "the application's curl: {out}{err}"
    );
    std::fs::remove_file(&flag).unwrap();
    assert!(!w.report(first + 2).0);
    // The probe's cgroup goes with the daemon.
    ic.proc.signal(libc::SIGTERM);
    assert!(ic.proc.wait_exit(10.0).is_some_and(|s| s.success()));
    assert!(!probes_cgroup.exists());
}

#[test]
fn in_file_mode_the_probe_turns_readiness() {
    let w = World::new();
    let ic = w
        .vm()
        .interceptor()
        .args([
            "--readiness-probe",
            "{tcpSocket: {port: 8082}, periodSeconds: 1}",
        ])
        .log("vm-file")
        .start_except(PROBE);
    let verdict =
        |want: Option<u16>| wait_for(10.0, || (ic.readiness() == want).then_some(())).is_some();
    assert!(verdict(Some(503)));
    assert_eq!(probe_state(&ic)["healthy"], false);
    let mut c = w.vm().ns.cmd(helper_bin("tcp-echo").to_str().unwrap());
    c.arg("127.0.0.1:8082");
    let mut p = Proc::spawn("tcp-app", c, w.t.path("tcp-app.log"));
    p.wait_for_output("listening", 10.0);
    assert!(verdict(Some(200)), "{}", probe_state(&ic));
    assert_eq!(ic.metrics().sum("interceptor_probe_healthy", &[]), 1.0);
    p.signal(libc::SIGKILL);
    assert!(verdict(Some(503)));
    // A bad probe is a start error naming it.
    let (ok, _, err) = try_sh(
        &mut w
            .vm()
            .interceptor()
            .args([
                "--readiness-probe",
                "{tcpSocket: {port: 1}, exec: {command: [true]}}",
            ])
            .command(),
    );
    assert!(!ok && err.contains("exactly one of"), "{err}");
}
