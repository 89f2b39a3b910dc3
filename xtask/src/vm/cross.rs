//! The demo story on four guests, each a VM of its own under systemd with the package
//! installed: a client VM in network A whose app reaches `product` on a pod VM in its own
//! network directly, and `reviews` on a pod VM in network B through a gateway VM running
//! `interceptor gateway`; the pods' daemons terminate mTLS (STRICT) for their apps. Networks A
//! and B are QEMU socket LANs on loopback multicast: the guests' traffic crosses real virtio
//! NICs and never reaches the host's network.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};

use super::guest::{self, Guest, Lan, Spec};
use super::image;
use super::peer::{Mesh, TRUST_DOMAIN};
use super::Release;

const POD_A: &str = "10.10.0.2";
const GW_A: &str = "10.10.0.3";
const POD_B: &str = "10.20.0.2";
const PORT: u16 = 8080;

fn mesh_yaml() -> String {
    let service = |name: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  hosts: [{name}.default.svc.cluster.local]\n  ports: [{{number: {PORT}, name: tcp, protocol: TCP}}]\n\
             \x20 resolution: STATIC\n  workloadSelector: {{labels: {{app: {name}}}}}\n"
        )
    };
    let pod = |name: &str, addr: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}-pod, namespace: default}}\n\
             spec:\n  address: {addr}\n  labels: {{app: {name}, security.istio.io/tlsMode: istio}}\n  serviceAccount: {name}\n"
        )
    };
    [
        service("product"),
        service("reviews"),
        pod("product", POD_A),
        pod("reviews", POD_B),
    ]
    .concat()
}

fn networks_yaml() -> String {
    format!(
        "networks:\n  network-a:\n    endpoints: [{{fromCidr: 10.10.0.0/24}}]\n  network-b:\n    \
         endpoints: [{{fromCidr: 10.20.0.0/24}}]\n    gateways: [{{address: {GW_A}, port: 15443}}]\n"
    )
}

/// Puts the package, the certificates of `sa` and the config on a guest, and installs.
fn install(g: &Guest, deb: &Path, mesh: &Mesh, sa: &str, config: &str) -> anyhow::Result<()> {
    g.put(deb, "/root/interceptor.deb")?;
    g.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/interceptor.deb >/root/apt.log 2>&1 || { cat /root/apt.log; exit 1; }")?;
    let certs = mesh.certs(sa);
    g.sh("mkdir -p /etc/certs")?;
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        g.put(&certs.join(f), &format!("/etc/certs/{f}"))?;
    }
    g.sh("chmod 600 /etc/certs/key.pem")?;
    g.write("/etc/interceptor/mesh/mesh.yaml", &mesh_yaml())?;
    g.write("/etc/interceptor/networks.yaml", &networks_yaml())?;
    g.write("/etc/interceptor/config.yaml", config)
}

/// A pod VM: the app (an echo server) behind the daemon's inbound mTLS, STRICT.
fn pod(g: &Guest, deb: &Path, mesh: &Mesh, sa: &str) -> anyhow::Result<()> {
    install(
        g,
        deb,
        mesh,
        sa,
        &format!(
            "mesh:\n  - /etc/interceptor/mesh\ncerts: /etc/certs\nmtls-mode: strict\n\
             inbound-ports: \"{PORT}\"\n"
        ),
    )?;
    g.sh(&format!(
        "systemd-run --unit app-echo socat TCP-LISTEN:{PORT},fork,reuseaddr EXEC:cat && \
         systemctl enable --now interceptor"
    ))?;
    Ok(())
}

