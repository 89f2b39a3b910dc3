//! proxy::Outbound: accepts captured connections, finds the service from the original
//! destination, plans its targets (`route::plan`, the same call `explain` makes) and relays to
//! the first one that answers (`transport::try_targets`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use crate::capture::OriginalDst;
use crate::mesh::traffic::{LoadBalancer, TrafficPolicy};
use crate::mesh::{Host, ListenerProtocol, Service, Store, Table};
use crate::metrics::{self, Metrics, TcpLabels};
use crate::net::relay;
use crate::route::balance::{self, Balance, Load};
use crate::route::policy::Subject;
use crate::route::traffic::{self, Cluster, NoRoute};
use crate::route::{self, Outliers, Scope, Target, Transport};
use crate::spiffe::{SpiffeId, DEFAULT_TRUST_DOMAIN};
use crate::tls;
use crate::transport::hbone::Origin;
use crate::transport::{try_targets, Attempts, Dialer, For, Upstream};

mod http;

/// How long a connection routed by SNI may take to send its ClientHello (as the gateway).
const HELLO_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// How our metrics name this VM, and the headers that tell HTTP peers.
    local: Arc<crate::metadata_exchange::Local>,
    /// Connections open per endpoint and cluster (least request, maxConnections).
    load: Arc<Load>,
    /// Upstream HTTP connections kept for the next request.
    pool: Arc<super::pool::Pool>,
    breakers: super::breaker::Breakers,
    /// Endpoints' telemetry names, made once per table.
    peers: Peers,
    /// Mirrored copies in flight (bounded: a slow mirror sheds copies, never memory).
    mirroring: std::sync::atomic::AtomicUsize,
    /// How long a connection to a sniffed port may take to show that it speaks HTTP.
    protocol_detection: std::time::Duration,
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
        local: Arc<crate::metadata_exchange::Local>,
        protocol_detection: std::time::Duration,
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
            local,
            load: Arc::default(),
            pool: Arc::default(),
            breakers: super::breaker::Breakers::default(),
            peers: Peers::default(),
            mirroring: Default::default(),
            protocol_detection,
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

    /// Whether a connection to an HTTP-routed port is served as HTTP: always on a declared
    /// HTTP port; on a sniffed one, as its first bytes say.
    async fn speaks_http(
        &self,
        client: &TcpStream,
        table: &Table,
        svc: &Service,
        dst: SocketAddr,
    ) -> bool {
        if route::http::outbound_protocol(table, svc, dst.port()) != ListenerProtocol::Auto {
            return true;
        }
        let sniffed = crate::net::sniff::sniff(client, self.protocol_detection)
            .await
            .unwrap_or(crate::net::sniff::Sniffed::Silent);
        self.metrics.detected("outbound", sniffed.label());
        tracing::debug!(original = %dst, service = %svc.host, detected = sniffed.label(), "outbound: protocol sniffed");
        sniffed.is_http()
    }

    async fn handle(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
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
        // Requests are routed one by one where a VirtualService has HTTP rules for the port,
        // or its DestinationRule limits requests; on a port of no declared protocol, only if
        // the connection turns out to speak HTTP (else its TCP routes take it, as istiod's
        // default chain).
        if (route::http::http_routes(&table, &self.subject, dialed, dst).is_some()
            || route::http::pool_needs_http(&table, &self.subject, dialed, dst))
            && self.speaks_http(&client, &table, dialed, dst).await
        {
            return self.serve_http(client, peer, dst).await;
        }
        // Read the ClientHello only where a route depends on its SNI.
        let sni = if traffic::needs_sni(&table, &self.subject, dialed, dst) {
            client_sni(&client, peer).await
        } else {
            None
        };
        let route = traffic::route(&table, &self.subject, dialed, dst, sni.as_deref());
        let cluster =
            traffic::chosen_cluster(&table, &self.subject, &route, dialed, dialed_port, dst);
        let cluster = match cluster {
            Ok(c) => c,
            Err(e) => {
                self.metrics.outbound_refused(e.label());
                tracing::warn!(%peer, original = %dst, service = %dialed.host, route = %route.by, reason = e.label(), error = %e, "outbound: refused by its route; closing");
                return;
            }
        };
        let svc = cluster.service;
        let tls = self.tls.current();
        let dial = match self.prepare(
            &table,
            &cluster,
            peer,
            dst,
            tls.as_deref(),
            Served::PerConnection,
        ) {
            Ok(d) => d,
            Err(e) => {
                self.metrics.outbound_refused(e.label());
                tracing::warn!(%peer, original = %dst, service = %svc.host, reason = e.label(), error = %e, "outbound: refused; closing");
                return;
            }
        };
        let started = Instant::now();
        let (i, upstream) = match self
            .connect(
                &dial.targets,
                &dial.policy,
                (peer, &svc.host),
                tls::Alpn::Istio,
            )
            .await
        {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(%peer, original = %dst, service = %svc.host, tried = e.tried, "outbound: no endpoint reachable; closing");
                return;
            }
        };
        let targets = &dial.targets;
        let target = &targets[i];
        let _open = self.load.open(dial.count_key(), &target.endpoint);
        let labels = labels(
            &upstream,
            target,
            svc,
            tls.as_deref(),
            (&self.local.peer, &self.peers, &table),
        );
        self.metrics.opened(&labels);
        let peer_workload = match &upstream {
            Upstream::Hbone(s) => s.peer_workload().and_then(|w| w.service.clone()),
            _ => None,
        };
        tracing::debug!(%peer, original = %dst, service = %svc.host, endpoint = %target.endpoint, "outbound connection");
        let result = match upstream {
            Upstream::Tcp(mut up) => relay(&mut client, &mut up).await,
            Upstream::Tls(mut up) | Upstream::Originated(mut up) => {
                relay(&mut client, up.as_mut()).await
            }
            Upstream::Hbone(mut up) => relay(&mut client, up.as_mut()).await,
        };
        self.metrics.closed(&labels, result.a_to_b, result.b_to_a);
        // The access log: one line per connection, at its end.
        tracing::info!(
            %peer, original = %dst, service = %svc.host, %cluster, route = %route.by,
            endpoint = %target.endpoint, gateway_network = target.gateway_network(),
            transport = target.transport.label(), authority = hbone_authority(&target.transport),
            peer_workload = peer_workload.as_deref().unwrap_or("-"),
            sent = result.a_to_b, received = result.b_to_a, end = %result.end,
            error = result.error.map(|k| k.to_string()).as_deref().unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64,
            "outbound connection closed"
        );
    }
}

