//! The scenarios, run in a guest under its real systemd. Each step checks what a user would
//! check (systemctl, journalctl, /proc, bpftool, a captured app's bytes) and fails with what it
//! saw.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::guest::{self, Forward, Guest, Spec};
use super::image::{self, Image};
use super::peer::{self, HostProc, Mesh};
use super::Release;

/// The pod's address as guests see it (a guestfwd to the host's s_server) and its port.
const POD_ADDR: &str = "10.0.2.100";
pub(super) const POD_PORT: u16 = 7000;
/// The guest's own mesh service, captured inbound.
const APP_PORT: u16 = 8080;
pub(super) const SERVICE: &str = "echo.default.svc.cluster.local";

/// The load's service: a pod that echoes many connections at once (`peer::envoy_pod`).
pub(super) const LOAD_SERVICE: &str = "load.default.svc.cluster.local";
const LOAD_POD_ADDR: &str = "10.0.2.102";
pub(super) const LOAD_PORT: u16 = 7001;

/// The mesh as the guest's files say it: one service whose pod has a sidecar (tlsMode istio),
/// and the load's.
fn mesh_yaml() -> String {
    let load = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: load, namespace: default}}\n\
         spec:\n  hosts: [{LOAD_SERVICE}]\n  ports: [{{number: {LOAD_PORT}, name: tcp-load, protocol: TCP}}]\n\
         \x20 resolution: STATIC\n  workloadSelector: {{labels: {{app: load}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: load-pod, namespace: default}}\n\
         spec:\n  address: {LOAD_POD_ADDR}\n  labels: {{app: load, security.istio.io/tlsMode: istio}}\n  serviceAccount: echo\n"
    );
    one_service_yaml() + &load
}

fn one_service_yaml() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: echo, namespace: default}}\n\
         spec:\n  hosts: [{SERVICE}]\n  ports: [{{number: {POD_PORT}, name: tcp-echo, protocol: TCP}}]\n\
         \x20 resolution: STATIC\n  workloadSelector: {{labels: {{app: echo}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: echo-pod, namespace: default}}\n\
         spec:\n  address: {POD_ADDR}\n  labels: {{app: echo, security.istio.io/tlsMode: istio}}\n  serviceAccount: echo\n"
    )
}

/// The operator's config: the package's, with the mesh, STRICT inbound on the app's port.
fn config_yaml() -> String {
    format!(
        "mesh:\n  - /etc/interceptor/mesh\nnamespace: default\ncluster-domain: cluster.local\n\
         certs: /etc/certs\nmtls-mode: strict\ninbound-ports: \"{APP_PORT}\"\n"
    )
}

/// Where the guest's daemon learns the mesh.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Istio YAML in /etc/interceptor/mesh (the package's default).
    Files,
    /// The test control plane on the host (ADS, the Istio CA), with the Istio VM bundle
    /// installed in the guest as Istio's VM guide does.
    Istiod,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Istiod => "istiod",
        }
    }
}

/// Where the guest reaches the control plane (a guestfwd to the host's loopback).
pub(super) const ISTIOD_ADDR: &str = "10.0.2.101";
pub(super) const ISTIOD_PORT: u16 = 15012;
const TOKEN: &str = "vm-test-bootstrap-token";
const VIP: &str = "240.240.0.10";

/// The control plane's mesh: the same service as the files say, and STRICT for the VM's port
/// from a mesh-wide PeerAuthentication (istiod's virtualInbound).
fn istiod_mesh() -> interceptor_tests::istiod::Mesh {
    use interceptor_tests::istiod::{Endpoint, Mesh as CpMesh, Service};
    let mut svc = Service::new(SERVICE, VIP, POD_PORT);
    svc.sans = vec![format!("{}/echo", peer::TRUST_DOMAIN)];
    svc.endpoints = vec![Endpoint::new(POD_ADDR, POD_PORT)];
    CpMesh {
        services: vec![svc],
        traffic: "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                  metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
            .into(),
        inbound: Some(interceptor_tests::istiod_traffic::InboundWorkload {
            namespace: "default".into(),
            labels: [("app".to_string(), "vm-app".to_string())].into(),
            ports: vec![APP_PORT],
            http_ports: vec![],
        }),
        ..Default::default()
    }
}

