//! Dialing: turning a route's target into a connected upstream with the target's transport
//! (plain TCP, Istio mTLS, an HBONE stream in a pooled connection), and trying targets in order with bounded
//! attempts, timeouts and outlier marks. Every data path that connects out (outbound, the
//! gateway) goes through `try_targets`.

pub mod hbone;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::dns::Resolver;
use crate::mesh::Address;
use crate::metrics::Metrics;
use crate::net::{self, buffered, Buffered};
use crate::route::{EndpointAddr, Outliers, Target, Transport};
use crate::spiffe::SpiffeId;
use crate::tls;

/// A connected upstream.
pub enum Upstream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<Buffered>>),
    Hbone(Box<hbone::Stream>),
    /// TLS we originated (DestinationRule SIMPLE/MUTUAL): encrypted, but not Istio's mTLS.
    Originated(Box<tokio_rustls::client::TlsStream<Buffered>>),
}

impl Upstream {
    pub fn is_mtls(&self) -> bool {
        !matches!(self, Upstream::Tcp(_) | Upstream::Originated(_))
    }

    /// Who answered, as its certificate proved: one of `expected` (the verifier accepted
    /// nothing else). None for plain TCP.
    pub fn peer_identity(&self, expected: &[SpiffeId]) -> Option<SpiffeId> {
        let tls = match self {
            Upstream::Tcp(_) | Upstream::Originated(_) => return None,
            Upstream::Hbone(s) => return s.peer().cloned(),
            Upstream::Tls(tls) => tls,
        };
        if let [only] = expected {
            // The only identity the verifier accepts: no need to parse the certificate.
            return Some(only.clone());
        }
        let leaf = tls.get_ref().1.peer_certificates()?.first()?;
        crate::spiffe::uri_sans(leaf)
            .into_iter()
            .find(|id| expected.contains(id))
    }
}

/// Why one dial failed: a log line and a metric label.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Resolve(crate::dns::ResolveError),
    #[error("the endpoint requires mTLS but this VM has no certificate")]
    NoCertificate,
    /// Peers would refuse it: said here, once, rather than as their handshake errors.
    #[error(
        "the endpoint requires mTLS but this VM's certificate expired {0} s ago (not renewed)"
    )]
    CertificateExpired(u64),
    #[error("{0:?} is not a valid SNI")]
    Sni(String),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The server's certificate was refused (another root, another identity, expired).
    #[error("TLS handshake: {0}")]
    ServerCertificate(std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("HBONE: {0}")]
    Hbone(hbone::Error),
    /// The DestinationRule's TLS files cannot be used (unreadable, not PEM).
    #[error("TLS origination: {0}")]
    Origin(tls::OriginError),
}

impl DialError {
    pub fn label(&self) -> &'static str {
        match self {
            DialError::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut => "connect_timeout",
            DialError::Connect(_) => "connect",
            DialError::Resolve(_) => "resolve",
            DialError::NoCertificate => "no_certificate",
            DialError::CertificateExpired(_) => "certificate_expired",
            DialError::Sni(_) => "sni",
            DialError::Handshake(_) => "handshake",
            DialError::ServerCertificate(_) => "server_certificate",
            DialError::HandshakeTimeout => "handshake_timeout",
            DialError::Hbone(e) => e.label(),
            DialError::Origin(_) => "tls_origination_config",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub handshake: Duration,
    /// See `HEDGE_AFTER`.
    pub hedge_after: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            hedge_after: HEDGE_AFTER,
        }
    }
}

