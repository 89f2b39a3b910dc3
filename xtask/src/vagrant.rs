//! `cargo xtask vagrant-test`: the project on real VMs (see the Vagrantfile). The netns scenario
//! suite runs on mesh-vm as it is, and the installed service on mesh-vm reaches app-vm by a mesh
//! name (`packaging/vagrant-cross-vm.sh`).
//!
//! The VMs have no Rust: the host builds everything in the release profile and the VMs get the
//! repository, `target/release` included, at /vagrant. So the host's glibc must be no newer
//! than bookworm's (2.36), or the binaries do not start there.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::{build, cargo, root};

const VM: &str = "mesh-vm";
/// Where the Vagrantfile syncs the repository to.
const VM_ROOT: &str = "/vagrant";

pub fn test(keep: bool, provider: Option<&str>) -> anyhow::Result<()> {
    require_vagrant()?;
    build(true)?;
    let exes = test_executables()?;
    let result = on_vms(&exes, provider);
    if keep {
        eprintln!("VMs kept: `vagrant ssh {VM}`; `vagrant destroy -f` removes them");
        return result;
    }
    let destroyed = crate::run(&mut vagrant(&["destroy", "-f"]));
    match (result, destroyed) {
        (Err(e), Err(d)) => Err(e.context(format!("and then: {d:#}"))),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

fn require_vagrant() -> anyhow::Result<()> {
    match Command::new("vagrant").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "`vagrant --version` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "vagrant is not on PATH: install Vagrant and a provider (vagrant-libvirt or \
             VirtualBox); the VMs are described in the Vagrantfile"
        ),
        Err(e) => Err(e).context("running vagrant"),
    }
}

fn vagrant(args: &[&str]) -> Command {
    let mut c = Command::new("vagrant");
    c.current_dir(root()).args(args);
    c
}

fn ssh(script: &str) -> anyhow::Result<()> {
    crate::run(&mut vagrant(&["ssh", VM, "-c", script]))
}

/// The scenario test executables, as `cargo test` would run them. Release profile, like the
/// daemon: target/release is then the one build directory the VM needs.
fn test_executables() -> anyhow::Result<Vec<PathBuf>> {
    let mut c = cargo();
    c.args([
        "test",
        "-p",
        "interceptor-tests",
        "--release",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit());
    eprintln!("+ {c:?}");
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed: {}", out.status);
    }
    let exes: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            // Integration test targets only (tests/tests/*.rs), not the harness's unit tests.
            m["reason"] == "compiler-artifact"
                && m["profile"]["test"] == true
                && m["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect();
    if exes.is_empty() {
        bail!("{c:?} reported no test executables");
    }
    Ok(exes)
}

/// The path of a workspace file inside the VM.
fn in_vm(host: &Path) -> anyhow::Result<String> {
    let rel = host.strip_prefix(root()).with_context(|| {
        format!(
            "{} is outside the workspace (CARGO_TARGET_DIR?): the VM sees only the repository",
            host.display()
        )
    })?;
    Ok(format!("{VM_ROOT}/{}", rel.display()))
}

/// Single quotes for the VM's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn on_vms(exes: &[PathBuf], provider: Option<&str>) -> anyhow::Result<()> {
    let mut up = vagrant(&["up"]);
    if let Some(p) = provider {
        up.arg(format!("--provider={p}"));
    }
    crate::run(&mut up)?;
    // `up` syncs only a VM it boots: one kept from an earlier run must get this build too.
    crate::run(&mut vagrant(&["rsync", VM]))?;

    // The test executables have host paths compiled in (env!("CARGO_BIN_EXE_...")): make the
    // host's workspace path lead to the synced copy.
    let host = root();
    let parent = host.parent().unwrap_or(Path::new("/"));
    let (host_q, parent_q) = (
        quote(&host.to_string_lossy()),
        quote(&parent.to_string_lossy()),
    );
    ssh(&format!(
        "[ -e {host_q} ] || {{ sudo mkdir -p {parent_q} && sudo ln -s {VM_ROOT} {host_q}; }}"
    ))?;

    let release = format!("{VM_ROOT}/target/release");
    let mut failed = Vec::new();
    for exe in exes {
        let script = format!(
            "cd {VM_ROOT}/tests && sudo INTERCEPTOR_BIN={release}/interceptor \
             INTERCEPTOR_HELPERS_DIR={release} {} --test-threads=1",
            quote(&in_vm(exe)?)
        );
        // Every suite runs, as `cargo test --no-fail-fast` would.
        if let Err(e) = ssh(&script) {
            eprintln!("{e:#}");
            failed.push(exe.display().to_string());
        }
    }
    if let Err(e) = ssh(&format!("sudo sh {VM_ROOT}/packaging/vagrant-cross-vm.sh")) {
        eprintln!("{e:#}");
        failed.push("packaging/vagrant-cross-vm.sh".into());
    }
    if !failed.is_empty() {
        bail!("failed on {VM}: {}", failed.join(", "));
    }
    Ok(())
}
