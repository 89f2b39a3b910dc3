//! Installs what the project needs on a fresh Debian machine, only what is missing.

use std::process::Command;

use anyhow::bail;

use crate::run;

/// Debian packages: build (clang, libbpf headers), tests (iproute2, bpftool, dig, curl,
/// dnsmasq, tcpdump, openssl), benches (iptables, iperf3, stunnel4, dnsperf), packaging
/// (systemd: `systemd-analyze verify` of the unit).
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
    "procps",
    "systemd",
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
    for (bin, krate) in CARGO_TOOLS {
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
    ensure_cargo_tools()
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