/// Each endpoint's name in Istio's telemetry, made once per table version (a request names
/// its answering workload without rebuilding it).
#[derive(Default)]
pub(super) struct Peers {
    by_workload: std::sync::Mutex<(u64, std::collections::HashMap<String, metrics::Peer>)>,
}

/// Workloads named before the cache starts over.
const MAX_PEERS: usize = 4096;

impl Peers {
    pub(super) fn of(&self, table: &Table, w: &crate::mesh::Workload) -> metrics::Peer {
        let mut c = self.by_workload.lock().unwrap_or_else(|e| e.into_inner());
        if c.0 != table.version || c.1.len() >= MAX_PEERS {
            *c = (table.version, Default::default());
        }
        if let Some(p) = c.1.get(&w.name) {
            return p.clone();
        }
        let p = metrics::Peer::of_workload(w);
        c.1.insert(w.name.clone(), p.clone());
        p
    }
}

/// Whether a cluster's endpoints are dialed for a connection (its `maxConnections` refuses it
/// here) or for a request (the HTTP path's breakers count connections, requests and pending
/// requests instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Served {
    PerConnection,
    PerRequest,
}

/// How one cluster's endpoints are dialed, decided once per connection (or request).
pub(super) struct Dial {
    /// In the order to try them.
    targets: Vec<Target>,
    policy: TrafficPolicy,
    /// The cluster's name where a count or cursor is kept under it.
    cluster_key: Option<String>,
}

impl Dial {
    /// The key the cluster's open connections are counted under (only where a limit reads it).
    fn count_key(&self) -> Option<&str> {
        let limited = self.policy.pool.and_then(|p| p.max_connections).is_some();
        self.cluster_key.as_deref().filter(|_| limited)
    }
}

