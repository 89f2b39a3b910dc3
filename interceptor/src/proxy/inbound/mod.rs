//! proxy::Inbound: connections sk_lookup steered to us for this VM's own service ports.
//! PERMISSIVE and STRICT as Istio's sidecar (SPEC section 6; I: pilot/pkg/networking/core/
//! filterchain_options.go). The accepted socket's local address is the original destination.
//! The HBONE port is served here too (`hbone`): always mTLS, one CONNECT stream per connection.
//! Where a policy needs the request, an HTTP port's connections are served by `http`.

mod hbone;
mod http;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::mesh::ListenerProtocol;
use crate::metrics::{self, Metrics, TcpLabels};
use crate::net::{buffered, relay};
use crate::route::{policy, InboundPolicy, MtlsMode};
use crate::spiffe::{uri_sans, SpiffeId};
use crate::tls::{self, Peeked};

/// How long to wait for a client's first bytes before treating it as a server-first protocol.
const FIRST_BYTES: Duration = Duration::from_millis(200);
const HELLO: Duration = Duration::from_secs(5);
const HANDSHAKE: Duration = Duration::from_secs(10);
const APP_CONNECT: Duration = Duration::from_secs(5);

pub struct Inbound {
    tls: Arc<tls::Store>,
    /// For double HBONE, whose streams name a service, not an address.
    store: Arc<crate::mesh::Store>,
    policy: InboundPolicy,
    /// Our listener port: a connection whose original destination is it would loop.
    own_port: u16,
    /// Connections to this port are HBONE.
    hbone_port: Option<u16>,
    /// This VM's workload: the `baggage` on each HBONE stream's 200.
    baggage: Option<hyper::header::HeaderValue>,
    /// Where our IPv4 connections to the app come from: an address capture leaves alone.
    app_source4: Ipv4Addr,
    /// Connections before their handshake is done: what slow clients hold.
    handshakes: Arc<crate::net::Limit>,
    metrics: Arc<Metrics>,
    /// Kept HTTP connections to the app (inbound HTTP).
    app_pool: Arc<crate::proxy::pool::Pool>,
    /// How our metrics name this VM, and the headers that tell HTTP peers.
    local: Arc<crate::metadata_exchange::Local>,
}

/// How an authorized connection goes on.
enum Serve {
    /// Relayed as bytes.
    L4,
    /// The port is HTTP and served per request (`--inbound-http requests`, or its policy needs
    /// each request: a path, a method, a header); the verdict without one is kept for a
    /// connection whose requests we cannot read.
    Http(policy::Decision),
}

/// How a connection was handled, for the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mtls,
    /// mTLS on a resumed session: the client's chain was verified when the session was made.
    MtlsResumed,
    TlsPassthrough,
    Plaintext,
    Hbone,
    /// Served request by request (its mTLS, if any, terminated first).
    Http,
}

/// Why a connection was not served: the access log's result and a metric label.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("error before the first bytes: {0}")]
    Peek(std::io::Error),
    #[error("rejected: plaintext in STRICT mode")]
    PlaintextStrict,
    #[error("rejected: {0}")]
    MalformedStrict(String),
    #[error("rejected: mTLS needs a certificate (--certs)")]
    NoCertificate,
    #[error("handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("refused: SNI {0:?} names a service this host does not serve on this port")]
    SniNotServed(String),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("{0}")]
    Policy(crate::route::policy::Decision),
    #[error("refused: client certificate of trust domain {0:?}")]
    ForeignTrustDomain(String),
    #[error("refused: client certificate without a SPIFFE identity")]
    NoClientIdentity,
    #[error("app unreachable: {0}")]
    App(std::io::Error),
}

