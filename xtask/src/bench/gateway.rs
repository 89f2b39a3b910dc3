//! `cargo xtask bench gateway`: what the east-west gateway hop costs. The same VM, the same
//! interceptor pair and the same servers, in one run: (a) vm -> pod-a in the VM's network,
//! direct; (b) vm -> gw -> pod-b in network B. iperf3 single-stream throughput and
//! request/response latency at a fixed rate over one connection.

use std::path::Path;

use anyhow::Context;
use interceptor_tests::{Interceptor, Proc, Topology};

use super::{helper, iperf, median, mesh_certs, reuse_time_wait, rr};

const ROUNDS: usize = 3;
const IPERF_SECS: &str = "4";
const RR_RATE: &str = "1000";
const RR_SECS: &str = "4";
const VIP_A: &str = "240.240.9.10";
const VIP_B: &str = "240.240.9.11";
const POD_B: &str = "10.88.0.2";
const GW_A: &str = "10.77.0.3";

fn mesh() -> String {
    let service = |name: &str, vip: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{name}.default.svc.cluster.local]\n  addresses: [{vip}]\n  ports: [{{number: 5201, name: iperf}}, {{number: 7001, name: echo}}]\n  resolution: STATIC\n  workloadSelector: {{labels: {{app: {name}}}}}\n"
        )
    };
    let workload = |name: &str, addr: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  address: {addr}\n  labels: {{app: {name}, security.istio.io/tlsMode: istio}}\n  serviceAccount: bench\n"
        )
    };
    [
        service("bench-a", VIP_A),
        service("bench-b", VIP_B),
        workload("bench-a", "10.77.0.2"),
        workload("bench-b", POD_B),
    ]
    .concat()
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let b = Topology::new()
        .network("a")
        .network("b")
        .node("vm", &["a"])
        .node("pod", &["a"])
        .node("gw", &["a", "b"])
        .node("pod-b", &["b"])
        .build();
    let (vm, gw_node) = (b.node("vm"), b.node("gw"));
    reuse_time_wait(&[&vm.ns, &b.node("pod").ns, &b.node("pod-b").ns, &gw_node.ns]);
    let (vm_certs, pod_certs) = mesh_certs(b.dir.path());
    let mesh = b.write("mesh.yaml", &mesh());
    let networks = b.write(
        "networks.yaml",
        &format!(
            "networks:\n  a:\n    endpoints: [{{fromCidr: 10.77.0.0/24}}]\n  b:\n    endpoints: [{{fromCidr: 10.88.0.0/24}}]\n    gateways: [{{address: {GW_A}, port: 15443}}]\n"
        ),
    );
    let empty = b.write("empty.yaml", "# inbound only\n");
    let resolv = b.write("resolv.conf", "nameserver 10.77.0.53\n");

    // The same servers on both pods, each behind its own interceptor (inbound mTLS).
    let mut procs: Vec<Proc> = Vec::new();
    let mut sidecars: Vec<Interceptor> = Vec::new();
    for (node, addr, side) in [
        (b.node("pod"), "10.77.0.2", "a"),
        (b.node("pod-b"), POD_B, "b"),
    ] {
        let ns = &node.ns;
        let mut c = ns.cmd("iperf3");
        c.args(["-s", "--forceflush", "-B", addr, "-p", "5201"]);
        let mut s = Proc::spawn("iperf3", c, b.path(&format!("iperf3-{side}.log")));
        s.wait_for_output("Server listening", 10.0);
        procs.push(s);
        let mut c = ns.cmd(helper("tcp-echo").to_str().context("utf-8")?);
        c.arg(format!("{addr}:7001"));
        let mut e = Proc::spawn("tcp-echo", c, b.path(&format!("echo-{side}.log")));
        e.wait_for_output("listening", 10.0);
        procs.push(e);
        sidecars.push(
            node.interceptor()
                .mesh(&empty)
                .resolv(&resolv)
                .certs(&pod_certs)
                .args(["--inbound-ports", "5201,7001"])
                .env("RUST_LOG", "warn")
                .log(&format!("pod-{side}-ic"))
                .start(),
        );
    }
    let gw = gw_node.gateway(&mesh, &networks, "b", &format!("{GW_A}:15443"));
    let _vm = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .certs(&vm_certs)
        .arg("--mesh-networks")
        .arg(&networks)
        .args(["--network", "a"])
        .env("RUST_LOG", "warn")
        .log("vm-ic")
        .start();

    let modes = ["a direct (same network)", "b via gateway"];
    let rrl = helper("rrload");
    let mut gbps: [Vec<f64>; 2] = Default::default();
    let mut p50: [Vec<f64>; 2] = Default::default();
    let mut p99: [Vec<f64>; 2] = Default::default();
    for round in 0..ROUNDS {
        for (m, vip) in [VIP_A, VIP_B].iter().enumerate() {
            let g =
                iperf(vm.in_cgroup("iperf3", &["-c", vip, "-p", "5201", "-t", IPERF_SECS, "-J"]))?;
            let (l50, l99) = rr(vm.in_cgroup(
                rrl.to_str().context("utf-8")?,
                &[&format!("{vip}:7001"), RR_RATE, RR_SECS],
            ))?;
            eprintln!(
                "round {round} {}: {g:.2} Gbit/s, rr p50 {l50:.0} us p99 {l99:.0} us",
                modes[m]
            );
            gbps[m].push(g);
            p50[m].push(l50);
            p99[m].push(l99);
        }
    }
    let med = |v: &[Vec<f64>; 2], m: usize| median(v[m].clone());
    println!("\ngateway bench: median of {ROUNDS} rounds; iperf3 {IPERF_SECS}s one stream; request/response at {RR_RATE}/s over one connection; mTLS through the interceptor pair in both");
    println!(
        "{:<26} {:>10} {:>9} {:>9}",
        "path", "Gbit/s", "p50 us", "p99 us"
    );
    for (m, name) in modes.iter().enumerate() {
        println!(
            "{:<26} {:>10.2} {:>9.0} {:>9.0}",
            name,
            med(&gbps, m),
            med(&p50, m),
            med(&p99, m)
        );
    }
    let cost = 1.0 - med(&gbps, 1) / med(&gbps, 0);
    let added = med(&p50, 1) - med(&p50, 0);
    println!("gateway hop: throughput cost {:.1} % (goal <= 10 %), p50 added {added:.0} us (goal <= 100 us), p99 added {:.0} us", cost * 100.0, med(&p99, 1) - med(&p99, 0));
    let json = serde_json::json!({
        "modes": modes,
        "gbps": [med(&gbps, 0), med(&gbps, 1)],
        "p50_us": [med(&p50, 0), med(&p50, 1)],
        "p99_us": [med(&p99, 0), med(&p99, 1)],
    });
    std::fs::write(
        out.join("gateway.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    drop(gw);
    Ok(())
}