/// Dials targets with this VM's current TLS configs.
pub struct Dialer {
    tls: Arc<tls::Store>,
    configs: ClientConfigs,
    timeouts: Timeouts,
    /// Host-name endpoints are resolved by us (None: the system resolver).
    resolver: Option<Arc<Resolver>>,
    /// HBONE's pooled connections.
    hbone: hbone::Pool,
    /// TLS origination's configs (DestinationRule SIMPLE/MUTUAL).
    origin: tls::OriginConfigs,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Dialer {
    pub fn new(tls: Arc<tls::Store>, timeouts: Timeouts) -> Self {
        Self {
            tls,
            configs: ClientConfigs::default(),
            timeouts,
            resolver: None,
            hbone: hbone::Pool::new(Arc::default()),
            origin: tls::OriginConfigs::default(),
            provider: tls::provider(),
        }
    }

    /// HBONE connections and streams are counted in `metrics`, and each CONNECT names
    /// `workload` in its baggage.
    pub fn with_metrics(
        mut self,
        metrics: Arc<Metrics>,
        workload: &crate::baggage::Workload,
    ) -> Self {
        self.hbone = hbone::Pool::new(metrics).with_workload(workload);
        self
    }

    pub fn with_resolver(mut self, resolver: Arc<Resolver>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// A TCP connection to the target, as is: what a relay of someone else's bytes needs.
    pub async fn tcp(&self, endpoint: &EndpointAddr) -> Result<TcpStream, DialError> {
        let t = self.timeouts.connect;
        let ip = match (&endpoint.address, &self.resolver) {
            (Address::Ip(ip), _) => *ip,
            (Address::Hostname(h), Some(r)) => {
                let ips = r.lookup(h).await.map_err(DialError::Resolve)?;
                // The resolver returns at least one; IPv4 first. Another address of the same
                // name is another target's business: outliers are per endpoint.
                *ips.first().ok_or_else(|| {
                    DialError::Resolve(crate::dns::ResolveError::NoAddress(h.clone()))
                })?
            }
            (Address::Hostname(h), None) => {
                return net::connect_host(h, endpoint.port, t)
                    .await
                    .map_err(DialError::Connect)
            }
        };
        net::connect(std::net::SocketAddr::new(ip, endpoint.port), t)
            .await
            .map_err(DialError::Connect)
    }

    /// Connects to `target` and sets up its transport.
    pub async fn dial(&self, target: &Target) -> Result<Upstream, DialError> {
        self.dial_for(target, None, tls::Alpn::Istio).await
    }

    /// As `dial`, for an application connection (HBONE tells the peer of it; Istio mTLS
    /// offers `alpn`).
    pub async fn dial_for(
        &self,
        target: &Target,
        origin: Option<hbone::Origin<'_>>,
        alpn: tls::Alpn,
    ) -> Result<Upstream, DialError> {
        match &target.transport {
            Transport::Plain => Ok(Upstream::Tcp(self.tcp(&target.endpoint).await?)),
            Transport::Hbone {
                authority,
                identities,
            } => {
                let id = self.certificate()?;
                let Address::Ip(ip) = target.endpoint.address else {
                    return Err(DialError::Hbone(hbone::Error::Authority(
                        target.endpoint.to_string(),
                    )));
                };
                let authority = authority.to_string();
                let req = hbone::Connect {
                    tls: &id,
                    endpoint: SocketAddr::new(ip, target.endpoint.port),
                    authority: &authority,
                    identities,
                    origin,
                };
                let stream = self
                    .hbone
                    .connect(req, self.timeouts.handshake, || self.tcp(&target.endpoint))
                    .await?;
                Ok(Upstream::Hbone(Box::new(stream)))
            }
            Transport::DoubleHbone {
                authority,
                gateway_identities,
                identities,
                network,
            } => {
                let id = self.certificate()?;
                let Address::Ip(ip) = target.endpoint.address else {
                    return Err(DialError::Hbone(hbone::Error::Authority(
                        target.endpoint.to_string(),
                    )));
                };
                let req = hbone::Connect {
                    tls: &id,
                    endpoint: SocketAddr::new(ip, target.endpoint.port),
                    authority,
                    identities: gateway_identities,
                    origin,
                };
                let outer = self
                    .hbone
                    .connect(req, self.timeouts.handshake, || self.tcp(&target.endpoint))
                    .await?;
                let inner = hbone::inner(
                    &id,
                    outer,
                    authority,
                    identities,
                    network,
                    self.timeouts.handshake,
                    self.hbone.metrics(),
                )
                .await?;
                Ok(Upstream::Hbone(Box::new(inner)))
            }
            Transport::Tls { sni, identities } => {
                let id = self.certificate()?;
                let tcp = self.tcp(&target.endpoint).await?;
                let config =
                    self.configs
                        .get(&id.client, &id.roots, &target.endpoint, identities, alpn);
                let name = ServerName::try_from(sni.to_string())
                    .map_err(|_| DialError::Sni(sni.to_string()))?;
                let handshake = TlsConnector::from(config).connect(name, buffered(tcp));
                let stream = tokio::time::timeout(self.timeouts.handshake, handshake)
                    .await
                    .map_err(|_| DialError::HandshakeTimeout)?
                    .map_err(handshake_error)?;
                Ok(Upstream::Tls(Box::new(stream)))
            }
            Transport::Originate { sni, tls } => {
                let config = self
                    .origin
                    .get(tls, &self.provider)
                    .map_err(DialError::Origin)?;
                let tcp = self.tcp(&target.endpoint).await?;
                Ok(Upstream::Originated(Box::new(
                    self.originate(config, sni.as_deref(), &target.endpoint, tcp)
                        .await?,
                )))
            }
        }
    }

    /// The handshake of TLS we originate: SNI `sni` when given (else none: the endpoint's IP
    /// is what the certificate is checked against).
    async fn originate(
        &self,
        config: Arc<ClientConfig>,
        sni: Option<&str>,
        endpoint: &EndpointAddr,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<Buffered>, DialError> {
        let name = match (sni, &endpoint.address) {
            (Some(s), _) => {
                ServerName::try_from(s.to_string()).map_err(|_| DialError::Sni(s.to_string()))?
            }
            (None, Address::Ip(ip)) => ServerName::IpAddress((*ip).into()),
            (None, Address::Hostname(h)) => {
                ServerName::try_from(h.clone()).map_err(|_| DialError::Sni(h.clone()))?
            }
        };
        let handshake = TlsConnector::from(config).connect(name, buffered(tcp));
        tokio::time::timeout(self.timeouts.handshake, handshake)
            .await
            .map_err(|_| DialError::HandshakeTimeout)?
            .map_err(handshake_error)
    }
}

impl Dialer {
    /// The certificate before the connection: without a valid one there is nothing to try.
    fn certificate(&self) -> Result<Arc<tls::Configs>, DialError> {
        let id = self.tls.current().ok_or(DialError::NoCertificate)?;
        if let Ok(ago) = std::time::SystemTime::now().duration_since(id.not_after) {
            return Err(DialError::CertificateExpired(ago.as_secs()));
        }
        Ok(id)
    }
}

/// A refused server certificate is told apart from other handshake failures.
fn handshake_error(e: std::io::Error) -> DialError {
    let certificate = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
    if certificate {
        DialError::ServerCertificate(e)
    } else {
        DialError::Handshake(e)
    }
}

/// What `try_targets` dials with.
pub trait Connector: Sync {
    type Conn: Send;
    fn connect<'a>(
        &'a self,
        target: &'a Target,
    ) -> impl Future<Output = Result<Self::Conn, DialError>> + Send + 'a;

    /// How long a dial may go unanswered before the next target is dialed beside it.
    fn hedge_after(&self) -> Duration {
        HEDGE_AFTER
    }
}

/// Each target with its transport.
impl Connector for Dialer {
    type Conn = Upstream;
    fn hedge_after(&self) -> Duration {
        self.timeouts.hedge_after
    }
    fn connect<'a>(
        &'a self,
        target: &'a Target,
    ) -> impl Future<Output = Result<Upstream, DialError>> + Send + 'a {
        self.dial(target)
    }
}

