//! `cargo xtask bench http`: HTTP through an interceptor pair at L7 against an Envoy sidecar
//! pair at L7, in one run, with the direct path as the floor:
//! (a) direct, (b) VM interceptor (its outbound serves the connection as HTTP: a VirtualService
//! `http` route) → pod interceptor (its inbound serves it as HTTP: an AuthorizationPolicy on
//! paths), (d) Envoy → Envoy with HTTP connection managers on both sides, as Istio configures
//! a sidecar for an HTTP port (HTTP RBAC inbound, ALPN istio-http/1.1).
//! Load: wrk (HTTP/1.1 keep-alive, and a connection per request with `Connection: close`),
//! h2load (HTTP/2, 4 connections × 10 streams; proxied modes only: the bench server speaks
//! HTTP/1.1), and request/response latency at a fixed rate over one kept connection (rrload).
//! 1 KiB responses. Each proxy on one worker thread, as a sidecar on a 2-core VM; logs off.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use interceptor_tests::envoy::{self, Envoy};
use interceptor_tests::Topology;

use super::{cpu_secs, helper, median, mesh_certs, quiet, ratio_range, reuse_time_wait, rr};

const ROUNDS: usize = 3;
const SECS: &str = "4";
const RR_RATE: &str = "1000";
const RR_SECS: &str = "4";
const VIP: &str = "240.240.9.10";
/// The app's port on the pod: through the interceptors (b), direct (a), Envoy's backend (d).
const APP: [u16; 3] = [8080, 8081, 8082];
/// Envoy's inbound on the pod and outbound on the VM's loopback.
const ENVOY_IN: u16 = 28082;
const ENVOY_OUT: u16 = 48082;

const VM_MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench, namespace: default}
spec:
  hosts: [bench.default.svc.cluster.local]
  addresses: [240.240.9.10]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: bench}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: bench-pod, namespace: default}
spec:
  address: 10.77.0.2
  labels: {app: bench, security.istio.io/tlsMode: istio}
  serviceAccount: bench
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bench, namespace: default}
spec:
  hosts: [bench.default.svc.cluster.local]
  http:
  - route: [{destination: {host: bench.default.svc.cluster.local}}]
"#;

/// The pod's own service and a policy on paths: requests judged one by one.
const POD_POLICY: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bench, namespace: default}
spec:
  rules:
  - to: [{operation: {paths: ['*']}}]
"#;

#[derive(Default, Clone)]
struct Figures {
    /// Requests per second and per proxy CPU-second: keep-alive, connection per request, h2.
    rps: [Vec<f64>; 3],
    per_cpu: [Vec<f64>; 3],
    p50: Vec<f64>,
    p99: Vec<f64>,
}

/// Requests per second from wrk's summary; an error if any answer was not a 2xx/3xx.
fn wrk(mut cmd: Command) -> anyhow::Result<f64> {
    let out = cmd
        .output()
        .context("wrk (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "wrk failed: {text}");
    anyhow::ensure!(!text.contains("Non-2xx"), "wrk saw errors: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk output: {text}"))
}

/// Requests per second from h2load's summary; an error if any request failed.
fn h2load(mut cmd: Command) -> anyhow::Result<f64> {
    let out = cmd
        .output()
        .context("h2load (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "h2load failed: {text}");
    let failed = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(',').find(|p| p.trim().ends_with("failed")))
        .and_then(|p| p.split_whitespace().next()?.parse::<u64>().ok());
    anyhow::ensure!(failed == Some(0), "h2load saw failures: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().strip_suffix("req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("h2load output: {text}"))
}

