//! `cargo xtask bench hbone`: the same clients and servers four ways in one run:
//! (a) direct plaintext, (b) an interceptor pair over the sidecar wire (a TLS handshake per
//! connection, resumed), (c) the same pair over HBONE (CONNECT streams in one pooled
//! connection), (d) an Envoy pair over HBONE (originator tcp_proxy tunnelling -> terminator
//! CONNECT, as Istio's sidecar and waypoint), the independent peer.
//! iperf3 throughput, request/response latency over one connection, new connections per second
//! and the proxies' CPU per new connection.

use std::path::Path;

use anyhow::Context;
use interceptor_tests::envoy::{self, Envoy};
use interceptor_tests::{Proc, Topology};

use super::{
    cpu_secs, helper, iperf, loadgen, median, mesh_certs, quiet, ratio_range, reuse_time_wait, rr,
};

const ROUNDS: usize = 3;
const IPERF_SECS: &str = "4";
const RR_RATE: &str = "1000";
const RR_SECS: &str = "4";
const CPS_SECS: &str = "3";
const POD: &str = "10.77.0.2";
const MTLS_VIP: &str = "240.240.9.9";
const HBONE_VIP: &str = "240.240.9.10";
/// The Envoy terminator's port: 15008 on the pod is our interceptor's.
const ENVOY_HBONE: u16 = 15009;

/// Ports on the pod: (through the interceptors, direct and through Envoy).
const IPERF: [u16; 2] = [5201, 5202];
const ECHO: [u16; 2] = [7001, 7002];
const HTTP: [u16; 2] = [8080, 8082];

fn mesh() -> String {
    let entry = |name: &str, vip: &str, labels: &str| {
        format!(
            r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  addresses: [{vip}]
  ports: [{{number: 5201, name: iperf}}, {{number: 7001, name: echo}}, {{number: 8080, name: http}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: {name}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}-pod, namespace: default}}
spec:
  address: {POD}
  labels: {{app: {name}, {labels}}}
  serviceAccount: bench
"#
        )
    };
    entry("bench", MTLS_VIP, "security.istio.io/tlsMode: istio")
        + &entry("bench-hbone", HBONE_VIP, "networking.istio.io/tunnel: http")
}

#[derive(Default, Clone)]
struct Figures {
    gbps1: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cps: Vec<f64>,
    cpu_us_per_conn: Vec<f64>,
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let t = Topology::vm_pod();
    let (vm, pod) = (t.node("vm"), t.node("pod"));
    reuse_time_wait(&[&vm.ns, &pod.ns]);
    let (vm_certs, pod_certs) = mesh_certs(t.dir.path());
    let mesh = t.write("mesh.yaml", &mesh());
    let empty = t.write("empty.yaml", "# inbound only\n");
    let resolv = t.write("resolv.conf", "nameserver 10.77.0.53\n");

    let mut servers = Vec::new();
    for p in IPERF {
        let mut c = pod.ns.cmd("iperf3");
        c.args(["-s", "--forceflush", "-B", POD, "-p", &p.to_string()]);
        let mut s = Proc::spawn("iperf3", c, t.path(&format!("iperf3-{p}.log")));
        s.wait_for_output("Server listening", 10.0);
        servers.push(s);
    }
    let echo_addrs: Vec<String> = ECHO.iter().map(|p| format!("{POD}:{p}")).collect();
    let mut c = pod.ns.cmd(helper("tcp-echo").to_str().context("utf-8")?);
    c.args(&echo_addrs);
    let mut echo = Proc::spawn("tcp-echo", c, t.path("tcp-echo.log"));
    echo.wait_for_output("listening", 10.0);
    let http_addrs: Vec<String> = HTTP.iter().map(|p| format!("{POD}:{p}")).collect();
    let http_refs: Vec<&str> = http_addrs.iter().map(String::as_str).collect();
    let _http = pod.bench_http(&http_refs);

    // (b, c) the interceptor pair: the sidecar wire on the listed ports, HBONE on 15008. One
    // worker thread each, as Envoy's --concurrency 1: the same deal for both pairs.
    let inbound = format!("{},{},{}", IPERF[0], ECHO[0], HTTP[0]);
    let pod_ic = pod
        .interceptor()
        .mesh(&empty)
        .resolv(&resolv)
        .certs(&pod_certs)
        .args(["--inbound-ports", &inbound, "--worker-threads", "1"])
        .env("RUST_LOG", "warn")
        .log("pod-ic")
        .start();
    let vm_ic = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .certs(&vm_certs)
        .args(["--worker-threads", "1"])
        .env("RUST_LOG", "warn")
        .log("vm-ic")
        .start();

    // (d) the Envoy pair, tunnelling to the direct ports.
    let san = "spiffe://cluster.local/ns/default/sa/bench";
    let tunnels: Vec<(u16, String)> = [IPERF[1], ECHO[1], HTTP[1]]
        .iter()
        .map(|p| (30000 + p, format!("{POD}:{p}")))
        .collect();
    let tunnel_refs: Vec<(u16, &str)> = tunnels.iter().map(|(l, a)| (*l, a.as_str())).collect();
    let terminator = Envoy::start_logging(
        pod,
        "envoy-terminator",
        &quiet(envoy::hbone_terminator_config(
            &pod_certs,
            POD,
            ENVOY_HBONE,
            19000,
        )),
        19000,
        "error",
    );
    let originator = Envoy::start_logging(
        vm,
        "envoy-originator",
        &quiet(envoy::hbone_originator_config(
            &vm_certs,
            &tunnel_refs,
            POD,
            ENVOY_HBONE,
            san,
            19001,
        )),
        19001,
        "error",
    );

