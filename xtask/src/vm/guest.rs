//! One QEMU guest: booted from an image's kernel and a per-guest overlay of its disk, reached
//! by ssh on a 127.0.0.1 port QEMU forwards, stopped by PID when dropped (also on failure).
//!
//! Networking never touches the host's: the guest's first NIC is QEMU's user-mode network with
//! `restrict=on` (no way out of the guest but the forwards the harness sets up: ssh in, and
//! `guestfwd` addresses that lead to services the harness runs on the host's loopback); guests
//! see each other on LANs that are QEMU socket networks over loopback multicast.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::image::{self, Image};

/// A guest-side address that leads to a TCP port on the host's loopback (a QEMU `guestfwd`):
/// each connection the guest makes to `guest_addr` runs one socat to `host_port`.
pub struct Forward {
    pub guest_addr: String,
    pub host_port: u16,
}

/// A LAN between guests: QEMU's socket network on a loopback multicast group. `addr` is this
/// guest's address on it (CIDR).
pub struct Lan {
    pub group_port: u16,
    pub addr: String,
}

pub struct Spec<'a> {
    pub name: &'a str,
    pub image: &'a Image,
    pub memory_mb: u32,
    pub forwards: Vec<Forward>,
    /// (127.0.0.1 port on the host, guest port): connections into the guest's services.
    pub hostfwds: Vec<(u16, u16)>,
    pub lans: Vec<Lan>,
}

pub struct Guest {
    pub name: String,
    child: Child,
    ssh_port: u16,
    key: PathBuf,
    dir: PathBuf,
    started: Instant,
    pub booted_in: Duration,
}

