//! `cargo xtask bench mtls`: the same client and server three ways in one run:
//! (a) direct plaintext, (b) an interceptor pair (VM outbound -> pod inbound, Istio mTLS),
//! (c) a stunnel4 pair doing mTLS with the same certificates.
//! iperf3 throughput (1 and 4 streams), request/response latency at a fixed rate over one
//! connection, and new connections per second.

use std::path::Path;

use anyhow::Context;
use interceptor_tests::{Proc, Topology};

use super::{helper, iperf, loadgen, median, mesh_certs, reuse_time_wait, rr};

const ROUNDS: usize = 2;
const IPERF_SECS: &str = "4";
const RR_RATE: &str = "1000";
const RR_SECS: &str = "4";
const CPS_SECS: &str = "3";
const VIP: &str = "240.240.9.9";

/// Ports on the pod: (mesh, direct, stunnel backend) for each server.
const IPERF: [u16; 3] = [5201, 5202, 5203];
const ECHO: [u16; 3] = [7001, 7002, 7003];
const HTTP: [u16; 3] = [8080, 8082, 8083];

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
    let _pod_ic = pod
        .interceptor()
        .mesh(&empty)
        .resolv(&resolv)
        .certs(&pod_certs)
        .args(["--inbound-ports", &inbound])
        .env("RUST_LOG", "warn")
        .log("pod-ic")
        .start();
    let _vm_ic = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .certs(&vm_certs)
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

    let modes = ["a direct", "b interceptor", "c stunnel"];
    let addr = |mode: usize, ports: [u16; 3]| -> (String, u16) {
        match mode {
            0 => ("10.77.0.2".into(), ports[1]),
            1 => (VIP.into(), ports[0]),
            _ => ("127.0.0.1".into(), 30000 + ports[2]),
        }
    };
    let (lg, rrl) = (helper("loadgen"), helper("rrload"));
    let mut figs = vec![Figures::default(); 3];
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
            let g1 = iperf(cmd(
                "iperf3",
                &["-c", &host, "-p", &port, "-t", IPERF_SECS, "-J"],
            ))?;
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
            let load = loadgen(cmd(
                lg.to_str().context("utf-8")?,
                &[&format!("{host}:{port}"), CPS_SECS, "4"],
            ))?;
            anyhow::ensure!(
                load.errors == 0,
                "{name}: {} connection errors",
                load.errors
            );
            eprintln!("round {round} {name}: {g1:.2} Gbit/s x1, {g4:.2} Gbit/s x4, rr p50 {p50:.0} us p99 {p99:.0} us, {:.0} conn/s", load.cps);
            let f = &mut figs[m];
            f.gbps1.push(g1);
            f.gbps4.push(g4);
            f.p50.push(p50);
            f.p99.push(p99);
            f.cps.push(load.cps);
        }
    }
    let med: Vec<[f64; 5]> = figs
        .iter()
        .map(|f| {
            [
                median(f.gbps1.clone()),
                median(f.gbps4.clone()),
                median(f.p50.clone()),
                median(f.p99.clone()),
                median(f.cps.clone()),
            ]
        })
        .collect();
    println!("\nmtls bench: median of {ROUNDS} rounds; iperf3 {IPERF_SECS}s; request/response at {RR_RATE}/s over one connection; conn/s with 4 concurrent");
    println!(
        "{:<15} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "mode", "Gbit/s x1", "Gbit/s x4", "p50 us", "p99 us", "conn/s"
    );
    for (i, m) in modes.iter().enumerate() {
        let f = med[i];
        println!(
            "{:<15} {:>10.2} {:>10.2} {:>9.0} {:>9.0} {:>9.0}",
            m, f[0], f[1], f[2], f[3], f[4]
        );
    }
    let (a, b, c) = (med[0], med[1], med[2]);
    println!(
        "b/a throughput x1 {:.2} (goal >= 0.50)   b/c x1 {:.2} (goal >= 1.5)   b/c x4 {:.2}",
        b[0] / a[0],
        b[0] / c[0],
        b[1] / c[1]
    );
    println!(
        "b/a p50 {:.2} (goal <= 2)   b/a CPS {:.2} (goal >= 0.55)   b/c CPS {:.2}",
        b[2] / a[2],
        b[4] / a[4],
        b[4] / c[4]
    );
    let json = serde_json::json!({"modes": modes, "figures": med, "columns": ["gbps1", "gbps4", "p50_us", "p99_us", "cps"]});
    std::fs::write(out.join("mtls.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
