//! HBONE inbound (SPEC 11; I: ztunnel src/proxy/inbound.rs): TLS 1.3 with ALPN h2 and a
//! client certificate of our trust domain, then one CONNECT stream per proxied connection.
//! Each stream is answered as ztunnel does: 400 for anything but a CONNECT to this VM's own
//! address (never an open proxy), 401 when the allow-list refuses the client's identity, 503
//! when the app refuses, 200 and the bytes both ways otherwise. The app sees the connection
//! from 127.0.0.6, as from the sidecar wire.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{connect_app, Conn, Inbound, Kind, Refused, HANDSHAKE};
use crate::baggage::{self, Workload};
use crate::mesh::{Address, ListenerProtocol};
use crate::metrics::{self, TcpLabels, INBOUND};
use crate::net::sniff::{sniff_read, Rewind};
use crate::net::{buffered, relay};
use crate::spiffe::{uri_sans, SpiffeId};
use crate::transport::hbone::serve_draining;

/// Why one stream was refused: its status and a metric label.
#[derive(Debug, thiserror::Error)]
enum StreamRefused {
    #[error("not a CONNECT ({0})")]
    NotConnect(Method),
    #[error("authority {0:?} is not IP:port")]
    BadAuthority(String),
    #[error("authority {0} is not this VM's address {1}")]
    NotLocal(SocketAddr, std::net::IpAddr),
    #[error("authority {0:?}: no such service port with an endpoint on this VM")]
    NotLocalService(String),
    #[error("port {0}: {1}")]
    NotAllowed(u16, crate::route::policy::Decision),
    #[error("app unreachable: {0}")]
    App(std::io::Error),
}

impl StreamRefused {
    fn status(&self) -> StatusCode {
        match self {
            StreamRefused::NotConnect(_)
            | StreamRefused::BadAuthority(_)
            | StreamRefused::NotLocal(..)
            | StreamRefused::NotLocalService(_) => StatusCode::BAD_REQUEST,
            StreamRefused::NotAllowed(..) => StatusCode::UNAUTHORIZED,
            StreamRefused::App(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            StreamRefused::NotConnect(_) => "hbone_not_connect",
            StreamRefused::BadAuthority(_) => "hbone_bad_authority",
            StreamRefused::NotLocal(..) | StreamRefused::NotLocalService(_) => "hbone_not_local",
            StreamRefused::NotAllowed(_, d) => d.reason.label(),
            StreamRefused::App(_) => "app_unreachable",
        }
    }
}

/// A stream let in: relayed to the app's connection, served request by request, or (a port of
/// no declared protocol) told by its first bytes.
enum Opened {
    App(SocketAddr, TcpStream),
    Requests(SocketAddr),
    Sniff(SocketAddr, crate::route::policy::Decision),
}

/// What a stream's CONNECT says of its client, taken before the upgrade consumes it.
struct Head {
    forwarded: Option<String>,
    source: Workload,
}

impl Head {
    fn of(req: &Request<hyper::body::Incoming>) -> Self {
        Self {
            forwarded: req
                .headers()
                .get("forwarded")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            source: Workload::parse(
                req.headers()
                    .get_all("baggage")
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            ),
        }
    }
}

type Tunneled = TokioIo<hyper::upgrade::Upgraded>;

/// What every stream of one connection shares.
struct Tunnel {
    inbound: Arc<Inbound>,
    /// The connection's local address: the VM address the peer dialled.
    local: SocketAddr,
    peer: SocketAddr,
    client: Option<SpiffeId>,
    ours: SpiffeId,
}

impl Inbound {
    /// Serves one HBONE connection until the peer closes it.
    pub(super) async fn hbone(
        self: Arc<Self>,
        stream: TcpStream,
        conn: &mut Conn,
    ) -> Result<(), Refused> {
        conn.kind = Some(Kind::Hbone);
        let id = self.tls.current().ok_or(Refused::NoCertificate)?;
        let accept = TlsAcceptor::from(id.hbone_server.clone()).accept(buffered(stream));
        let tls = tokio::time::timeout(HANDSHAKE, accept)
            .await
            .map_err(|_| Refused::HandshakeTimeout)?
            .map_err(Refused::Handshake)?;
        conn.pending = None;
        let client = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| uri_sans(leaf).into_iter().next());
        conn.identity = client.clone();
        // The roots verified the chain; the identity must also be of our trust domain.
        match &client {
            Some(c) if c.trust_domain() == id.trust_domain() => {}
            Some(c) => return Err(Refused::ForeignTrustDomain(c.trust_domain().to_string())),
            None => return Err(Refused::NoClientIdentity),
        }
        self.metrics.hbone_connection(INBOUND);
        let tunnel = Arc::new(Tunnel {
            inbound: self.clone(),
            local: conn.dst,
            peer: conn.peer,
            client,
            ours: id.spiffe.clone(),
        });
        let service = hyper::service::service_fn(move |req| {
            let tunnel = tunnel.clone();
            async move { Ok::<_, Infallible>(tunnel.stream(req).await) }
        });
        let served = serve_draining(TokioIo::new(tls), service).await;
        self.metrics.hbone_connection_closed(INBOUND);
        match served {
            Ok(()) => conn.log(0, 0, &"HBONE connection closed"),
            Err(e) => conn.log(0, 0, &format_args!("HBONE connection ended: {e}")),
        }
        Ok(())
    }
}

