//! The daemon: `interceptor run` and `interceptor gateway` are each a list of parts started in
//! order and owned by one supervisor. Every part reads and writes shared state the daemon
//! makes first (`Ctx`): the mesh store that sources write and data paths read, the identity
//! store that providers write and TLS reads, readiness, metrics, observed endpoint health.

mod listeners;
mod parts;
mod reload;
mod supervisor;

pub use supervisor::{Died, Handle, Supervisor};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin;
use crate::capture;
use crate::config::{GatewayArgs, IdentitySource, Settings};
use crate::dns::{self, ResolvConf};
use crate::fdstore::FdStore;
use crate::health;
use crate::identity::{self, FileProvider, Identity};
use crate::mesh::{self, FileSource};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::route::Outliers;
use crate::tls;
use crate::xds;

/// Readiness conditions of `interceptor run`.
pub const TABLE: &str = "mesh table";
pub const CAPTURE: &str = "capture";
pub const LISTENERS: &str = "listeners";

/// What every part shares.
pub struct Ctx {
    pub store: Arc<mesh::Store>,
    pub identity: Arc<identity::Store>,
    pub tls: Arc<tls::Store>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub outliers: Arc<Outliers>,
    pub dns_stats: Arc<dns::Stats>,
    pub capture: Arc<capture::Status>,
    /// The istiod source's state, when there is one.
    pub xds: Option<Arc<xds::Status>>,
    /// The Istio CA provider's state, when it is the identity provider.
    pub ca: Option<Arc<identity::CaStatus>>,
    /// The application's probe, when there is one.
    pub health: Option<Arc<health::Health>>,
    pub network: String,
    pub gateway_identity: Option<crate::spiffe::SpiffeId>,
    pub limits: Arc<crate::net::Limits>,
    pub started: SystemTime,
}

/// TLS takes the identities providers set. The one place the two meet.
struct TlsCredentials(Arc<tls::Store>);

impl identity::Credentials for TlsCredentials {
    fn install(&self, id: &Identity) -> Result<(), String> {
        self.0
            .install(
                id.spiffe.clone(),
                id.chain.clone(),
                &id.key,
                &id.roots,
                id.not_after,
            )
            .map_err(|e| e.to_string())
    }
}

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    fn new(
        options: mesh::Options,
        network: String,
        conditions: &[&str],
        xds: Option<Arc<xds::Status>>,
        ca: Option<Arc<identity::CaStatus>>,
        health: Option<Arc<health::Health>>,
        gateway_identity: Option<crate::spiffe::SpiffeId>,
        limits: &crate::config::Limits,
    ) -> Arc<Self> {
        let tls = tls::Store::new();
        Arc::new(Self {
            store: mesh::Store::new(options),
            identity: identity::Store::new(Arc::new(TlsCredentials(tls.clone()))),
            tls,
            metrics: Arc::new(Metrics::default()),
            readiness: Readiness::new(conditions),
            outliers: Arc::new(Outliers::default()),
            dns_stats: Arc::new(dns::Stats::default()),
            capture: Arc::new(capture::Status::default()),
            xds,
            ca,
            health,
            network,
            gateway_identity,
            limits: crate::net::Limits::new(limits),
            started: SystemTime::now(),
        })
    }

    fn admin_state(
        &self,
        nameservers: Vec<SocketAddr>,
        dns: bool,
        inbound: Option<crate::route::InboundPolicy>,
        restart: crate::fdstore::Restart,
    ) -> Arc<admin::State> {
        Arc::new(admin::State {
            store: self.store.clone(),
            identity: self.identity.clone(),
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
            dns: dns.then(|| self.dns_stats.clone()),
            capture: self.capture.clone(),
            xds: self.xds.clone(),
            ca: self.ca.clone(),
            health: self.health.clone(),
            network: self.network.clone(),
            gateway_identity: self.gateway_identity.clone(),
            limits: self.limits.clone(),
            nameservers,
            inbound,
            started: self.started,
            restart,
        })
    }
}

