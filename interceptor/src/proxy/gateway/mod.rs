//! proxy::Gateway: the east-west gateway of a network (SPEC section 7; Istio's AUTO_PASSTHROUGH,
//! I: pilot/pkg/networking/core/gateway.go). Routes by the SNI of the client's ClientHello
//! without terminating TLS, to an endpoint of its own network, and relays the raw bytes: the
//! mTLS is end to end between the two sidecars and the gateway never sees plaintext. With a
//! certificate it also takes double HBONE's outer tunnel on 15008 (`hbone`).

mod hbone;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::mesh::traffic::Destination;
use crate::mesh::Store;
use crate::metrics::{self, Metrics, TcpLabels};
use crate::net::splice_relay;
use crate::route::policy::Subject;
use crate::route::{self, parse_sni, traffic, Outliers, Scope};
use crate::tls::{self, ClientHello, Peeked};
use crate::transport::{try_targets, Dialer, RawTcp};

/// A client that sends nothing for this long is not one of ours.
const FIRST_BYTES: Duration = Duration::from_secs(5);
const HELLO: Duration = Duration::from_secs(5);
/// At most this many endpoints are tried for one connection.
const MAX_ATTEMPTS: usize = 3;

pub struct Gateway {
    store: Arc<Store>,
    /// The gateway's own identity, for the outer tunnel of double HBONE.
    tls: Arc<tls::Store>,
    network: String,
    dialer: Dialer,
    outliers: Arc<Outliers>,
    metrics: Arc<Metrics>,
}

/// Why a connection was refused: the close is the answer, the log says why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("not TLS")]
    NotTls,
    #[error("no ClientHello within the wait")]
    Silent,
    #[error("malformed ClientHello: {0}")]
    Malformed(String),
    #[error("no istio ALPN (offered {0:?})")]
    NoIstioAlpn(Vec<String>),
    #[error("no SNI")]
    NoSni,
    #[error("SNI {0:?} is not outbound_.PORT_.SUBSET_.HOST")]
    NotIstioSni(String),
    #[error("unknown host {0:?}")]
    UnknownHost(String),
    #[error("host {host:?} has no port {port}")]
    UnknownPort { host: String, port: u16 },
    #[error("host {host:?} has no subset {subset:?}")]
    UnknownSubset { host: String, subset: String },
    #[error("no healthy mTLS endpoint of {0:?} in this network")]
    NoEndpoint(String),
    #[error("SNI {0:?} is not istiod's")]
    NotIstiod(String),
    #[error("istiod unreachable: {0}")]
    IstiodUnreachable(String),
}

impl Refusal {
    /// The value of the `reason` label of `interceptor_gateway_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NotTls => "not_tls",
            Refusal::Silent => "silent",
            Refusal::Malformed(_) => "malformed_hello",
            Refusal::NoIstioAlpn(_) => "no_istio_alpn",
            Refusal::NoSni => "no_sni",
            Refusal::NotIstioSni(_) => "not_istio_sni",
            Refusal::UnknownHost(_) => "unknown_host",
            Refusal::UnknownPort { .. } => "unknown_port",
            Refusal::UnknownSubset { .. } => "unknown_subset",
            Refusal::NoEndpoint(_) => "no_endpoint",
            Refusal::NotIstiod(_) => "not_istiod",
            Refusal::IstiodUnreachable(_) => "istiod_unreachable",
        }
    }
}

/// Where a ClientHello asks to go: (host, port, subset).
pub fn route(hello: &ClientHello) -> Result<(String, u16, String), Refusal> {
    if !hello.has_istio_alpn() {
        let offered = hello
            .alpn
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        return Err(Refusal::NoIstioAlpn(offered));
    }
    let sni = hello.sni.as_deref().ok_or(Refusal::NoSni)?;
    let (port, subset, host) =
        parse_sni(sni).ok_or_else(|| Refusal::NotIstioSni(sni.to_string()))?;
    Ok((host.to_string(), port, subset.to_string()))
}

