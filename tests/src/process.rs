use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_for;

/// A process this test started, output to a file. Killed (by its pid) on drop.
pub struct Proc {
    child: Child,
    log: PathBuf,
    name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("dup log");
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

/// A running `interceptor run`.
pub struct Interceptor {
    pub proc: Proc,
}

impl Interceptor {
    /// Starts `cmd` (an `interceptor run ...` already wrapped into netns and cgroup) and waits
    /// until it says it is ready.
    pub fn start(cmd: Command, log: PathBuf) -> Self {
        let mut proc = Proc::spawn("interceptor", cmd, log);
        proc.wait_for_output("interceptor ready", 20.0);
        Self { proc }
    }

    pub fn log(&self) -> String {
        self.proc.output()
    }

    /// Waits until the log shows `needle` at least `count` times.
    pub fn wait_log_count(&self, needle: &str, count: usize, secs: f64) -> bool {
        wait_for(secs, || {
            (self.log().matches(needle).count() >= count).then_some(())
        })
        .is_some()
    }
}

pub fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}
