use std::process::Command;

use crate::sh;

/// A network namespace made with `ip netns add`, loopback up. Deleted on drop (its veth ends go
/// with it).
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        // A leftover of a killed earlier run with the same id would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        sh(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command run inside this namespace. nsenter (not `ip netns exec`, which remounts /sys
    /// and hides a hybrid cgroup2 mount) execs in place, so the child's pid is the program's.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        c
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair between two namespaces; goes away with the namespaces.
pub struct Veth;

impl Veth {
    /// Creates `a_if` in `a` and `b_if` in `b`, both up, with the given addresses (CIDR).
    pub fn connect(
        a: &Netns,
        a_if: &str,
        a_addrs: &[&str],
        b: &Netns,
        b_if: &str,
        b_addrs: &[&str],
    ) {
        sh(Command::new("ip").args([
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ]));
        for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
            for addr in addrs {
                let mut args = vec!["addr", "add", addr, "dev", ifname];
                if addr.contains(':') {
                    args.push("nodad");
                }
                ns.ip(&args);
            }
            ns.ip(&["link", "set", ifname, "up"]);
        }
    }
}