/// The Istio VM bundle as `istioctl x workload entry configure` writes it (written under
/// `dir` on the host), placed in the guest as Istio's VM guide says: cluster.env, mesh config,
/// root cert, token, and the hosts line for istiod.
pub(super) fn put_bundle(
    guest: &Guest,
    dir: &Path,
    spec: &interceptor_tests::bundle::Spec,
) -> anyhow::Result<()> {
    let root = interceptor_tests::bundle::write_bundle(dir, spec);
    for f in [
        "var/lib/istio/envoy/cluster.env",
        "etc/istio/config/mesh",
        "etc/certs/root-cert.pem",
        "var/run/secrets/tokens/istio-token",
    ] {
        let remote = format!("/{f}");
        guest.sh(&format!("mkdir -p $(dirname {remote})"))?;
        guest.put(&root.join(f), &remote)?;
    }
    guest.sh(&format!(
        "echo '{} istiod.istio-system.svc' >> /etc/hosts",
        spec.istiod_ip
    ))?;
    Ok(())
}

/// One booted guest with the host side of the mesh around it.
pub(super) struct Run {
    pub(super) guest: Guest,
    source: Source,
    mesh: Mesh,
    cp: Option<interceptor_tests::istiod::ControlPlane>,
    _pod: HostProc,
    _load_pod: [HostProc; 2],
    /// 127.0.0.1 port forwarded to the guest's app port (for the inbound client).
    app_fwd: u16,
    pub accel: &'static str,
    pub image: Image,
}

impl Run {
    pub(super) fn start(release: Release, source: Source, deb: &Path) -> anyhow::Result<Run> {
        let image = image::ensure(release)?;
        let accel = guest::accel(&image)?;
        let dir = image::vm_dir().join("run").join(release.name());
        let mesh = Mesh::new(&dir.join("mesh"))?;
        let pod_port = guest::free_port()?;
        let pod = peer::pod(&mesh, "echo", pod_port)?;
        let load_port = guest::free_port()?;
        let load_pod = peer::envoy_pod(&mesh, "echo", load_port)?;
        let app_fwd = guest::free_port()?;
        let mut forwards = vec![
            Forward {
                guest_addr: format!("{POD_ADDR}:{POD_PORT}"),
                host_port: pod_port,
            },
            Forward {
                guest_addr: format!("{LOAD_POD_ADDR}:{LOAD_PORT}"),
                host_port: load_port,
            },
        ];
        let cp = match source {
            Source::Files => None,
            Source::Istiod => {
                let port = guest::free_port()?;
                forwards.push(Forward {
                    guest_addr: format!("{ISTIOD_ADDR}:{ISTIOD_PORT}"),
                    host_port: port,
                });
                let cp = interceptor_tests::istiod::ControlPlane::start_here(
                    ([127, 0, 0, 1], port).into(),
                    &mesh.ca,
                    TOKEN,
                    istiod_mesh(),
                );
                // Whom the bootstrap token stands for (istiod reads it from the token's
                // service account).
                *cp.ca_state()
                    .token_identity
                    .lock()
                    .map_err(|_| anyhow::anyhow!("CA state poisoned"))? =
                    format!("{}/vm", peer::TRUST_DOMAIN);
                Some(cp)
            }
        };
        let guest = Guest::boot(
            Spec {
                name: release.name(),
                image: &image,
                memory_mb: 1024,
                forwards,
                hostfwds: vec![(app_fwd, APP_PORT)],
                lans: Vec::new(),
            },
            accel,
            &dir,
        )?;
        let run = Run {
            guest,
            source,
            mesh,
            cp,
            _pod: pod,
            _load_pod: load_pod,
            app_fwd,
            accel,
            image,
        };
        run.guest.put(deb, "/root/interceptor.deb")?;
        Ok(run)
    }

    pub(super) fn sh(&self, script: &str) -> anyhow::Result<String> {
        self.guest.sh(script)
    }

