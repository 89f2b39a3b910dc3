use std::os::fd::AsRawFd;
use std::process::Command;

use crate::sh;

/// A network namespace made with `ip netns add`, loopback up. Deleted on drop (its veth ends go
/// with it).
pub struct Netns {
    r: NetnsRef,
}

/// A namespace by name, to run things in; does not own it.
#[derive(Clone, Debug)]
pub struct NetnsRef {
    name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        // A leftover of a killed earlier run with the same id would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self {
            r: NetnsRef { name },
        };
        sh(Command::new("ip").args(["-n", &ns.r.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn handle(&self) -> NetnsRef {
        self.r.clone()
    }
}

impl std::ops::Deref for Netns {
    type Target = NetnsRef;
    fn deref(&self) -> &NetnsRef {
        &self.r
    }
}

impl NetnsRef {
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

    /// Runs `f` on a thread of this test process moved into the namespace: sockets it opens
    /// live there. For talking to servers in the namespace without a subprocess per request.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open netns {path}: {e}"));
                // SAFETY: setns on a descriptor we own; it affects only this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    /// `GET path` from `addr` inside the namespace: (status, body), None when nothing answers.
    pub fn http_get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        let (addr, path) = (addr.to_string(), path.to_string());
        self.run(move || http_get(&addr, &path))
    }
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    // HTTP/1.1 (Envoy's admin refuses 1.0), one request per connection.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Some((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.r.name])
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
