//! Project tasks: `cargo xtask setup | build-ebpf | test | demo | bench | install | uninstall |
//! deb | vagrant-test ...`.

mod bench;
mod deb;
mod demo;
mod install;
mod setup;
mod vagrant;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[path = "../../interceptor-ebpf/build/compile.rs"]
mod compile;

#[derive(Parser)]
#[command(about = "interceptor project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (apt packages, cargo tools) that is missing; idempotent
    Setup,
    /// Compile the C BPF programs to target/bpf/capture.bpf.o
    BuildEbpf,
    /// Set up, then run formatting, clippy and the whole test suite (what CI runs)
    Test,
    /// Set up, build, and show a VM namespace whose curl to a mesh service name is captured
    Demo,
    /// Benchmarks, each side by side with a peer in the same run
    Bench {
        #[arg(value_enum, default_value = "all")]
        which: bench::Which,
    },
    /// Install the daemon as a systemd service (binary, unit, example config and mesh); never
    /// starts it
    Install {
        /// Stage the files under DIR instead of / (images, packages); nothing is run then
        #[arg(long, env = "DESTDIR", value_name = "DIR")]
        destdir: Option<PathBuf>,
        /// Install this binary instead of building the release one
        #[arg(long, value_name = "PATH")]
        bin: Option<PathBuf>,
    },
    /// Build the Debian package (`interceptor_<version>_<arch>.deb`): `apt install ./FILE`
    Deb {
        /// Package this binary instead of building the release one
        #[arg(long, value_name = "PATH")]
        bin: Option<PathBuf>,
        /// Where the package goes [default: target/deb]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Remove exactly what `install` created; a config edited since is kept
    Uninstall {
        #[arg(long, env = "DESTDIR", value_name = "DIR")]
        destdir: Option<PathBuf>,
    },
    /// The long soak: 10 000 held mTLS connections, new ones and DNS for 10 minutes, on
    /// release builds (the test suite runs a 60-second one)
    Soak {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, default_value_t = 10_000)]
        connections: u64,
    },
    /// The .deb in Debian guests under QEMU and real systemd, on each release's own kernel
    VmTest {
        #[arg(long, value_enum, default_value = "all")]
        release: vm::Which,
        #[arg(long, value_enum, default_value = "all")]
        scenarios: vm::Scenarios,
        /// Only CI's smoke subset (one bookworm guest, the debug build), as `test` runs it
        #[arg(long)]
        smoke: bool,
    },
    /// Two Vagrant VMs: the scenario tests on one, and the installed service reaching the other
    VagrantTest {
        /// Leave the VMs running afterwards (`vagrant destroy -f` removes them)
        #[arg(long)]
        keep: bool,
        /// Vagrant provider (libvirt, virtualbox) [default: Vagrant's own choice]
        #[arg(long)]
        provider: Option<String>,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The daemon's fault-injection hooks, compiled into the test builds only.
const TEST_HOOKS: &str = "interceptor/test-hooks";

/// Builds the daemon and the test helper binaries.
pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    c.args([
        "build",
        "-p",
        "interceptor",
        "-p",
        "interceptor-tests",
        "--bins",
    ]);
    if release {
        c.arg("--release");
    } else {
        c.args(["--features", TEST_HOOKS]);
    }
    run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// The oldest glibc the packaged binary links against: bullseye's (2.31), so one `.deb` installs
/// on Debian 11, 12 and 13 (a plain build on this bookworm machine needs 2.34).
const PORTABLE_TARGET: &str = "x86_64-unknown-linux-gnu.2.31";

/// The release daemon for packages: built with zig as the linker against glibc 2.31's symbols.
pub fn build_portable() -> anyhow::Result<PathBuf> {
    build_portable_bin("interceptor", "interceptor")
}

/// The guests' load tool (`restart-load`), built as the daemon is so that it runs on Debian 11
/// too.
pub fn build_portable_load_tool() -> anyhow::Result<PathBuf> {
    build_portable_bin("interceptor-tests", "restart-load")
}

fn build_portable_bin(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    setup::ensure_zig()?;
    run(cargo().args([
        "zigbuild",
        "--release",
        "-p",
        package,
        "--bin",
        bin,
        "--target",
        PORTABLE_TARGET,
    ]))?;
    Ok(root()
        .join("target")
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join(bin))
}

/// Removes namespaces and cgroups left by an earlier test run that was killed before its
/// destructors ran. Only names this project's harness makes.
fn sweep_leftovers() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let ours = name.starts_with("ic")
                && name.contains('-')
                && name[2..]
                    .split('-')
                    .next()
                    .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
            if ours {
                eprintln!("removing leftover netns {name}");
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let mount = interceptor_tests::cgroup2_mount();
    if let Ok(rd) = std::fs::read_dir(&mount) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("interceptor-test-")
            {
                eprintln!("removing leftover cgroup {}", e.path().display());
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// What a cold `test` writes under target/ (debug tree without incremental state, clippy's,
/// the fuzz builds, the guest image), measured on a clean clone: reported beside the free space
/// so a run that will not fit says so before it starts instead of dying in a linker (6.4 GiB
/// on 2026-12-08, the clone included).
const TEST_DISK_GIB: f64 = 7.0;

/// Free space on the filesystem holding target/, in GiB (df, as it is what a user would run).
fn free_gib(dir: &Path) -> Option<f64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let bytes: f64 = text.lines().nth(1)?.trim().parse().ok()?;
    Some(bytes / f64::from(1u32 << 30))
}

fn report_disk() {
    let target = root().join("target");
    let _ = std::fs::create_dir_all(&target);
    match free_gib(&target) {
        Some(free) if free < TEST_DISK_GIB => eprintln!(
            "warning: {free:.1} GiB free under {}; a cold `cargo xtask test` writes about \
             {TEST_DISK_GIB} GiB there and may run out (builds already there need less)",
            target.display()
        ),
        Some(free) => eprintln!("disk: {free:.1} GiB free under {}", target.display()),
        None => eprintln!(
            "disk: could not read the free space under {}",
            target.display()
        ),
    }
}

fn test() -> anyhow::Result<()> {
    setup::ensure()?;
    sweep_leftovers();
    report_disk();
    // The suite builds every workspace crate once: incremental state would only take disk
    // (1.7 GiB of the debug tree).
    std::env::set_var("CARGO_INCREMENTAL", "0");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let bin = build(false)?;
    let counts = run_tests(
        cargo()
            .args([
                "test",
                "--workspace",
                "--no-fail-fast",
                "--features",
                TEST_HOOKS,
            ])
            .env("INTERCEPTOR_BIN", bin.join("interceptor")),
    )?;
    let smoke = vm::smoke(&bin)?;
    println!("{smoke}");
    fuzz(FUZZ_SECONDS)?;
    // One closing line for the whole suite: cargo prints one per test binary, the last of which
    // (doc tests) counts none.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    Ok(())
}

#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn run_tests(cmd: &mut Command) -> anyhow::Result<Counts> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let mut counts = Counts::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (what, n) = (
                        words.next(),
                        words.next().and_then(|n| n.parse::<u64>().ok()),
                    );
                    match (what, n) {
                        (Some("passed"), Some(n)) => counts.passed += n,
                        (Some("failed"), Some(n)) => counts.failed += n,
                        (Some("ignored"), Some(n)) => counts.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{cmd:?} failed: {status}; tests: {} passed, {} failed",
            counts.passed,
            counts.failed
        );
    }
    Ok(counts)
}