/// Resident memory of the processes, MiB.
fn rss_mib(pids: &[i32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            let kb = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            kb.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum::<f64>()
        / 1024.0
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let t = Topology::vm_pod();
    let (vm, pod) = (t.node("vm"), t.node("pod"));
    reuse_time_wait(&[&vm.ns, &pod.ns]);
    let (vm_certs, pod_certs) = mesh_certs(t.dir.path());
    let vm_mesh = t.write("vm-mesh.yaml", VM_MESH);
    let pod_mesh = t.write("pod-mesh.yaml", &format!("{VM_MESH}{POD_POLICY}"));
    let resolv = t.write("resolv.conf", "nameserver 10.77.0.53\n");
    let app_addrs: Vec<String> = APP.iter().map(|p| format!("10.77.0.2:{p}")).collect();
    let app_refs: Vec<&str> = app_addrs.iter().map(String::as_str).collect();
    let _app = pod.bench_http(&app_refs);

    let pod_ic = pod
        .interceptor()
        .mesh(&pod_mesh)
        .resolv(&resolv)
        .certs(&pod_certs)
        .args([
            "--inbound-ports",
            &APP[0].to_string(),
            "--worker-threads",
            "1",
        ])
        .env("RUST_LOG", "warn")
        .log("pod-ic")
        .start();
    let vm_ic = vm
        .interceptor()
        .mesh(&vm_mesh)
        .resolv(&resolv)
        .certs(&vm_certs)
        .args(["--worker-threads", "1"])
        .env("RUST_LOG", "warn")
        .log("vm-ic")
        .start();
    let env_srv = Envoy::start_logging(
        pod,
        "envoy-inbound",
        &quiet(envoy::sidecar_http_inbound_config(
            &pod_certs,
            "10.77.0.2",
            ENVOY_IN,
            &app_addrs[2],
            19000,
        )),
        19000,
        "error",
    );
    let env_cli = Envoy::start_logging(
        vm,
        "envoy-outbound",
        &quiet(envoy::http_outbound_config(
            &vm_certs,
            ENVOY_OUT,
            "bench.default.svc.cluster.local",
            "10.77.0.2",
            ENVOY_IN,
            "spiffe://cluster.local/ns/default/sa/bench",
            19001,
        )),
        19001,
        "error",
    );

    let modes = ["a direct", "b interceptor", "d envoy"];
    let target = |m: usize| match m {
        0 => format!("10.77.0.2:{}", APP[1]),
        1 => format!("{VIP}:{}", APP[0]),
        _ => format!("127.0.0.1:{ENVOY_OUT}"),
    };
    let pids = |m: usize| match m {
        1 => vec![vm_ic.proc.pid(), pod_ic.proc.pid()],
        2 => vec![env_cli.proc.pid(), env_srv.proc.pid()],
        _ => vec![],
    };
    let rrl = helper("rrload");
    let mut figs = vec![Figures::default(); modes.len()];
    for round in 0..ROUNDS {
        for (m, name) in modes.iter().enumerate() {
            // Only (b) runs in the captured cgroup.
            let cmd = |program: &str, args: &[&str]| match m {
                1 => vm.in_cgroup(program, args),
                _ => vm.cmd(program, args),
            };
            let url = format!("http://{}/bench", target(m));
            let secs: f64 = SECS.parse()?;
            let d = format!("{SECS}s");
            let loads: [Vec<&str>; 3] = [
                vec!["-t1", "-c8", "-d", &d, &url],
                vec!["-t1", "-c8", "-d", &d, "-H", "Connection: close", &url],
                vec!["-c4", "-m10", "-D", SECS, &url],
            ];
            let mut line = format!("round {round} {name}:");
            for (k, args) in loads.iter().enumerate() {
                if k == 2 && m == 0 {
                    continue; // the bench server speaks HTTP/1.1 only
                }
                let before = cpu_secs(&pids(m));
                let rps = match k {
                    2 => h2load(cmd("h2load", args))?,
                    _ => wrk(cmd("wrk", args))?,
                };
                let cpu = cpu_secs(&pids(m)) - before;
                let per_cpu = if cpu > 0.0 { rps * secs / cpu } else { 0.0 };
                figs[m].rps[k].push(rps);
                figs[m].per_cpu[k].push(per_cpu);
                line += &format!(" [{k}] {rps:.0} req/s ({per_cpu:.0} req/CPU-s)");
            }
            let (p50, p99) = rr(cmd(
                rrl.to_str().context("utf-8")?,
                &[&target(m), RR_RATE, RR_SECS, "http"],
            ))?;
            figs[m].p50.push(p50);
            figs[m].p99.push(p99);
            eprintln!("{line} rr p50 {p50:.0} us p99 {p99:.0} us");
        }
    }
    report(out, &modes, &figs, [rss_mib(&pids(1)), rss_mib(&pids(2))])
}

fn report(out: &Path, modes: &[&str], figs: &[Figures], rss: [f64; 2]) -> anyhow::Result<()> {
    let med = |v: &Vec<f64>| median(v.clone());
    println!("\nhttp bench (each proxy on one worker thread, 1 KiB answers): median of {ROUNDS} rounds of {SECS}s; [ka] wrk HTTP/1.1 keep-alive 8 connections, [cpr] wrk a connection per request, [h2] h2load 4 connections x 10 streams; rr at {RR_RATE}/s over one kept connection; CPU of both proxies of a pair");
    println!(
        "{:<15} {:>9} {:>11} {:>9} {:>11} {:>9} {:>11} {:>8} {:>8}",
        "mode",
        "ka rps",
        "ka rq/CPUs",
        "cpr rps",
        "cpr rq/CPUs",
        "h2 rps",
        "h2 rq/CPUs",
        "p50 us",
        "p99 us"
    );
    for (i, m) in modes.iter().enumerate() {
        let f = &figs[i];
        println!(
            "{:<15} {:>9.0} {:>11.0} {:>9.0} {:>11.0} {:>9.0} {:>11.0} {:>8.0} {:>8.0}",
            m,
            med(&f.rps[0]),
            med(&f.per_cpu[0]),
            med(&f.rps[1]),
            med(&f.per_cpu[1]),
            med(&f.rps[2]),
            med(&f.per_cpu[2]),
            med(&f.p50),
            med(&f.p99)
        );
    }
    let (a, b, d) = (&figs[0], &figs[1], &figs[2]);
    let added = |x: &Vec<f64>, base: &Vec<f64>| med(x) - med(base);
    println!(
        "b/d (vs Envoy) requests per CPU-second: keep-alive {:.2} {} (goal >= 2)   connection per request {:.2} {}   h2 {:.2} {}",
        med(&b.per_cpu[0]) / med(&d.per_cpu[0]),
        ratio_range(&b.per_cpu[0], &d.per_cpu[0]),
        med(&b.per_cpu[1]) / med(&d.per_cpu[1]),
        ratio_range(&b.per_cpu[1], &d.per_cpu[1]),
        med(&b.per_cpu[2]) / med(&d.per_cpu[2]),
        ratio_range(&b.per_cpu[2], &d.per_cpu[2]),
    );
    println!(
        "added latency over direct at {RR_RATE}/s: interceptor p50 {:.0} us p99 {:.0} us, Envoy p50 {:.0} us p99 {:.0} us: p99 b/d {:.2} (goal <= 0.5)",
        added(&b.p50, &a.p50),
        added(&b.p99, &a.p99),
        added(&d.p50, &a.p50),
        added(&d.p99, &a.p99),
        added(&b.p99, &a.p99) / added(&d.p99, &a.p99),
    );
    println!(
        "RSS after the run: interceptor pair {:.1} MiB, Envoy pair {:.1} MiB: b/d {:.2} (goal <= 0.5)",
        rss[0],
        rss[1],
        rss[0] / rss[1]
    );
    let json = serde_json::json!({
        "modes": modes,
        "rps": figs.iter().map(|f| f.rps.iter().map(&med).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "per_cpu": figs.iter().map(|f| f.per_cpu.iter().map(&med).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "p50_us": figs.iter().map(|f| med(&f.p50)).collect::<Vec<_>>(),
        "p99_us": figs.iter().map(|f| med(&f.p99)).collect::<Vec<_>>(),
        "rss_mib": rss,
    });
    std::fs::write(out.join("http.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