/// The mesh file source for these settings.
pub fn file_source(s: &Settings) -> FileSource {
    let paths = if s.mesh.explicit || s.mesh.paths.iter().any(|p| p.exists()) {
        s.mesh.paths.clone()
    } else {
        // With istiod the files are an optional addition: their absence is the normal case.
        match s.istiod {
            Some(_) => tracing::debug!(
                default = crate::config::DEFAULT_MESH_DIR,
                "no mesh files: the table comes from istiod alone"
            ),
            None => tracing::warn!(
                default = crate::config::DEFAULT_MESH_DIR,
                "no mesh files: starting with an empty mesh table"
            ),
        }
        vec![]
    };
    FileSource::new(paths, s.mesh.networks.clone(), s.options.namespace.clone())
}

/// Joins every load error into one.
pub fn mesh_errors(errors: Vec<mesh::Error>) -> anyhow::Error {
    let list: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
    anyhow::anyhow!("invalid mesh configuration:\n{}", list.join("\n"))
}

/// `interceptor run`.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    match crate::net::raise_fd_limit() {
        Ok(n) => tracing::debug!(open_files = n, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let mut conditions = vec![TABLE, CAPTURE, LISTENERS];
    let xds_status = s.istiod.as_ref().map(|i| {
        conditions.push(xds::READY);
        Arc::new(xds::Status::new(
            format!("{} ({})", i.bundle.discovery.host, i.bundle.discovery.addr),
            match i.protocol {
                xds::Protocol::Delta => "delta",
                xds::Protocol::Sotw => "sotw",
            },
        ))
    });
    let ca_status = matches!(s.identity, IdentitySource::IstioCa(_)).then(|| {
        conditions.push(identity::READY);
        Arc::new(identity::CaStatus::default())
    });
    let health = s.probe.as_ref().map(|spec| {
        conditions.push(health::READY);
        health::Health::new(spec)
    });
    let ctx = Ctx::new(
        s.options.clone(),
        s.network.clone(),
        &conditions,
        xds_status.clone(),
        ca_status.clone(),
        health.clone(),
        s.gateway_identity.clone(),
        &s.limits,
    );
    let resolv = ResolvConf::read(&s.resolv_conf).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no upstream nameservers: names outside the mesh get SERVFAIL");
        ResolvConf::default()
    });
    let mut sup = Supervisor::new(ctx.readiness.clone());
    let mut store = FdStore::open(s.fd_store);

    // Admin first: readiness says 503 until everything below is up.
    sup.add(parts::admin(
        ctx.admin_state(
            resolv.nameservers.clone(),
            true,
            Some(s.policy.clone()),
            store.restart(),
        ),
        s.admin_addr,
        Some(&mut store),
    )?);

    // Sources: the first table, or the daemon does not start.
    sup.add(parts::mesh_files(&ctx, file_source(&s))?);

    // Identity providers.
    match (&s.identity, &s.istiod, ca_status) {
        (IdentitySource::Files { dir, required }, ..) => sup.add(parts::identity_files(
            &ctx,
            FileProvider::new(dir.clone()),
            *required,
        )?),
        (IdentitySource::IstioCa(settings), Some(istiod), Some(status)) => sup.add(parts::ca(
            &ctx,
            istiod.bundle.clone(),
            settings.clone(),
            status,
        )),
        _ => tracing::warn!(
            "no --certs: mesh endpoints that require mTLS are unreachable, inbound mTLS is off"
        ),
    }
    if let (Some(istiod), Some(status)) = (&s.istiod, xds_status) {
        sup.add(parts::xds(&ctx, istiod, &s, status, health.clone()));
    }

    // Listeners before capture: a captured connection must never meet a closed port.
    let listeners = listeners::Listeners::bind(&s, &mut store)?;
    let inbound_fds = listeners.inbound_fds();
    let mut exec_cgroup = None;
    let capture = match &s.cgroup {
        Some(cgroup) => {
            let cgroup = capture::resolve_cgroup(cgroup.as_deref())?;
            // An exec probe's command runs where capture leaves it alone.
            if matches!(
                s.probe.as_ref().map(|p| &p.kind),
                Some(health::Kind::Exec { .. })
            ) {
                exec_cgroup = Some(health::ExecCgroup::create(&cgroup).with_context(|| {
                    format!("creating the exec probe cgroup under {}", cgroup.display())
                })?);
            }
            let settings = capture::Settings {
                cgroup,
                ports: s.ports,
                inbound: s.inbound.enabled().then(|| s.inbound.clone()),
                exempt_cgroup: exec_cgroup.as_ref().map_or(0, |c| c.id()),
                local_hop: s.local_hop == crate::config::LocalHop::Sockmap,
                passthrough: s.exclude_outbound_cidrs.clone(),
            };
            Some(parts::Capture::attach(
                &ctx,
                settings,
                &inbound_fds,
                &mut store,
            )?)
        }
        None => {
            ctx.capture.set(capture::Info::default());
            ctx.readiness.set(CAPTURE, true);
            None
        }
    };
    let orig = capture
        .as_ref()
        .map(|c| c.original_dst())
        .unwrap_or_else(|| Arc::new(capture::OriginalDst::netfilter_only()));
    let capture_maps_need_capability = orig.needs_capability();
    let (outbound, inbound, dns) = listeners.start(&ctx, &s, orig, resolv)?;
    sup.add(dns);
    sup.add(outbound);
    if let Some(inbound) = inbound {
        sup.add(inbound);
    }
    if let (Some(spec), Some(health)) = (&s.probe, health) {
        sup.add(parts::probe(&ctx, spec.clone(), health, exec_cgroup));
    }
    // Capture last: on the way down it is the first part stopped (fail-open before anything
    // else goes).
    if let Some(c) = capture {
        sup.add(c.start(&ctx));
    }
    // Everything that needed a capability is done (see `privilege`), but for map access on a
    // kernel that asks CAP_BPF for it.
    let before = crate::privilege::effective_mask();
    let keep = capture_maps_need_capability.then_some(caps::Capability::CAP_BPF);
    if keep.is_some() {
        tracing::warn!(
            "this kernel refuses BPF map access without CAP_BPF (unprivileged BPF disabled; \
             seen on 5.10, not on 6.1 and newer): CAP_BPF kept, every other capability dropped"
        );
    }
    crate::privilege::drop_all_but(keep).context("dropping capabilities")?;
    tracing::info!(
        before = format!("{before:016x}"),
        after = format!("{:016x}", crate::privilege::effective_mask()),
        "capabilities dropped"
    );
    ctx.readiness.set(LISTENERS, true);
    tracing::info!(
        outbound = s.ports.outbound, dns = s.ports.dns, admin = %s.admin_addr,
        cgroup = ?ctx.capture.info().and_then(|c| c.cgroup), "interceptor ready"
    );
    // What the previous process stored and this one did not take goes now (a link to a
    // program this configuration no longer runs, a listener on a port it no longer uses).
    store.finish();
    if store.tell_predecessor_ready() {
        // Started by a reload: from now on systemd's main process is this one.
        notify_systemd(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Ready,
        ]);
    } else {
        // A cold start: READY=1 once the mesh is usable (istiod's first table, the first
        // certificate), so units ordered after this one find mTLS working; at most
        // --startup-wait, as capture is attached already and a dead istiod must not hold the
        // boot (a reload's successor says it at once: systemd must know its pid before the
        // predecessor exits).
        let wanted: Vec<&'static str> = [TABLE, xds::READY, identity::READY]
            .into_iter()
            .filter(|c| conditions.contains(c))
            .collect();
        tokio::spawn(ready_when_usable(
            ctx.readiness.clone(),
            wanted,
            s.startup_wait,
        ));
    }
    let shutdown = Shutdown {
        grace: s.shutdown_grace,
        drain_timeout: s.drain_timeout,
        store: store.enabled().then(|| (store, ctx.readiness.clone())),
    };
    supervise(sup, shutdown).await
}