pub fn run(release: Release, deb: &Path) -> anyhow::Result<String> {
    let image = image::ensure(release)?;
    let accel = guest::accel(&image)?;
    let dir = image::vm_dir().join("run").join("cross");
    let mesh = Mesh::new(&dir.join("mesh"))?;
    // Two multicast groups on loopback: the two networks.
    let (lan_a, lan_b) = (guest::free_port()?, guest::free_port()?);
    let lans = |addrs: &[(u16, &str)]| -> Vec<Lan> {
        addrs
            .iter()
            .map(|(group_port, addr)| Lan {
                group_port: *group_port,
                addr: format!("{addr}/24"),
            })
            .collect()
    };
    let specs = [
        ("client", lans(&[(lan_a, "10.10.0.1")])),
        ("pod-a", lans(&[(lan_a, POD_A)])),
        ("gw", lans(&[(lan_a, GW_A), (lan_b, "10.20.0.3")])),
        ("pod-b", lans(&[(lan_b, POD_B)])),
    ];
    let started = Instant::now();
    // Spawned together, waited for after: four TCG guests on two cores take little longer
    // than one.
    let mut guests = Vec::new();
    let specs: Vec<Spec> = specs
        .into_iter()
        .map(|(name, lans)| Spec {
            name,
            image: &image,
            memory_mb: 768,
            forwards: Vec::new(),
            hostfwds: Vec::new(),
            lans,
        })
        .collect();
    for spec in &specs {
        guests.push(Guest::spawn(spec, accel, &dir)?);
    }
    for (g, spec) in guests.iter_mut().zip(&specs) {
        g.ready(spec)?;
    }
    let boot = started.elapsed();
    let [client, pod_a, gw, pod_b] = &guests[..] else {
        bail!("four guests");
    };
    eprintln!("vm: cross: 4 guests up in {:.0} s", boot.as_secs_f64());
    pod(pod_a, deb, &mesh, "product")?;
    pod(pod_b, deb, &mesh, "reviews")?;
    install(
        gw,
        deb,
        &mesh,
        "gateway",
        "mesh:\n  - /etc/interceptor/mesh\n",
    )?;
    gw.sh(&format!(
        "systemd-run --unit interceptor-gateway /usr/bin/interceptor gateway \
         --mesh /etc/interceptor/mesh --mesh-networks /etc/interceptor/networks.yaml \
         --network network-b --listen {GW_A}:15443 && \
         for i in $(seq 100); do ss -ltn | grep -q '{GW_A}:15443' && exit 0; sleep 0.2; done; \
         journalctl -u interceptor-gateway --no-pager -o cat; exit 1"
    ))
    .context("the gateway VM's interceptor gateway")?;
    install(
        client,
        deb,
        &mesh,
        "vm",
        "mesh:\n  - /etc/interceptor/mesh\nmesh-networks: /etc/interceptor/networks.yaml\n\
         network: network-a\ncerts: /etc/certs\n",
    )?;
    client.sh("systemctl enable --now interceptor")?;
    let mut lines = Vec::new();
    for (service, what) in [("product", "direct"), ("reviews", "via the gateway VM")] {
        let line = format!("hello-{service}");
        let out = client.sh(&format!(
            "(echo {line}; sleep 3) | timeout 20 socat - TCP:{service}.default.svc.cluster.local:{PORT} 2>&1; true"
        ))?;
        if !out.contains(&line) {
            bail!(
                "client VM → {service} ({what}) got {out:?}; client journal:\n{}",
                client.sh("journalctl -u interceptor --no-pager -n 30 -o cat")?
            );
        }
        lines.push(format!("{service} {what}: echoed"));
    }
    // The pod in network B saw the client VM's own identity: the gateway never decrypted.
    let journal = pod_b.sh("journalctl -u interceptor --no-pager -o cat")?;
    let vm_id = format!("{TRUST_DOMAIN}/vm");
    if !journal
        .lines()
        .any(|l| l.contains("inbound connection") && l.contains(&vm_id))
    {
        bail!("pod-b's daemon logged no inbound connection from {vm_id}:\n{journal}");
    }
    let gw_log = gw.sh("journalctl -u interceptor-gateway --no-pager -o cat")?;
    if !gw_log.contains("gateway connection") {
        bail!("the gateway VM logged no routed connection:\n{gw_log}");
    }
    Ok(format!(
        "4 guests up in {:.0} s; {}; pod-b saw {vm_id} (the gateway routed by SNI, never decrypted); all in {:.0} s",
        boot.as_secs_f64(),
        lines.join(", "),
        started.elapsed().as_secs_f64()
    ))
}
