//! Benchmarks. Each runs the product and a peer side by side in one run, on the same machine
//! and topology, and reports ratios (never absolute pass/fail).

mod capture;
mod dns;
mod gateway;
mod hbone;
mod http;
mod mtls;
mod xds;

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Which {
    Capture,
    Dns,
    Mtls,
    Gateway,
    Hbone,
    Http,
    Xds,
    All,
}

pub fn run(which: Which) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    let dir = crate::build(true)?;
    std::env::set_var("INTERCEPTOR_BIN", dir.join("interceptor"));
    std::env::set_var("INTERCEPTOR_HELPERS_DIR", &dir);
    let out = crate::root().join("target").join("bench");
    std::fs::create_dir_all(&out)?;
    if matches!(which, Which::Capture | Which::All) {
        capture::run(&out)?;
    }
    if matches!(which, Which::Dns | Which::All) {
        dns::run(&out)?;
    }
    if matches!(which, Which::Mtls | Which::All) {
        mtls::run(&out)?;
    }
    if matches!(which, Which::Gateway | Which::All) {
        gateway::run(&out)?;
    }
    if matches!(which, Which::Hbone | Which::All) {
        hbone::run(&out)?;
    }
    if matches!(which, Which::Http | Which::All) {
        http::run(&out)?;
    }
    if matches!(which, Which::Xds | Which::All) {
        xds::run(&out)?;
    }
    Ok(())
}

/// One loadgen result.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    pub cps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

pub fn loadgen(mut cmd: Command) -> anyhow::Result<Load> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("loadgen JSON")?;
    Ok(Load {
        cps: v["cps"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_f64().unwrap_or(0.0),
        p99_us: v["p99_us"].as_f64().unwrap_or(0.0),
        errors: v["errors"].as_u64().unwrap_or(0),
    })
}

/// The day's range of a ratio, "[lo-hi]": per round, `x`'s figure over `y`'s.
pub fn ratio_range(x: &[f64], y: &[f64]) -> String {
    let r: Vec<f64> = x.iter().zip(y).map(|(a, b)| a / b).collect();
    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.iter().copied().fold(0.0, f64::max);
    format!("[{lo:.2}-{hi:.2}]")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// TIME_WAIT reuse inside the bench's own namespaces (a per-netns sysctl): connection-rate runs
/// would otherwise run out of ports.
pub fn reuse_time_wait(namespaces: &[&interceptor_tests::Netns]) {
    for ns in namespaces {
        interceptor_tests::sh(ns.cmd("sysctl").args(["-qw", "net.ipv4.tcp_tw_reuse=1"]));
    }
}

/// A bench CA and the VM's and the pod's certificates (Istio VM layout), under `dir`.
pub fn mesh_certs(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    use interceptor_tests::certs::{Ca, Key};
    let ca = Ca::new("bench root");
    let td = "spiffe://cluster.local/ns/default/sa";
    (
        ca.issue(&dir.join("vm-certs"), &format!("{td}/vm"), Key::Ecdsa),
        ca.issue(&dir.join("pod-certs"), &format!("{td}/bench"), Key::Ecdsa),
    )
}

pub fn helper(name: &str) -> PathBuf {
    interceptor_tests::helper_bin(name)
}

/// Throughput in Gbit/s from `iperf3 -J`.
pub fn iperf(mut cmd: Command) -> anyhow::Result<f64> {
    let out = cmd.output().context("iperf3")?;
    anyhow::ensure!(
        out.status.success(),
        "iperf3 failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON")
}

/// (p50, p99) in microseconds from the `rrload` helper.
pub fn rr(mut cmd: Command) -> anyhow::Result<(f64, f64)> {
    let out = cmd.output().context("rrload")?;
    anyhow::ensure!(
        out.status.success(),
        "rrload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["p50_us"].as_f64().unwrap_or(0.0),
        v["p99_us"].as_f64().unwrap_or(0.0),
    ))
}

/// The config without access logs: the interceptors log at warn, Envoy gets the same deal.
pub fn quiet(config: String) -> String {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("access_log");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(&config) {
        Ok(mut v) => {
            strip(&mut v);
            v.to_string()
        }
        Err(_) => config,
    }
}

/// User + system CPU seconds of the processes so far.
pub fn cpu_secs(pids: &[i32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / 100.0
}