/// After a hand-over's grace, how long the connections accepted last get to finish.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// How the daemon's life ends.
enum End {
    /// SIGTERM or SIGINT.
    Stop,
    /// A reload: the successor is ready and systemd's main process.
    HandedOver,
}

/// How a stop goes.
struct Shutdown {
    /// SIGTERM: connections in progress get this long, then are closed cleanly.
    grace: std::time::Duration,
    /// After a reload: connections this process holds get this long.
    drain_timeout: std::time::Duration,
    /// systemd keeps the links and listeners (and can be handed them on a reload).
    store: Option<(FdStore, Arc<crate::readiness::Readiness>)>,
}

/// Runs the parts until a stop signal (exit 0) or a dead part (exit non-zero). Then, with
/// capture detached and the listeners closed, connections in progress get `grace` to end and
/// are closed cleanly after it (`net::drain`). A dead part gets no grace: its connections are
/// closed cleanly at once, so that systemd restarts us sooner.
///
/// With systemd's store our stop detaches nothing: the grace is spent still serving, new
/// connections and DNS queries answered up to its end; what comes after waits in the kernel's
/// queues for the next process on a restart; on a stop, systemd closes the store as we exit and
/// capture detaches then. `interceptor reload` (the unit's ExecReload=) hands everything to a
/// successor, and this process drains what it holds for `drain_timeout`.
async fn supervise(sup: Supervisor, shutdown: Shutdown) -> anyhow::Result<()> {
    let Shutdown {
        grace,
        drain_timeout,
        store,
    } = shutdown;
    let serving_through = store.is_some();
    let mut end = End::Stop;
    let stop = async {
        end = match store {
            Some((store, readiness)) => until_stop_or_handed_over(store, readiness, grace).await,
            None => {
                wait_for_stop().await;
                End::Stop
            }
        };
    };
    let result = sup.run(stop).await;
    if matches!(end, End::HandedOver) && result.is_ok() {
        // Not STOPPING=1: the service goes on, in the successor.
        let left = crate::net::drain::run(drain_timeout).await;
        tracing::info!(
            cut = left,
            "reload: drained; the successor serves from here on"
        );
        return Ok(());
    }
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    if serving_through && result.is_ok() {
        return Ok(());
    }
    let grace = if result.is_ok() {
        grace
    } else {
        std::time::Duration::ZERO
    };
    let left = crate::net::drain::run(grace).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "connections still open after the shutdown grace: cut"
        );
    }
    result.map_err(anyhow::Error::from)
}

