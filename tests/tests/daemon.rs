//! Issue 10: one supervisor owns the daemon's parts. A part that dies turns readiness off,
//! capture goes first (fail-open), and the daemon exits non-zero for systemd to restart it.
//! The death is real: the daemon under test is built with its `test-hooks` feature, which makes
//! one accept loop panic on its first connection.

use interceptor_tests::notify::NotifySocket;
use interceptor_tests::{try_sh, wait_for, Topology};

const MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: product, namespace: default}
spec:
  hosts: [product.default.svc.cluster.local]
  addresses: [240.240.1.1]
  ports: [{number: 8080, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.77.0.2}]
"#;

#[test]
fn a_dead_part_turns_readiness_off_detaches_capture_and_exits_non_zero() {
    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let mesh = t.write("mesh.yaml", MESH);
    let mut ic = vm
        .interceptor()
        .mesh(&mesh)
        .env("INTERCEPTOR_TEST_PANIC_ACCEPT", "outbound")
        // Long enough to watch the dead daemon before it exits.
        .env("INTERCEPTOR_TEST_EXIT_DELAY_MS", "4000")
        .start();
    assert!(vm.cgroup.attached_programs() >= 9);
    assert_eq!(ic.readiness(), Some(200));

    // A captured connection reaches the outbound accept loop, which panics.
    let _ = try_sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "2", "http://240.240.1.1:8080/"]));
    let reason = wait_for(5.0, || match ic.admin_get("/healthz/ready") {
        Some((503, body)) => Some(body),
        _ => None,
    })
    .expect("readiness goes 503");
    assert!(
        reason.contains("a part died: outbound") && reason.contains("panicked"),
        "{reason}"
    );
    // Capture was the first part stopped: nothing is attached while the daemon is still up.
    assert!(
        wait_for(5.0, || (vm.cgroup.attached_programs() == 0).then_some(())).is_some(),
        "programs still attached after a part died"
    );
    let status = ic.proc.wait_exit(15.0).expect("the daemon exits");
    assert!(
        !status.success(),
        "a dead part must exit non-zero: {status}"
    );
    assert!(
        ic.log().contains("a part of the daemon died"),
        "{}",
        ic.log()
    );
}

/// Least privilege: once capture is attached and the listeners bound, the daemon holds no
/// capability in any set, the bounding set included, in any of its threads. (Every other scenario test runs the daemon
/// so: capture, reloads, probes and SIGTERM's detach all work without.)
#[test]
fn after_start_the_daemon_holds_no_capability() {
    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let mesh = t.write("mesh.yaml", "# nothing\n");
    let resolv = t.write("resolv.conf", "nameserver 10.77.0.2\n");
    // Before: what the daemon is started with (the test's own root capabilities), which
    // include CAP_SYS_ADMIN (21) and CAP_BPF (39).
    let before = std::fs::read_to_string("/proc/self/status").expect("own status");
    let eff = before
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:\t"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .expect("CapEff");
    assert_eq!(eff & (1 << 21 | 1 << 39), 1 << 21 | 1 << 39, "{before}");
    let ic = vm.interceptor().mesh(&mesh).resolv(&resolv).start();
    // Capabilities are per thread: every one of the daemon's (runtime workers, blocking
    // pool) must hold none, not only the main thread /proc/PID/status shows.
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", ic.proc.pid()))
        .expect("task dir")
        .map(|e| e.expect("task entry").path())
        .collect();
    assert!(
        tasks.len() > 1,
        "a multi-threaded daemon has more than one thread"
    );
    for task in tasks {
        let status = std::fs::read_to_string(task.join("status")).expect("status");
        for set in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            assert!(
                status
                    .lines()
                    .any(|l| l == format!("{set}:\t0000000000000000")),
                "{}: {set} is not empty:\n{status}",
                task.display()
            );
        }
    }
    assert!(ic.log().contains("capabilities dropped"), "{}", ic.log());
}

