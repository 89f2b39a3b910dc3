//! `cargo xtask bench capture`: new connections per second and connect+first-byte latency for a
//! client in the VM, four ways against the same server in one run:
//! (a) direct, (b) eBPF capture into proxy::Outbound, (b') the same with `--local-hop sockmap`
//! (from a VM namespace of its own), (c) the same listener behind an iptables
//! REDIRECT rule (how Istio's sidecar and agent capture), (d) an Envoy sidecar (one worker)
//! behind the same kind of rule, passing the plaintext through as Istio's virtualOutbound does.
//! (c) and (d) run from a second VM namespace with its own link to the pod: its nat rules switch
//! on conntrack for the whole namespace, which a VM on eBPF capture does not pay, so a and b must
//! not share it. Each proxy's CPU per connection is printed next to its rate.

use std::path::Path;

use interceptor_tests::envoy::{self, Envoy};
use interceptor_tests::{interceptor_bin, sh, Interceptor, Topology};

use super::{cpu_secs, helper, loadgen, median, quiet, ratio_range, Load};

const ROUNDS: usize = 3;
const CPS_SECS: &str = "3";
const CPS_CONCURRENCY: &str = "4";
const LAT_SECS: &str = "2";

const MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: product, namespace: default}
spec:
  hosts: [product.default.svc.cluster.local]
  addresses: [240.240.7.7]
  ports: [{number: 8080, name: http}, {number: 5201, name: iperf}]
  resolution: STATIC
  endpoints: [{address: 10.77.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: routed, namespace: default}
spec:
  hosts: [routed.default.svc.cluster.local]
  addresses: [240.240.7.8]
  ports: [{number: 8080, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.77.0.2, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: routed, namespace: default}
spec:
  host: routed
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routed, namespace: default}
spec:
  hosts: [routed]
  tcp:
  - route:
    - {destination: {host: routed, subset: v1}, weight: 50}
    - {destination: {host: routed}, weight: 50}
"#;
const VIP: &str = "240.240.7.7:8080";
/// The same server behind a weighted VirtualService over a DestinationRule subset: what a
/// route costs per connection.
const ROUTED_VIP: &str = "240.240.7.8:8080";
/// The same VIP on another port, redirected to Envoy in the iptables namespace.
const ENVOY_VIP: &str = "240.240.7.7:8081";

pub fn run(out: &Path) -> anyhow::Result<()> {
    let t = Topology::new()
        .network("a")
        .network("c")
        .node("vm", &["a"])
        .node("pod", &["a", "c"])
        .node("vm2", &["c"])
        .node("vm3", &["a"])
        .build();
    let (vm, pod, vm2, vm3) = (t.node("vm"), t.node("pod"), t.node("vm2"), t.node("vm3"));
    // The pod's address on the second VM namespace's own link.
    let pod_from_vm2 = pod.ip("c");
    super::reuse_time_wait(&[&vm.ns, &pod.ns, &vm2.ns, &vm3.ns]);
    let mesh = t.write("mesh.yaml", MESH);
    let resolv = t.write("resolv.conf", "nameserver 10.77.0.53\n");
    let mesh_c = t.write("mesh-c.yaml", &MESH.replace("10.77.0.2", pod_from_vm2));
    let _server = pod.bench_http(&["10.77.0.2:8080", &format!("{pod_from_vm2}:8080")]);

    // (b): eBPF capture, the daemon in the cgroup as in production. Logs at warn: the bench
    // measures the data path, not the access log.
    let ebpf = vm
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .env("RUST_LOG", "warn")
        .log("ebpf")
        .start();
    // (b'): the same with the local hop on sockmap, from a VM namespace of its own.
    let sockmap = vm3
        .interceptor()
        .mesh(&mesh)
        .resolv(&resolv)
        .args(["--local-hop", "sockmap"])
        .env("RUST_LOG", "warn")
        .log("sockmap")
        .start();
    let mut iperf_srv = pod.ns.cmd("iperf3");
    iperf_srv.args(["-s", "--forceflush", "-B", "10.77.0.2", "-p", "5201"]);
    let mut iperf_srv = interceptor_tests::Proc::spawn("iperf3", iperf_srv, t.path("iperf3.log"));
    iperf_srv.wait_for_output("Server listening", 10.0);
    // (c): the same binary, no eBPF, behind iptables REDIRECT on another port.
    let mut ipt_cmd = vm2.ns.cmd(interceptor_bin().to_str().expect("utf-8"));
    ipt_cmd
        .args([
            "run",
            "--capture",
            "none",
            "--outbound-port",
            "15002",
            "--dns-port",
            "15054",
            "--mesh",
        ])
        .arg(&mesh_c)
        .arg("--resolv-conf")
        .arg(&resolv)
        .env("RUST_LOG", "warn");
    let ipt = Interceptor::start(
        ipt_cmd,
        t.path("iptables.log"),
        vm2.ns.handle(),
        "127.0.0.1:15020",
    );
    vm2.ns
        .ip(&["route", "add", "240.240.0.0/16", "dev", vm2.iface("c")]);
    // VIP:8080 to our listener (c), VIP:8081 to Envoy's (d), as Istio's nat OUTPUT rules do.
    for (dport, to) in [("8080", "15002"), ("8081", "15003")] {
        sh(vm2.ns.cmd("iptables").args([
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "240.240.7.7",
            "--dport",
            dport,
            "-j",
            "REDIRECT",
            "--to-ports",
            to,
        ]));
    }
    // (d): Envoy behind iptables, one worker as a sidecar on a small VM.
    let envoy = Envoy::start_logging(
        vm2,
        "envoy-passthrough",
        &quiet(envoy::redirect_passthrough_config(
            15003,
            &format!("{pod_from_vm2}:8080"),
            19002,
        )),
        19002,
        "error",
    );

    let lg = helper("loadgen");
    let lg = lg.to_str().expect("utf-8");
    let direct = "10.77.0.2:8080".to_string();
    // Where each client runs: 0 the vm, 1 the vm's captured cgroup, 2 the iptables namespace.
    let modes: [(&str, &str, u8); 6] = [
        ("a direct", &direct, 0),
        ("b eBPF", VIP, 1),
        ("b' +sockmap", VIP, 3),
        ("c iptables", VIP, 2),
        ("d Envoy+ipt", ENVOY_VIP, 2),
        ("b +VS route", ROUTED_VIP, 1),
    ];
    let pids = |mode: usize| -> Vec<i32> {
        match mode {
            1 | 5 => vec![ebpf.proc.pid()],
            2 => vec![sockmap.proc.pid()],
            3 => vec![ipt.proc.pid()],
            4 => vec![envoy.proc.pid()],
            _ => vec![],
        }
    };
    // Single-stream throughput through the local hop, a/b/b' only.
    let mut gbps: Vec<Vec<f64>> = vec![vec![]; 3];
    let mut cps: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    let mut p50: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    let mut p99: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    let mut cpu: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    for round in 0..ROUNDS {
        for (i, (name, addr, place)) in modes.iter().enumerate() {
            let run = |program: &str, args: &[&str]| match place {
                0 => vm.cmd(program, args),
                1 => vm.in_cgroup(program, args),
                3 => vm3.in_cgroup(program, args),
                _ => vm2.cmd(program, args),
            };
            let cmd = |secs: &str, conc: &str| run(lg, &[addr, secs, conc]);
            if i < 3 {
                let host = if i == 0 { "10.77.0.2" } else { "240.240.7.7" };
                let before = cpu_secs(&pids(i));
                let g = super::iperf(run("iperf3", &["-c", host, "-p", "5201", "-t", "3", "-J"]))?;
                let cpu_gb = (cpu_secs(&pids(i)) - before) / (g * 3.0 / 8.0);
                eprintln!("round {round} {name}: {g:.2} Gbit/s one stream ({cpu_gb:.2} CPU s/GB)");
                gbps[i].push(g);
            }
            let before = cpu_secs(&pids(i));
            let load: Load = loadgen(cmd(CPS_SECS, CPS_CONCURRENCY))?;
            let cpu_us =
                (cpu_secs(&pids(i)) - before) / (load.cps * CPS_SECS.parse::<f64>()?) * 1e6;
            let lat: Load = loadgen(cmd(LAT_SECS, "1"))?;
            anyhow::ensure!(
                load.errors == 0 && lat.errors == 0,
                "{name}: {} connection errors",
                load.errors + lat.errors
            );
            eprintln!(
                "round {round} {name}: {:.0} conn/s ({cpu_us:.0} CPU us/conn), p50 {:.0} us, p99 {:.0} us",
                load.cps, lat.p50_us, lat.p99_us
            );
            cpu[i].push(cpu_us);
            cps[i].push(load.cps);
            p50[i].push(lat.p50_us);
            p99[i].push(lat.p99_us);
        }
    }
    let m = |v: &Vec<Vec<f64>>| -> Vec<f64> { v.iter().map(|x| median(x.clone())).collect() };
    let ranges = (
        ratio_range(&cps[1], &cps[0]),
        ratio_range(&cps[1], &cps[3]),
        ratio_range(&cps[1], &cps[4]),
        ratio_range(&cps[5], &cps[1]),
    );
    let gbps = m(&gbps);
    let (cps, p50, p99, cpu) = (m(&cps), m(&p50), m(&p99), m(&cpu));
    println!("\ncapture bench: median of {ROUNDS} rounds; CPS at concurrency {CPS_CONCURRENCY}, latency at concurrency 1 (connect + first byte)");
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>12}",
        "mode", "conn/s", "p50 us", "p99 us", "CPU us/conn"
    );
    for (i, (name, _, _)) in modes.iter().enumerate() {
        println!(
            "{:<12} {:>10.0} {:>10.0} {:>10.0} {:>12.0}",
            name, cps[i], p50[i], p99[i], cpu[i]
        );
    }
    println!(
        "b/a CPS {:.2} {} (goal >= 0.55)   b/c CPS {:.2} {} (goal >= 1.5)   b/d CPS {:.2} {}   CPU/conn b/c {:.2} b/d {:.2}",
        cps[1] / cps[0],
        ranges.0,
        cps[1] / cps[3],
        ranges.1,
        cps[1] / cps[4],
        ranges.2,
        cpu[1] / cpu[3],
        cpu[1] / cpu[4],
    );
    println!(
        "local hop on sockmap (b'/b): conn/s {:.2}, CPU/conn {:.2}, one-stream Gbit/s {:.2} ({:.2} vs {:.2}; direct {:.2})",
        cps[2] / cps[1],
        cpu[2] / cpu[1],
        gbps[2] / gbps[1],
        gbps[2],
        gbps[1],
        gbps[0],
    );
    println!(
        "a weighted VirtualService over a DestinationRule subset (b+VS / b, same daemon): conn/s {:.3} {}, CPU/conn {:.3}, p50 {:.3} (goal: within 2 %)",
        cps[5] / cps[1],
        ranges.3,
        cpu[5] / cpu[1],
        p50[5] / p50[1],
    );
    println!(
        "b/c p50 {:.2}   b/a p50 {:.2}   b/c p99 {:.2}",
        p50[1] / p50[3],
        p50[1] / p50[0],
        p99[1] / p99[3]
    );
    let json = serde_json::json!({
        "modes": ["direct", "ebpf", "ebpf_sockmap", "iptables", "envoy_iptables", "ebpf_routed"], "cps": cps,
        "p50_us": p50, "p99_us": p99, "cpu_us_per_conn": cpu, "gbps_one_stream": gbps,
        "b_over_c_cps": cps[1] / cps[3], "b_over_a_cps": cps[1] / cps[0],
        "routed_over_b_cps": cps[5] / cps[1], "routed_over_b_cpu": cpu[5] / cpu[1],
    });
    std::fs::write(
        out.join("capture.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