/// Each target with its transport, for an application connection from `.1`.
pub struct For<'a>(pub &'a Dialer, pub hbone::Origin<'a>, pub tls::Alpn);

impl Connector for For<'_> {
    type Conn = Upstream;
    fn hedge_after(&self) -> Duration {
        self.0.timeouts.hedge_after
    }
    fn connect<'a>(
        &'a self,
        target: &'a Target,
    ) -> impl Future<Output = Result<Upstream, DialError>> + Send + 'a {
        self.0.dial_for(target, Some(self.1), self.2)
    }
}

/// Each target's address as plain TCP, whatever its transport: for relaying someone else's
/// bytes (the gateway relays its client's TLS).
pub struct RawTcp<'a>(pub &'a Dialer);

impl Connector for RawTcp<'_> {
    type Conn = TcpStream;
    fn hedge_after(&self) -> Duration {
        self.0.timeouts.hedge_after
    }
    fn connect<'a>(
        &'a self,
        target: &'a Target,
    ) -> impl Future<Output = Result<TcpStream, DialError>> + Send + 'a {
        self.0.tcp(&target.endpoint)
    }
}

/// Every target of a connection failed.
#[derive(Debug, thiserror::Error)]
#[error("no endpoint reachable ({tried} tried)")]
pub struct Exhausted {
    pub tried: usize,
    pub last: Option<DialError>,
}

