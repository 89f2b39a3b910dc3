//! `cargo xtask bench mtls`: the same client and server four ways in one run:
//! (a) direct plaintext, (b) an interceptor pair (VM outbound -> pod inbound, Istio mTLS),
//! (c) a stunnel4 pair doing mTLS with the same certificates, (d) an Envoy sidecar pair
//! configured as Istio configures one (the sidecar we replace).
//! iperf3 throughput (1 and 4 streams), request/response latency at a fixed rate over one
//! connection, new connections per second, and the proxies' CPU next to each rate. Both proxy
//! pairs run on one worker thread each (`--worker-threads 1`, Envoy `--concurrency 1`), as a
//! sidecar on a 2-core VM.

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
const VIP: &str = "240.240.9.9";

/// Ports on the pod: (mesh, direct, stunnel backend, Envoy backend) for each server. Envoy's
/// inbound listens on 20000 + its backend, its outbound on the VM's 127.0.0.1:40000 + backend.
const IPERF: [u16; 4] = [5201, 5202, 5203, 5204];
const ECHO: [u16; 4] = [7001, 7002, 7003, 7004];
const HTTP: [u16; 4] = [8080, 8082, 8083, 8084];

const MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench, namespace: default}
spec:
  hosts: [bench.default.svc.cluster.local]
  addresses: [240.240.9.9]
  ports: [{number: 5201, name: iperf}, {number: 7001, name: echo}, {number: 8080, name: http}]
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
"#;

fn stunnel_conf(certs: &Path, client: bool) -> String {
    let mut s = format!(
        "foreground = yes\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\ncert = {c}/cert-chain.pem\nkey = {c}/key.pem\nCAfile = {c}/root-cert.pem\nverifyChain = yes\nrequireCert = yes\n",
        c = certs.display()
    );
    for (name, backend) in [("iperf", IPERF[2]), ("echo", ECHO[2]), ("http", HTTP[2])] {
        let tunnel = 30000 + backend;
        if client {
            s += &format!("[{name}]\nclient = yes\naccept = 127.0.0.1:{tunnel}\nconnect = 10.77.0.2:{tunnel}\n");
        } else {
            s += &format!("[{name}]\naccept = 10.77.0.2:{tunnel}\nconnect = 10.77.0.2:{backend}\n");
        }
    }
    s
}

#[derive(Default, Clone)]
struct Figures {
    gbps1: Vec<f64>,
    gbps4: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cps: Vec<f64>,
    cpu_s_per_gb: Vec<f64>,
    cpu_us_per_conn: Vec<f64>,
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let t = Topology::vm_pod();
    let (vm, pod) = (t.node("vm"), t.node("pod"));
    reuse_time_wait(&[&vm.ns, &pod.ns]);
    let (vm_certs, pod_certs) = mesh_certs(t.dir.path());
    let mesh = t.write("mesh.yaml", MESH);
    let empty = t.write("empty.yaml", "# inbound only\n");
    let resolv = t.write("resolv.conf", "nameserver 10.77.0.53\n");

    // Servers on the pod.
    let mut servers = Vec::new();
    for p in IPERF {
        let mut c = pod.ns.cmd("iperf3");
        c.args([
            "-s",
            "--forceflush",
            "-B",
            "10.77.0.2",
            "-p",
            &p.to_string(),
        ]);
        let mut s = Proc::spawn("iperf3", c, t.path(&format!("iperf3-{p}.log")));
        s.wait_for_output("Server listening", 10.0);
        servers.push(s);
    }
    let echo_addrs: Vec<String> = ECHO.iter().map(|p| format!("10.77.0.2:{p}")).collect();
    let mut c = pod.ns.cmd(helper("tcp-echo").to_str().context("utf-8")?);
    c.args(&echo_addrs);
    let mut echo = Proc::spawn("tcp-echo", c, t.path("tcp-echo.log"));
    echo.wait_for_output("listening", 10.0);
    let http_addrs: Vec<String> = HTTP.iter().map(|p| format!("10.77.0.2:{p}")).collect();
    let http_refs: Vec<&str> = http_addrs.iter().map(String::as_str).collect();
    let _http = pod.bench_http(&http_refs);