/// READY=1 once `wanted` are met, or after `wait` anyway; never once a stop began.
async fn ready_when_usable(
    readiness: Arc<crate::readiness::Readiness>,
    wanted: Vec<&'static str>,
    wait: std::time::Duration,
) {
    if let Err(why) = readiness.wait_for(&wanted, wait).await {
        let state = readiness.state();
        if state.stopping || state.failed.is_some() {
            return;
        }
        tracing::warn!(
            waited_ms = wait.as_millis() as u64,
            %why,
            "telling systemd READY=1 without the mesh usable yet (capture is attached; \
             /healthz/ready says what it waits for)"
        );
    }
    notify_systemd(&[sd_notify::NotifyState::Ready]);
}

/// Tells systemd (Type=notify) where we are; a no-op outside systemd.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_stop() {
    if let Err(e) = stop_signal().await {
        tracing::error!(error = %e, "cannot wait for signals");
        std::future::pending::<()>().await;
    }
}

async fn stop_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

/// Under systemd's store: a stop signal serves through the grace (see `supervise`);
/// `interceptor reload` (ExecReload=) takes everything for a successor, and a hand-over that
/// fails leaves this process serving.
async fn until_stop_or_handed_over(
    store: FdStore,
    readiness: Arc<crate::readiness::Readiness>,
    grace: std::time::Duration,
) -> End {
    let listener = reload::socket_path()
        .and_then(|p| reload::listen(&p).map_err(reload::Error::from))
        .map_err(|e| tracing::warn!(error = %e, "systemctl reload is off (a restart is not)"))
        .ok();
    let stop = wait_for_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            conn = next_reload(listener.as_ref()) => {
                tracing::info!("reload: handing over to a successor");
                match reload::offer(conn, &store).await {
                    Ok(true) => {
                        tracing::info!("reload: the successor is ready; draining");
                        return End::HandedOver;
                    }
                    Ok(false) => tracing::error!("reload failed: this process goes on serving"),
                    Err(e) => {
                        tracing::error!(error = %e, "reload failed: this process goes on serving");
                    }
                }
            }
        }
    }
    readiness.stopping();
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    // Everything answered for the grace (connections open then are closed cleanly at its end);
    // then new connections are left in the queue for the next process, the short ones in
    // flight finish, and DNS answers up to the exit.
    let _ = tokio::time::timeout(grace, crate::net::drain::run(grace)).await;
    crate::net::drain::stop_accepting();
    let left = crate::net::drain::settle(SETTLE).await;
    tracing::info!(
        cut = left,
        "stopping: served through the grace; new connections wait for the next process \
         (capture and listeners stay with systemd)"
    );
    End::Stop
}