impl Gateway {
    pub fn new(
        store: Arc<Store>,
        tls: Arc<tls::Store>,
        network: String,
        dialer: Dialer,
        outliers: Arc<Outliers>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            tls,
            network,
            dialer,
            outliers,
            metrics,
        })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, limit: Arc<crate::net::Limit>) {
        crate::net::accept_loop(
            listener,
            "gateway",
            Some(limit),
            crate::net::Tasks::Detached,
            move |stream, peer| {
                let this = self.clone();
                async move { this.handle(stream, peer).await }
            },
        )
        .await
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        let _ = client.set_nodelay(true);
        let hello = match tls::peek_client_hello(&client, FIRST_BYTES, HELLO).await {
            Ok(Peeked::Tls(hello)) => hello,
            Ok(Peeked::Plain) => return self.refuse(peer, None, Refusal::NotTls),
            Ok(Peeked::Silent) => return self.refuse(peer, None, Refusal::Silent),
            Ok(Peeked::Malformed(e)) => return self.refuse(peer, None, Refusal::Malformed(e)),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "gateway: connection failed before a ClientHello");
                return;
            }
        };
        let sni = hello.sni.clone();
        let (host, port, subset) = match route(&hello) {
            Ok(r) => r,
            Err(e) => return self.refuse(peer, sni.as_deref(), e),
        };
        // One table snapshot for the whole connection.
        let table = self.store.load();
        let Some(svc) = table.service_by_host(&host) else {
            return self.refuse(peer, sni.as_deref(), Refusal::UnknownHost(host));
        };
        let Some(svc_port) = svc.port(port) else {
            return self.refuse(peer, sni.as_deref(), Refusal::UnknownPort { host, port });
        };
        // A subset's SNI (a DestinationRule subset behind this gateway) reaches that subset's
        // endpoints only, as Istio's gateway's subset clusters do.
        let subject = Subject::default();
        let cluster = if subset.is_empty() {
            traffic::service_cluster(&table, &subject, svc, svc_port)
        } else {
            let dest = Destination {
                host: svc.host.clone(),
                subset: subset.clone(),
                port: Some(port),
                weight: 1,
                headers: None,
            };
            match traffic::cluster(&table, &subject, &dest, port) {
                Ok(c) => c,
                Err(_) => {
                    return self.refuse(
                        peer,
                        sni.as_deref(),
                        Refusal::UnknownSubset { host, subset },
                    )
                }
            }
        };
        let plan = route::plan_cluster(
            &cluster,
            Scope::Gateway {
                network: &self.network,
            },
        );
        let targets = route::order(plan, &self.outliers);
        if targets.is_empty() {
            return self.refuse(peer, sni.as_deref(), Refusal::NoEndpoint(host));
        }
        // The relay needs the raw socket: the bytes are the client's TLS, never ours.
        let (i, upstream) = match try_targets(
            &targets,
            crate::transport::Attempts::at_most(MAX_ATTEMPTS),
            &self.outliers,
            &self.metrics,
            svc.host.as_str(),
            &RawTcp(&self.dialer),
        )
        .await
        {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(%peer, service = %svc.host, tried = e.tried, "gateway: no endpoint reachable; closing");
                return;
            }
        };
        let endpoint = &targets[i].endpoint;
        tracing::info!(%peer, sni = sni.as_deref().unwrap_or("-"), %endpoint, "gateway connection");
        // The peeked ClientHello is still in the socket: the endpoint gets the client's bytes
        // from the first one on, spliced, never copied through us.
        let labels = TcpLabels::new(metrics::GATEWAY, svc.host.to_string(), true);
        self.metrics.opened(&labels);
        let result = splice_relay(&client, &upstream).await;
        let (from_client, to_client) = result.as_ref().copied().unwrap_or((0, 0));
        self.metrics.closed(&labels, from_client, to_client);
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok((sent, received)) => {
                tracing::info!(%peer, %endpoint, sent, received, duration_ms, "gateway connection closed")
            }
            Err(e) => {
                tracing::info!(%peer, %endpoint, error = %e, duration_ms, "gateway connection reset")
            }
        }
    }
}

