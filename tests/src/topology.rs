use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{interceptor_bin, unique_id, Interceptor, Netns, Proc, TestCgroup, Veth};

/// `interceptor run` in `ns`, inside and capturing `cgroup` (so a test also proves the daemon
/// never captures itself), logging at info.
fn run_cmd(ns: &Netns, cgroup: &TestCgroup, mesh: &Path, resolv: &Path, extra: &[&str]) -> Command {
    let mut c = ns.cmd(interceptor_bin().to_str().expect("utf-8 path"));
    c.arg("run")
        .arg("--mesh")
        .arg(mesh)
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--resolv-conf")
        .arg(resolv);
    c.args(extra);
    c.env("RUST_LOG", "info");
    cgroup.wrap(&c)
}

/// Addresses of the vm <-> pod link. Namespaces are isolated, so every test can use the same
/// subnet.
pub struct Subnet;

impl Subnet {
    pub const VM4: &'static str = "10.77.0.1";
    pub const POD4: &'static str = "10.77.0.2";
    /// A second address on the pod: a "real" service address for fail-open checks.
    pub const POD4_B: &'static str = "10.77.0.3";
    pub const VM6: &'static str = "fd00:77::1";
    pub const POD6: &'static str = "fd00:77::2";
    /// A nameserver address nobody answers on: only capture can answer it.
    pub const FAKE_NS: &'static str = "10.77.0.53";
}

/// The single-network topology of SPEC section 9: `vm` (test cgroup, interceptor) and `pod`,
/// joined by a veth.
pub struct VmPod {
    pub id: u32,
    pub dir: tempfile::TempDir,
    // Drop order: processes (fields of the test) first, then the cgroups, then namespaces.
    pub cgroup: TestCgroup,
    /// The pod's own captured cgroup, for an interceptor running on the pod side.
    pub pod_cgroup: TestCgroup,
    pub vm: Netns,
    pub pod: Netns,
}

impl VmPod {
    pub fn new() -> Self {
        crate::require_prerequisites();
        let id = unique_id();
        let dir = tempfile::Builder::new()
            .prefix("interceptor-test-")
            .tempdir()
            .expect("tempdir");
        let vm = Netns::new(format!("ic{id:x}-vm"));
        let pod = Netns::new(format!("ic{id:x}-pod"));
        Veth::connect(
            &vm,
            &format!("ic{id:x}v"),
            &[
                &format!("{}/24", Subnet::VM4),
                &format!("{}/64", Subnet::VM6),
            ],
            &pod,
            &format!("ic{id:x}p"),
            &[
                &format!("{}/24", Subnet::POD4),
                &format!("{}/24", Subnet::POD4_B),
                &format!("{}/64", Subnet::POD6),
            ],
        );
        let cgroup = TestCgroup::new(&format!("interceptor-test-{id:x}"));
        let pod_cgroup = TestCgroup::new(&format!("interceptor-test-{id:x}-pod"));
        Self {
            id,
            dir,
            cgroup,
            pod_cgroup,
            vm,
            pod,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write test file");
        p
    }

    /// A command inside the vm's captured cgroup.
    pub fn in_cgroup(&self, program: &str, args: &[&str]) -> Command {
        let mut c = self.vm.cmd(program);
        c.args(args);
        self.cgroup.wrap(&c)
    }

    /// A command in the vm namespace but outside the captured cgroup.
    pub fn outside(&self, program: &str, args: &[&str]) -> Command {
        let mut c = self.vm.cmd(program);
        c.args(args);
        c
    }

    /// `getent hosts NAME` in the cgroup with `resolv` as /etc/resolv.conf (private mount ns).
    pub fn getent(&self, resolv: &Path, name: &str) -> Command {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec getent hosts {name}",
            resolv.display()
        );
        self.in_cgroup("unshare", &["-m", "sh", "-c", &script])
    }

    /// Starts `interceptor run` in the vm namespace, inside the captured cgroup (so the test also
    /// proves the daemon never captures itself).
    pub fn start_interceptor(&self, mesh: &Path, resolv: &Path, extra: &[&str]) -> Interceptor {
        Interceptor::start(
            self.interceptor_cmd(mesh, resolv, extra),
            self.path("interceptor.log"),
        )
    }

    pub fn interceptor_cmd(&self, mesh: &Path, resolv: &Path, extra: &[&str]) -> Command {
        run_cmd(&self.vm, &self.cgroup, mesh, resolv, extra)
    }

    /// `interceptor run` on the pod side: its own cgroup, inbound capture in the pod namespace.
    pub fn pod_interceptor_cmd(
        &self,
        ns: &Netns,
        mesh: &Path,
        resolv: &Path,
        extra: &[&str],
    ) -> Command {
        run_cmd(ns, &self.pod_cgroup, mesh, resolv, extra)
    }

