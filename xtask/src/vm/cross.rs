//! The demo story on four guests, each a VM of its own under systemd with the package
//! installed: a client VM in network A whose app reaches `product` on a pod VM in its own
//! network directly, and `reviews` on a pod VM in network B through a gateway VM running
//! `interceptor gateway`; the pods' daemons terminate mTLS (STRICT) for their apps. The same
//! pods also serve a service each that Istio marks HBONE (`details` on the pod in A: one
//! CONNECT stream; `ratings` on the pod in B: double HBONE through the gateway's :15008).
//! Networks A and B are QEMU socket LANs on loopback multicast: the guests' traffic crosses
//! real virtio NICs and never reaches the host's network.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};

use super::guest::{self, Forward, Guest, Lan, Spec};
use super::image::{self, Image};
use super::peer::{Mesh, TRUST_DOMAIN};
use super::scenario::{put_bundle, Source, ISTIOD_ADDR, ISTIOD_PORT};
use super::Release;

const POD_A: &str = "10.10.0.2";
const GW_A: &str = "10.10.0.3";
const POD_B: &str = "10.20.0.2";
const PORT: u16 = 8080;
/// The HBONE services' port (`details`, `ratings`).
const HBONE_PORT: u16 = 9080;

fn mesh_yaml() -> String {
    let service = |name: &str, port: u16| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  hosts: [{name}.default.svc.cluster.local]\n  ports: [{{number: {port}, name: tcp, protocol: TCP}}]\n\
             \x20 resolution: STATIC\n  workloadSelector: {{labels: {{app: {name}}}}}\n"
        )
    };
    // `sa` is the pod VM's identity: a VM has one certificate whichever service it serves.
    // A sidecar's workload is labelled tlsMode istio; an ambient one only speaks HBONE (a
    // remote one is reached by double HBONE, not through the gateway's :15443).
    let pod = |name: &str, addr: &str, sa: &str, speaks: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}-pod, namespace: default}}\n\
             spec:\n  address: {addr}\n  labels: {{app: {name}, {speaks}}}\n  serviceAccount: {sa}\n"
        )
    };
    let sidecar = "security.istio.io/tlsMode: istio";
    let hbone = "networking.istio.io/tunnel: http";
    [
        service("product", PORT),
        service("reviews", PORT),
        service("details", HBONE_PORT),
        service("ratings", HBONE_PORT),
        pod("product", POD_A, "product", sidecar),
        pod("reviews", POD_B, "reviews", sidecar),
        pod("details", POD_A, "product", hbone),
        pod("ratings", POD_B, "reviews", hbone),
    ]
    .concat()
}

fn networks_yaml() -> String {
    format!(
        "networks:\n  network-a:\n    endpoints: [{{fromCidr: 10.10.0.0/24}}]\n  network-b:\n    \
         endpoints: [{{fromCidr: 10.20.0.0/24}}]\n    gateways: [{{address: {GW_A}, port: 15443}}]\n"
    )
}

/// Puts the package on a guest and installs it (nothing starts).
fn install_deb(g: &Guest, deb: &Path) -> anyhow::Result<()> {
    g.put(deb, "/root/interceptor.deb")?;
    g.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/interceptor.deb >/root/apt.log 2>&1 || { cat /root/apt.log; exit 1; }")?;
    Ok(())
}

