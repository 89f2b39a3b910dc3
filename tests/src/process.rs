use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{wait_for, NetnsRef};

/// A process this test started, output to a file. Killed (by its pid) on drop.
pub struct Proc {
    pub(crate) child: Child,
    log: PathBuf,
    pub(crate) name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("dup log");
        die_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Self {
            child,
            log,
            name: name.to_string(),
        }
    }

    /// Resident memory (VmRSS) now, in KiB; 0 once the process is gone.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until the output contains `needle`; panics with the output if the process exits or
    /// time runs out.
    pub fn wait_for_output(&mut self, needle: &str, secs: f64) {
        let found = wait_for(secs, || {
            if self.output().contains(needle) {
                return Some(true);
            }
            match self.child.try_wait() {
                Ok(Some(_)) => Some(false),
                _ => None,
            }
        });
        if found != Some(true) {
            panic!(
                "{} did not print {needle:?}; output:\n{}",
                self.name,
                self.output()
            );
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for exit; None if still running after `secs`.
    pub fn wait_exit(&mut self, secs: f64) -> Option<std::process::ExitStatus> {
        wait_for(secs, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} output ({}):\n{}",
                self.name,
                self.log.display(),
                self.output()
            );
        }
    }
}

/// A running `interceptor run` or `interceptor gateway`, and its admin endpoint.
pub struct Interceptor {
    pub proc: Proc,
    ns: NetnsRef,
    admin: String,
}

impl Interceptor {
    /// Starts `cmd` (already wrapped into netns and cgroup) and waits until its readiness
    /// endpoint at `admin` (inside `ns`) answers 200; panics with the log if it exits first.
    pub fn start(cmd: Command, log: PathBuf, ns: NetnsRef, admin: &str) -> Self {
        let proc = Proc::spawn("interceptor", cmd, log);
        let mut ic = Self {
            proc,
            ns,
            admin: admin.to_string(),
        };
        ic.wait_ready(30.0);
        ic
    }

    /// Starts `cmd` and waits until every readiness condition but `except` is met (a test that
    /// watches that one condition change).
    pub fn start_except(
        cmd: Command,
        log: PathBuf,
        ns: NetnsRef,
        admin: &str,
        except: &str,
    ) -> Self {
        let proc = Proc::spawn("interceptor", cmd, log);
        let mut ic = Self {
            proc,
            ns,
            admin: admin.to_string(),
        };
        let up = wait_for(30.0, || {
            if let Some((_, body)) = ic.admin_get("/status") {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let conditions = v["readiness"]["conditions"].as_object()?;
                if conditions
                    .iter()
                    .all(|(k, ok)| k == except || ok.as_bool() == Some(true))
                {
                    return Some(true);
                }
            }
            match ic.proc.child.try_wait() {
                Ok(Some(_)) => Some(false),
                _ => None,
            }
        });
        if up != Some(true) {
            panic!("interceptor never came up; output:\n{}", ic.proc.output());
        }
        ic
    }

    /// Waits for readiness 200; panics with the log when the process exits or time runs out.
    pub fn wait_ready(&mut self, secs: f64) {
        let ready = wait_for(secs, || {
            if matches!(self.admin_get("/healthz/ready"), Some((200, _))) {
                return Some(true);
            }
            match self.proc.child.try_wait() {
                Ok(Some(_)) => Some(false),
                _ => None,
            }
        });
        if ready != Some(true) {
            panic!(
                "{} never became ready; output:\n{}",
                self.proc.name,
                self.proc.output()
            );
        }
    }

    pub fn log(&self) -> String {
        self.proc.output()
    }

    /// `GET path` from the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        self.ns.http_get(&self.admin, path)
    }

    /// The readiness endpoint's status code (None: nothing listening).
    pub fn readiness(&self) -> Option<u16> {
        self.admin_get("/healthz/ready").map(|(c, _)| c)
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self
            .admin_get(path)
            .unwrap_or_else(|| panic!("admin {path}: no answer"));
        assert_eq!(code, 200, "admin {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin {path}: {e}: {body}"))
    }

    pub fn metrics(&self) -> Metrics {
        let (code, body) = self
            .admin_get("/stats/prometheus")
            .expect("metrics endpoint answers");
        assert_eq!(code, 200, "{body}");
        Metrics(body)
    }

    /// The sum of every sample of `name` whose labels include `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics().sum(name, labels)
    }

    /// Waits until `counter(name, labels)` reaches `at_least`; false on timeout.
    pub fn wait_counter(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
        secs: f64,
    ) -> bool {
        wait_for(secs, || {
            (self.counter(name, labels) >= at_least).then_some(())
        })
        .is_some()
    }

    /// The version of the mesh table in force.
    pub fn table_version(&self) -> u64 {
        self.json("/status")["table"]["version"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits until the table in force is newer than `version`.
    pub fn wait_table_after(&self, version: u64, secs: f64) -> bool {
        wait_for(secs, || (self.table_version() > version).then_some(())).is_some()
    }
}

/// A Prometheus text exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// Every sample of `name`: (labels, value).
    pub fn samples(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (head, value) = l.rsplit_once(' ')?;
                let value: f64 = value.parse().ok()?;
                let (metric, labels) = match head.split_once('{') {
                    Some((m, rest)) => (m, rest.strip_suffix('}')?),
                    None => (head, ""),
                };
                (metric == name).then(|| (parse_labels(labels), value))
            })
            .collect()
    }

    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .iter()
            .filter(|(have, _)| {
                labels
                    .iter()
                    .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        out.push((
            k.trim_start_matches(',').to_string(),
            after[..end].to_string(),
        ));
        rest = &after[end + 1..];
    }
    out
}

/// The child gets SIGKILL when the thread that spawned it ends, so a test binary that aborts
/// (a panic while panicking, a signal) leaves no daemon, echo server or dnsmasq behind. Every
/// `Proc` is spawned from a test's own thread, which outlives it.
/// The child gets SIGKILL when the thread that spawned it ends (a killed harness leaves no
/// process behind).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