/// Istio's `expose-istiod` Gateway: TLS whose SNI is istiod's name passes through, unterminated,
/// to istiod on the same port (15012 xDS and CA, 15017 webhooks), so a VM in another network
/// reaches the control plane only through the east-west gateway.
pub struct ExposeIstiod {
    /// istiod's name, as in the VM's discoveryAddress (`istiod.istio-system.svc`).
    pub sni: String,
    /// istiod's address; the port is the one the connection came in on.
    pub istiod: std::net::IpAddr,
    pub dialer: Dialer,
    pub metrics: Arc<Metrics>,
}

impl ExposeIstiod {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, limit: Arc<crate::net::Limit>) {
        crate::net::accept_loop(
            listener,
            "gateway",
            Some(limit),
            crate::net::Tasks::Detached,
            move |stream, peer| {
                let this = self.clone();
                async move { this.handle(stream, peer).await }
            },
        )
        .await
    }

    fn refuse(&self, peer: SocketAddr, sni: Option<&str>, why: Refusal) {
        self.metrics.gateway_refused(why.label());
        tracing::warn!(%peer, sni = sni.unwrap_or("-"), reason = %why, "gateway (istiod): connection refused");
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Ok(local) = client.local_addr() else {
            return;
        };
        let hello = match tls::peek_client_hello(&client, FIRST_BYTES, HELLO).await {
            Ok(Peeked::Tls(hello)) => hello,
            Ok(Peeked::Plain) => return self.refuse(peer, None, Refusal::NotTls),
            Ok(Peeked::Silent) => return self.refuse(peer, None, Refusal::Silent),
            Ok(Peeked::Malformed(e)) => return self.refuse(peer, None, Refusal::Malformed(e)),
            Err(_) => return,
        };
        let Some(sni) = hello.sni.as_deref() else {
            return self.refuse(peer, None, Refusal::NoSni);
        };
        if !sni.eq_ignore_ascii_case(&self.sni) {
            return self.refuse(peer, Some(sni), Refusal::NotIstiod(sni.to_string()));
        }
        let upstream = crate::route::EndpointAddr {
            address: crate::mesh::Address::Ip(self.istiod),
            port: local.port(),
        };
        let up = match self.dialer.tcp(&upstream).await {
            Ok(up) => up,
            Err(e) => {
                return self.refuse(peer, Some(sni), Refusal::IstiodUnreachable(e.to_string()))
            }
        };
        tracing::info!(%peer, sni, istiod = %upstream, "gateway connection to istiod");
        let labels = TcpLabels::new(metrics::GATEWAY, sni.to_string(), true);
        self.metrics.opened(&labels);
        let (from_client, to_client) = splice_relay(&client, &up).await.unwrap_or((0, 0));
        self.metrics.closed(&labels, from_client, to_client);
    }
}

impl Gateway {
    fn refuse(&self, peer: SocketAddr, sni: Option<&str>, why: Refusal) {
        self.metrics.gateway_refused(why.label());
        tracing::warn!(%peer, sni = sni.unwrap_or("-"), reason = %why, "gateway: connection refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(sni: Option<&str>, alpn: &[&str]) -> ClientHello {
        ClientHello {
            sni: sni.map(str::to_string),
            alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
        }
    }

    #[test]
    fn routes_istio_sni_and_refuses_the_rest() {
        let sni = "outbound_.8080_._.product.default.svc.cluster.local";
        assert_eq!(
            route(&hello(Some(sni), &["istio"])),
            Ok((
                "product.default.svc.cluster.local".into(),
                8080,
                String::new()
            ))
        );
        assert_eq!(
            route(&hello(
                Some("outbound_.8080_.v1_.product.default.svc.cluster.local"),
                &["istio"]
            )),
            Ok((
                "product.default.svc.cluster.local".into(),
                8080,
                "v1".into()
            ))
        );
        assert_eq!(
            route(&hello(Some(sni), &["h2"])),
            Err(Refusal::NoIstioAlpn(vec!["h2".into()]))
        );
        assert_eq!(route(&hello(None, &["istio"])), Err(Refusal::NoSni));
        assert!(matches!(
            route(&hello(Some("product.default"), &["istio-peer-exchange"])),
            Err(Refusal::NotIstioSni(_))
        ));
    }
}