/// The mesh from files: the package, the certificates of `sa`, the mesh and networks files and
/// the config.
fn install(g: &Guest, deb: &Path, mesh: &Mesh, sa: &str, config: &str) -> anyhow::Result<()> {
    install_deb(g, deb)?;
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

/// The bootstrap token of the VM of service account `sa`.
fn token(sa: &str) -> String {
    format!("vm-test-token-{sa}")
}

/// The mesh from istiod: the package and the Istio VM bundle of `sa` in `network` (its own
/// token: the Istio CA issues its identity), the VM's inbound ports, and `config` after the
/// istiod lines.
fn join(
    g: &Guest,
    deb: &Path,
    mesh: &Mesh,
    (sa, network): (&str, &str),
    inbound_ports: &str,
    config: &str,
) -> anyhow::Result<()> {
    use interceptor_tests::bundle::Spec as Bundle;
    install_deb(g, deb)?;
    let mut spec = Bundle::new("default", sa, ISTIOD_ADDR, &mesh.ca.pem());
    spec.token = token(sa);
    spec.network = network.into();
    spec.workload_name = sa.into();
    spec.labels = [("app".to_string(), sa.to_string())].into();
    spec.inbound_ports = inbound_ports.into();
    put_bundle(g, &mesh.dir.join(format!("bundle-{sa}")), &spec)?;
    g.write(
        "/etc/interceptor/config.yaml",
        &format!("control-plane: istiod\nistio-dir: /\n{config}"),
    )
}

/// The control plane's mesh: the files' services but `ratings` (istiod gives a sidecar's
/// remote-network endpoints as the gateway's address, split horizon; double HBONE is not
/// modelled), STRICT mesh-wide (istiod's virtualInbound for the pods' ports), network B behind
/// the gateway VM.
fn istiod_mesh() -> interceptor_tests::istiod::Mesh {
    use interceptor_tests::istiod::{Endpoint, Mesh as CpMesh, Service};
    let service = |name: &str, vip: &str, port: u16, (pod, sa, network): (&str, &str, &str)| {
        let mut svc = Service::new(&format!("{name}.default.svc.cluster.local"), vip, port);
        svc.sans = vec![format!("{TRUST_DOMAIN}/{sa}")];
        let mut e = Endpoint::new(pod, port);
        e.network = network.into();
        e.hbone = name == "details";
        svc.endpoints = vec![e];
        svc
    };
    CpMesh {
        services: vec![
            service("product", "240.240.1.1", PORT, (POD_A, "product", "network-a")),
            service("reviews", "240.240.1.2", PORT, (POD_B, "reviews", "network-b")),
            service("details", "240.240.1.3", HBONE_PORT, (POD_A, "product", "network-a")),
        ],
        gateways: [(
            "network-b".to_string(),
            std::net::SocketAddr::from(([10, 10, 0, 3], 15443)),
        )]
        .into(),
        traffic: "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                  metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
            .into(),
        inbound: Some(interceptor_tests::istiod_traffic::InboundWorkload {
            namespace: "default".into(),
            labels: Default::default(),
            ports: vec![PORT, HBONE_PORT],
            http_ports: vec![],
        }),
        ..Default::default()
    }
}

/// The test control plane on the host's loopback, each joining VM's token standing for its
/// own service account.
fn control_plane(
    mesh: &Mesh,
    port: u16,
) -> anyhow::Result<interceptor_tests::istiod::ControlPlane> {
    let cp = interceptor_tests::istiod::ControlPlane::start_here(
        ([127, 0, 0, 1], port).into(),
        &mesh.ca,
        &token("vm"),
        istiod_mesh(),
    );
    let state = cp.ca_state();
    *state
        .token_identity
        .lock()
        .map_err(|_| anyhow::anyhow!("CA state poisoned"))? = format!("{TRUST_DOMAIN}/vm");
    let mut more = state
        .more_tokens
        .lock()
        .map_err(|_| anyhow::anyhow!("CA state poisoned"))?;
    for sa in ["product", "reviews"] {
        more.insert(token(sa), format!("{TRUST_DOMAIN}/{sa}"));
    }
    drop(more);
    Ok(cp)
}

/// A pod VM: the app (echo servers on both ports) behind the daemon's inbound mTLS, STRICT,
/// from files or from istiod.
fn pod(
    g: &Guest,
    deb: &Path,
    mesh: &Mesh,
    (sa, network): (&str, &str),
    source: Source,
) -> anyhow::Result<()> {
    let ports = format!("{PORT},{HBONE_PORT}");
    match source {
        Source::Files => install(
            g,
            deb,
            mesh,
            sa,
            &format!(
                "mesh:\n  - /etc/interceptor/mesh\ncerts: /etc/certs\nmtls-mode: strict\n\
                 inbound-ports: \"{ports}\"\n"
            ),
        )?,
        Source::Istiod => join(g, deb, mesh, (sa, network), &ports, "")?,
    }
    g.sh(&format!(
        "systemd-run --unit app-echo socat TCP-LISTEN:{PORT},fork,reuseaddr EXEC:cat && \
         systemd-run --unit app-echo-hbone socat TCP-LISTEN:{HBONE_PORT},fork,reuseaddr EXEC:cat && \
         systemctl enable --now interceptor"
    ))?;
    Ok(())
}

/// The gateway VM: `interceptor gateway` for network B from files (it has no istiod mode),
/// with its own certificate for double HBONE's outer tunnels.
fn gateway(g: &Guest, deb: &Path, mesh: &Mesh) -> anyhow::Result<()> {
    install(
        g,
        deb,
        mesh,
        "gateway",
        "mesh:\n  - /etc/interceptor/mesh\n",
    )?;
    g.sh(&format!(
        "systemd-run --unit interceptor-gateway /usr/bin/interceptor gateway \
         --mesh /etc/interceptor/mesh --mesh-networks /etc/interceptor/networks.yaml \
         --network network-b --listen {GW_A}:15443 --certs /etc/certs --hbone-listen {GW_A}:15008 && \
         for i in $(seq 100); do ss -ltn | grep -q '{GW_A}:15443' && ss -ltn | grep -q '{GW_A}:15008' && exit 0; sleep 0.2; done; \
         journalctl -u interceptor-gateway --no-pager -o cat; exit 1"
    ))
    .context("the gateway VM's interceptor gateway")?;
    Ok(())
}

/// Boots the four guests side by side; `istiod` is the host port the three daemons' guests
/// reach istiod at (a guestfwd), if the mesh comes from it.
fn boot(
    image: &Image,
    accel: &'static str,
    dir: &Path,
    istiod: Option<u16>,
) -> anyhow::Result<Vec<Guest>> {
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
    let specs: Vec<Spec> = specs
        .into_iter()
        .map(|(name, lans)| Spec {
            name,
            image,
            memory_mb: 768,
            forwards: istiod
                .filter(|_| name != "gw")
                .map(|host_port| Forward {
                    guest_addr: format!("{ISTIOD_ADDR}:{ISTIOD_PORT}"),
                    host_port,
                })
                .into_iter()
                .collect(),
            hostfwds: Vec::new(),
            lans,
        })
        .collect();
    // Spawned together, waited for after: four TCG guests on two cores take little longer
    // than one.
    let mut guests = Vec::new();
    for spec in &specs {
        guests.push(Guest::spawn(spec, accel, dir)?);
    }
    for (g, spec) in guests.iter_mut().zip(&specs) {
        g.ready(spec)?;
    }
    Ok(guests)
}

pub fn run(release: Release, source: Source, deb: &Path) -> anyhow::Result<String> {
    let image = image::ensure(release)?;
    let accel = guest::accel(&image)?;
    let dir = image::vm_dir()
        .join("run")
        .join(format!("cross-{}", source.name()));
    let mesh = Mesh::new(&dir.join("mesh"))?;
    let istiod_port = match source {
        Source::Files => None,
        Source::Istiod => Some(guest::free_port()?),
    };
    let _cp = istiod_port
        .map(|port| control_plane(&mesh, port))
        .transpose()?;
    let started = Instant::now();
    let guests = boot(&image, accel, &dir, istiod_port)?;
    let boot = started.elapsed();
    let [client, pod_a, gw, pod_b] = &guests[..] else {
        bail!("four guests");
    };
    eprintln!(
        "vm: cross ({}): 4 guests up in {:.0} s",
        source.name(),
        boot.as_secs_f64()
    );
    pod(pod_a, deb, &mesh, ("product", "network-a"), source)?;
    pod(pod_b, deb, &mesh, ("reviews", "network-b"), source)?;
    gateway(gw, deb, &mesh)?;
    let gateway_identity = format!("gateway-identity: {TRUST_DOMAIN}/gateway\n");
    match source {
        Source::Files => install(
            client,
            deb,
            &mesh,
            "vm",
            &format!(
                "mesh:\n  - /etc/interceptor/mesh\nmesh-networks: /etc/interceptor/networks.yaml\n\
                 network: network-a\ncerts: /etc/certs\n{gateway_identity}"
            ),
        )?,
        Source::Istiod => join(
            client,
            deb,
            &mesh,
            ("vm", "network-a"),
            "",
            &gateway_identity,
        )?,
    }
    client.sh("systemctl enable --now interceptor")?;
    let mut lines = Vec::new();
    let mut services = vec![
        ("product", PORT, "direct"),
        ("reviews", PORT, "via the gateway VM"),
        ("details", HBONE_PORT, "HBONE direct"),
    ];
    if source == Source::Files {
        services.push(("ratings", HBONE_PORT, "double HBONE via the gateway VM"));
    }
    for (service, port, what) in services {
        let line = format!("hello-{service}");
        let out = client.sh(&format!(
            "(echo {line}; sleep 3) | timeout 20 socat - TCP:{service}.default.svc.cluster.local:{port} 2>&1; true"
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
    // HBONE crossed the real NICs: each pod's daemon answered CONNECT streams, and (from
    // files) the gateway terminated the outer tunnel of the double HBONE one.
    let mut counted = vec![
        (client, "the client VM", "outbound"),
        (pod_a, "pod-a", "inbound"),
    ];
    if source == Source::Files {
        counted.extend([
            (client, "the client VM", "double"),
            (pod_b, "pod-b", "inbound"),
            (gw, "the gateway VM", "gateway"),
        ]);
    }
    for (g, name, direction) in counted {
        let streams = counter(g, "interceptor_hbone_streams_total", direction)?;
        if streams < 1.0 {
            bail!("{name} counted no {direction} HBONE stream");
        }
        lines.push(format!("{name}: {streams} {direction} HBONE stream(s)"));
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

/// The sum of a counter's series with `direction="<direction>"`, read from the guest's admin
/// endpoint (the daemon's and the gateway's default, 127.0.0.1:15020).
fn counter(g: &Guest, name: &str, direction: &str) -> anyhow::Result<f64> {
    let text = g.sh("curl -sf http://127.0.0.1:15020/stats/prometheus")?;
    let label = format!("direction=\"{direction}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
