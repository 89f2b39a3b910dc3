//! proxy::Outbound: accepts captured connections, finds the service from the original
//! destination, plans its targets (`route::plan`, the same call `explain` makes) and relays to
//! the first one that answers (`transport::try_targets`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use crate::capture::OriginalDst;
use crate::mesh::traffic::LoadBalancer;
use crate::mesh::{self, Service, Store};
use crate::metrics::{self, Metrics, TcpLabels};
use crate::net::{relay, Relayed};
use crate::route::balance::{self, Balance, Load};
use crate::route::policy::Subject;
use crate::route::traffic::{self, NoRoute};
use crate::route::{self, Outliers, Scope, Target, Transport};
use crate::spiffe::{SpiffeId, DEFAULT_TRUST_DOMAIN};
use crate::tls;
use crate::transport::hbone::Origin;
use crate::transport::{try_targets, Attempts, Dialer, For, Upstream};

/// At most this many endpoints are tried for one connection.
pub const MAX_ATTEMPTS: usize = 3;

pub struct Outbound {
    store: Arc<Store>,
    tls: Arc<tls::Store>,
    orig: Arc<OriginalDst>,
    dialer: Dialer,
    outliers: Arc<Outliers>,
    /// Our own listener addresses: a connection whose original destination is one of them would
    /// loop.
    own: Vec<SocketAddr>,
    /// This VM's network: endpoints elsewhere are reached through their network's gateway.
    network: String,
    /// What east-west gateways present for double HBONE (None: Istio's default).
    gateway_identity: Option<SpiffeId>,
    /// Who this VM is, for the routes that depend on it (sourceLabels, sourceNamespace,
    /// exportTo) and which DestinationRule applies.
    subject: Subject,
    /// Connections open per endpoint and cluster (least request, maxConnections).
    load: Arc<Load>,
    metrics: Arc<Metrics>,
}