    /// Polls a guest shell condition until it holds.
    pub(super) fn until(&self, what: &str, secs: u64, script: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.guest.run(script)?.status.success() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(secs) {
                bail!(
                    "{}: {what}: not within {secs} s; unit: {}",
                    self.guest.name,
                    self.guest
                        .sh("systemctl status --no-pager interceptor 2>&1; journalctl -u interceptor --no-pager -n 30 -o cat")
                        .unwrap_or_else(|e| format!("{e:#}"))
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `apt install ./interceptor.deb`: installed, enabled and started by nothing.
    pub(super) fn install(&self) -> anyhow::Result<()> {
        self.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/interceptor.deb >/root/apt.log 2>&1 || { cat /root/apt.log; exit 1; }")?;
        let state =
            self.sh("systemctl is-enabled interceptor; systemctl is-active interceptor; true")?;
        if !state.contains("disabled") || !state.contains("inactive") {
            bail!("the package enabled or started the service by itself: {state}");
        }
        match self.source {
            Source::Files => self.files_config()?,
            Source::Istiod => self.istiod_config()?,
        }
        // The VM's own service: an echo server, a unit of its own (not captured outbound: it
        // only listens).
        self.sh(&format!(
            "systemd-run --unit app-echo socat TCP-LISTEN:{APP_PORT},fork,reuseaddr EXEC:cat"
        ))?;
        Ok(())
    }

    fn files_config(&self) -> anyhow::Result<()> {
        self.guest
            .write("/etc/interceptor/mesh/mesh.yaml", &mesh_yaml())?;
        self.guest
            .write("/etc/interceptor/config.yaml", &config_yaml())?;
        let certs = self.mesh.certs("vm");
        self.sh("mkdir -p /etc/certs")?;
        for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
            self.guest.put(&certs.join(f), &format!("/etc/certs/{f}"))?;
        }
        self.sh("chmod 600 /etc/certs/key.pem && interceptor check --mesh /etc/interceptor/mesh >/dev/null")?;
        Ok(())
    }

    /// The Istio VM bundle as `istioctl x workload entry configure` writes it, placed as
    /// Istio's VM guide says (cluster.env, mesh config, root cert, token, the hosts line for
    /// istiod). The token lives under /var/run, a tmpfs: gone after a reboot, as on a VM whose
    /// token was good for the first start only.
    fn istiod_config(&self) -> anyhow::Result<()> {
        use interceptor_tests::bundle::Spec as Bundle;
        let mut spec = Bundle::new("default", "vm", ISTIOD_ADDR, &self.mesh.ca.pem());
        spec.token = TOKEN.into();
        spec.inbound_ports = APP_PORT.to_string();
        put_bundle(&self.guest, &self.mesh.dir.join("bundle"), &spec)?;
        self.guest.write(
            "/etc/interceptor/config.yaml",
            "control-plane: istiod\nistio-dir: /\n",
        )
    }

    /// `systemctl enable --now`: Type=notify returns once READY=1, and READY means capture is in
    /// the kernel: checked at once, with no wait.
    pub(super) fn start_service(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.sh("systemctl enable --now interceptor")?;
        let took = started.elapsed();
        self.capture_attached()
            .context("READY=1 came before capture was attached")?;
        Ok(took)
    }

    /// The captured programs on the guest's root cgroup, as bpftool lists them.
    pub(super) fn capture_attached(&self) -> anyhow::Result<String> {
        let out = self.sh("bpftool cgroup show /sys/fs/cgroup")?;
        if !out.contains("connect4") {
            bail!("no capture programs on the root cgroup: {out}");
        }
        Ok(out)
    }

    pub(super) fn capture_detached(&self) -> anyhow::Result<()> {
        let out = self.sh("bpftool cgroup show /sys/fs/cgroup")?;
        if out.contains("connect4") {
            bail!("capture programs still attached: {out}");
        }
        Ok(())
    }

    /// The guest's app, by the service's mesh name: DNS and connection captured, carried over
    /// mTLS to the pod (which reverses the line).
    pub(super) fn outbound(&self, line: &str) -> anyhow::Result<()> {
        // The pod answers and keeps the connection: the app's stdin stays open 3 s so socat
        // reads the answer before its end (it gives the other side 0.5 s after an EOF).
        let out = self.sh(&format!(
            "(echo {line}; sleep 3) | timeout 20 socat - TCP:{SERVICE}:{POD_PORT} 2>&1; true"
        ))?;
        let want: String = line.chars().rev().collect();
        if !out.contains(&want) {
            bail!(
                "the captured app got {out:?} from the pod, not {want:?}; the daemon's journal:\n{}",
                self.journal_tail()
            );
        }
        Ok(())
    }

    /// What the app's own getpeername() says it is connected to: the service's VIP, not the
    /// daemon's listener (the getpeername4 hook). Asked by perl's getpeername (perl-base is in
    /// every guest), since curl and socat report the address they dialled, not the kernel's.
    fn app_sees_vip(&self) -> anyhow::Result<()> {
        let vip = self.sh(&format!(
            "getent ahostsv4 {SERVICE} | head -1 | cut -d' ' -f1"
        ))?;
        let vip = vip.trim();
        let seen = self.sh(&format!(
            "perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 0) or die $!; \
             connect(S, sockaddr_in({POD_PORT}, inet_aton(\"{vip}\"))) or die $!; \
             my ($p, $a) = sockaddr_in(getpeername(S)); print inet_ntoa($a), \":$p\"'"
        ))?;
        let want = format!("{vip}:{POD_PORT}");
        if seen.trim() != want {
            bail!("the app's getpeername() said {seen:?}, not the service's {want}");
        }
        Ok(())
    }

    /// The host as a mesh client with its own certificate: into the guest's app port, which
    /// capture (sk_lookup) hands to the interceptor's inbound (STRICT), to the echo app.
    fn inbound(&self, line: &str) -> anyhow::Result<()> {
        let out = peer::mtls_line(&self.mesh, "client", self.app_fwd, line)?;
        if !out.contains(line) {
            bail!(
                "openssl s_client into the guest's app port got {out:?}; the daemon's journal:\n{}",
                self.journal_tail()
            );
        }
        Ok(())
    }

    pub(super) fn journal_tail(&self) -> String {
        self.guest
            .sh("journalctl -u interceptor --no-pager -n 40 -o cat")
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    pub(super) fn main_pid(&self) -> anyhow::Result<u32> {
        self.sh("systemctl show -p MainPID --value interceptor")?
            .trim()
            .parse()
            .context("MainPID")
    }

    /// kill -9 of the main PID: capture detaches with the process (fail-open), the unit
    /// restarts it (Restart=on-failure), capture and the mesh connection come back.
    fn kill9(&self) -> anyhow::Result<Duration> {
        let pid = self.main_pid()?;
        let started = Instant::now();
        self.sh(&format!("kill -9 {pid}"))?;
        self.until(
            "restarted by systemd",
            30,
            &format!(
                "test \"$(systemctl show -p NRestarts --value interceptor)\" -ge 1 && \
                 systemctl is-active -q interceptor && \
                 test \"$(systemctl show -p MainPID --value interceptor)\" != {pid}"
            ),
        )?;
        let took = started.elapsed();
        self.capture_attached()?;
        self.outbound("after-restart")?;
        Ok(took)
    }

    /// How the control plane's CA was asked for this VM's certificates since `since`: by the
    /// bootstrap token or by the certificate it already held.
    fn issued_since(&self, since: std::time::SystemTime) -> Vec<&'static str> {
        self.cp.as_ref().map_or_else(Vec::new, |cp| {
            cp.ca_state()
                .issued
                .lock()
                .map(|issued| {
                    issued
                        .iter()
                        .filter(|i| i.at >= since && i.identity.ends_with("/sa/vm"))
                        .map(|i| i.auth)
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// What systemd and the kernel say about the running service.
    fn inspect(&self) -> anyhow::Result<Inspection> {
        if self.source == Source::Istiod {
            let issued = self.issued_since(std::time::UNIX_EPOCH);
            if !issued.contains(&"token") {
                bail!(
                    "the Istio CA never issued the VM's first certificate on its token: {issued:?}"
                );
            }
        }
        let pid = self.main_pid()?;
        let caps = self.sh(&format!("grep -E '^Cap(Eff|Bnd)' /proc/{pid}/status"))?;
        let journal = self.sh("journalctl -u interceptor --no-pager -o cat")?;
        // All dropped; or CAP_BPF alone (bit 39) where the daemon found the kernel refuses it
        // map access without, and said so.
        let bpf_kept = journal.contains("CAP_BPF kept");
        let allowed = if bpf_kept {
            "0000008000000000"
        } else {
            "0000000000000000"
        };
        if caps.lines().any(|l| !l.ends_with(allowed)) {
            bail!("the daemon kept capabilities: {caps}");
        }
        if !journal.contains("capture attached") {
            bail!("journald has no 'capture attached' line: {journal}");
        }
        let programs = self.status_programs()?;
        let ktls = self
            .sh("modprobe tls 2>/dev/null && echo yes || echo no")?
            .trim()
            .to_string();
        let caps = if bpf_kept { "CAP_BPF" } else { "none" }.to_string();
        Ok(Inspection {
            programs,
            ktls,
            caps,
        })
    }

    /// The programs the daemon says it attached (`interceptor status --json`).
    fn status_programs(&self) -> anyhow::Result<String> {
        let status = self.sh("interceptor status --json")?;
        serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| {
                v.pointer("/capture/programs")
                    .and_then(|p| p.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
            })
            .with_context(|| format!("status has no capture.programs: {status}"))
    }

    /// The opt-in local hop (sockops + sk_msg between the app and the daemon): attached on
    /// this kernel, and the captured connection still carries its bytes. The config is put
    /// back afterwards.
    fn local_hop(&self) -> anyhow::Result<String> {
        self.sh("cp /etc/interceptor/config.yaml /root/config.yaml && \
             echo 'local-hop: sockmap' >> /etc/interceptor/config.yaml && \
             systemctl restart interceptor")?;
        self.capture_attached()?;
        let programs = self.status_programs()?;
        let sk_msg = self.sh("bpftool prog show")?;
        if !programs.contains("local_hop") || !sk_msg.contains("sk_msg") {
            bail!("local-hop: sockmap attached no sk_msg program: {programs}");
        }
        self.outbound("over-the-local-hop")?;
        self.sh(
            "cp /root/config.yaml /etc/interceptor/config.yaml && systemctl restart interceptor",
        )?;
        self.capture_attached()?;
        Ok("yes".into())
    }

    /// systemctl stop: a clean exit, every program gone, the app's traffic no longer captured.
    pub(super) fn stop(&self) -> anyhow::Result<()> {
        self.sh("systemctl stop interceptor")?;
        let result = self.sh("systemctl show -p Result --value interceptor")?;
        if result.trim() != "success" {
            bail!("stop ended with Result={}", result.trim());
        }
        self.capture_detached()
    }

    /// apt purge: nothing of ours is left.
    pub(super) fn purge(&self) -> anyhow::Result<()> {
        self.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q interceptor >/root/apt.log 2>&1 || { cat /root/apt.log; exit 1; }")?;
        let left = self.sh(
            "for p in /etc/interceptor /var/lib/interceptor /usr/bin/interceptor \
             /usr/lib/systemd/system/interceptor.service /etc/systemd/system/multi-user.target.wants/interceptor.service; \
             do test -e $p && echo $p; done; true",
        )?;
        if !left.trim().is_empty() {
            bail!("purge left: {left}");
        }
        self.capture_detached()
    }
}

struct Inspection {
    programs: String,
    ktls: String,
    /// Capabilities the running daemon holds.
    caps: String,
}

fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    let r = f().with_context(|| format!("step '{name}'"))?;
    eprintln!("vm:   ok {name} ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(r)
}

/// What the smoke test saw of restarts under load, and how fast capture went with the unit.
pub struct Smoke {
    pub outcomes: Vec<super::hitless::Outcome>,
    pub crash_loop_detach: Duration,
    pub stop_detach: Duration,
}

pub fn smoke(
    release: Release,
    deb: &Path,
    upgrade: &Path,
    load_tool: &Path,
) -> anyhow::Result<Smoke> {
    use super::hitless::LOAD;
    let run = step("boot", || Run::start(release, Source::Files, deb))?;
    step("install", || run.install())?;
    step("start (READY with capture)", || run.start_service())?;
    step("captured mesh connection over mTLS", || {
        run.outbound("hello-mesh")
    })?;
    run.put_load_tool(load_tool)?;
    let baseline = step("the load alone loses nothing", || run.baseline_load(LOAD))?;
    let restart = step("systemctl restart under load: nothing lost", || {
        run.restart_under_load(LOAD)
    })?;
    let reload = step("systemctl reload under load: nothing lost at all", || {
        run.reload_under_load(LOAD)
    })?;
    let upgraded = step(
        "apt install of a newer package under load: nothing lost",
        || run.upgrade_under_load(LOAD, upgrade),
    )?;
    let crash = step("kill -9 under load, restarted by systemd", || {
        run.kill9_under_load(LOAD)
    })?;
    let crash_loop_detach = step(
        "crash loop past the start limit: capture gone within 1 s",
        || run.crash_loop_fails_open(),
    )?;
    let stop_detach = step("stop: capture gone within 1 s", || run.stop_fails_open())?;
    step("purge leaves nothing", || run.purge())?;
    Ok(Smoke {
        outcomes: vec![baseline, restart, reload, upgraded, crash],
        crash_loop_detach,
        stop_detach,
    })
}

pub struct Report {
    release: Release,
    source: Source,
    kernel: String,
    accel: &'static str,
    boot: Duration,
    ready: Duration,
    restart: Duration,
    reboot: Duration,
    inspection: Inspection,
    local_hop: String,
    hitless: Vec<super::hitless::Outcome>,
}

impl Report {
    /// The restarts under load, one row each, the release first.
    pub fn hitless_rows(&self) -> Vec<String> {
        self.hitless
            .iter()
            .map(|o| format!("| {} {}", self.release.name(), o.row()))
            .collect()
    }

    pub fn header() -> &'static str {
        "| release (mesh from) | kernel | accel | boot | enable --now (READY) | outbound mTLS | inbound mTLS (sk_lookup) | getpeername → VIP | kill -9 → back | reboot → back | stop / purge | capabilities kept | programs attached | local hop (sockmap) | kTLS module | all steps |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    }

    pub fn row(&self, total: Duration) -> String {
        format!(
            "| {} ({}) | {} | {} | {:.0} s | {:.1} s | ok | ok | ok | {:.1} s | {:.0} s | ok | {} | {} | {} | {} | {:.0} s |",
            self.release.name(),
            self.source.name(),
            self.kernel,
            self.accel,
            self.boot.as_secs_f64(),
            self.ready.as_secs_f64(),
            self.restart.as_secs_f64(),
            self.reboot.as_secs_f64(),
            self.inspection.caps,
            self.inspection.programs,
            self.local_hop,
            self.inspection.ktls,
            total.as_secs_f64()
        )
    }
}

pub fn full(
    release: Release,
    source: Source,
    deb: &Path,
    load_tool: &Path,
) -> anyhow::Result<Report> {
    let mut run = step("boot", || Run::start(release, source, deb))?;
    step("install", || run.install())?;
    let ready = step("start (READY with capture)", || run.start_service())?;
    step("captured mesh connection over mTLS", || {
        run.outbound("hello-mesh")
    })?;
    step("inbound mTLS from openssl via sk_lookup", || {
        run.inbound("hello-vm")
    })?;
    step("the app's getpeername() gives the VIP", || {
        run.app_sees_vip()
    })?;
    let inspection = step("capabilities, journald, status", || run.inspect())?;
    let local_hop = step("local hop (sockops + sk_msg)", || run.local_hop())?;
    let restart = step("kill -9, restarted by systemd", || run.kill9())?;
    let reboot = step("reboot: enabled unit back with capture", || {
        let rebooted_at = std::time::SystemTime::now();
        let took = run.guest.reboot()?;
        run.until(
            "active after reboot",
            60,
            "systemctl is-active -q interceptor",
        )?;
        if run.source == Source::Istiod {
            // The bootstrap token was on a tmpfs: the daemon is back on its kept certificate
            // and table alone.
            run.sh("! test -e /var/run/secrets/tokens/istio-token")
                .context("the token survived the reboot: the test proves nothing")?;
            let asked = run.issued_since(rebooted_at);
            if asked.contains(&"token") {
                bail!("after the reboot the CA was asked with a token: {asked:?}");
            }
        }
        run.capture_attached()?;
        run.sh(&format!(
            "systemd-run --unit app-echo socat TCP-LISTEN:{APP_PORT},fork,reuseaddr EXEC:cat"
        ))?;
        run.outbound("after-reboot")?;
        run.inbound("after-reboot")?;
        Ok(took)
    })?;
    if source == Source::Istiod {
        step(
            "istiod gone: a restart serves the kept table and certificate",
            || {
                run.cp = None;
                run.sh("systemctl restart interceptor")?;
                run.capture_attached()?;
                run.outbound("without-istiod")
            },
        )?;
    }
    let mut hitless = Vec::new();
    if source == Source::Files {
        use super::hitless::LOAD;
        run.put_load_tool(load_tool)?;
        hitless.push(step("the load alone loses nothing", || {
            run.baseline_load(LOAD)
        })?);
        hitless.push(step("systemctl restart under load", || {
            run.restart_under_load(LOAD)
        })?);
        hitless.push(step("systemctl reload under load", || {
            run.reload_under_load(LOAD)
        })?);
        hitless.push(step("kill -9 under load", || run.kill9_under_load(LOAD))?);
        step(
            "crash loop past the start limit: capture gone within 1 s",
            || run.crash_loop_fails_open(),
        )?;
        step("stop: capture gone within 1 s", || run.stop_fails_open())?;
    } else {
        step("stop detaches", || run.stop())?;
    }
    step("purge leaves nothing", || run.purge())?;
    Ok(Report {
        hitless,
        release,
        source,
        kernel: run.image.kernel_version.clone(),
        accel: run.accel,
        boot: run.guest.booted_in,
        ready,
        restart,
        reboot,
        inspection,
        local_hop,
    })
}