impl Refused {
    fn label(&self) -> &'static str {
        match self {
            Refused::Peek(_) => "peek",
            Refused::PlaintextStrict => "plaintext_strict",
            Refused::MalformedStrict(_) => "malformed_strict",
            Refused::NoCertificate => "no_certificate",
            Refused::Handshake(e) => handshake_label(e),
            Refused::SniNotServed(_) => "sni_not_served",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::Policy(d) => d.reason.label(),
            Refused::ForeignTrustDomain(_) => "foreign_trust_domain",
            Refused::NoClientIdentity => "no_client_identity",
            Refused::App(_) => "app_unreachable",
        }
    }
}

/// Why a handshake failed, as precisely as rustls says: an operator chasing refusals needs
/// "their certificate expired" apart from "they trust another root".
fn handshake_label(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => "client_cert_expired",
        Some(E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => {
            "client_cert_not_yet_valid"
        }
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => "client_cert_untrusted",
        Some(E::InvalidCertificate(_)) => "client_cert_invalid",
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::PeerIncompatible(_)) => "tls_incompatible",
        _ => "handshake",
    }
}

/// One connection, for its access-log line.
struct Conn {
    peer: SocketAddr,
    dst: SocketAddr,
    started: Instant,
    kind: Option<Kind>,
    identity: Option<SpiffeId>,
    /// Held until the handshake is done (or the connection is known not to have one).
    pending: Option<crate::net::Permit>,
    /// Whether it speaks HTTP, where its port is sniffed: as its mTLS ALPN or its first
    /// plaintext bytes say (None: not told; served as bytes).
    speaks_http: Option<bool>,
}

impl Conn {
    fn log(&self, received: u64, sent: u64, result: &dyn std::fmt::Display) {
        tracing::info!(
            peer = %self.peer, service = %self.dst, mode = ?self.kind,
            identity = self.identity.as_ref().map(SpiffeId::as_str).unwrap_or("-"),
            received, sent, duration_ms = self.started.elapsed().as_millis() as u64,
            result = %result, "inbound connection"
        );
    }

    /// A relayed connection's line: what moved each way and how it ended, whatever ended it.
    fn log_relayed(&self, r: &crate::net::Relayed) {
        tracing::info!(
            peer = %self.peer, service = %self.dst, mode = ?self.kind,
            identity = self.identity.as_ref().map(SpiffeId::as_str).unwrap_or("-"),
            received = r.a_to_b, sent = r.b_to_a, end = %r.end,
            error = r.error.map(|k| k.to_string()).as_deref().unwrap_or("-"),
            duration_ms = self.started.elapsed().as_millis() as u64,
            result = "ok", "inbound connection"
        );
    }
}

