//! How each part of the daemon starts: what it needs from the shared context, what it binds
//! or loads before it counts as started (so a bad config fails the start, not a later request),
//! and the future the supervisor then owns.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;

use super::{mesh_errors, Ctx, Handle, CAPTURE, TABLE};
use crate::admin;
use crate::capture::{self, OriginalDst, Vips};
use crate::config::{Istiod, Settings};
use crate::identity::{self, FileProvider};
use crate::mesh::FileSource;
use crate::net;
use crate::proxy::{ExposeIstiod, Gateway};
use crate::transport::{Dialer, Timeouts};
use crate::xds;

/// How long an upstream DNS exchange may take before the client gets SERVFAIL.
pub(super) const DNS_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// admin::Server: bound now (its port in use is a start failure), serving from here on.
/// With a store, the listener is the previous process's (a successor started by a reload binds
/// nothing its predecessor still holds).
pub fn admin(
    state: Arc<admin::State>,
    addr: SocketAddr,
    store: Option<&mut crate::fdstore::FdStore>,
) -> anyhow::Result<Handle> {
    let listeners = match store {
        Some(store) => super::listeners::tcp(store, "admin", &[addr]),
        None => net::bind_all(&[addr], "admin"),
    }
    .with_context(|| format!("admin endpoint {addr}"))?;
    let server = admin::Server::new(state);
    Ok(Handle::loops(
        "admin",
        listeners.into_iter().map(move |l| server.clone().serve(l)),
    ))
}

/// The mesh files: loaded now (every error listed, the daemon does not start half
/// configured), watched from here on.
pub fn mesh_files(ctx: &Ctx, source: FileSource) -> anyhow::Result<Handle> {
    source.load_into(&ctx.store).map_err(mesh_errors)?;
    ctx.readiness.set(TABLE, true);
    let table = ctx.store.load();
    tracing::info!(
        services = table.services.len(),
        workloads = table.workloads.len(),
        names = table.names.len(),
        "mesh table loaded"
    );
    let watch = source
        .watch(ctx.store.clone())
        .context("watching mesh files")?;
    Ok(Handle::new("mesh files", async move {
        watch.await;
        anyhow::bail!("the mesh file watch ended")
    }))
}

/// The identity files: loaded now (or, when `required` is false, whenever they appear),
/// watched from here on.
pub fn identity_files(ctx: &Ctx, provider: FileProvider, required: bool) -> anyhow::Result<Handle> {
    match provider.load_into(&ctx.identity) {
        Ok(id) => {
            tracing::info!(spiffe = %id.spiffe, serial = %id.serial, expires_in_s = id.expires_in().as_secs(), "identity loaded")
        }
        Err(crate::identity::Error::Missing(f)) if !required => {
            std::fs::create_dir_all(provider.dir())
                .with_context(|| format!("creating {}", provider.dir().display()))?;
            tracing::warn!(file = %f.display(), "no certificate yet: mTLS starts once one is there");
        }
        Err(e) => return Err(e).context("identity (--certs)"),
    }
    let watch = Arc::new(provider)
        .watch(ctx.identity.clone())
        .context("watching the identity files")?;
    Ok(Handle::new("identity files", async move {
        watch.await;
        anyhow::bail!("the identity file watch ended")
    }))
}

/// The Istio CA provider: a certificate an earlier run left is in force now (the VM serves mTLS
/// with the CA unreachable); the CA is asked at once when there is none, then at half-life.
pub fn ca(
    ctx: &Ctx,
    bundle: Arc<crate::bundle::Bundle>,
    settings: identity::CaSettings,
    status: Arc<identity::CaStatus>,
) -> Handle {
    let provider = identity::CaProvider::new(bundle, settings, status);
    provider.restore(&ctx.identity);
    let (store, readiness) = (ctx.identity.clone(), ctx.readiness.clone());
    // Readiness follows the certificate in force (and its expiry).
    let watch = {
        let mut rx = store.subscribe();
        let readiness = readiness.clone();
        async move {
            loop {
                let expires = rx.borrow_and_update().as_ref().map(|id| id.not_after);
                readiness.set(
                    identity::READY,
                    expires.is_some_and(|t| t > SystemTime::now()),
                );
                let until_expiry = expires
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::MAX);
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(until_expiry) => {}
                }
            }
        }
    };
    tracing::info!(spiffe = provider.spiffe(), "certificates from the Istio CA");
    Handle::new("istio ca", async move {
        tokio::join!(provider.run(store), watch);
        anyhow::bail!("the CA provider ended")
    })
}