impl Outbound {
    /// The endpoints of `cluster` in the order to try them, unless its circuit breaker is open.
    fn prepare(
        &self,
        table: &Table,
        cluster: &Cluster<'_>,
        peer: SocketAddr,
        dst: SocketAddr,
        tls: Option<&tls::Configs>,
        served: Served,
    ) -> Result<Dial, NoRoute> {
        let policy = cluster.policy.clone();
        let max_connections = policy.pool.and_then(|p| p.max_connections);
        let lb = policy.load_balancer.unwrap_or(LoadBalancer::LeastRequest);
        // The cluster's name is a key only where its count or cursor is kept.
        let cluster_key =
            (max_connections.is_some() || lb == LoadBalancer::RoundRobin).then(|| cluster.name());
        if served == Served::PerConnection {
            if let Some(e) = self.overflow(max_connections, cluster_key.as_deref()) {
                return Err(e);
            }
        }
        let trust_domain = tls
            .map(|c| c.trust_domain())
            .unwrap_or(DEFAULT_TRUST_DOMAIN);
        let scope = Scope::Sidecar {
            network: &self.network,
            networks: &table.networks,
            trust_domain,
            original: Some(dst),
            gateway_identity: self.gateway_identity.as_ref(),
            locality: &self.subject.locality,
        };
        let plan = route::plan_cluster(cluster, scope);
        self.outliers
            .warn_unreachable(cluster.service.host.as_str(), &plan.skipped);
        let targets = balance::order(
            plan,
            &self.outliers,
            Balance {
                policy: lb,
                load: &self.load,
                cluster: cluster_key.as_deref().unwrap_or_default(),
                source: peer.ip(),
                max_ejection_percent: policy.outlier.map(|o| o.max_ejection_percent),
            },
        );
        Ok(Dial {
            targets,
            policy,
            cluster_key,
        })
    }

    /// Dials `targets` in order (the next one when one fails), as the cluster's policy says;
    /// Istio mTLS offers `alpn`.
    async fn connect(
        &self,
        targets: &[Target],
        policy: &TrafficPolicy,
        (peer, service): (SocketAddr, &Host),
        alpn: tls::Alpn,
    ) -> Result<(usize, Upstream), crate::transport::Exhausted> {
        try_targets(
            targets,
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
            service.as_str(),
            &For(
                &self.dialer,
                Origin {
                    client: peer,
                    service: service.as_str(),
                },
                alpn,
            ),
        )
        .await
    }

    /// Envoy's circuit breaker: the cluster already holds its `maxConnections`.
    fn overflow(&self, max: Option<u32>, cluster: Option<&str>) -> Option<NoRoute> {
        let (max, key) = (max?, cluster?);
        (self.load.cluster(key) >= max).then(|| NoRoute::Overflow {
            cluster: key.to_string(),
            max,
        })
    }
}

/// The SNI of the client's ClientHello, left unread in the socket: None when the client is not
/// speaking TLS (its route is then the chains without server names, as in Envoy).
async fn client_sni(client: &TcpStream, peer: SocketAddr) -> Option<String> {
    match tls::peek_client_hello(client, HELLO_WAIT, HELLO_WAIT).await {
        Ok(tls::Peeked::Tls(hello)) => hello.sni,
        Ok(other) => {
            tracing::debug!(%peer, first_flight = ?other, "outbound: no SNI on a port routed by SNI");
            None
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "outbound: reading the ClientHello failed");
            None
        }
    }
}

/// Istio's TCP metric labels for a connection made: who proved to be whom, and the answering
/// workload's version.
fn labels(
    upstream: &Upstream,
    target: &Target,
    svc: &Service,
    tls: Option<&tls::Configs>,
    (local, peers, table): (&metrics::Peer, &Peers, &Table),
) -> TcpLabels {
    let mtls = upstream.is_mtls();
    let server = upstream.peer_identity(target.transport.identities());
    let destination = match &target.via {
        route::Via::Direct(w) => peers.of(table, w),
        _ => metrics::Peer::of_principal(server.as_ref().map(SpiffeId::as_str)),
    };
    let host = svc.host.to_string();
    let workloads = metrics::Workloads::new(local, &destination, &host, &svc.namespace);
    TcpLabels::new(metrics::SOURCE, host, mtls)
        .workloads(workloads)
        .principals(
            tls.filter(|_| mtls).map(|c| c.spiffe.as_str()),
            server.as_ref().map(SpiffeId::as_str),
        )
        .version(match &target.via {
            route::Via::Direct(w) => metrics::canonical_revision(&w.labels),
            _ => metrics::UNKNOWN.into(),
        })
}

/// The CONNECT stream's authority, for the access log.
fn hbone_authority(t: &Transport) -> Option<String> {
    match t {
        Transport::Hbone { authority, .. } => Some(authority.to_string()),
        _ => None,
    }
}