/// Seconds each fuzz target runs in `test`: short and bounded, enough to catch a panic on the
/// paths that read bytes from outside.
const FUZZ_SECONDS: u32 = 20;

/// Every parser that reads outside input: DNS queries, ClientHellos (gateway SNI routing and
/// inbound mTLS detection), the mesh files (Istio YAML, meshNetworks), the VM bundle, istiod's
/// pushes, the CA's answers, HTTP peers' Istio metadata headers and the first bytes sniffed
/// on ports of no declared protocol.
const FUZZ_TARGETS: &[&str] = &[
    "dns_query",
    "client_hello",
    "istio_yaml",
    "mesh_networks",
    "vm_bundle",
    "xds_response",
    "ca_chain",
    "peer_metadata",
    "protocol_sniff",
];

/// libFuzzer over each target. No sanitizer: `-s none` builds on the stable toolchain; a panic
/// still fails the run. Prints one line of executions per target at the end.
fn fuzz(seconds: u32) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let mut summary = Vec::new();
    for target in FUZZ_TARGETS {
        let mut cmd = cargo();
        cmd.current_dir(root().join("interceptor").join("fuzz"))
            .args(["fuzz", "run", target, "-s", "none", "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048")
            .stderr(std::process::Stdio::piped());
        eprintln!("+ {cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
        // libFuzzer's last word: "Done N runs in S second(s)".
        let mut runs = None;
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).lines() {
                let line = line?;
                eprintln!("{line}");
                if let Some(rest) = line.strip_prefix("Done ") {
                    runs = rest.split_whitespace().next().map(str::to_string);
                }
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("fuzz target {target} failed ({status}): its crash input is under interceptor/fuzz/artifacts/{target}");
        }
        summary.push(format!("{target} {} runs", runs.as_deref().unwrap_or("?")));
    }
    println!("fuzz: {seconds} s each, 0 crashes: {}", summary.join(", "));
    Ok(())
}

fn soak(seconds: u64, connections: u64) -> anyhow::Result<()> {
    setup::ensure()?;
    let bin = build(true)?;
    run(cargo()
        .args([
            "test",
            "-p",
            "interceptor-tests",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ])
        .env("INTERCEPTOR_BIN", bin.join("interceptor"))
        .env("INTERCEPTOR_HELPERS_DIR", &bin)
        .env("INTERCEPTOR_SOAK_SECS", seconds.to_string())
        .env("INTERCEPTOR_SOAK_CONNS", connections.to_string()))
}

fn build_ebpf() -> anyhow::Result<()> {
    setup::ensure()?;
    let src = root().join("interceptor-ebpf").join(compile::SOURCE_DIR);
    let out_dir = root().join("target").join("bpf");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("capture.bpf.o");
    compile::compile(&src, &out).map_err(anyhow::Error::msg)?;
    println!("{}", out.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure(),
        Task::BuildEbpf => build_ebpf(),
        Task::Test => test(),
        Task::Demo => demo::run(),
        Task::Bench { which } => bench::run(which),
        Task::Install { destdir, bin } => install::install(destdir.as_deref(), bin.as_deref()),
        Task::Uninstall { destdir } => install::uninstall(destdir.as_deref()),
        Task::Deb { bin, out } => {
            let bin = match bin {
                Some(b) => b,
                None => build_portable()?,
            };
            let out = out.unwrap_or_else(|| root().join("target").join("deb"));
            let deb = deb::build(&bin, &out)?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Soak {
            seconds,
            connections,
        } => soak(seconds, connections),
        Task::VmTest { smoke: true, .. } => {
            setup::ensure()?;
            println!("{}", vm::smoke(&build(false)?)?);
            Ok(())
        }
        Task::VmTest {
            release, scenarios, ..
        } => vm::test(release, scenarios),
        Task::VagrantTest { keep, provider } => vagrant::test(keep, provider.as_deref()),
    }
}
