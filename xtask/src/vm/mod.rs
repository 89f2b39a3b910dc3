//! `cargo xtask vm-test`: the `.deb` on real Debian guests under QEMU, run by real systemd, on
//! each release's own kernel. `cargo xtask test` runs the smoke subset in one bookworm guest.
//!
//! The host is the mesh around the guests: the "pod" a guest's app reaches is an `openssl
//! s_server` on the host's loopback that demands a client certificate from the mesh CA (a peer
//! that is not us), reached through a QEMU guestfwd address; the client that reaches the guest's
//! own service over mTLS is `openssl s_client`. Nothing else leaves a guest.

mod cross;
mod guest;
mod hitless;
mod image;
mod peer;
mod scenario;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

pub use image::vm_dir;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Release {
    /// Debian 11, kernel 5.10
    Bullseye,
    /// Debian 12, kernel 6.1
    Bookworm,
    /// Debian 13, kernel 6.12
    Trixie,
}

impl Release {
    pub fn name(self) -> &'static str {
        match self {
            Release::Bullseye => "bullseye",
            Release::Bookworm => "bookworm",
            Release::Trixie => "trixie",
        }
    }

    pub const ALL: [Release; 3] = [Release::Bullseye, Release::Bookworm, Release::Trixie];
}

/// Which scenarios `vm-test` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenarios {
    /// Both
    All,
    /// One guest per release and mesh source (files, istiod)
    Single,
    /// The four-guest demo story (bookworm)
    Cross,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Which {
    Bullseye,
    Bookworm,
    Trixie,
    All,
}

impl Which {
    fn releases(self) -> Vec<Release> {
        match self {
            Which::Bullseye => vec![Release::Bullseye],
            Which::Bookworm => vec![Release::Bookworm],
            Which::Trixie => vec![Release::Trixie],
            Which::All => Release::ALL.to_vec(),
        }
    }
}

/// The package as users get it: `cargo xtask deb`'s portable release build.
fn release_deb() -> anyhow::Result<PathBuf> {
    let bin = crate::build_portable()?;
    crate::deb::build(&bin, &crate::root().join("target").join("deb"))
}

/// Every scenario on every release asked for; a table of what each kernel did, written to
/// target/vm/results.md and printed.
pub fn test(which: Which, scenarios: Scenarios) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    let deb = release_deb()?;
    let load_tool = crate::build_portable_load_tool()?;
    let mut rows = Vec::new();
    let mut hitless_rows = Vec::new();
    let mut failed = Vec::new();
    let singles = if scenarios == Scenarios::Cross {
        Vec::new()
    } else {
        which.releases()
    };
    for release in singles {
        for source in [scenario::Source::Files, scenario::Source::Istiod] {
            let started = Instant::now();
            match scenario::full(release, source, &deb, &load_tool) {
                Ok(report) => {
                    rows.push(report.row(started.elapsed()));
                    hitless_rows.extend(report.hitless_rows());
                }
                Err(e) => {
                    let what = format!("{} ({})", release.name(), source.name());
                    eprintln!("vm: {what} FAILED: {e:#}");
                    rows.push(format!("| {what} | FAILED: {e:#} |"));
                    failed.push(what);
                }
            }
        }
    }
    if which.releases().contains(&Release::Bookworm) && scenarios != Scenarios::Single {
        for source in [scenario::Source::Files, scenario::Source::Istiod] {
            let what = format!("cross-VM demo (bookworm, mesh from {})", source.name());
            match cross::run(Release::Bookworm, source, &deb) {
                Ok(summary) => {
                    eprintln!("vm: {what}: {summary}");
                    rows.push(format!("\n{what}: {summary}"));
                }
                Err(e) => {
                    eprintln!("vm: {what} FAILED: {e:#}");
                    rows.push(format!("\n{what}: FAILED: {e:#}"));
                    failed.push(what);
                }
            }
        }
    }
    let table = format!(
        "{}\n{}\n\nRestarts under load (mesh from files):\n\n| release {}\n{}\n",
        scenario::Report::header(),
        rows.join("\n"),
        hitless::Outcome::header().replace('\n', "\n| --- "),
        hitless_rows.join("\n")
    );
    std::fs::write(vm_dir().join("results.md"), &table)?;
    println!("{table}");
    if !failed.is_empty() {
        anyhow::bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// CI's subset: one bookworm guest, the package as `cargo xtask test` just built it (the debug
/// binary: a release build would double CI's build time), installed, started by systemd,
/// one captured mesh connection over mTLS, `kill -9` and the unit's restart, stop, purge.
pub fn smoke(debug_dir: &Path) -> anyhow::Result<String> {
    let started = Instant::now();
    let deb = crate::deb::build(
        &debug_dir.join("interceptor"),
        &crate::root().join("target").join("vm").join("smoke-deb"),
    )
    .context("packaging the debug build for the smoke test")?;
    // The same program as a newer package: what `apt install` of an upgrade does to a running
    // daemon (its binary replaced under it, then the postinst's reload).
    let upgrade = crate::deb::build_version(
        &debug_dir.join("interceptor"),
        &crate::root()
            .join("target")
            .join("vm")
            .join("smoke-deb-upgrade"),
        concat!(env!("CARGO_PKG_VERSION"), "+upgrade1"),
    )
    .context("packaging the upgrade for the smoke test")?;
    let smoke = scenario::smoke(
        Release::Bookworm,
        &deb,
        &upgrade,
        &debug_dir.join("restart-load"),
    )?;
    let rows: Vec<String> = smoke.outcomes.iter().map(|o| o.row()).collect();
    Ok(format!(
        "vm smoke (bookworm guest, systemd): passed in {:.0} s\n{}\n{}\n\
         capture gone after the unit failed (crash loop): {:.0} ms; after systemctl stop: {:.0} ms",
        started.elapsed().as_secs_f64(),
        hitless::Outcome::header(),
        rows.join("\n"),
        smoke.crash_loop_detach.as_secs_f64() * 1000.0,
        smoke.stop_detach.as_secs_f64() * 1000.0,
    ))
}