    /// An http-echo test server in namespace `ns`.
    pub fn http_in(&self, ns: &Netns, name: &str, addrs: &[&str]) -> Proc {
        let mut c = ns.cmd(crate::helper_bin("http-echo").to_str().expect("utf-8 path"));
        c.arg(name).args(addrs);
        let mut p = Proc::spawn(name, c, self.path(&format!("{name}.log")));
        p.wait_for_output("listening", 10.0);
        p
    }

    /// The http-bench server (one event loop, fixed answer) in namespace `ns`: for benchmarks.
    pub fn bench_http_in(&self, ns: &Netns, addrs: &[&str]) -> Proc {
        let mut c = ns.cmd(
            crate::helper_bin("http-bench")
                .to_str()
                .expect("utf-8 path"),
        );
        c.args(addrs);
        let mut p = Proc::spawn("http-bench", c, self.path("http-bench.log"));
        p.wait_for_output("listening", 10.0);
        p
    }

    /// The http-echo test server in the pod namespace.
    pub fn pod_http(&self, name: &str, addrs: &[&str]) -> Proc {
        self.http_in(&self.pod, name, addrs)
    }

    /// dnsmasq in the pod namespace on `addr`:53 with the given `host-record`s.
    pub fn pod_dnsmasq(&self, addr: &str, records: &[&str]) -> Proc {
        let mut c = self.pod.cmd("dnsmasq");
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
        let mut p = Proc::spawn("dnsmasq", c, self.path("dnsmasq.log"));
        p.wait_for_output("started", 10.0);
        p
    }
}

impl Default for VmPod {
    fn default() -> Self {
        Self::new()
    }
}

/// The multi-network topology of SPEC section 9. Network A: `vm` and `pod` (pod-a) as in
/// [`VmPod`], plus the gateway's A leg. Network B: `pod_b`, reached only through `gw`: the vm has
/// no route to it.
///
/// ```text
///   vm 10.77.0.1 ──── 10.77.0.2 pod (pod-a)            network A
///   vm 10.66.0.1 ──── 10.66.0.2 gw 10.88.0.1 ──── 10.88.0.2 pod_b   network B
/// ```
pub struct MultiNet {
    /// pod_b's own captured cgroup (its interceptor serves inbound there).
    pub pod_b_cgroup: TestCgroup,
    pub base: VmPod,
    pub gw: Netns,
    pub pod_b: Netns,
}

impl MultiNet {
    pub const VM_A: &'static str = "10.66.0.1";
    pub const GW_A: &'static str = "10.66.0.2";
    pub const GW_B: &'static str = "10.88.0.1";
    pub const POD_B: &'static str = "10.88.0.2";

    pub fn new() -> Self {
        let base = VmPod::new();
        let id = base.id;
        let gw = Netns::new(format!("ic{id:x}-gw"));
        let pod_b = Netns::new(format!("ic{id:x}-podb"));
        Veth::connect(
            &base.vm,
            &format!("ic{id:x}ga"),
            &[&format!("{}/24", Self::VM_A)],
            &gw,
            &format!("ic{id:x}gb"),
            &[&format!("{}/24", Self::GW_A)],
        );
        Veth::connect(
            &gw,
            &format!("ic{id:x}gc"),
            &[&format!("{}/24", Self::GW_B)],
            &pod_b,
            &format!("ic{id:x}pb"),
            &[&format!("{}/24", Self::POD_B)],
        );
        let pod_b_cgroup = TestCgroup::new(&format!("interceptor-test-{id:x}-podb"));
        Self {
            pod_b_cgroup,
            base,
            gw,
            pod_b,
        }
    }

    /// The gateway's interface on network A (towards the vm) and on network B.
    pub fn gw_ifaces(&self) -> (String, String) {
        (
            format!("ic{:x}gb", self.base.id),
            format!("ic{:x}gc", self.base.id),
        )
    }

    /// `interceptor run` on pod_b: inbound capture in its namespace, its own cgroup.
    pub fn pod_b_interceptor_cmd(&self, mesh: &Path, resolv: &Path, extra: &[&str]) -> Command {
        run_cmd(&self.pod_b, &self.pod_b_cgroup, mesh, resolv, extra)
    }

    /// `interceptor gateway` in `gw`, with every capability dropped: it must need none.
    pub fn gateway_cmd(&self, mesh: &Path, networks: &Path, network: &str) -> Command {
        let mut c = self.gw.cmd("setpriv");
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
        .args(["--network", network, "--listen"])
        .arg(format!("{}:15443", Self::GW_A));
        c.env("RUST_LOG", "info");
        c
    }
}

impl Default for MultiNet {
    fn default() -> Self {
        Self::new()
    }
}
