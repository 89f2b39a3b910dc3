//! `cargo xtask bench xds`: a control plane pushes 10 000 services with 50 000 endpoints to a VM
//! (the test control plane of the scenario tests, behaving as istiod): how long from a decoded
//! response to its table in force, per type; the daemon's resident size after it; how long one
//! endpoint change then takes. Decoding the outer responses (prost, the resources stay bytes)
//! is timed apart, in this process; decoding each resource is part of applying it.

use std::path::Path;

use interceptor_tests::bundle::{write_bundle, Spec};
use interceptor_tests::certs::{Ca, Key};
use interceptor_tests::envoy::{ads_sidecar_config, envoy_bin, Envoy};
use interceptor_tests::istiod::{
    decode_seconds, encoded_sync, ControlPlane, Endpoint, Mesh, Service,
};
use interceptor_tests::istiod_sds::Secrets;
use interceptor_tests::{wait_for, Topology};

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 5;
/// One service in this many has a DestinationRule (subsets v1, v2) and a VirtualService
/// splitting its TCP 90/10 between them.
const ROUTED_EVERY: usize = 10;

/// The DestinationRule and VirtualService of service `i`, with `v1`% to v1.
fn intent(i: usize, v1: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: s{i}, namespace: bench}}
spec:
  host: s{i}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: s{i}, namespace: bench}}
spec:
  hosts: [s{i}]
  tcp:
  - route:
    - {{destination: {{host: s{i}, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: s{i}, subset: v2}}, weight: {}}}
---
",
        100 - v1
    )
}

fn mesh() -> Mesh {
    let services = (0..SERVICES)
        .map(|i| {
            let vip = format!("240.240.{}.{}", i / 250, i % 250 + 1);
            let mut s = Service::new(&format!("s{i}.bench.svc.cluster.local"), &vip, 8080);
            s.sans = vec![format!("spiffe://cluster.local/ns/bench/sa/s{i}")];
            s.endpoints = (0..ENDPOINTS_PER_SERVICE)
                .map(|e| {
                    let mut ep =
                        Endpoint::new(&format!("10.{}.{}.{}", 100 + e, i / 250, i % 250 + 1), 8080);
                    let version = if e % 2 == 0 { "v1" } else { "v2" };
                    ep.labels.insert("version".into(), version.into());
                    ep
                })
                .collect();
            s
        })
        .collect();
    Mesh {
        services,
        traffic: (0..SERVICES)
            .step_by(ROUTED_EVERY)
            .map(|i| intent(i, 90))
            .collect(),
        ..Default::default()
    }
}

/// User plus system CPU seconds the process has used.
fn cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the command); 100 ticks a second.
    (ticks(11) + ticks(12)) / 100.0
}

fn envoy_version() -> String {
    std::process::Command::new(envoy_bin())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            // "…/envoy  version: HASH/1.40.0/Clean/RELEASE/BoringSSL"
            let after = text.split("version:").nth(1)?;
            after.split('/').nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| "(unknown version)".into())
}

fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let t = Topology::new()
        .network("a")
        .node("vm", &["a"])
        .node("istiod", &["a"])
        .node("envoy", &["a"])
        .node("istiod2", &["a"])
        .build();
    let ca = Ca::new("bench root");
    let istiod = t.node("istiod").ip("a").to_string();
    // The VM joins an empty mesh, then the whole mesh arrives in one push on the live stream.
    let cp = ControlPlane::start(
        &t.node("istiod").ns.handle(),
        format!("{istiod}:15012").parse()?,
        &ca,
        "bench-token",
        Mesh::default(),
    );
    let mut spec = Spec::new("bench", "vm", &istiod, &ca.pem());
    spec.token = "bench-token".into();
    let root = write_bundle(&t.path("vm-root"), &spec);
    ca.issue(&root.join("etc/certs"), &spec.identity(), Key::Ecdsa);
    let ic = t
        .node("vm")
        .interceptor()
        .args(["--control-plane", "istiod", "--istio-dir"])
        .arg(&root)
        .env("RUST_LOG", "warn")
        .start();
    let pid = ic.proc.pid();
    // Envoy, istio-proxy's data plane, takes the same push as a sidecar would (CDS, EDS, LDS;
    // it has no NDS): the peer these figures compare with.
    // Its own control plane (the same code and mesh), pushed once ours is measured: the two
    // do not share the two cores while measured.
    let istiod2 = t.node("istiod2").ip("a").to_string();
    let cp2 = ControlPlane::start(
        &t.node("istiod2").ns.handle(),
        format!("{istiod2}:15012").parse()?,
        &ca,
        "bench-token",
        Mesh::default(),
    );
    let envoy_certs = t.path("envoy-certs");
    ca.issue(
        &envoy_certs,
        "spiffe://cluster.local/ns/bench/sa/envoy",
        Key::Ecdsa,
    );
    cp2.serve_secrets(Secrets::from_dir(&envoy_certs));
    let envoy_ip = t.node("envoy").ip("a").to_string();
    let envoy = Envoy::start_logging(
        t.node("envoy"),
        "envoy-xds",
        &ads_sidecar_config(
            &envoy_certs,
            &format!("{istiod2}:15012"),
            &format!("sidecar~{envoy_ip}~envoy-bench.bench~bench.svc.cluster.local"),
            15900,
        ),
        15900,
        "error",
    );
    let envoy_pid = envoy.proc.pid();
    let ignored = envoy.stat("cluster_manager.active_clusters");
    let rss_empty = rss_mib(pid);
    let envoy_rss_empty = rss_mib(envoy_pid);
    let (cpu0, envoy_cpu0) = (cpu_s(pid), cpu_s(envoy_pid));
    let status = |ic: &interceptor_tests::Interceptor| ic.json("/status");
    let acks =
        |s: &serde_json::Value, ty: &str| s["istiod"]["types"][ty]["acks"].as_u64().unwrap_or(0);
    let before = status(&ic);
    let eds_acks = acks(&before, "endpoints");
    let lds_acks = acks(&before, "listeners");

    let pushed = std::time::Instant::now();
    cp.push(mesh());
    let in_force = wait_for(60.0, || {
        let s = status(&ic);
        (s["table"]["services"].as_u64() == Some(SERVICES as u64)
            && acks(&s, "endpoints") > eds_acks
            && acks(&s, "listeners") > lds_acks)
            .then_some(())
    });
    anyhow::ensure!(in_force.is_some(), "the push never came into force");
    let wall_s = pushed.elapsed().as_secs_f64();
    // The kernel's (VIP, port) map follows the table asynchronously.
    let vips_s = wait_for(30.0, || {
        (status(&ic)["captured_vips"].as_u64().unwrap_or(0) as usize >= SERVICES).then_some(())
    })
    .map(|()| pushed.elapsed().as_secs_f64());
    let s = status(&ic);
    let apply = |ty: &str| {
        s["istiod"]["types"][ty]["last_apply_ms"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let (cds, eds, nds) = (apply("clusters"), apply("endpoints"), apply("names"));
    let lds = apply("listeners");
    let rss = rss_mib(pid);
    // After the table was persisted (1 s after the push) and the allocator settled.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let rss_settled = rss_mib(pid);
    let cpu = cpu_s(pid) - cpu0;

    let envoy_pushed = std::time::Instant::now();
    cp2.push(mesh());
    let envoy_in_force = wait_for(120.0, || {
        (envoy.stat("cluster_manager.active_clusters")
            >= ignored + (SERVICES + 2 * SERVICES / ROUTED_EVERY) as u64
            && envoy.stat("cluster_manager.warming_clusters") == 0
            && envoy.stat("listener_manager.total_listeners_active") > SERVICES as u64)
            .then_some(())
    });
    anyhow::ensure!(
        envoy_in_force.is_some(),
        "Envoy never had the pushed clusters active: {} active, {} warming, CDS {} rejected, EDS {} rejected\n{}",
        envoy.stat("cluster_manager.active_clusters"),
        envoy.stat("cluster_manager.warming_clusters"),
        envoy.stat("cluster_manager.cds.update_rejected"),
        envoy.stat("cluster.xds-grpc.upstream_cx_total"),
        envoy.log().lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    let envoy_wall_s = envoy_pushed.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let envoy_rss = rss_mib(envoy_pid);
    let envoy_cpu = cpu_s(envoy_pid) - envoy_cpu0;

    // One endpoint changes weight: applied when our own ACK count for endpoints moves.
    let eds_acks = acks(&status(&ic), "endpoints");
    cp.update(|m| m.services[SERVICES / 2].endpoints[0].weight = 7);
    anyhow::ensure!(
        wait_for(10.0, || (acks(&status(&ic), "endpoints") > eds_acks)
            .then_some(()))
        .is_some(),
        "the endpoint change was never applied"
    );
    let one = status(&ic)["istiod"]["types"]["endpoints"]["last_apply_ms"]
        .as_f64()
        .unwrap_or(0.0);

    // One VirtualService's weights change (90/10 to 50/50): applied when the listeners' ACK
    // count moves, in force in the table that same moment.
    let lds_acks = acks(&status(&ic), "listeners");
    let shifted = SERVICES / 2 / ROUTED_EVERY * ROUTED_EVERY;
    cp.update(|m| {
        m.traffic = (0..SERVICES)
            .step_by(ROUTED_EVERY)
            .map(|i| intent(i, if i == shifted { 50 } else { 90 }))
            .collect()
    });
    anyhow::ensure!(
        wait_for(10.0, || (acks(&status(&ic), "listeners") > lds_acks)
            .then_some(()))
        .is_some(),
        "the VirtualService change was never applied"
    );
    let one_route = status(&ic)["istiod"]["types"]["listeners"]["last_apply_ms"]
        .as_f64()
        .unwrap_or(0.0);

    let encode_started = std::time::Instant::now();
    let sizes = encoded_sync(mesh());
    let encode_s = encode_started.elapsed().as_secs_f64();
    let decode: Vec<(String, usize, f64)> = sizes
        .iter()
        .map(|(ty, bytes)| (ty.clone(), bytes.len(), decode_seconds(bytes, 3) * 1000.0))
        .collect();

    println!(
        "\nxds bench: one push of {SERVICES} services, {} endpoints to a VM on the live stream (delta xDS over TLS)",
        SERVICES * ENDPOINTS_PER_SERVICE
    );
    println!(
        "{:<10} {:>12} {:>22} {:>26}",
        "type", "bytes", "outer decode ms", "arrival to in force ms"
    );
    for ((ty, bytes, dec), app) in decode.iter().zip([cds, eds, nds]) {
        println!("{ty:<10} {bytes:>12} {dec:>22.1} {app:>26.1}");
    }
    println!(
        "CDS+NDS arrive together and come into force together; EDS follows its subscription. \
         Applying: {:.0} ms (CDS/NDS batch) + {eds:.0} ms (EDS) (goal < 100 ms); push to table in force, \
         wall clock with the control plane's encoding ({encode_s:.2} s to build and encode the three responses once): {wall_s:.2} s; {SERVICES} (VIP, port) entries in the kernel after {}",
        cds.max(nds),
        vips_s.map_or("never (30 s)".to_string(), |s| format!("{s:.2} s"))
    );
    println!(
        "RSS: {rss_empty:.1} MiB with an empty table, {rss:.1} MiB after the push, {rss_settled:.1} MiB settled \
         (goal < 64 MiB)"
    );
    println!("one endpoint change: {one:.2} ms (goal < 5 ms); one VirtualService weight change: {one_route:.2} ms");
    println!(
        "intent: {} services of {SERVICES} with a DestinationRule (2 subsets) and a weighted VirtualService: {} subset clusters, {SERVICES} listeners (LDS applied in {lds:.0} ms)",
        SERVICES / ROUTED_EVERY,
        2 * SERVICES / ROUTED_EVERY
    );
    println!(
        "side by side with Envoy {} (the same push from the same control plane code, one after the other; Envoy takes CDS+EDS+LDS):",
        envoy_version()
    );
    println!(
        "  CPU for the push: interceptor {cpu:.2} s, Envoy {envoy_cpu:.2} s ({:.1}x); push to in force: interceptor {wall_s:.2} s, Envoy {envoy_wall_s:.2} s",
        envoy_cpu / cpu.max(1e-3)
    );
    println!(
        "  RSS: interceptor {rss_empty:.1} -> {rss_settled:.1} MiB (+{:.1}), Envoy {envoy_rss_empty:.1} -> {envoy_rss:.1} MiB (+{:.1}; {:.1}x the growth)",
        rss_settled - rss_empty,
        envoy_rss - envoy_rss_empty,
        (envoy_rss - envoy_rss_empty) / (rss_settled - rss_empty).max(0.1)
    );
    let json = serde_json::json!({
        "services": SERVICES, "endpoints": SERVICES * ENDPOINTS_PER_SERVICE,
        "apply_ms": {"clusters": cds, "endpoints": eds, "names": nds, "listeners": lds},
        "one_route_change_ms": one_route,
        "routed_services": SERVICES / ROUTED_EVERY,
        "outer_decode_ms": decode.iter().map(|d| (d.0.clone(), d.2)).collect::<std::collections::BTreeMap<_, _>>(),
        "bytes": decode.iter().map(|d| (d.0.clone(), d.1)).collect::<std::collections::BTreeMap<_, _>>(),
        "rss_mib": {"empty": rss_empty, "after_push": rss, "settled": rss_settled},
        "one_endpoint_change_ms": one, "push_wall_s": wall_s, "vips_in_kernel_s": vips_s,
        "cpu_s": cpu,
        "envoy": {"cpu_s": envoy_cpu, "push_wall_s": envoy_wall_s,
                  "rss_mib": {"empty": envoy_rss_empty, "after_push": envoy_rss}},
    });
    std::fs::write(out.join("xds.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
