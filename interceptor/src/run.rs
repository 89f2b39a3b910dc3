//! The daemon: wires sources, capture and data paths together, and takes them down on signal.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::UdpSocket;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin;
use crate::capture::{self, Capture, OriginalDst};
use crate::config::{CaptureMode, GatewayArgs, Settings};
use crate::dns::{self, ResolvConf, Upstream};
use crate::identity::{self, FileProvider};
use crate::mesh::{self, FileSource, Store};
use crate::metrics::Metrics;
use crate::proxy::{self, AllowList, Gateway, Inbound, Outbound};

/// The mesh source for these settings.
pub fn file_source(s: &Settings) -> FileSource {
    let opts = mesh::Options {
        namespace: s.namespace.clone(),
        cluster_domain: s.cluster_domain.clone(),
    };
    let paths = if s.mesh_explicit || s.mesh.iter().any(|p| p.exists()) {
        s.mesh.clone()
    } else {
        vec![]
    };
    if paths.is_empty() {
        tracing::warn!(
            default = crate::config::DEFAULT_MESH_DIR,
            "no mesh files: starting with an empty mesh table"
        );
    }
    FileSource::new(paths, s.mesh_networks.clone(), opts)
}

/// Loads the first table or fails with every error found.
pub fn first_table(source: &FileSource) -> anyhow::Result<mesh::Table> {
    source.load().map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        anyhow::anyhow!("invalid mesh configuration:\n{}", list.join("\n"))
    })
}

fn bind_udp(addrs: &[SocketAddr]) -> anyhow::Result<Vec<UdpSocket>> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut out = Vec::new();
    for a in addrs {
        match dns::bind_udp(*a, workers) {
            Ok(s) => out.extend(s),
            Err(e) => tracing::warn!(addr = %a, error = %e, "DNS: cannot listen on UDP"),
        }
    }
    if out.is_empty() {
        bail!("DNS: no UDP listener could be bound on {addrs:?}");
    }
    Ok(out)
}