    // (b) the interceptor pair; logs at warn so the access log is not what we measure.
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

    // (c) the stunnel pair.
    let srv_conf = t.write("stunnel-server.conf", &stunnel_conf(&pod_certs, false));
    let cli_conf = t.write("stunnel-client.conf", &stunnel_conf(&vm_certs, true));
    let mut c = pod.ns.cmd("stunnel4");
    c.arg(&srv_conf);
    let mut st_srv = Proc::spawn("stunnel-server", c, t.path("stunnel-server.log"));
    st_srv.wait_for_output("Configuration successful", 10.0);
    let mut c = vm.ns.cmd("stunnel4");
    c.arg(&cli_conf);
    let mut st_cli = Proc::spawn("stunnel-client", c, t.path("stunnel-client.log"));
    st_cli.wait_for_output("Configuration successful", 10.0);

    // (d) the Envoy sidecar pair: plaintext in on the VM, Istio mTLS to the pod's inbound.
    let backends: Vec<(u16, String)> = [IPERF[3], ECHO[3], HTTP[3]]
        .iter()
        .map(|p| (20000 + p, format!("10.77.0.2:{p}")))
        .collect();
    let backend_refs: Vec<(u16, &str)> = backends.iter().map(|(l, a)| (*l, a.as_str())).collect();
    let env_srv = Envoy::start_logging(
        pod,
        "envoy-inbound",
        &quiet(envoy::sidecar_inbound_config(
            &pod_certs,
            "10.77.0.2",
            &backend_refs,
            19000,
        )),
        19000,
        "error",
    );
    let outbound: Vec<(u16, u16)> = [IPERF[3], ECHO[3], HTTP[3]]
        .iter()
        .map(|p| (40000 + p, 20000 + p))
        .collect();
    let env_cli = Envoy::start_logging(
        vm,
        "envoy-outbound",
        &quiet(envoy::sidecar_outbound_config(
            &vm_certs,
            &outbound,
            "bench.default.svc.cluster.local",
            "10.77.0.2",
            "spiffe://cluster.local/ns/default/sa/bench",
            19001,
        )),
        19001,
        "error",
    );

