//! One builder for every scenario's hosts and networks, as readable as the scenario:
//!
//! ```no_run
//! use interceptor_tests::Topology;
//! let net = Topology::new()
//!     .network("a")
//!     .network("b")
//!     .node("vm", &["a"])
//!     .node("pod", &["a"])
//!     .node("gw", &["a", "b"])
//!     .node("pod-b", &["b"])
//!     .build();
//! let vm = net.node("vm");
//! let ic = vm.interceptor().certs(&net.path("vm-certs")).start();
//! ```
//!
//! Every node is a network namespace with a child cgroup of its own. Network number `i` (in the
//! order declared) is 10.X.0.0/24 and fd00:X::/64 with X = 77, 88, 99, ...; its members get .1,
//! .2, ... in the order they join it. A network of two nodes is one veth pair; a bigger one is a
//! bridge in a namespace of its own. There is no route between networks: only a node with a leg
//! in both (a gateway) joins them. Everything is removed on drop, also when a test fails.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{interceptor_bin, unique_id, Interceptor, Netns, Proc, TestCgroup, Veth};

/// Well-known addresses on the first network (10.77.0.0/24).
pub struct Subnet;

impl Subnet {
    /// A nameserver address nobody answers on: only capture can answer it.
    pub const FAKE_NS: &'static str = "10.77.0.53";
}

struct NodeSpec {
    name: String,
    networks: Vec<String>,
    /// Extra addresses (network, address) beyond the one the node gets by its order.
    extra: Vec<(String, String)>,
}

#[derive(Default)]
pub struct Topology {
    networks: Vec<String>,
    nodes: Vec<NodeSpec>,
}

fn third_octet(net_index: usize) -> usize {
    77 + 11 * net_index
}

impl Topology {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn network(mut self, name: &str) -> Self {
        self.networks.push(name.to_string());
        self
    }

    /// A host with a leg on each of `networks`.
    pub fn node(mut self, name: &str, networks: &[&str]) -> Self {
        self.nodes.push(NodeSpec {
            name: name.to_string(),
            networks: networks.iter().map(|n| n.to_string()).collect(),
            extra: vec![],
        });
        self
    }

    /// One more address for the last node, on `network` (an IPv4 address in its subnet).
    pub fn address(mut self, network: &str, addr: &str) -> Self {
        if let Some(n) = self.nodes.last_mut() {
            n.extra.push((network.to_string(), addr.to_string()));
        }
        self
    }

    /// The `vm` and `pod` of SPEC section 9 on one network `a`; the pod also has 10.77.0.3, a
    /// "real" address for fail-open checks.
    pub fn vm_pod() -> Net {
        Self::new()
            .network("a")
            .node("vm", &["a"])
            .node("pod", &["a"])
            .address("a", "10.77.0.3")
            .build()
    }

    pub fn build(self) -> Net {
        crate::require_prerequisites();
        let id = unique_id();
        let dir = tempfile::Builder::new()
            .prefix("interceptor-test-")
            .tempdir()
            .expect("tempdir");
        let mut nodes: Vec<Node> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, spec)| Node {
                cgroup: TestCgroup::new(&format!("interceptor-test-{id:x}-{i}")),
                ns: Netns::new(format!("ic{id:x}-{}", short(&spec.name))),
                name: spec.name.clone(),
                dir: dir.path().to_path_buf(),
                v4: BTreeMap::new(),
                v6: BTreeMap::new(),
                ifaces: BTreeMap::new(),
            })
            .collect();
        let mut switches = Vec::new();
        for (ni, net) in self.networks.iter().enumerate() {
            let x = third_octet(ni);
            let members: Vec<usize> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, s)| s.networks.contains(net))
                .map(|(i, _)| i)
                .collect();
            let addrs = |host: usize, node: usize| -> Vec<String> {
                let mut v = vec![
                    format!("10.{x}.0.{host}/24"),
                    format!("fd00:{x}::{host}/64"),
                ];
                v.extend(
                    self.nodes[node]
                        .extra
                        .iter()
                        .filter(|(n, _)| n == net)
                        .map(|(_, a)| format!("{a}/24")),
                );
                v
            };
            for (host, node) in members.iter().enumerate() {
                let host = host + 1;
                let n = &mut nodes[*node];
                n.v4.insert(net.clone(), format!("10.{x}.0.{host}"));
                n.v6.insert(net.clone(), format!("fd00:{x}::{host}"));
                n.ifaces.insert(net.clone(), format!("ic{id:x}n{node}{ni}"));
            }
            if members.len() == 2 {
                let (a, b) = (members[0], members[1]);
                let (aa, ba) = (addrs(1, a), addrs(2, b));
                let aa: Vec<&str> = aa.iter().map(String::as_str).collect();
                let ba: Vec<&str> = ba.iter().map(String::as_str).collect();
                Veth::connect(
                    &nodes[a].ns,
                    &nodes[a].ifaces[net],
                    &aa,
                    &nodes[b].ns,
                    &nodes[b].ifaces[net],
                    &ba,
                );
            } else if members.len() > 2 {
                let switch = Netns::new(format!("ic{id:x}-s{ni}"));
                let bridge = format!("ic{id:x}br{ni}");
                switch.ip(&["link", "add", &bridge, "type", "bridge"]);
                switch.ip(&["link", "set", &bridge, "up"]);
                for (host, node) in members.iter().enumerate() {
                    let port = format!("ic{id:x}s{node}{ni}");
                    let a = addrs(host + 1, *node);
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    Veth::connect(
                        &nodes[*node].ns,
                        &nodes[*node].ifaces[net],
                        &a,
                        &switch,
                        &port,
                        &[],
                    );
                    switch.ip(&["link", "set", &port, "master", &bridge]);
                }
                switches.push(switch);
            }
        }
        Net {
            id,
            nodes,
            switches,
            dir,
        }
    }
}

