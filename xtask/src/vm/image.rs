//! Guest images: a Debian release's own userland and kernel, built with `mmdebstrap` from the
//! Debian archive this machine's apt already uses, cached under `target/vm/` by release and
//! recipe (package list and customisation): a changed recipe builds a new image.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::Release;
use crate::run;

/// What every guest carries: systemd as init, a kernel with its modules, ssh for the harness,
/// and the tools the scenarios use as the VM's own apps and checks.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-amd64",
    "initramfs-tools",
    "openssh-server",
    "iproute2",
    "kmod",
    "bpftool",
    "socat",
    "curl",
    // dig: bind9-dnsutils in every release (trixie dropped the dnsutils name).
    "bind9-dnsutils",
    "openssl",
    "procps",
];

/// Modules the initramfs needs to find the root disk under QEMU: with only these (instead of
/// Debian's MODULES=most) the initramfs is a fraction of the size and boot under TCG is halved.
const INITRAMFS_MODULES: &str = "virtio_pci\nvirtio_blk\nvirtio_net\next4\n";

/// Units a test guest must not run: timers that start apt or disk work in the middle of a
/// measurement, and time sync that would try to reach the internet.
const MASKED: &[&str] = &[
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
];

/// Root filesystem size: the userland is ~700 MB; room for the package and logs.
const DISK_SIZE: &str = "2G";

/// A built guest image: a qcow2 base every guest overlays, and the kernel and initrd QEMU boots
/// directly (no bootloader: faster, and the kernel is the release's own all the same).
pub struct Image {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel's version, as `uname -r` will print it.
    pub kernel_version: String,
}

fn recipe_key(release: Release) -> String {
    let mut h = DefaultHasher::new();
    (
        release.name(),
        PACKAGES,
        INITRAMFS_MODULES,
        MASKED,
        DISK_SIZE,
        2u32,
    )
        .hash(&mut h);
    format!("{:016x}", h.finish())
}

pub fn vm_dir() -> PathBuf {
    crate::root().join("target").join("vm")
}

/// The harness's own ssh key: guests accept only it (root, key only).
pub fn ssh_key() -> anyhow::Result<PathBuf> {
    let dir = vm_dir();
    fs::create_dir_all(&dir)?;
    let key = dir.join("id_ed25519");
    if !key.exists() {
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "interceptor-vm-test",
                "-f",
            ])
            .arg(&key))?;
    }
    Ok(key)
}

/// The image for `release`, built if the cache has none for this recipe.
pub fn ensure(release: Release) -> anyhow::Result<Image> {
    let dir = vm_dir().join(format!("{}-{}", release.name(), recipe_key(release)));
    if !dir.join("ready").exists() {
        build(release, &dir)?;
    }
    let kernel_version = fs::read_to_string(dir.join("kernel-version"))?
        .trim()
        .to_string();
    Ok(Image {
        disk: dir.join("disk.qcow2"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        kernel_version,
    })
}

/// The archive this machine's apt uses (its first deb822 or one-line source), so the guests
/// come from the same place as the host's own packages, whatever mirror that is.
fn archive() -> anyhow::Result<(String, String)> {
    let mut uris = Vec::new();
    let sources = Path::new("/etc/apt/sources.list.d/debian.sources");
    if let Ok(text) = fs::read_to_string(sources) {
        uris.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("URIs:"))
                .flat_map(|l| l.split_whitespace().map(str::to_string)),
        );
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        uris.extend(text.lines().filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("deb")).then(|| w.next().map(str::to_string))?
        }));
    }
    let main = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .cloned();
    let security = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian-security"))
        .cloned();
    match (main, security) {
        (Some(m), Some(s)) => Ok((m, s)),
        _ => bail!(
            "cannot find the Debian archive in this machine's apt sources \
             (a .../debian and a .../debian-security URI); guests are built from it"
        ),
    }
}

fn build(release: Release, dir: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (main, security) = archive()?;
    let suite = release.name();
    let work = dir.with_extension("building");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let rootfs = work.join("root");
    let key = ssh_key()?;
    let pubkey = fs::read_to_string(key.with_extension("pub"))?;
    let customize = customize_script(&pubkey);
    fs::write(work.join("customize.sh"), customize)?;
    let mut mm = Command::new("mmdebstrap");
    mm.args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!(
            "--customize-hook=sh {} \"$1\"",
            work.join("customize.sh").display()
        ))
        .arg(suite)
        .arg(&rootfs)
        .arg(format!("deb {main} {suite} main"))
        .arg(format!("deb {main} {suite}-updates main"));
    // bullseye is past its LTS: on 2026-12-07 its security suite listed packages (bpftool,
    // the kernel) whose pool files answered 404. Its guests are the final point release.
    if release != Release::Bullseye {
        mm.arg(format!("deb {security} {suite}-security main"));
    }
    run(&mut mm).with_context(|| format!("building the {suite} guest image"))?;
    let boot = rootfs.join("boot");
    let kernel = newest(&boot, "vmlinuz-")?;
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel file name")?
        .to_string();
    fs::copy(&kernel, work.join("vmlinuz"))?;
    fs::copy(
        boot.join(format!("initrd.img-{version}")),
        work.join("initrd.img"),
    )?;
    fs::write(work.join("kernel-version"), &version)?;
    let raw = work.join("disk.raw");
    // mke2fs fills the filesystem from the directory: no loop device, no mount.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "guest", "-d"])
        .arg(&rootfs)
        .arg(&raw)
        .arg(DISK_SIZE))?;
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(work.join("disk.qcow2")))?;
    fs::remove_file(&raw)?;
    fs::remove_dir_all(&rootfs)?;
    fs::write(work.join("ready"), "")?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&work, dir)?;
    eprintln!(
        "vm: {suite} image built in {:.0} s (kernel {version})",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn newest(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// Runs in the finished root (mmdebstrap's customize hook, `$1` the root): the small initramfs,
/// the harness's key, DHCP on the user-mode NIC, no timers, a resolver that is not the host's.
fn customize_script(pubkey: &str) -> String {
    let masked = MASKED.join(" ");
    format!(
        r#"set -e
root="$1"
printf '{INITRAMFS_MODULES}' >> "$root/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
chroot "$root" update-initramfs -u -k all
mkdir -p "$root/root/.ssh"
chmod 700 "$root/root/.ssh"
echo '{pubkey}' > "$root/root/.ssh/authorized_keys"
chmod 600 "$root/root/.ssh/authorized_keys"
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/80-user.network"
chroot "$root" systemctl enable systemd-networkd
chroot "$root" systemctl mask {masked}
echo guest > "$root/etc/hostname"
echo '/dev/vda / ext4 rw,relatime 0 1' > "$root/etc/fstab"
# QEMU's user network answers DNS at 10.0.2.3; the host's resolver means nothing in a guest.
rm -f "$root/etc/resolv.conf"
echo 'nameserver 10.0.2.3' > "$root/etc/resolv.conf"
"#,
        pubkey = pubkey.trim()
    )
}