pub async fn run(s: Settings) -> anyhow::Result<()> {
    let source = file_source(&s);
    let store = Store::new(first_table(&source)?);
    let table = store.load();
    tracing::info!(
        services = table.services.len(),
        workloads = table.workloads.len(),
        names = table.names.len(),
        "mesh table loaded"
    );
    drop(table);

    let cgroup = match s.capture {
        CaptureMode::Ebpf => Some(capture::resolve_cgroup(s.cgroup.as_deref())?),
        CaptureMode::None => None,
    };
    let identity = identity::Store::new(None);
    let provider = match &s.certs {
        Some(dir) => {
            let p = FileProvider::new(dir.clone());
            let id = p.load().context("identity (--certs)")?;
            tracing::info!(spiffe = %id.spiffe, expires_in_s = id.expires_in().as_secs(), "identity loaded");
            identity.set(id);
            Some(p)
        }
        None => {
            tracing::warn!(
                "no --certs: mesh endpoints that require mTLS are unreachable, inbound mTLS is off"
            );
            None
        }
    };
    let allow =
        AllowList::parse(&s.inbound_allow).map_err(|e| anyhow::anyhow!("--inbound-allow: {e}"))?;
    let resolv = ResolvConf::read(&s.resolv_conf).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no upstream nameservers: names outside the mesh get SERVFAIL");
        ResolvConf::default()
    });

    // Admin first: readiness says 503 until everything below is up.
    let metrics = Arc::new(Metrics::default());
    let state = admin::State::new(
        store.clone(),
        identity.clone(),
        metrics.clone(),
        s.network.clone(),
        resolv.nameservers.clone(),
    );
    let admin_listener = tokio::net::TcpListener::bind(s.admin_addr)
        .await
        .with_context(|| format!("admin endpoint {}", s.admin_addr))?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(admin::Server::new(state.clone()).serve(admin_listener));

    // Listeners before capture: a captured connection must never meet a closed port.
    let outbound_addrs = Settings::loopback(s.outbound_port);
    let dns_addrs = Settings::loopback(s.dns_port);
    let outbound_listeners = proxy::bind_all(&outbound_addrs, "outbound")
        .await
        .context("outbound listener")?;
    let dns_tcp = proxy::bind_all(&dns_addrs, "DNS")
        .await
        .context("DNS TCP listener")?;
    let dns_udp = bind_udp(&dns_addrs)?;
    let inbound_addrs = [
        SocketAddr::from(([0, 0, 0, 0], s.inbound_port)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, s.inbound_port)),
    ];
    let inbound_listeners = if s.inbound_enabled() {
        proxy::bind_all(&inbound_addrs, "inbound")
            .await
            .context("inbound listener")?
    } else {
        vec![]
    };

    let (capture, mut vips, orig) = match &cgroup {
        Some(path) => {
            let inbound = s.inbound_enabled().then(|| capture::Inbound {
                ports: s.inbound_ports.clone(),
                all: s.inbound_all,
                exclude: s.inbound_excluded(),
            });
            let settings = capture::Settings {
                cgroup: path.clone(),
                outbound_port: s.outbound_port,
                dns_port: s.dns_port,
                inbound_port: s.inbound_port,
                inbound,
            };
            let fds: Vec<RawFd> = inbound_listeners.iter().map(AsRawFd::as_raw_fd).collect();
            let (c, v, o) = Capture::attach(&settings, &fds)?;
            (Some(c), Some(v), o)
        }
        None => (None, None, OriginalDst::netfilter_only()),
    };
    if let Some(v) = vips.as_mut() {
        let n = v.sync(&store.load())?;
        state.captured_vips.store(n, Ordering::Relaxed);
        tracing::info!(captured = n, "capture map synced");
    }
    let _ = state.capture.set(admin::CaptureInfo {
        cgroup: capture.as_ref().map(|c| c.cgroup().to_path_buf()),
        programs: capture
            .as_ref()
            .map(|c| c.programs().iter().map(|p| p.to_string()).collect())
            .unwrap_or_default(),
        inbound_ports: s.inbound_ports.clone(),
        inbound_all: s.inbound_all,
    });

    if let Some(mut v) = vips {
        let store = store.clone();
        let state = state.clone();
        let mut changed = store.subscribe();
        tasks.spawn(async move {
            while changed.changed().await.is_ok() {
                match v.sync(&store.load()) {
                    Ok(n) => {
                        state.captured_vips.store(n, Ordering::Relaxed);
                        tracing::info!(captured = n, "capture map synced")
                    }
                    Err(e) => tracing::error!(error = %e, "capture map sync failed"),
                }
            }
        });
    }
    let _watch = source.watch(store.clone()).context("watching mesh files")?;

    let _identity_watch = match provider {
        Some(p) => Some(p.watch(identity.clone()).context("watching --certs")?),
        None => None,
    };
    let inbound = Inbound::new(
        identity.clone(),
        s.mtls_mode,
        allow,
        s.inbound_port,
        metrics.clone(),
    );
    for l in inbound_listeners {
        tasks.spawn(inbound.clone().serve(l));
    }
    let outbound = Outbound::new(
        store.clone(),
        identity.clone(),
        Arc::new(orig),
        outbound_addrs.to_vec(),
        s.network.clone(),
        metrics.clone(),
    );
    for l in outbound_listeners {
        tasks.spawn(outbound.clone().serve(l));
    }
    let upstream = Upstream::new(resolv.nameservers.clone(), Duration::from_secs(5));
    let dns = dns::Server::new(store.clone(), upstream, resolv.search.first().cloned());
    let _ = state.dns.set(dns.clone());
    for l in dns_tcp {
        tasks.spawn(dns.clone().serve_tcp(l));
    }
    for u in dns_udp {
        tasks.spawn(dns.clone().serve_udp(u));
    }
    tracing::info!(
        outbound = s.outbound_port, dns = s.dns_port, upstream = ?resolv.nameservers,
        admin = %s.admin_addr, cgroup = ?capture.as_ref().map(|c| c.cgroup().to_path_buf()), "interceptor ready"
    );
    state.ready.store(true, Ordering::Release);
    notify_systemd(&[sd_notify::NotifyState::Ready]);

    stop_signal().await?;
    state.ready.store(false, Ordering::Release);
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    // Detach first: from here on traffic flows as if we had never run.
    drop(capture);
    tasks.abort_all();
    Ok(())
}

/// Tells systemd (Type=notify) where we are; a no-op outside systemd.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Waits for SIGTERM or SIGINT.
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

/// `interceptor gateway`: the same mesh sources as `run`, no capture, no identity (it never
/// terminates TLS), so it needs no privileges.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let opts = mesh::Options {
        namespace: args.namespace,
        cluster_domain: args.cluster_domain,
    };
    let source = FileSource::new(args.mesh, args.mesh_networks, opts);
    let store = Store::new(first_table(&source)?);
    let table = store.load();
    let local = table
        .services
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|w| w.network == args.network)
        .count();
    if !table.networks.networks.contains_key(&args.network) {
        tracing::warn!(network = %args.network, "network not in meshNetworks: only endpoints that name it are served");
    }
    drop(table);
    let metrics = Arc::new(Metrics::default());
    let state = admin::State::new(
        store.clone(),
        identity::Store::new(None),
        metrics.clone(),
        args.network.clone(),
        vec![],
    );
    let _ = state.capture.set(admin::CaptureInfo {
        cgroup: None,
        programs: vec![],
        inbound_ports: vec![],
        inbound_all: false,
    });
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("admin endpoint {}", args.admin_addr))?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(admin::Server::new(state.clone()).serve(admin_listener));
    let listeners = proxy::bind_all(&args.listen, "gateway")
        .await
        .context("gateway listener")?;
    let _watch = source.watch(store.clone()).context("watching mesh files")?;
    let gateway = Gateway::new(store, args.network.clone(), metrics);
    for l in listeners {
        tasks.spawn(gateway.clone().serve(l));
    }
    tracing::info!(network = %args.network, listen = ?args.listen, admin = %args.admin_addr, endpoints = local, "gateway ready");
    state.ready.store(true, Ordering::Release);
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    stop_signal().await?;
    tasks.abort_all();
    Ok(())
}