impl Outbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        tls: Arc<tls::Store>,
        orig: Arc<OriginalDst>,
        dialer: Dialer,
        outliers: Arc<Outliers>,
        own: Vec<SocketAddr>,
        network: String,
        gateway_identity: Option<SpiffeId>,
        subject: Subject,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            tls,
            orig,
            dialer,
            outliers,
            own,
            network,
            gateway_identity,
            subject,
            load: Arc::default(),
            metrics,
        })
    }

    /// Serves `listener`, at most `limit`'s connections at once.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, limit: Arc<crate::net::Limit>) {
        crate::net::accept_loop(
            listener,
            "outbound",
            Some(limit),
            crate::net::Tasks::Drained,
            move |stream, peer| {
                let this = self.clone();
                async move { this.handle(stream, peer).await }
            },
        )
        .await
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        let Some(dst) = self.orig.lookup(&client) else {
            tracing::warn!(%peer, "outbound: no original destination for connection; closing");
            return;
        };
        if self.own.contains(&dst) {
            tracing::warn!(%peer, %dst, "outbound: connection to the proxy itself; closing");
            return;
        }
        // One table snapshot for the whole connection.
        let table = self.store.load();
        let Some((dialed, dialed_port)) = table.service_for(dst) else {
            tracing::warn!(%peer, original = %dst, "outbound: no mesh service at the original destination; closing");
            return;
        };
        let route = traffic::route(&table, &self.subject, dialed, dst);
        let cluster = match route.target.as_ref() {
            mesh::traffic::Target::Service => Ok(traffic::service_cluster(
                &table,
                &self.subject,
                dialed,
                dialed_port,
            )),
            mesh::traffic::Target::Clusters(ds) => traffic::pick(ds)
                .ok_or_else(|| NoRoute::NoCluster {
                    cluster: "(a route without destinations)".into(),
                })
                .and_then(|d| traffic::cluster(&table, &self.subject, d, dst.port())),
            // A VIP is nowhere to pass through to: refused like a black hole.
            mesh::traffic::Target::BlackHole | mesh::traffic::Target::Passthrough => {
                Err(NoRoute::BlackHole {
                    by: route.by.clone(),
                })
            }
        };
        let cluster = match cluster {
            Ok(c) => c,
            Err(e) => {
                self.metrics.outbound_refused(e.label());
                tracing::warn!(%peer, original = %dst, service = %dialed.host, route = %route.by, reason = e.label(), error = %e, "outbound: refused by its route; closing");
                return;
            }
        };
        let svc = cluster.service;
        let policy = cluster.policy.clone();
        let max_connections = policy.pool.and_then(|p| p.max_connections);
        let lb = policy.load_balancer.unwrap_or(LoadBalancer::LeastRequest);
        // The cluster's name is a key only where its count or cursor is kept.
        let cluster_key =
            (max_connections.is_some() || lb == LoadBalancer::RoundRobin).then(|| cluster.name());
        if let (Some(max), Some(key)) = (max_connections, &cluster_key) {
            if self.load.cluster(key) >= max {
                let e = NoRoute::Overflow {
                    cluster: key.clone(),
                    max,
                };
                self.metrics.outbound_refused(e.label());
                tracing::warn!(%peer, original = %dst, service = %svc.host, reason = e.label(), error = %e, "outbound: refused; closing");
                return;
            }
        }
        let tls = self.tls.current();
        let trust_domain = tls
            .as_ref()
            .map(|c| c.trust_domain())
            .unwrap_or(DEFAULT_TRUST_DOMAIN);
        let scope = Scope::Sidecar {
            network: &self.network,
            networks: &table.networks,
            trust_domain,
            original: Some(dst),
            gateway_identity: self.gateway_identity.as_ref(),
        };
        let plan = route::plan_cluster(&cluster, scope);
        self.outliers
            .warn_unreachable(svc.host.as_str(), &plan.skipped);
        let targets = balance::order(
            plan,
            &self.outliers,
            Balance {
                policy: lb,
                load: &self.load,
                cluster: cluster_key.as_deref().unwrap_or_default(),
                source: peer.ip(),
            },
        );
        let started = Instant::now();
        let (i, upstream) = match try_targets(
            &targets,
            Attempts {
                max: MAX_ATTEMPTS,
                connect_timeout: policy
                    .pool
                    .and_then(|p| p.connect_timeout_ms)
                    .map(std::time::Duration::from_millis),
                outlier: policy.outlier,
            },
            &self.outliers,
            &self.metrics,
            svc.host.as_str(),
            &For(
                &self.dialer,
                Origin {
                    client: peer,
                    service: svc.host.as_str(),
                },
            ),
        )
        .await
        {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(%peer, original = %dst, service = %svc.host, tried = e.tried, "outbound: no endpoint reachable; closing");
                return;
            }
        };
        let target = &targets[i];
        let _open = self.load.open(
            cluster_key.as_deref().filter(|_| max_connections.is_some()),
            &target.endpoint,
        );
        let mtls = upstream.is_mtls();
        let server = upstream.peer_identity(target.transport.identities());
        let labels = TcpLabels::new(metrics::SOURCE, svc.host.to_string(), mtls).principals(
            tls.as_ref().filter(|_| mtls).map(|c| c.spiffe.as_str()),
            server.as_ref().map(SpiffeId::as_str),
        );
        self.metrics.opened(&labels);
        let peer_workload = match &upstream {
            Upstream::Hbone(s) => s.peer_workload().and_then(|w| w.service.clone()),
            _ => None,
        };
        tracing::info!(%peer, original = %dst, service = %svc.host, cluster = %cluster, route = %route.by, endpoint = %target.endpoint, gateway_network = target.gateway_network(), transport = target.transport.label(), authority = hbone_authority(&target.transport), peer_workload = peer_workload.as_deref().unwrap_or("-"), "outbound connection");
        let result = match upstream {
            Upstream::Tcp(mut up) => relay(&mut client, &mut up).await,
            Upstream::Tls(mut up) => relay(&mut client, up.as_mut()).await,
            Upstream::Hbone(mut up) => relay(&mut client, up.as_mut()).await,
        };
        self.metrics.closed(&labels, result.a_to_b, result.b_to_a);
        log_close(&result, dst, svc, target, started);
    }
}

/// The CONNECT stream's authority, for the access log.
fn hbone_authority(t: &Transport) -> Option<String> {
    match t {
        Transport::Hbone { authority, .. } => Some(authority.to_string()),
        _ => None,
    }
}

fn log_close(r: &Relayed, dst: SocketAddr, svc: &Service, target: &Target, started: Instant) {
    tracing::info!(
        original = %dst, service = %svc.host, endpoint = %target.endpoint,
        sent = r.a_to_b, received = r.b_to_a, end = %r.end,
        error = r.error.map(|k| k.to_string()).as_deref().unwrap_or("-"),
        duration_ms = started.elapsed().as_millis() as u64,
        "outbound connection closed"
    );
}