impl Inbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tls: Arc<tls::Store>,
        store: Arc<crate::mesh::Store>,
        policy: InboundPolicy,
        own_port: u16,
        hbone_port: Option<u16>,
        workload: crate::baggage::Workload,
        local: Arc<crate::metadata_exchange::Local>,
        app_source4: Ipv4Addr,
        handshakes: Arc<crate::net::Limit>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            tls,
            store,
            policy,
            own_port,
            hbone_port,
            baggage: workload
                .header()
                .and_then(|b| hyper::header::HeaderValue::from_str(&b).ok()),
            local,
            app_source4,
            handshakes,
            metrics,
            app_pool: Arc::default(),
        })
    }

    /// Serves `listener`, at most `limit`'s connections at once.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, limit: Arc<crate::net::Limit>) {
        crate::net::accept_loop(
            listener,
            "inbound",
            Some(limit),
            crate::net::Tasks::Drained,
            move |stream, peer| {
                let this = self.clone();
                async move { this.handle(stream, peer).await }
            },
        )
        .await
    }

    async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Ok(dst) = stream.local_addr() else { return };
        if dst.port() == self.own_port {
            tracing::warn!(%peer, %dst, "inbound: connection to the proxy itself; closing");
            return;
        }
        let Some(pending) = self.handshakes.try_take() else {
            self.metrics.inbound_refused(self.handshakes.name);
            crate::net::reset(stream);
            return;
        };
        let mut conn = Conn {
            peer,
            dst,
            started: Instant::now(),
            kind: None,
            identity: None,
            pending: Some(pending),
            speaks_http: None,
        };
        let served = if Some(dst.port()) == self.hbone_port {
            let _ = stream.set_nodelay(true);
            self.clone().hbone(stream, &mut conn).await
        } else {
            self.clone().serve_one(stream, &mut conn).await
        };
        if let Err(why) = served {
            self.metrics.inbound_refused(why.label());
            conn.log(0, 0, &why);
        }
    }

    /// AuthorizationPolicy (and `--inbound-allow`) for a connection whose client is known.
    fn authorize(&self, conn: &Conn, mtls: bool) -> Result<Serve, Refused> {
        let table = self.store.load();
        let decision = policy::authorize(
            &table,
            &self.policy,
            &policy::Request {
                port: conn.dst.port(),
                identity: conn.identity.as_ref(),
                mtls,
                source: conn.peer.ip().to_canonical(),
                destination: conn.dst.ip().to_canonical(),
                http: None,
            },
        );
        // An HTTP port is served per request (each judged on its own, as Envoy's HTTP RBAC),
        // or, with `--inbound-http connections`, only where the verdict needs a request.
        if self.per_request(&table, conn.dst, conn.speaks_http, &decision) {
            return Ok(Serve::Http(decision));
        }
        audit(&decision, conn.peer, conn.dst);
        match decision.allowed {
            true => Ok(Serve::L4),
            false => Err(Refused::Policy(decision)),
        }
    }

    /// Istio's workload labels of an inbound connection: the client as its identity tells
    /// (its namespace), this VM as the destination.
    fn inbound_workloads(&self, source: Option<&str>, service: &str) -> metrics::Workloads {
        let local = &self.local.peer;
        metrics::Workloads::new(
            &metrics::Peer::of_principal(source),
            local,
            service,
            &local.namespace,
        )
    }

    /// A connection to an HTTP port, served request by request.
    async fn serve_requests<I>(self: &Arc<Self>, io: I, conn: &mut Conn, mtls: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        conn.kind = Some(Kind::Http);
        let client = self.http_client(conn.peer, conn.dst, conn.identity.clone(), mtls);
        self.serve_http(io, client).await;
        conn.log(0, 0, &"served as HTTP (requests logged one by one)");
    }

    /// Who asks on a connection (or HBONE stream) to `dst` served as HTTP, and the service
    /// there.
    fn http_client(
        &self,
        peer: SocketAddr,
        dst: SocketAddr,
        identity: Option<SpiffeId>,
        mtls: bool,
    ) -> http::Client {
        let table = self.store.load();
        let service = crate::route::inbound_service(&table, dst);
        http::Client {
            peer,
            dst,
            identity,
            mtls,
            app_h2: service.is_some_and(|(_, sp)| sp.is_http2()),
            app_as_client: crate::route::inbound_protocol(&table, dst) == ListenerProtocol::Auto,
            service: service.map_or_else(|| dst.to_string(), |(s, _)| s.host.to_string()),
            service_namespace: service
                .map(|(s, _)| s.namespace.clone())
                .unwrap_or_default(),
            baggage: None,
        }
    }

    /// Whether a connection to `dst` with this verdict is served request by request: an HTTP
    /// port (or a sniffed one the connection speaks HTTP to), under `--inbound-http requests`
    /// or a policy that needs a request's attributes.
    fn per_request(
        &self,
        table: &crate::mesh::Table,
        dst: SocketAddr,
        speaks_http: Option<bool>,
        decision: &policy::Decision,
    ) -> bool {
        let wanted = self.policy.http_requests || (!decision.allowed && decision.needs_http);
        wanted
            && match crate::route::inbound_protocol(table, dst) {
                ListenerProtocol::Http => true,
                ListenerProtocol::Auto => speaks_http == Some(true),
                ListenerProtocol::Tcp => false,
            }
    }

    /// On a sniffed port, whether a plaintext connection speaks HTTP, from its first bytes.
    async fn sniff(&self, stream: &TcpStream, conn: &mut Conn) {
        let table = self.store.load();
        if crate::route::inbound_protocol(&table, conn.dst) != ListenerProtocol::Auto {
            return;
        }
        let sniffed = crate::net::sniff::sniff(stream, self.policy.protocol_detection)
            .await
            .unwrap_or(crate::net::sniff::Sniffed::Silent);
        self.metrics.detected("inbound", sniffed.label());
        conn.speaks_http = Some(sniffed.is_http());
    }

    async fn serve_one(self: Arc<Self>, stream: TcpStream, conn: &mut Conn) -> Result<(), Refused> {
        let _ = stream.set_nodelay(true);
        let mode = policy::mtls_mode(&self.store.load(), &self.policy, conn.dst.port()).mode;
        let strict = mode == MtlsMode::Strict;
        let first = if strict { HELLO } else { FIRST_BYTES };
        let peeked = tls::peek_client_hello(&stream, first, HELLO)
            .await
            .map_err(Refused::Peek)?;
        match peeked {
            // DISABLE: nothing is terminated, whatever it looks like.
            Peeked::Tls(_) | Peeked::Malformed(_) if mode == MtlsMode::Disable => {
                self.passthrough(stream, conn, Kind::TlsPassthrough).await
            }
            Peeked::Tls(hello) if strict || hello.has_istio_alpn() => {
                conn.speaks_http = Some(hello.alpn.iter().any(|a| tls::is_istio_http_alpn(a)));
                if let Some(sni) = &hello.sni {
                    let table = self.store.load();
                    if crate::route::sni_served(&table, sni, conn.dst) == Some(false) {
                        return Err(Refused::SniNotServed(sni.clone()));
                    }
                }
                self.terminate(stream, conn).await
            }
            Peeked::Tls(_) => self.passthrough(stream, conn, Kind::TlsPassthrough).await,
            Peeked::Plain | Peeked::Silent if !strict => {
                // A client silent this long speaks second: bytes, not waited for twice.
                if matches!(peeked, Peeked::Silent) {
                    conn.speaks_http = Some(false);
                }
                self.passthrough(stream, conn, Kind::Plaintext).await
            }
            Peeked::Plain | Peeked::Silent => Err(Refused::PlaintextStrict),
            Peeked::Malformed(e) if !strict => {
                // Not ours to judge: the app may speak something TLS-like.
                tracing::debug!(peer = %conn.peer, error = %e, "inbound: unparsable TLS passed through");
                self.passthrough(stream, conn, Kind::TlsPassthrough).await
            }
            Peeked::Malformed(e) => Err(Refused::MalformedStrict(e)),
        }
    }

    async fn terminate(
        self: &Arc<Self>,
        stream: TcpStream,
        conn: &mut Conn,
    ) -> Result<(), Refused> {
        conn.kind = Some(Kind::Mtls);
        let id = self.tls.current().ok_or(Refused::NoCertificate)?;
        let accept = TlsAcceptor::from(id.server.clone()).accept(buffered(stream));
        let mut tls = tokio::time::timeout(HANDSHAKE, accept)
            .await
            .map_err(|_| Refused::HandshakeTimeout)?
            .map_err(Refused::Handshake)?;
        conn.pending = None;
        conn.identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| uri_sans(leaf).into_iter().next());
        // The roots verified the chain; as Istio's inbound (its SAN matcher is the trust
        // domain's spiffe:// prefix), the identity must also be of our trust domain.
        let refusal = match &conn.identity {
            Some(c) if c.trust_domain() == id.trust_domain() => None,
            Some(c) => Some(Refused::ForeignTrustDomain(c.trust_domain().to_string())),
            None => Some(Refused::NoClientIdentity),
        };
        if let Some(refusal) = refusal {
            let _ = tls.shutdown().await;
            return Err(refusal);
        }
        match self.authorize(conn, true) {
            Err(refused) => {
                let _ = tls.shutdown().await;
                return Err(refused);
            }
            Ok(Serve::Http(_)) => {
                self.serve_requests(tls, conn, true).await;
                return Ok(());
            }
            Ok(Serve::L4) => {}
        }
        let mut app = connect_app(conn.dst, self.app_source4)
            .await
            .map_err(Refused::App)?;
        if let Some(rustls::HandshakeKind::Resumed) = tls.get_ref().1.handshake_kind() {
            conn.kind = Some(Kind::MtlsResumed);
        }
        let source = conn.identity.as_ref().map(SpiffeId::as_str);
        let labels = TcpLabels::new(metrics::DESTINATION, conn.dst.to_string(), true)
            .principals(source, Some(id.spiffe.as_str()))
            .workloads(self.inbound_workloads(source, &conn.dst.to_string()));
        self.metrics.opened(&labels);
        let r = relay(&mut tls, &mut app).await;
        self.metrics.closed(&labels, r.a_to_b, r.b_to_a);
        conn.log_relayed(&r);
        Ok(())
    }

    async fn passthrough(
        self: &Arc<Self>,
        mut stream: TcpStream,
        conn: &mut Conn,
        kind: Kind,
    ) -> Result<(), Refused> {
        conn.kind = Some(kind);
        conn.pending = None;
        if kind == Kind::Plaintext && conn.speaks_http.is_none() {
            self.sniff(&stream, conn).await;
        }
        // Istio applies AuthorizationPolicy to plaintext too: no principal, no namespace.
        match self.authorize(conn, false) {
            Err(refused) => {
                crate::net::reset(stream);
                return Err(refused);
            }
            Ok(Serve::Http(_)) if kind == Kind::Plaintext => {
                self.serve_requests(stream, conn, false).await;
                return Ok(());
            }
            // TLS we do not terminate: its requests cannot be read; the verdict without them
            // stands (failed closed), and an allowed one passes as bytes.
            Ok(Serve::Http(decision)) if !decision.allowed => {
                audit(&decision, conn.peer, conn.dst);
                crate::net::reset(stream);
                return Err(Refused::Policy(decision));
            }
            Ok(Serve::Http(_) | Serve::L4) => {}
        }
        let mut app = connect_app(conn.dst, self.app_source4)
            .await
            .map_err(Refused::App)?;
        let labels = TcpLabels::new(metrics::DESTINATION, conn.dst.to_string(), false)
            .workloads(self.inbound_workloads(None, &conn.dst.to_string()));
        self.metrics.opened(&labels);
        let r = relay(&mut stream, &mut app).await;
        self.metrics.closed(&labels, r.a_to_b, r.b_to_a);
        conn.log_relayed(&r);
        Ok(())
    }
}

/// AUDIT policies decide nothing; that they matched is logged, as Istio's audit log.
fn audit(decision: &policy::Decision, peer: SocketAddr, dst: SocketAddr) {
    if !decision.audited.is_empty() {
        tracing::info!(%peer, %dst, audited = ?decision.audited, allowed = decision.allowed, "inbound connection matched an AUDIT policy");
    }
}

/// Connects to the local app at the original destination. IPv4 from `source4` (127.0.0.6, as
/// Istio's sidecar does), which sk_lookup skips so we are not captured again; IPv6 over
/// loopback.
async fn connect_app(dst: SocketAddr, source4: Ipv4Addr) -> std::io::Result<TcpStream> {
    let (socket, target) = if dst.is_ipv4() {
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddr::from((source4, 0)))?;
        (s, dst)
    } else {
        (
            TcpSocket::new_v6()?,
            SocketAddr::from((Ipv6Addr::LOCALHOST, dst.port())),
        )
    };
    let stream = tokio::time::timeout(APP_CONNECT, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