/// How long a dial may go without an answer before the next target is dialed beside it. An
/// endpoint that takes the SYN and never finishes TLS, or drops SYNs, would otherwise cost each
/// connection that picks it the whole connect or handshake timeout; with this, it costs this
/// much. Far above a LAN or even a cross-region handshake.
pub const HEDGE_AFTER: Duration = Duration::from_millis(500);

/// How many targets one connection may try, and the cluster's settings for them (its
/// DestinationRule's connect timeout and outlier detection).
#[derive(Clone, Copy, Debug, Default)]
pub struct Attempts {
    pub max: usize,
    /// Instead of the daemon's connect timeout.
    pub connect_timeout: Option<Duration>,
    pub outlier: Option<crate::mesh::traffic::OutlierDetection>,
}

impl Attempts {
    pub fn at_most(max: usize) -> Self {
        Self {
            max,
            ..Default::default()
        }
    }
}

/// Dials `targets` in order, at most `attempts.max` of them: the next one when a dial fails, or
/// beside it when it has not answered within the connector's `hedge_after`; the first to answer wins and the
/// others are dropped. Marks each failure and success in `outliers` (a dial outpaced by
/// another counts as failed: it was slower than `HEDGE_AFTER`) and counts failures by reason.
/// Returns the index of the target that answered with its upstream.
pub async fn try_targets<C: Connector>(
    targets: &[Target],
    attempts: Attempts,
    outliers: &Outliers,
    metrics: &Metrics,
    service: &str,
    connector: &C,
) -> Result<(usize, C::Conn), Exhausted> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let tried = targets.len().min(attempts.max);
    let hedge_after = connector.hedge_after();
    let dial = |i: usize| {
        let target = &targets[i];
        async move {
            let result = match attempts.connect_timeout {
                None => connector.connect(target).await,
                Some(t) => tokio::time::timeout(t, connector.connect(target))
                    .await
                    .unwrap_or_else(|_| {
                        Err(DialError::Connect(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within the cluster's connectTimeout {t:?}"),
                        )))
                    }),
            };
            (i, result)
        }
    };
    let mut dialing = FuturesUnordered::new();
    let mut in_flight: Vec<usize> = Vec::new();
    let mut next = 0;
    let mut last = None;
    loop {
        if dialing.is_empty() {
            if next >= tried {
                return Err(Exhausted { tried, last });
            }
            dialing.push(dial(next));
            in_flight.push(next);
            next += 1;
        }
        let done = if next < tried {
            tokio::select! {
                done = dialing.next() => done,
                _ = tokio::time::sleep(hedge_after) => {
                    tracing::debug!(%service, endpoint = %targets[next - 1].endpoint, "no answer yet; dialing the next endpoint beside it");
                    dialing.push(dial(next));
                    in_flight.push(next);
                    next += 1;
                    continue;
                }
            }
        } else {
            dialing.next().await
        };
        let Some((i, result)) = done else { continue };
        in_flight.retain(|&j| j != i);
        match result {
            Ok(up) => {
                outliers.succeeded(&targets[i].endpoint);
                for &j in &in_flight {
                    outliers.failed_under(&targets[j].endpoint, attempts.outlier);
                    metrics.dial_failed(OUTPACED);
                    tracing::warn!(%service, endpoint = %targets[j].endpoint, reason = OUTPACED, "endpoint did not answer within {hedge_after:?}; another did");
                }
                return Ok((i, up));
            }
            Err(e) => {
                outliers.failed_under(&targets[i].endpoint, attempts.outlier);
                metrics.dial_failed(e.label());
                tracing::warn!(%service, endpoint = %targets[i].endpoint, error = %e, reason = e.label(), "endpoint failed; trying the next");
                last = Some(e);
            }
        }
    }
}

