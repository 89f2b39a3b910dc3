//! proxy::Outbound: accepts captured connections, finds the service from the original
//! destination and forwards to a healthy endpoint (mTLS for Istio endpoints, plaintext for the
//! rest), trying the next endpoint when one fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::pick::{self, Outliers, Scope, Target};
use super::relay::{buffered, relay, Buffered};
use crate::capture::OriginalDst;
use crate::identity::{self, SpiffeId};
use crate::mesh::{Address, Health, Resolution, Service, ServicePort, Store, Workload};
use crate::metrics::{self, Metrics, TcpLabels};
use crate::tls;

/// At most this many endpoints are tried for one connection.
const MAX_ATTEMPTS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection towards an endpoint.
enum Upstream {
    Plain(TcpStream),
    Mtls(Box<tokio_rustls::client::TlsStream<Buffered>>),
}

pub struct Outbound {
    store: Arc<Store>,
    identity: Arc<identity::Store>,
    orig: Arc<OriginalDst>,
    outliers: Outliers,
    /// Our own listener addresses: a connection whose original destination is one of them would
    /// loop.
    own: Vec<SocketAddr>,
    /// This VM's network: endpoints elsewhere are reached through their network's gateway.
    network: String,
    metrics: Arc<Metrics>,
    tls_configs: tls::ClientConfigs,
}

impl Outbound {
    pub fn new(
        store: Arc<Store>,
        identity: Arc<identity::Store>,
        orig: Arc<OriginalDst>,
        own: Vec<SocketAddr>,
        network: String,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            identity,
            orig,
            outliers: Outliers::default(),
            own,
            network,
            metrics,
            tls_configs: tls::ClientConfigs::default(),
        })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        super::accept_loop(listener, "outbound", move |stream, peer| {
            let this = self.clone();
            async move { this.handle(stream, peer).await }
        })
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
        let Some((svc, port)) = table.service_for(dst) else {
            tracing::warn!(%peer, original = %dst, "outbound: no mesh service at the original destination; closing");
            return;
        };
        let scope = Scope::Sidecar {
            network: &self.network,
            networks: &table.networks,
        };
        let mut targets = pick::order(svc, port, scope, &self.outliers);
        if targets.is_empty() && svc.resolution == Resolution::Dns {
            // A DNS service without endpoints is reached at its own host name (Istio does this).
            targets.push(dns_self_target(svc, port));
        }
        let started = Instant::now();
        let tried = targets.len().min(MAX_ATTEMPTS);
        for target in targets.iter().take(MAX_ATTEMPTS) {
            match self.connect(svc, port, target).await {
                Ok(upstream) => {
                    self.outliers.succeeded(target);
                    let mtls = matches!(upstream, Upstream::Mtls(_));
                    let labels = TcpLabels::new(metrics::SOURCE, svc.host.to_string(), mtls);
                    self.metrics.opened(&labels);
                    tracing::info!(%peer, original = %dst, service = %svc.host, endpoint = %target.label(), gateway_network = target.gateway_network(), mtls, "outbound connection");
                    let result = match upstream {
                        Upstream::Plain(mut up) => relay(&mut client, &mut up).await,
                        Upstream::Mtls(mut up) => relay(&mut client, up.as_mut()).await,
                    };
                    let _ = client.shutdown().await;
                    let (from_client, to_client) = result.as_ref().copied().unwrap_or((0, 0));
                    self.metrics.closed(&labels, from_client, to_client);
                    log_close(&result, dst, svc, target, started);
                    return;
                }
                Err(e) => {
                    self.outliers.failed(target);
                    tracing::warn!(original = %dst, service = %svc.host, endpoint = %target.label(), error = %e, "outbound: endpoint failed; trying the next");
                }
            }
        }
        tracing::warn!(%peer, original = %dst, service = %svc.host, tried, "outbound: no endpoint reachable; closing");
    }

    async fn connect(
        &self,
        svc: &Service,
        port: &ServicePort,
        target: &Target,
    ) -> std::io::Result<Upstream> {
        let tcp = target.connect(CONNECT_TIMEOUT).await?;
        if !target.speaks_istio_mtls() {
            return Ok(Upstream::Plain(tcp));
        }
        let id = self.identity.current().ok_or_else(|| {
            std::io::Error::other(
                "endpoint requires mTLS but no certificate is configured (--certs)",
            )
        })?;
        // Through a gateway: any endpoint behind it may answer, and it is their identity we
        // check, never the gateway's (it only relays our TLS).
        let expected = expected_identities(svc, target.workloads(), id.trust_domain());
        let config = self
            .tls_configs
            .get(&id.client, &id.roots, target.label(), expected);
        let name = ServerName::try_from(tls::sni(port.number, "", svc.host.as_str()))
            .map_err(std::io::Error::other)?;
        let handshake = TlsConnector::from(config).connect(name, buffered(tcp));
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        Ok(Upstream::Mtls(Box::new(stream)))
    }
}

/// Who may answer for `svc` on these workloads: the ServiceEntry's subjectAltNames when given,
/// else each workload's service account in our trust domain.
pub fn expected_identities(
    svc: &Service,
    workloads: &[Arc<Workload>],
    trust_domain: &str,
) -> Vec<SpiffeId> {
    let from_entry: Vec<SpiffeId> = svc
        .subject_alt_names
        .iter()
        .filter_map(|s| SpiffeId::parse(s))
        .collect();
    if !from_entry.is_empty() {
        return from_entry;
    }
    let mut ids: Vec<SpiffeId> = Vec::new();
    for w in workloads {
        let id = SpiffeId::new(trust_domain, &w.namespace, &w.service_account);
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

fn dns_self_target(svc: &Service, port: &ServicePort) -> Target {
    let w = Workload {
        name: format!("{}#dns", svc.origin),
        namespace: svc.namespace.clone(),
        address: Address::Hostname(svc.host.to_string()),
        labels: Default::default(),
        ports: Default::default(),
        network: String::new(),
        locality: String::new(),
        weight: 1,
        service_account: String::new(),
        health: Health::Healthy,
    };
    Target::direct(Arc::new(w), port)
}

fn log_close(
    result: &std::io::Result<(u64, u64)>,
    dst: SocketAddr,
    svc: &Service,
    target: &Target,
    started: Instant,
) {
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok((sent, received)) => tracing::info!(
            original = %dst, service = %svc.host, endpoint = %target.label(), sent, received, duration_ms,
            "outbound connection closed"
        ),
        Err(e) => tracing::info!(
            original = %dst, service = %svc.host, endpoint = %target.label(), error = %e, duration_ms,
            "outbound connection reset"
        ),
    }
}