    let modes = [
        "a direct",
        "b ic sidecar mTLS",
        "c ic HBONE",
        "d envoy HBONE",
    ];
    let addr = |mode: usize, ports: [u16; 2]| -> String {
        match mode {
            0 => format!("{POD}:{}", ports[1]),
            1 => format!("{MTLS_VIP}:{}", ports[0]),
            2 => format!("{HBONE_VIP}:{}", ports[0]),
            _ => format!("127.0.0.1:{}", 30000 + ports[1]),
        }
    };
    let pids = |mode: usize| -> Vec<i32> {
        match mode {
            1 | 2 => vec![vm_ic.proc.pid(), pod_ic.proc.pid()],
            3 => vec![originator.proc.pid(), terminator.proc.pid()],
            _ => vec![],
        }
    };
    let (lg, rrl) = (helper("loadgen"), helper("rrload"));
    let mut figs = vec![Figures::default(); modes.len()];
    for round in 0..ROUNDS {
        for (m, name) in modes.iter().enumerate() {
            // Only the interceptor modes run in the captured cgroup.
            let cmd = |program: &str, args: &[&str]| {
                if m == 1 || m == 2 {
                    vm.in_cgroup(program, args)
                } else {
                    vm.cmd(program, args)
                }
            };
            let a = addr(m, IPERF);
            let (host, port) = a.rsplit_once(':').context("addr")?;
            let g1 = iperf(cmd(
                "iperf3",
                &["-c", host, "-p", port, "-t", IPERF_SECS, "-J"],
            ))?;
            let (p50, p99) = rr(cmd(
                rrl.to_str().context("utf-8")?,
                &[&addr(m, ECHO), RR_RATE, RR_SECS],
            ))?;
            let before = cpu_secs(&pids(m));
            let load = loadgen(cmd(
                lg.to_str().context("utf-8")?,
                &[&addr(m, HTTP), CPS_SECS, "4"],
            ))?;
            let cpu = cpu_secs(&pids(m)) - before;
            anyhow::ensure!(
                load.errors == 0,
                "{name}: {} connection errors",
                load.errors
            );
            let connections = load.cps * CPS_SECS.parse::<f64>()?;
            let cpu_us = if m == 0 { 0.0 } else { cpu / connections * 1e6 };
            eprintln!("round {round} {name}: {g1:.2} Gbit/s, rr p50 {p50:.0} us p99 {p99:.0} us, {:.0} conn/s, proxies' CPU {cpu_us:.0} us/conn", load.cps);
            let f = &mut figs[m];
            f.gbps1.push(g1);
            f.p50.push(p50);
            f.p99.push(p99);
            f.cps.push(load.cps);
            f.cpu_us_per_conn.push(cpu_us);
        }
    }
    let med: Vec<[f64; 5]> = figs
        .iter()
        .map(|f| {
            [
                median(f.gbps1.clone()),
                median(f.p50.clone()),
                median(f.p99.clone()),
                median(f.cps.clone()),
                median(f.cpu_us_per_conn.clone()),
            ]
        })
        .collect();
    println!("\nhbone bench (each proxy on one worker thread): median of {ROUNDS} rounds; iperf3 {IPERF_SECS}s one stream; request/response at {RR_RATE}/s over one connection; conn/s with 4 concurrent");
    println!(
        "{:<18} {:>9} {:>8} {:>8} {:>8} {:>14}",
        "mode", "Gbit/s", "p50 us", "p99 us", "conn/s", "CPU us/conn"
    );
    for (i, m) in modes.iter().enumerate() {
        let f = med[i];
        println!(
            "{:<18} {:>9.2} {:>8.0} {:>8.0} {:>8.0} {:>14.0}",
            m, f[0], f[1], f[2], f[3], f[4]
        );
    }
    let (a, b, c, d) = (med[0], med[1], med[2], med[3]);
    println!(
        "c/a conn/s {:.2} {} (goal >= 0.45; b/a {:.2})   c/b throughput {:.2} {} (goal >= 0.90)",
        c[3] / a[3],
        ratio_range(&figs[2].cps, &figs[0].cps),
        b[3] / a[3],
        c[0] / b[0],
        ratio_range(&figs[2].gbps1, &figs[1].gbps1),
    );
    println!(
        "c/d (ours vs Envoy, both HBONE): throughput {:.2}, conn/s {:.2}, p50 {:.2}, CPU per connection {:.2}",
        c[0] / d[0],
        c[3] / d[3],
        c[1] / d[1],
        c[4] / d[4]
    );
    let json = serde_json::json!({"modes": modes, "figures": med, "columns": ["gbps1", "p50_us", "p99_us", "cps", "cpu_us_per_conn"]});
    std::fs::write(out.join("hbone.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