    let modes = ["a direct", "b interceptor", "c stunnel", "d envoy"];
    let addr = |mode: usize, ports: [u16; 4]| -> (String, u16) {
        match mode {
            0 => ("10.77.0.2".into(), ports[1]),
            1 => (VIP.into(), ports[0]),
            2 => ("127.0.0.1".into(), 30000 + ports[2]),
            _ => ("127.0.0.1".into(), 40000 + ports[3]),
        }
    };
    let pids = |mode: usize| -> Vec<i32> {
        match mode {
            1 => vec![vm_ic.proc.pid(), pod_ic.proc.pid()],
            2 => vec![st_cli.pid(), st_srv.pid()],
            3 => vec![env_cli.proc.pid(), env_srv.proc.pid()],
            _ => vec![],
        }
    };
    let (lg, rrl) = (helper("loadgen"), helper("rrload"));
    let mut figs = vec![Figures::default(); modes.len()];
    for round in 0..ROUNDS {
        for (m, name) in modes.iter().enumerate() {
            // Only (b) runs in the captured cgroup; a and c must not be captured.
            let cmd = |program: &str, args: &[&str]| {
                if m == 1 {
                    vm.in_cgroup(program, args)
                } else {
                    vm.cmd(program, args)
                }
            };
            let (host, port) = addr(m, IPERF);
            let port = port.to_string();
            let before = cpu_secs(&pids(m));
            let g1 = iperf(cmd(
                "iperf3",
                &["-c", &host, "-p", &port, "-t", IPERF_SECS, "-J"],
            ))?;
            let gb = g1 * IPERF_SECS.parse::<f64>()? / 8.0;
            let cpu_gb = (cpu_secs(&pids(m)) - before) / gb;
            let g4 = iperf(cmd(
                "iperf3",
                &["-c", &host, "-p", &port, "-t", IPERF_SECS, "-P", "4", "-J"],
            ))?;
            let (host, port) = addr(m, ECHO);
            let (p50, p99) = rr(cmd(
                rrl.to_str().context("utf-8")?,
                &[&format!("{host}:{port}"), RR_RATE, RR_SECS],
            ))?;
            let (host, port) = addr(m, HTTP);
            let before = cpu_secs(&pids(m));
            let load = loadgen(cmd(
                lg.to_str().context("utf-8")?,
                &[&format!("{host}:{port}"), CPS_SECS, "4"],
            ))?;
            let connections = load.cps * CPS_SECS.parse::<f64>()?;
            let cpu_conn = (cpu_secs(&pids(m)) - before) / connections * 1e6;
            anyhow::ensure!(
                load.errors == 0,
                "{name}: {} connection errors",
                load.errors
            );
            eprintln!("round {round} {name}: {g1:.2} Gbit/s x1 ({cpu_gb:.2} CPU s/GB), {g4:.2} Gbit/s x4, rr p50 {p50:.0} us p99 {p99:.0} us, {:.0} conn/s ({cpu_conn:.0} CPU us/conn)", load.cps);
            let f = &mut figs[m];
            f.gbps1.push(g1);
            f.gbps4.push(g4);
            f.p50.push(p50);
            f.p99.push(p99);
            f.cps.push(load.cps);
            f.cpu_s_per_gb.push(cpu_gb);
            f.cpu_us_per_conn.push(cpu_conn);
        }
    }
    let med: Vec<[f64; 7]> = figs
        .iter()
        .map(|f| {
            [
                median(f.gbps1.clone()),
                median(f.gbps4.clone()),
                median(f.p50.clone()),
                median(f.p99.clone()),
                median(f.cps.clone()),
                median(f.cpu_s_per_gb.clone()),
                median(f.cpu_us_per_conn.clone()),
            ]
        })
        .collect();
    println!("\nmtls bench (each proxy on one worker thread): median of {ROUNDS} rounds; iperf3 {IPERF_SECS}s; request/response at {RR_RATE}/s over one connection; conn/s with 4 concurrent; CPU of both proxies of a pair");
    println!(
        "{:<15} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>12}",
        "mode", "Gbit/s x1", "Gbit/s x4", "p50 us", "p99 us", "conn/s", "CPU s/GB", "CPU us/conn"
    );
    for (i, m) in modes.iter().enumerate() {
        let f = med[i];
        println!(
            "{:<15} {:>10.2} {:>10.2} {:>9.0} {:>9.0} {:>9.0} {:>10.2} {:>12.0}",
            m, f[0], f[1], f[2], f[3], f[4], f[5], f[6]
        );
    }
    let (a, b, c, d) = (med[0], med[1], med[2], med[3]);
    println!(
        "b/a x1 {:.2} {} (goal >= 0.60)   b/a x4 {:.2} (goal >= 0.50)   b/a p50 {:.2} (goal <= 1.8)   b/a p99 {:.2} (goal <= 2.5)   b/a CPS {:.2} {} (goal >= 0.20)",
        b[0] / a[0],
        ratio_range(&figs[1].gbps1, &figs[0].gbps1),
        b[1] / a[1],
        b[2] / a[2],
        b[3] / a[3],
        b[4] / a[4],
        ratio_range(&figs[1].cps, &figs[0].cps),
    );
    println!(
        "b/d (vs Envoy) x1 {:.2} {} (goal >= 1.5)   x4 {:.2}   CPS {:.2} {} (goal >= 2.5)   CPU/GB {:.2}   CPU/conn {:.2}",
        b[0] / d[0],
        ratio_range(&figs[1].gbps1, &figs[3].gbps1),
        b[1] / d[1],
        b[4] / d[4],
        ratio_range(&figs[1].cps, &figs[3].cps),
        b[5] / d[5],
        b[6] / d[6],
    );
    println!(
        "b/c (vs stunnel) x1 {:.2}   x4 {:.2}   CPS {:.2}   CPU/GB {:.2}   CPU/conn {:.2}",
        b[0] / c[0],
        b[1] / c[1],
        b[4] / c[4],
        b[5] / c[5],
        b[6] / c[6],
    );
    let json = serde_json::json!({"modes": modes, "figures": med, "columns": ["gbps1", "gbps4", "p50_us", "p99_us", "cps", "cpu_s_per_gb", "cpu_us_per_conn"]});
    std::fs::write(out.join("mtls.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