/// Namespace names carry the node's name, shortened: interface and namespace names are small.
fn short(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect()
}

/// A built topology. Drop order: nodes (their cgroups kill what ran in them, then their
/// namespaces go), then the switches, then the directory.
pub struct Net {
    pub id: u32,
    nodes: Vec<Node>,
    switches: Vec<Netns>,
    pub dir: tempfile::TempDir,
}

impl Net {
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the topology"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write test file");
        p
    }

    /// How many switch namespaces the topology needed (networks of three or more).
    pub fn switches(&self) -> usize {
        self.switches.len()
    }
}

/// One host: a namespace and a cgroup of its own.
pub struct Node {
    pub name: String,
    // Drop order: the cgroup (killing whatever the test started in it) before the namespace.
    pub cgroup: TestCgroup,
    pub ns: Netns,
    dir: PathBuf,
    v4: BTreeMap<String, String>,
    v6: BTreeMap<String, String>,
    ifaces: BTreeMap<String, String>,
}

impl Node {
    /// This node's IPv4 address on `network`.
    pub fn ip(&self, network: &str) -> &str {
        self.v4
            .get(network)
            .unwrap_or_else(|| panic!("{} is not on network {network}", self.name))
    }

    pub fn ip6(&self, network: &str) -> &str {
        &self.v6[network]
    }

    /// The node's interface on `network` (for tcpdump).
    pub fn iface(&self, network: &str) -> &str {
        &self.ifaces[network]
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A command in this node's namespace, outside its captured cgroup.
    pub fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = self.ns.cmd(program);
        c.args(args);
        c
    }

    /// A command in this node's namespace and inside its captured cgroup.
    pub fn in_cgroup(&self, program: &str, args: &[&str]) -> Command {
        self.cgroup.wrap(&self.cmd(program, args))
    }