impl Tunnel {
    async fn stream(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Empty<Bytes>> {
        let started = Instant::now();
        match self.open(&req).await {
            Ok(opened) => {
                let this = self.clone();
                crate::net::drain::spawn(async move {
                    match opened {
                        Opened::App(authority, app) => {
                            this.relay(req, authority, app, started).await
                        }
                        Opened::Requests(authority) => this.requests(req, authority).await,
                        Opened::Sniff(authority, decision) => {
                            this.sniffed(req, authority, decision, started).await
                        }
                    }
                });
                let mut ok = status(StatusCode::OK);
                if let Some(b) = &self.inbound.baggage {
                    ok.headers_mut().insert("baggage", b.clone());
                }
                ok
            }
            Err(why) => {
                self.inbound.metrics.inbound_refused(why.label());
                tracing::info!(
                    peer = %self.peer, identity = self.client.as_ref().map(SpiffeId::as_str).unwrap_or("-"),
                    authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
                    status = why.status().as_u16(), result = %why, "inbound HBONE stream refused"
                );
                status(why.status())
            }
        }
    }

    /// Checks the stream and connects to the app: the 200 means the app took it. A stream to
    /// an HTTP port served per request connects nothing yet: its requests go to the app one by
    /// one, as the sidecar's inbound HTTP chains take HBONE's inner streams.
    async fn open(&self, req: &Request<hyper::body::Incoming>) -> Result<Opened, StreamRefused> {
        if req.method() != Method::CONNECT {
            return Err(StreamRefused::NotConnect(req.method().clone()));
        }
        let raw = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let local = self.local.ip().to_canonical();
        let authority = match raw.parse::<SocketAddr>() {
            Ok(a) if a.ip().to_canonical() == local => a,
            Ok(a) => return Err(StreamRefused::NotLocal(a, local)),
            // Double HBONE names the service: its port on this VM's own endpoint.
            Err(_) => SocketAddr::new(local, self.service_port(raw)?),
        };
        let decision = crate::route::policy::authorize(
            &self.inbound.store.load(),
            &self.inbound.policy,
            &crate::route::policy::Request {
                port: authority.port(),
                identity: self.client.as_ref(),
                mtls: true,
                source: self.peer.ip().to_canonical(),
                destination: authority.ip(),
                http: None,
            },
        );
        let table = self.inbound.store.load();
        if self.inbound.per_request(&table, authority, None, &decision) {
            return Ok(Opened::Requests(authority));
        }
        // A port of no declared protocol that would be served per request if the stream
        // speaks HTTP: its first bytes (inside the stream, after the 200) decide, as the
        // sidecar's sniffed inbound chains. A refusal no request could change is said now.
        if crate::route::inbound_protocol(&table, authority) == ListenerProtocol::Auto
            && self
                .inbound
                .per_request(&table, authority, Some(true), &decision)
            && (decision.allowed || decision.needs_http)
        {
            return Ok(Opened::Sniff(authority, decision));
        }
        super::audit(&decision, self.peer, authority);
        if !decision.allowed {
            return Err(StreamRefused::NotAllowed(authority.port(), decision));
        }
        let app = connect_app(authority, self.inbound.app_source4)
            .await
            .map_err(StreamRefused::App)?;
        Ok(Opened::App(authority, app))
    }

    /// The port this VM serves `host:port` of a mesh service on (SPEC 11: the destination
    /// maps the service port to its target port); only a service with an endpoint at this
    /// VM's address.
    fn service_port(&self, raw: &str) -> Result<u16, StreamRefused> {
        let bad = || StreamRefused::BadAuthority(raw.to_string());
        let (host, port) = raw.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let table = self.inbound.store.load();
        let svc = table
            .service_by_host(&host.to_ascii_lowercase())
            .ok_or_else(|| StreamRefused::NotLocalService(raw.to_string()))?;
        let sp = svc
            .port(port)
            .ok_or_else(|| StreamRefused::NotLocalService(raw.to_string()))?;
        let local = Address::Ip(self.local.ip().to_canonical());
        svc.endpoints_for(sp)
            .iter()
            .find(|w| w.address == local)
            .map(|w| w.target_port(sp))
            .ok_or_else(|| StreamRefused::NotLocalService(raw.to_string()))
    }

    /// The stream's bytes once its 200 is sent (counted), or None if it was reset first.
    async fn upgrade(
        &self,
        req: Request<hyper::body::Incoming>,
        authority: SocketAddr,
    ) -> Option<Tunneled> {
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                self.inbound.metrics.hbone_stream(INBOUND);
                Some(TokioIo::new(up))
            }
            Err(e) => {
                tracing::info!(peer = %self.peer, %authority, error = %e, "inbound HBONE stream reset before it opened");
                None
            }
        }
    }

    /// A stream to an HTTP port, served request by request after its 200.
    async fn requests(&self, req: Request<hyper::body::Incoming>, authority: SocketAddr) {
        let head = Head::of(&req);
        if let Some(tunnel) = self.upgrade(req, authority).await {
            self.serve_requests(tunnel, &head, authority).await;
        }
    }

    async fn serve_requests<I>(&self, io: I, head: &Head, authority: SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let mut client = self
            .inbound
            .http_client(self.peer, authority, self.client.clone(), true);
        client.baggage = Some(metrics::Peer::of_baggage(&head.source));
        self.inbound.serve_http(io, client).await;
    }

    /// A stream to a port of no declared protocol: HTTP served per request, other bytes (or
    /// none: a server-first protocol) relayed to the app if the policy lets them in. The 200
    /// is already sent: a refusal or an unreachable app ends the stream.
    async fn sniffed(
        &self,
        req: Request<hyper::body::Incoming>,
        authority: SocketAddr,
        decision: crate::route::policy::Decision,
        started: Instant,
    ) {
        let head = Head::of(&req);
        let Some(mut tunnel) = self.upgrade(req, authority).await else {
            return;
        };
        let wait = self.inbound.policy.protocol_detection;
        let (sniffed, read) = match sniff_read(&mut tunnel, super::FIRST_BYTES, wait).await {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(peer = %self.peer, %authority, error = %e, "inbound HBONE stream ended before it spoke");
                return;
            }
        };
        self.inbound.metrics.detected("inbound", sniffed.label());
        let tunnel = Rewind::new(read, tunnel);
        if sniffed.is_http() {
            return self.serve_requests(tunnel, &head, authority).await;
        }
        super::audit(&decision, self.peer, authority);
        let refused = if decision.allowed {
            match connect_app(authority, self.inbound.app_source4).await {
                Ok(app) => {
                    return self
                        .relay_bytes(tunnel, &head, authority, app, started)
                        .await
                }
                Err(e) => StreamRefused::App(e),
            }
        } else {
            StreamRefused::NotAllowed(authority.port(), decision)
        };
        self.inbound.metrics.inbound_refused(refused.label());
        tracing::info!(
            peer = %self.peer, identity = self.client.as_ref().map(SpiffeId::as_str).unwrap_or("-"),
            %authority, protocol = sniffed.label(), result = %refused,
            "inbound HBONE stream to a sniffed port refused after its 200"
        );
    }

    async fn relay(
        &self,
        req: Request<hyper::body::Incoming>,
        authority: SocketAddr,
        app: TcpStream,
        started: Instant,
    ) {
        let head = Head::of(&req);
        if let Some(tunnel) = self.upgrade(req, authority).await {
            self.relay_bytes(tunnel, &head, authority, app, started)
                .await;
        }
    }

    async fn relay_bytes<I>(
        &self,
        mut tunnel: I,
        head: &Head,
        authority: SocketAddr,
        mut app: TcpStream,
        started: Instant,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (forwarded, source) = (&head.forwarded, &head.source);
        let service = self.destination_service(forwarded.as_deref(), authority);
        let m = &self.inbound.metrics;
        let client = self.client.as_ref().map(SpiffeId::as_str);
        let peer = metrics::Peer::of_peer(Some(metrics::Peer::of_baggage(source)), client);
        let local = &self.inbound.local.peer;
        let labels = TcpLabels::new(metrics::DESTINATION, service.clone(), true)
            .principals(client, Some(self.ours.as_str()))
            .workloads(metrics::Workloads::new(
                &peer,
                local,
                &service,
                &local.namespace,
            ));
        m.opened(&labels);
        let r = relay(&mut tunnel, &mut app).await;
        m.closed(&labels, r.a_to_b, r.b_to_a);
        let client = forwarded.as_deref().and_then(baggage::forwarded_for);
        tracing::info!(
            peer = %self.peer, client = client.unwrap_or("-"), %authority, service = %service,
            identity = self.client.as_ref().map(SpiffeId::as_str).unwrap_or("-"),
            source_workload = source.service.as_deref().unwrap_or("-"),
            source_namespace = source.namespace.as_deref().unwrap_or("-"),
            received = r.a_to_b, sent = r.b_to_a, end = %r.end,
            error = r.error.map(|k| k.to_string()).as_deref().unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64,
            "inbound HBONE stream"
        );
    }

    /// The service a stream is for, for telemetry (as ztunnel's `guess_inbound_service`): the
    /// `host=` the client named in `forwarded` if it is a service this VM serves at that port
    /// (a client's word alone names nothing), else the address.
    fn destination_service(&self, forwarded: Option<&str>, authority: SocketAddr) -> String {
        let table = self.inbound.store.load();
        let local = Address::Ip(authority.ip().to_canonical());
        forwarded
            .and_then(baggage::forwarded_host)
            .and_then(|h| table.service_by_host(&h.to_ascii_lowercase()))
            .filter(|svc| {
                svc.ports.iter().any(|sp| {
                    svc.endpoints_for(sp)
                        .iter()
                        .any(|w| w.address == local && w.target_port(sp) == authority.port())
                })
            })
            .map_or_else(|| authority.to_string(), |svc| svc.host.to_string())
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}