/// The failure reason of a dial another one beat (see `HEDGE_AFTER`).
pub const OUTPACED: &str = "outpaced";

/// TLS 1.3 resumption stores, one per (endpoint, expected identities). A resumed session skips
/// the certificate check, so a session is only ever offered where it was made: to the same
/// endpoint, under the same identity expectation (rustls also refuses resumption across
/// verifiers). A resumed handshake saves both certificate verifications and signatures, most of
/// the cost of a new mTLS connection. A new certificate (rotation) starts the cache over.
#[derive(Default)]
pub struct ClientConfigs {
    inner: Mutex<Option<ConfigCache>>,
}

type ConfigKey = (EndpointAddr, Vec<SpiffeId>, tls::Alpn);
/// The base the configs were made from, and the configs.
type ConfigCache = (Arc<ClientConfig>, HashMap<ConfigKey, Arc<ClientConfig>>);

/// Endpoint configs kept before the cache starts over.
const MAX_ENDPOINT_CONFIGS: usize = 4096;

impl ClientConfigs {
    pub fn get(
        &self,
        base: &Arc<ClientConfig>,
        roots: &Arc<RootCertStore>,
        endpoint: &EndpointAddr,
        expected: &[SpiffeId],
        alpn: tls::Alpn,
    ) -> Arc<ClientConfig> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match &*inner {
            Some((b, map)) => !Arc::ptr_eq(b, base) || map.len() >= MAX_ENDPOINT_CONFIGS,
            None => true,
        };
        if fresh {
            *inner = Some((base.clone(), HashMap::new()));
        }
        let Some((_, map)) = inner.as_mut() else {
            return tls::client_for(base, roots, expected.to_vec(), alpn);
        };
        map.entry((endpoint.clone(), expected.to_vec(), alpn))
            .or_insert_with(|| tls::client_for(base, roots, expected.to_vec(), alpn))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Via;