/// A port the kernel just handed out on 127.0.0.1 (free a moment ago).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Guest {
    /// Starts the guest and waits until it answers ssh with its LAN addresses set.
    pub fn boot(spec: Spec, accel: &str, run_dir: &Path) -> anyhow::Result<Guest> {
        let mut guest = Guest::spawn(&spec, accel, run_dir)?;
        guest.ready(&spec)?;
        Ok(guest)
    }

    /// Starts QEMU and returns at once: several guests boot side by side when spawned first
    /// and waited for after (`ready`). QEMU dies with this thread (PDEATHSIG): spawn from the
    /// thread that keeps the guard.
    pub fn spawn(spec: &Spec, accel: &str, run_dir: &Path) -> anyhow::Result<Guest> {
        let dir = run_dir.join(spec.name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let overlay = dir.join("disk.qcow2");
        crate::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&spec.image.disk)
                .arg(&overlay),
        )?;
        let ssh_port = free_port()?;
        let mut user = format!(
            "user,id=user,restrict=on,hostname={},hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
            spec.name
        );
        for (host, guest) in &spec.hostfwds {
            user.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        for f in &spec.forwards {
            user.push_str(&format!(
                ",guestfwd=tcp:{}-cmd:socat - TCP:127.0.0.1:{}",
                f.guest_addr, f.host_port
            ));
        }
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", accel, "-cpu", "max", "-smp", "1"])
            .arg("-m")
            .arg(spec.memory_mb.to_string())
            .args(["-display", "none", "-monitor", "none", "-nodefaults"])
            .arg("-kernel")
            .arg(&spec.image.kernel)
            .arg("-initrd")
            .arg(&spec.image.initrd)
            .args(["-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0"])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .args(["-netdev", &user, "-device", "virtio-net-pci,netdev=user"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()));
        for (i, lan) in spec.lans.iter().enumerate() {
            let id = format!("lan{i}");
            qemu.arg("-netdev").arg(format!(
                "socket,id={id},mcast=230.0.0.1:{},localaddr=127.0.0.1",
                lan.group_port
            ));
            qemu.arg("-device").arg(format!(
                "virtio-net-pci,netdev={id},mac={}",
                lan_mac(spec.name, i)
            ));
        }
        // A killed harness leaves no guest behind.
        interceptor_tests::die_with_parent(&mut qemu);
        qemu.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("qemu.log"))?);
        let started = Instant::now();
        let child = qemu
            .spawn()
            .with_context(|| format!("cannot start {qemu:?}"))?;
        Ok(Guest {
            name: spec.name.to_string(),
            child,
            ssh_port,
            key: image::ssh_key()?,
            dir,
            started,
            booted_in: Duration::ZERO,
        })
    }

    /// Waits for ssh, then gives the LAN NICs their addresses.
    pub fn ready(&mut self, spec: &Spec) -> anyhow::Result<()> {
        self.wait_ssh(Duration::from_secs(300))?;
        self.booted_in = self.started.elapsed();
        eprintln!(
            "vm: {} up in {:.1} s (ssh on 127.0.0.1:{})",
            self.name,
            self.booted_in.as_secs_f64(),
            self.ssh_port
        );
        for (i, lan) in spec.lans.iter().enumerate() {
            self.sh(&format!(
                "printf '[Match]\\nMACAddress={mac}\\n[Network]\\nAddress={addr}\\n' \
                 > /etc/systemd/network/10-lan{i}.network && networkctl reload && \
                 for n in $(seq 50); do ip -br a | grep -q '{ip}' && exit 0; sleep 0.2; done; exit 1",
                mac = lan_mac(spec.name, i),
                addr = lan.addr,
                ip = lan.addr.split('/').next().unwrap_or(&lan.addr),
            ))
            .with_context(|| format!("{}: LAN address {}", spec.name, lan.addr))?;
        }
        Ok(())
    }

    /// ssh (or scp) with the harness's key; the host key changes with every image, so it is
    /// not kept.
    fn ssh_tool(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.arg("-i").arg(&self.key);
        for option in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            "BatchMode=yes",
            "ConnectTimeout=5",
            "ServerAliveInterval=5",
        ] {
            c.args(["-o", option]);
        }
        // ssh names the port -p, scp -P.
        c.arg(if tool == "scp" { "-P" } else { "-p" })
            .arg(self.ssh_port.to_string());
        c
    }

    fn ssh_cmd(&self) -> Command {
        let mut c = self.ssh_tool("ssh");
        c.arg("root@127.0.0.1");
        c
    }

    /// Runs a shell script in the guest; its output whatever the status.
    pub fn run(&self, script: &str) -> anyhow::Result<Output> {
        self.ssh_cmd()
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("ssh to {}", self.name))
    }

    /// Runs a shell script in the guest that must succeed; its stdout.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self.run(script)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{}: `{script}` failed ({}): {}{}",
                self.name,
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Copies a host file into the guest.
    pub fn put(&self, local: &Path, remote: &str) -> anyhow::Result<()> {
        let mut c = self.ssh_tool("scp");
        c.arg("-q")
            .arg(local)
            .arg(format!("root@127.0.0.1:{remote}"));
        crate::run(&mut c)
    }

    /// Writes `text` to `remote` in the guest.
    pub fn write(&self, remote: &str, text: &str) -> anyhow::Result<()> {
        let local = self.dir.join(
            Path::new(remote)
                .file_name()
                .context("a file name to write")?,
        );
        fs::write(&local, text)?;
        if let Some(parent) = Path::new(remote).parent() {
            self.sh(&format!("mkdir -p {}", parent.display()))?;
        }
        self.put(&local, remote)
    }

    fn wait_ssh(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{}: QEMU exited ({status}) before ssh answered: {}\n{}",
                    self.name,
                    tail(&self.dir.join("qemu.log")),
                    tail(&self.dir.join("console.log"))
                );
            }
            if self.run("true").is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no ssh after {} s; console:\n{}",
                    self.name,
                    limit.as_secs(),
                    tail(&self.dir.join("console.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `systemctl reboot`, then waits for the guest to answer with a new boot id.
    pub fn reboot(&mut self) -> anyhow::Result<Duration> {
        let before = self.sh("cat /proc/sys/kernel/random/boot_id")?;
        let started = Instant::now();
        let _ = self.run("systemctl reboot");
        let deadline = started + Duration::from_secs(240);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if let Some(status) = self.child.try_wait()? {
                bail!("{}: QEMU exited ({status}) on reboot", self.name);
            }
            if let Ok(o) = self.run("cat /proc/sys/kernel/random/boot_id") {
                if o.status.success() && String::from_utf8_lossy(&o.stdout) != before {
                    return Ok(started.elapsed());
                }
            }
            if Instant::now() > deadline {
                bail!("{}: did not come back from reboot", self.name);
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Our own child, by PID: QEMU dies with its guest, the overlay goes with the run dir.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = fs::remove_file(self.dir.join("disk.qcow2"));
    }
}

/// A locally administered MAC per guest and LAN, stable across boots (networkd matches on it).
fn lan_mac(name: &str, lan: usize) -> String {
    let h = name
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!(
        "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
        (h >> 16) & 0xff,
        (h >> 8) & 0xff,
        h & 0xff,
        lan + 1
    )
}

fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// KVM where it really runs a guest, else TCG. `/dev/kvm` existing proves nothing (a nested
/// hypervisor may refuse to run the guest, or hang): a kernel is booted to its first words under
/// KVM, with a deadline. The answer is kept for this host boot.
pub fn accel(image: &Image) -> anyhow::Result<&'static str> {
    if !Path::new("/dev/kvm").exists() {
        return Ok("tcg");
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let cache = image::vm_dir().join(format!("accel-{}", boot_id.trim()));
    if let Ok(found) = fs::read_to_string(&cache) {
        return Ok(if found.trim() == "kvm" { "kvm" } else { "tcg" });
    }
    let mut probe = Command::new("qemu-system-x86_64");
    probe
        .args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-nodefaults"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&image.kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = probe.spawn().context("qemu-system-x86_64 (KVM probe)")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let works = loop {
        if let Some(status) = child.try_wait()? {
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            break status.success() && out.contains("Kernel panic");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let found = if works { "kvm" } else { "tcg" };
    fs::write(&cache, found)?;
    eprintln!(
        "vm: accelerator {found} (KVM probe: {})",
        if works { "booted" } else { "failed" }
    );
    Ok(found)
}
