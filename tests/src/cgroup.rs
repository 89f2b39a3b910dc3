use std::path::{Path, PathBuf};
use std::process::Command;

/// A child cgroup of the cgroup2 mount, made for one test. On drop, whatever the test started in
/// it is killed and the cgroup removed. Nothing is ever attached to the root.
pub struct TestCgroup {
    path: PathBuf,
}

pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .expect(
            "no cgroup2 mount in /proc/mounts: the tests need cgroup v2 (hybrid `unified` is fine)",
        )
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_mount().join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wraps `cmd` so the program runs inside this cgroup: a shell moves itself in, then execs.
    pub fn wrap(&self, cmd: &Command) -> Command {
        wrap_in(&self.path, cmd)
    }

    /// Number of BPF programs attached to this cgroup, per bpftool.
    pub fn attached_programs(&self) -> usize {
        let out = Command::new("bpftool")
            .arg("cgroup")
            .arg("show")
            .arg(&self.path)
            .output()
            .expect("run bpftool");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                l.trim_start()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            })
            .count()
    }
}

fn pids_of(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `cmd` run inside the cgroup at `path`: a shell moves itself in, then execs.
pub fn wrap_in(path: &Path, cmd: &Command) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(path)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            // Only processes this test put in its own cgroup, and cgroups made inside it (the
            // daemon's exec-probe cgroup, left behind by a daemon that was killed).
            let children: Vec<PathBuf> = std::fs::read_dir(&self.path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            for dir in children.iter().chain(std::iter::once(&self.path)) {
                for pid in pids_of(dir) {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            for dir in &children {
                let _ = std::fs::remove_dir(dir);
            }
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!(
            "warning: could not remove test cgroup {}",
            self.path.display()
        );
    }
}