/// What systemd does when the main process exits, for a unit's `Restart=` (systemd.service(5),
/// "Table 2"): `on-failure` restarts on a non-zero exit code and on a signal other than the
/// clean ones (SIGHUP, SIGINT, SIGTERM, SIGPIPE); `always` on anything; `no` never.
fn systemd_restarts(restart: &str, status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let clean_signal = |s| [libc::SIGHUP, libc::SIGINT, libc::SIGTERM, libc::SIGPIPE].contains(&s);
    match restart {
        "always" => true,
        "no" => false,
        "on-failure" => match (status.code(), status.signal()) {
            (Some(code), _) => code != 0,
            (None, Some(sig)) => !clean_signal(sig),
            _ => false,
        },
        other => panic!("Restart={other}: not modelled by this test"),
    }
}

/// The shipped unit under this test's own supervisor, acting as systemd would (no systemd
/// runs here): `Type=notify` READY=1 comes only with capture attached; a dead part exits so
/// that `Restart=on-failure` restarts it, and the restarted daemon captures again; SIGKILL is
/// restarted too; SIGTERM is a clean stop (STOPPING=1, exit 0) that is not.
#[test]
fn under_the_units_restart_policy_a_dead_part_or_a_kill_is_restarted_and_a_stop_is_not() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/interceptor.service"
    ))
    .expect("packaging/interceptor.service");
    let setting = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("the unit sets no {key}="))
            .trim()
            .to_string()
    };
    assert_eq!(setting("Type"), "notify");
    let restart = setting("Restart");
    assert_eq!(restart, "on-failure", "the unit's restart policy changed");

    let t = Topology::vm_pod();
    let vm = t.node("vm");
    let _pod = t.node("pod").http("pod", &["10.77.0.2:8080"]);
    let mesh = t.write("mesh.yaml", MESH);
    let notify = NotifySocket::bind(t.path("notify.sock"));
    let socket = notify.path.to_str().expect("utf-8 path").to_string();
    let start = |panic_hook: bool| {
        let b = vm.interceptor().mesh(&mesh).env("NOTIFY_SOCKET", &socket);
        let b = if panic_hook {
            b.env("INTERCEPTOR_TEST_PANIC_ACCEPT", "outbound")
        } else {
            b
        };
        let proc = b.spawn();
        notify.wait_for("READY=1");
        // Units ordered after this one start with capture in force.
        assert!(vm.cgroup.attached_programs() >= 9, "READY=1 before capture");
        proc
    };
    let captured =
        || try_sh(&mut vm.in_cgroup("curl", &["-sS", "-m", "5", "http://240.240.1.1:8080/up"]));

    // A part dies: non-zero, so the unit restarts it; the new daemon captures again.
    let mut first = start(true);
    let _ = captured();
    let status = first
        .wait_exit(20.0)
        .expect("the daemon exits after a part died");
    assert!(
        systemd_restarts(&restart, status),
        "{status}: systemd would not restart it"
    );
    let mut second = start(false);
    let (ok, out, err) = captured();
    assert!(ok && out.starts_with("pod GET /up"), "{out}{err}");

    // SIGKILL (the OOM killer, a bad operator): restarted as well.
    second.signal(libc::SIGKILL);
    let status = second.wait_exit(10.0).expect("killed");
    assert!(systemd_restarts(&restart, status), "{status}");
    let mut third = start(false);
    let (ok, out, err) = captured();
    assert!(ok && out.starts_with("pod GET /up"), "{out}{err}");

    // SIGTERM: the daemon says STOPPING=1, detaches and exits 0; not restarted.
    third.signal(libc::SIGTERM);
    notify.wait_for("STOPPING=1");
    let status = third.wait_exit(15.0).expect("stopped");
    assert!(status.success(), "{status}");
    assert!(!systemd_restarts(&restart, status));
    assert_eq!(vm.cgroup.attached_programs(), 0);
}