    /// A shell script in the cgroup with `resolv` bound over /etc/resolv.conf (a private mount
    /// namespace: the machine's own file is never touched).
    pub fn with_resolv(&self, resolv: &Path, script: &str) -> Command {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && {script}",
            resolv.display()
        );
        self.in_cgroup("unshare", &["-m", "sh", "-c", &script])
    }

    /// `getent hosts NAME` in the cgroup with `resolv` as /etc/resolv.conf.
    pub fn getent(&self, resolv: &Path, name: &str) -> Command {
        self.with_resolv(resolv, &format!("exec getent hosts {name}"))
    }

    /// `interceptor run` on this node, to be configured and started.
    pub fn interceptor(&self) -> Run {
        Run {
            ns: self.ns.handle(),
            cgroup: self.cgroup.path().to_path_buf(),
            dir: self.dir.clone(),
            log: format!("{}-interceptor", self.name),
            mesh: vec![],
            resolv: None,
            args: vec![],
            envs: vec![],
            admin: "127.0.0.1:15020".into(),
        }
    }

    /// An http-echo test server answering "NAME METHOD PATH from PEER".
    pub fn http(&self, name: &str, addrs: &[&str]) -> Proc {
        let mut c = self
            .ns
            .cmd(crate::helper_bin("http-echo").to_str().expect("utf-8 path"));
        c.arg(name).args(addrs);
        let mut p = Proc::spawn(name, c, self.path(&format!("{name}.log")));
        p.wait_for_output("listening", 10.0);
        p
    }

    /// An http-echo that keeps HTTP/1.1 connections open between requests (as most apps do).
    pub fn http_keepalive(&self, name: &str, addrs: &[&str]) -> Proc {
        let mut c = self
            .ns
            .cmd(crate::helper_bin("http-echo").to_str().expect("utf-8 path"));
        c.arg(name).args(addrs).env("HTTP_ECHO_KEEPALIVE", "1");
        let mut p = Proc::spawn(name, c, self.path(&format!("{name}.log")));
        p.wait_for_output("listening", 10.0);
        p
    }

    /// The http-bench server (one event loop, fixed answer): for benchmarks.
    pub fn bench_http(&self, addrs: &[&str]) -> Proc {
        let mut c = self.ns.cmd(
            crate::helper_bin("http-bench")
                .to_str()
                .expect("utf-8 path"),
        );
        c.args(addrs);
        let mut p = Proc::spawn(
            "http-bench",
            c,
            self.path(&format!("{}-http-bench.log", self.name)),
        );
        p.wait_for_output("listening", 10.0);
        p
    }

    /// dnsmasq on `addr`:53 answering `host-record`s, nothing else.
    pub fn dnsmasq(&self, addr: &str, records: &[&str]) -> Proc {
        let mut c = self.ns.cmd("dnsmasq");
        c.args([
            "-k",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--local=/#/",
            "--bind-interfaces",
            "--log-queries",
            "--log-facility=-",
            "--pid-file=",
            "--user=root",
        ])
        .arg(format!("--listen-address={addr}"));
        for r in records {
            c.arg(format!("--host-record={r}"));
        }
        let mut p = Proc::spawn(
            "dnsmasq",
            c,
            self.path(&format!("{}-dnsmasq.log", self.name)),
        );
        p.wait_for_output("started", 10.0);
        p
    }

    /// `interceptor gateway` for `network` on this node, with every capability dropped: it
    /// must need none.
    pub fn gateway(
        &self,
        mesh: &Path,
        networks: &Path,
        network: &str,
        listen: &str,
    ) -> Interceptor {
        self.gateway_with(mesh, networks, network, listen, &[])
    }

    /// As `gateway`, with more arguments.
    pub fn gateway_with(
        &self,
        mesh: &Path,
        networks: &Path,
        network: &str,
        listen: &str,
        extra: &[&std::ffi::OsStr],
    ) -> Interceptor {
        let mut c = self.ns.cmd("setpriv");
        c.args([
            "--no-new-privs",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(interceptor_bin())
        .arg("gateway")
        .arg("--mesh")
        .arg(mesh)
        .arg("--mesh-networks")
        .arg(networks)
        .args(["--network", network, "--listen", listen])
        .args(extra);
        c.env("RUST_LOG", "info");
        Interceptor::start(
            c,
            self.path(&format!("{}-gateway.log", self.name)),
            self.ns.handle(),
            "127.0.0.1:15020",
        )
    }
}

/// `interceptor run` on a node, inside and capturing the node's cgroup (so every test also
/// proves the daemon never captures itself), logging at info. The one way tests and benches
/// start the daemon.
pub struct Run {
    ns: crate::NetnsRef,
    cgroup: PathBuf,
    dir: PathBuf,
    log: String,
    mesh: Vec<PathBuf>,
    resolv: Option<PathBuf>,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    admin: String,
}

impl Run {
    pub fn mesh(mut self, path: &Path) -> Self {
        self.mesh.push(path.to_path_buf());
        self
    }

    pub fn resolv(mut self, path: &Path) -> Self {
        self.resolv = Some(path.to_path_buf());
        self
    }

    pub fn certs(self, dir: &Path) -> Self {
        self.arg("--certs").arg(dir)
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.to_string(), v.to_string()));
        self
    }

    /// The admin endpoint (default 127.0.0.1:15020): where readiness is awaited.
    pub fn admin(mut self, addr: &str) -> Self {
        self.admin = addr.to_string();
        self
    }

    /// The log file's name (`<name>.log` in the test directory).
    pub fn log(mut self, name: &str) -> Self {
        self.log = name.to_string();
        self
    }

    pub fn command(&self) -> Command {
        let mut c = self.ns.cmd(interceptor_bin().to_str().expect("utf-8 path"));
        c.arg("run");
        if self.mesh.is_empty() {
            let empty = self.dir.join("empty-mesh.yaml");
            std::fs::write(&empty, "# no services\n").expect("write empty mesh");
            c.arg("--mesh").arg(empty);
        }
        for m in &self.mesh {
            c.arg("--mesh").arg(m);
        }
        let resolv = self.resolv.clone().unwrap_or_else(|| {
            let p = self.dir.join("default-resolv.conf");
            std::fs::write(&p, format!("nameserver {}\n", Subnet::FAKE_NS))
                .expect("write resolv.conf");
            p
        });
        c.arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--resolv-conf")
            .arg(resolv)
            .arg("--admin-addr")
            .arg(&self.admin)
            .args(&self.args);
        c.env("RUST_LOG", "info");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        crate::cgroup::wrap_in(&self.cgroup, &c)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.log))
    }

    /// Starts it and waits until its readiness endpoint says 200.
    pub fn start(self) -> Interceptor {
        Interceptor::start(
            self.command(),
            self.log_path(),
            self.ns.clone(),
            &self.admin,
        )
    }

    /// Starts it and waits until it is ready but for readiness condition `except`.
    pub fn start_except(self, except: &str) -> Interceptor {
        Interceptor::start_except(
            self.command(),
            self.log_path(),
            self.ns.clone(),
            &self.admin,
            except,
        )
    }

    /// Starts it without waiting (for a start that must fail).
    pub fn spawn(self) -> Proc {
        Proc::spawn("interceptor", self.command(), self.log_path())
    }
}