/// The application's readiness probe.
pub fn probe(
    ctx: &Ctx,
    spec: crate::health::Spec,
    health: Arc<crate::health::Health>,
    exec_cgroup: Option<crate::health::ExecCgroup>,
) -> Handle {
    let readiness = ctx.readiness.clone();
    tracing::info!(
        probe = spec.kind.label(),
        period_s = spec.period.as_secs(),
        "application probe"
    );
    Handle::new("probe", async move {
        // Owned here: the cgroup goes when the part stops.
        let cgroup = exec_cgroup;
        crate::health::run(
            spec,
            health,
            readiness,
            cgroup.as_ref().map(|c| c.path().to_path_buf()),
        )
        .await;
        anyhow::bail!("the probe loop ended")
    })
}

/// Capture: attached now (it needs the inbound listeners), then keeping the kernel's VIP map
/// equal to the table for as long as it runs. Dropping it detaches every program.
pub struct Capture {
    capture: capture::Capture,
    vips: Vips,
    orig: Arc<OriginalDst>,
    /// The table the kernel's map holds, and the table changes since: a table published
    /// between attaching and `start` is synced by the loop, not taken as already there.
    synced: Arc<crate::mesh::Table>,
    changed: tokio::sync::watch::Receiver<u64>,
}

impl Capture {
    pub fn attach(
        ctx: &Ctx,
        settings: capture::Settings,
        inbound_fds: &[RawFd],
        store: &mut crate::fdstore::FdStore,
    ) -> anyhow::Result<Self> {
        // Subscribed before the table is read: a publish after the read is a change to sync.
        let changed = ctx.store.subscribe();
        ctx.store.gate_dns();
        let table = ctx.store.load();
        let mut n = 0;
        let (capture, vips, orig) =
            capture::Capture::attach(&settings, inbound_fds, store, |vips| {
                n = vips.sync(&table)?;
                outbound_mode(vips, &table);
                Ok(())
            })?;
        ctx.store.release_dns(table.clone());
        ctx.capture.set_vips(n);
        ctx.capture.set(capture.info(settings.inbound.as_ref()));
        ctx.readiness.set(CAPTURE, true);
        tracing::info!(captured = n, "capture map synced");
        Ok(Self {
            capture,
            vips,
            orig: Arc::new(orig),
            synced: table,
            changed,
        })
    }

    pub fn original_dst(&self) -> Arc<OriginalDst> {
        self.orig.clone()
    }

    pub fn start(self, ctx: &Ctx) -> Handle {
        let (store, status) = (ctx.store.clone(), ctx.capture.clone());
        let metrics = ctx.metrics.clone();
        let Self {
            capture,
            mut vips,
            mut synced,
            mut changed,
            ..
        } = self;
        Handle::new("capture", async move {
            // Owned here: when the supervisor stops this part, the programs go with it.
            let _capture = capture;
            let mut counted = 0;
            let mut tick = tokio::time::interval(REFUSALS_EVERY);
            loop {
                tokio::select! {
                    c = changed.changed() => if c.is_err() { break },
                    _ = tick.tick() => {
                        // The kernel counts REGISTRY_ONLY refusals; the metric follows.
                        let now = vips.registry_only_refused();
                        metrics.outbound_refused_by("registry_only", now.saturating_sub(counted));
                        counted = now;
                        continue;
                    }
                }
                let table = store.load();
                // The mode is the routes' (istiod's virtualOutbound), not the shape's.
                outbound_mode(&mut vips, &table);
                // An endpoint-only change keeps every (VIP, port): nothing to tell the kernel.
                if table.same_shape(&synced) {
                    store.release_dns(table);
                    continue;
                }
                synced = table;
                match vips.sync(&synced) {
                    Ok(n) => {
                        status.set_vips(n);
                        // Only now may DNS hand out the new names' VIPs.
                        store.release_dns(synced.clone());
                        tracing::info!(captured = n, "capture map synced")
                    }
                    // DNS keeps the last table the kernel fully holds.
                    Err(e) => tracing::error!(error = %e, "capture map sync failed"),
                }
            }
            anyhow::bail!("the mesh store went away")
        })
    }
}