/// The next `interceptor reload` connection (never, without a socket).
async fn next_reload(listener: Option<&tokio::net::UnixListener>) -> tokio::net::UnixStream {
    loop {
        match listener {
            Some(l) => match l.accept().await {
                Ok((conn, _)) => return conn,
                Err(e) => {
                    tracing::warn!(error = %e, "reload socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            None => std::future::pending::<()>().await,
        }
    }
}

/// `interceptor reload`: see `reload`.
pub fn reload_helper() -> anyhow::Result<u32> {
    let path = reload::socket_path()?;
    Ok(reload::run_helper(&path)?)
}

/// `interceptor gateway`: the same mesh source as `run`, no capture, so it needs no
/// privileges; an identity only with `--certs`, for double HBONE's outer tunnel (the sidecar
/// wire it never terminates).
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    if let Err(e) = crate::net::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
    let options = mesh::Options {
        namespace: args.namespace.clone(),
        cluster_domain: args.cluster_domain.clone(),
        registry_only: false,
    };
    let ctx = Ctx::new(
        options,
        args.network.clone(),
        &[TABLE, LISTENERS],
        None,
        None,
        None,
        None,
        &crate::config::Limits {
            gateway_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
            ..Default::default()
        },
    );
    ctx.capture.set(capture::Info::default());
    let mut sup = Supervisor::new(ctx.readiness.clone());
    sup.add(parts::admin(
        ctx.admin_state(vec![], false, None, Default::default()),
        args.admin_addr,
        None,
    )?);
    let source = FileSource::new(
        args.mesh.clone(),
        args.mesh_networks.clone(),
        args.namespace.clone(),
    );
    sup.add(parts::mesh_files(&ctx, source)?);
    let table = ctx.store.load();
    if !table.networks.networks.contains_key(&args.network) {
        tracing::warn!(network = %args.network, "network not in meshNetworks: only endpoints that name it are served");
    }
    let local = table
        .services
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|w| w.network == args.network)
        .count();
    drop(table);
    let hbone = match &args.certs {
        Some(dir) => {
            sup.add(parts::identity_files(
                &ctx,
                FileProvider::new(dir.clone()),
                true,
            )?);
            args.hbone_listen.clone()
        }
        None => vec![],
    };
    sup.add(parts::gateway(&ctx, &args.listen, &hbone, args.timeouts())?);
    if let Some(istiod) = args.expose_istiod {
        sup.add(parts::expose_istiod(
            &ctx,
            &args.listen,
            &args.istiod_ports,
            istiod,
            &args.istiod_sni,
            args.timeouts(),
        )?);
        tracing::info!(%istiod, sni = %args.istiod_sni, ports = ?args.istiod_ports, "exposing istiod");
    }
    ctx.readiness.set(LISTENERS, true);
    tracing::info!(network = %args.network, listen = ?args.listen, hbone = ?hbone, admin = %args.admin_addr, endpoints = local, "gateway ready");
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let shutdown = Shutdown {
        grace: args.shutdown_grace(),
        drain_timeout: args.shutdown_grace(),
        store: None,
    };
    supervise(sup, shutdown).await
}

/// Loads the first table of `source` for `interceptor check`: every error, or the table.
pub fn check_table(source: &FileSource, options: mesh::Options) -> anyhow::Result<mesh::Table> {
    let res = source.load().map_err(mesh_errors)?;
    Ok(mesh::Table::build(res, options))
}
