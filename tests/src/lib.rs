//! Test harness: network namespaces, a child cgroup, processes and an `interceptor` run inside
//! them. Every resource is removed on drop, also when a test fails or panics, and nothing is
//! ever attached outside the test's own cgroup.

pub mod bundle;
pub mod certs;
mod cgroup;
pub mod envoy;
pub mod hbone;
pub mod istiod;
pub mod istiod_ca;
pub mod istiod_http;
pub mod istiod_sds;
pub mod istiod_traffic;
mod netns;
pub mod notify;
mod process;
mod topology;
pub mod wire;

pub use cgroup::{cgroup2_mount, TestCgroup};
pub use netns::{Netns, NetnsRef, Veth};
pub use process::{die_with_parent, Interceptor, Metrics, Proc};
pub use topology::{Net, Node, Run, Subnet, Topology};

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A short id unique among concurrently running tests (and test binaries): interface names are
/// limited to 15 bytes.
pub fn unique_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (std::process::id() & 0xfff) << 8 | (n & 0xff)
}

/// Every test needs these; fail loudly (never skip) when they are missing.
pub fn require_prerequisites() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests need root (netns, cgroups, BPF): run `cargo xtask test` as root"
    );
    for tool in ["ip", "nsenter", "bpftool", "dig", "unshare"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "missing tool `{tool}`: run `cargo xtask setup` (installs every prerequisite)"
        );
    }
}

/// The interceptor binary under test: $INTERCEPTOR_BIN, else the workspace's target dir.
pub fn interceptor_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("INTERCEPTOR_BIN") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("interceptor");
        if p.exists() {
            return p;
        }
    }
    panic!("interceptor binary not built: run `cargo xtask test` (or `cargo build -p interceptor` first)");
}

/// A helper binary of this crate (http-echo, udp-query, loadgen): built next to the test
/// executables' `deps/` directory.
pub fn helper_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("INTERCEPTOR_HELPERS_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("exe dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "helper binary {} missing: build with `cargo build -p interceptor-tests --bins`",
        p.display()
    );
    p
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Output of a command that may fail: (success, stdout, stderr).
pub fn try_sh(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` until it returns Some or `secs` pass.
pub fn wait_for<T>(secs: f64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// Raises this process's soft limit on open descriptors to its hard one: the load helpers
/// hold thousands of connections.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is valid for both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