/// How often the kernel's REGISTRY_ONLY refusal count is read into the metric.
const REFUSALS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The table's outboundTrafficPolicy into the kernel.
fn outbound_mode(vips: &mut Vips, table: &crate::mesh::Table) {
    let on = table.registry_only();
    match vips.set_registry_only(on) {
        Ok(true) => tracing::info!(
            registry_only = on,
            "outbound traffic policy in force: {}",
            if on {
                "REGISTRY_ONLY (TCP outside the mesh refused at connect)"
            } else {
                "ALLOW_ANY"
            }
        ),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot set the outbound traffic policy"),
    }
}

/// mesh::XdsSource: the persisted table in force now (if any), the stream to istiod from here
/// on.
pub fn xds(
    ctx: &Ctx,
    istiod: &Istiod,
    s: &Settings,
    status: Arc<xds::Status>,
    health: Option<Arc<crate::health::Health>>,
) -> Handle {
    let b = istiod.bundle.clone();
    let extra = xds::node::Extra {
        instance_ips: xds::node::instance_ips_for(&b),
        ports: s.inbound.ports.clone(),
        hbone: s.inbound.hbone.is_some(),
        locality: s.policy.subject.locality.clone(),
    };
    let node = xds::node::node(&b, &extra);
    tracing::info!(node = %node.id, "node for istiod");
    let source = xds::XdsSource::new(
        b.clone(),
        ctx.store.clone(),
        ctx.identity.clone(),
        status,
        ctx.readiness.clone(),
        node,
        istiod.protocol,
        Some(b.paths.state_dir.join(ISTIOD_TABLE)),
        s.options.clone(),
    );
    let source = match health {
        Some(h) => source.with_health(h),
        None => source,
    };
    let state = source.restore();
    Handle::new("istiod", async move {
        source.run(state).await;
        anyhow::bail!("the istiod stream loop ended")
    })
}

/// Istio's expose-istiod on the gateway: istiod's ports of each listen address.
pub fn expose_istiod(
    ctx: &Ctx,
    listen: &[SocketAddr],
    ports: &[u16],
    istiod: std::net::IpAddr,
    sni: &str,
    timeouts: Timeouts,
) -> anyhow::Result<Handle> {
    let addrs: Vec<SocketAddr> = listen
        .iter()
        .flat_map(|a| ports.iter().map(|p| SocketAddr::new(a.ip(), *p)))
        .collect();
    let listeners = net::bind_all(&addrs, "gateway (istiod)").context("istiod listeners")?;
    let expose = Arc::new(ExposeIstiod {
        sni: sni.to_string(),
        istiod,
        dialer: Dialer::new(ctx.tls.clone(), timeouts),
        metrics: ctx.metrics.clone(),
    });
    let limit = ctx.limits.gateway.clone();
    Ok(Handle::loops(
        "gateway (istiod)",
        listeners
            .into_iter()
            .map(move |l| expose.clone().serve(l, limit.clone())),
    ))
}

/// The persisted istiod table's file in the state directory.
pub const ISTIOD_TABLE: &str = "istiod-table.json";

/// proxy::Gateway on its listeners.
pub fn gateway(
    ctx: &Ctx,
    listen: &[SocketAddr],
    hbone: &[SocketAddr],
    timeouts: Timeouts,
) -> anyhow::Result<Handle> {
    let listeners = net::bind_all(listen, "gateway").context("gateway listener")?;
    let hbone = net::bind_all(hbone, "gateway HBONE").context("gateway HBONE listener")?;
    let gateway = Gateway::new(
        ctx.store.clone(),
        ctx.tls.clone(),
        ctx.network.clone(),
        Dialer::new(ctx.tls.clone(), timeouts),
        ctx.outliers.clone(),
        ctx.metrics.clone(),
    );
    let limit = ctx.limits.gateway.clone();
    let sni = listeners.into_iter().map({
        let (gateway, limit) = (gateway.clone(), limit.clone());
        move |l| {
            Box::pin(gateway.clone().serve(l, limit.clone()))
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        }
    });
    let tunnels = hbone.into_iter().map(move |l| {
        Box::pin(gateway.clone().serve_hbone(l, limit.clone()))
            as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    });
    Ok(Handle::loops(
        "gateway",
        sni.chain(tunnels).collect::<Vec<_>>(),
    ))
}