    #[test]
    fn endpoint_configs_are_kept_per_endpoint_and_identity_and_reset_on_rotation() {
        let base = || {
            Arc::new(
                ClientConfig::builder_with_provider(tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            )
        };
        let (b1, b2) = (base(), base());
        let roots = Arc::new(RootCertStore::empty());
        let id = |s: &str| vec![SpiffeId::parse(s).unwrap()];
        let ep = |ip: &str| EndpointAddr {
            address: Address::Ip(ip.parse().unwrap()),
            port: 80,
        };
        use tls::Alpn::{Http1, Istio};
        let c = ClientConfigs::default();
        let a = c.get(
            &b1,
            &roots,
            &ep("10.0.0.1"),
            &id("spiffe://td/ns/a/sa/x"),
            Istio,
        );
        let same = c.get(
            &b1,
            &roots,
            &ep("10.0.0.1"),
            &id("spiffe://td/ns/a/sa/x"),
            Istio,
        );
        assert!(
            Arc::ptr_eq(&a, &same),
            "one config (one session store) per endpoint"
        );
        let other_ep = c.get(
            &b1,
            &roots,
            &ep("10.0.0.2"),
            &id("spiffe://td/ns/a/sa/x"),
            Istio,
        );
        let other_id = c.get(
            &b1,
            &roots,
            &ep("10.0.0.1"),
            &id("spiffe://td/ns/a/sa/y"),
            Istio,
        );
        assert!(!Arc::ptr_eq(&a, &other_ep) && !Arc::ptr_eq(&a, &other_id));
        let rotated = c.get(
            &b2,
            &roots,
            &ep("10.0.0.1"),
            &id("spiffe://td/ns/a/sa/x"),
            Istio,
        );
        let http = c.get(
            &b1,
            &roots,
            &ep("10.0.0.1"),
            &id("spiffe://td/ns/a/sa/x"),
            Http1,
        );
        assert!(!Arc::ptr_eq(&a, &http), "HTTP offers other protocols");
        assert_eq!(
            http.alpn_protocols,
            [
                b"istio-http/1.1".to_vec(),
                b"istio".to_vec(),
                b"http/1.1".to_vec()
            ]
        );
        assert!(!Arc::ptr_eq(&a, &rotated), "a new identity starts over");
    }

    fn target(port: u16) -> Target {
        Target {
            endpoint: EndpointAddr {
                address: Address::Ip("127.0.0.1".parse().unwrap()),
                port,
            },
            via: Via::ServiceHost,
            transport: Transport::Plain,
        }
    }

    /// Port 1 never answers; any other answers at once.
    struct Silent;
    impl Connector for Silent {
        type Conn = u16;
        async fn connect<'a>(&'a self, target: &'a Target) -> Result<u16, DialError> {
            if target.endpoint.port == 1 {
                std::future::pending::<()>().await;
            }
            Ok(target.endpoint.port)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_endpoint_is_outpaced_by_the_next_after_the_hedge_delay() {
        let outliers = Outliers::default();
        let targets = [target(1), target(2)];
        let started = tokio::time::Instant::now();
        let (i, port) = try_targets(
            &targets,
            Attempts::at_most(3),
            &outliers,
            &Metrics::default(),
            "svc",
            &Silent,
        )
        .await
        .unwrap();
        assert_eq!((i, port), (1, 2));
        assert_eq!(started.elapsed(), HEDGE_AFTER);
        assert!(outliers.is_ejected(&targets[0].endpoint));
    }

    #[tokio::test]
    async fn try_targets_skips_a_refusing_endpoint_and_marks_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap().port();
        // A port nobody listens on: bind, learn it, close.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dialer = Dialer::new(tls::Store::new(), Timeouts::default());
        let outliers = Outliers::default();
        let targets = [target(closed), target(good)];
        let (i, up) = try_targets(
            &targets,
            Attempts::at_most(3),
            &outliers,
            &Metrics::default(),
            "svc",
            &dialer,
        )
        .await
        .unwrap();
        assert_eq!(i, 1);
        assert!(!up.is_mtls());
        assert!(outliers.is_ejected(&targets[0].endpoint));
        assert!(!outliers.is_ejected(&targets[1].endpoint));
        // At most max_attempts are tried.
        let Err(e) = try_targets(
            &targets[..1],
            Attempts::at_most(1),
            &outliers,
            &Metrics::default(),
            "svc",
            &dialer,
        )
        .await
        else {
            panic!("a closed port answered");
        };
        assert_eq!(e.tried, 1);
        assert_eq!(e.last.map(|e| e.label()), Some("connect"));
    }

    #[tokio::test]
    async fn mtls_without_a_certificate_fails_before_connecting() {
        let dialer = Dialer::new(tls::Store::new(), Timeouts::default());
        let mut t = target(1);
        t.transport = Transport::Tls {
            sni: Arc::from("outbound_.80_._.a"),
            identities: vec![],
        };
        assert!(matches!(
            dialer.dial(&t).await,
            Err(DialError::NoCertificate)
        ));
    }
}
