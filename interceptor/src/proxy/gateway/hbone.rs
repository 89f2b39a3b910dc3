//! The gateway's side of double HBONE (SPEC 11; I: ztunnel's and Istio's east-west gateway
//! for ambient multi-network): it terminates the outer tunnel on 15008 with its own identity,
//! takes `CONNECT <service host>:<port>`, and relays the still-encrypted inner stream as raw
//! bytes to an HBONE endpoint of that service in its own network, at `<endpoint>:15008`. The
//! inner TLS is end to end between the client and the endpoint: the gateway never sees it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{Gateway, MAX_ATTEMPTS};
use crate::metrics::{self, TcpLabels};
use crate::net::buffered;
use crate::route::{self, Target};
use crate::spiffe::{uri_sans, SpiffeId};
use crate::transport::{try_targets, RawTcp};

const HANDSHAKE: Duration = Duration::from_secs(10);

/// Why an outer stream was refused: its status and the `reason` label.
#[derive(Debug, thiserror::Error)]
enum StreamRefused {
    #[error("not a CONNECT ({0})")]
    NotConnect(Method),
    #[error("authority {0:?} is not HOST:PORT")]
    BadAuthority(String),
    #[error("unknown service port {0:?}")]
    Unknown(String),
    #[error("no healthy HBONE endpoint of {0:?} in this network")]
    NoEndpoint(String),
    #[error("no endpoint of {0:?} reachable")]
    Unreachable(String),
}

impl StreamRefused {
    fn status(&self) -> StatusCode {
        match self {
            StreamRefused::NotConnect(_) | StreamRefused::BadAuthority(_) => {
                StatusCode::BAD_REQUEST
            }
            StreamRefused::Unknown(_) => StatusCode::NOT_FOUND,
            StreamRefused::NoEndpoint(_) | StreamRefused::Unreachable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            StreamRefused::NotConnect(_) => "hbone_not_connect",
            StreamRefused::BadAuthority(_) => "hbone_bad_authority",
            StreamRefused::Unknown(_) => "unknown_host",
            StreamRefused::NoEndpoint(_) => "no_endpoint",
            StreamRefused::Unreachable(_) => "hbone_unreachable",
        }
    }
}

impl Gateway {
    pub async fn serve_hbone(
        self: Arc<Self>,
        listener: TcpListener,
        limit: Arc<crate::net::Limit>,
    ) {
        crate::net::accept_loop(
            listener,
            "gateway hbone",
            Some(limit),
            crate::net::Tasks::Drained,
            move |stream, peer| {
                let this = self.clone();
                async move { this.hbone(stream, peer).await }
            },
        )
        .await
    }

    async fn hbone(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let Some(id) = self.tls.current() else {
            self.metrics.gateway_refused("no_certificate");
            tracing::warn!(%peer, "gateway: HBONE needs a certificate (--certs); closing");
            return;
        };
        let accept = TlsAcceptor::from(id.hbone_server.clone()).accept(buffered(stream));
        let tls = match tokio::time::timeout(HANDSHAKE, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.metrics.gateway_refused("handshake");
                tracing::warn!(%peer, error = %e, "gateway: HBONE handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.gateway_refused("handshake_timeout");
                return;
            }
        };
        let client = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| uri_sans(leaf).into_iter().next());
        if client.as_ref().map(SpiffeId::trust_domain) != Some(id.trust_domain()) {
            self.metrics.gateway_refused("foreign_trust_domain");
            tracing::warn!(%peer, client = ?client.as_ref().map(SpiffeId::as_str), "gateway: HBONE client not of our trust domain");
            return;
        }
        self.metrics.hbone_connection(metrics::GATEWAY);
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(this.outer_stream(req, peer, client).await) }
        });
        let served = crate::transport::hbone::serve_draining(TokioIo::new(tls), service).await;
        self.metrics.hbone_connection_closed(metrics::GATEWAY);
        if let Err(e) = served {
            tracing::debug!(%peer, error = %e, "gateway: HBONE connection ended");
        }
    }

    async fn outer_stream(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
        client: Option<SpiffeId>,
    ) -> Response<Empty<Bytes>> {
        let started = Instant::now();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match self.open(&req, &authority).await {
            Ok((service, target, upstream)) => {
                let network = req
                    .headers()
                    .get("x-forwarded-network")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                tracing::info!(%peer, client = client.as_ref().map(SpiffeId::as_str).unwrap_or("-"), %authority, endpoint = %target.endpoint, from_network = %network, "gateway HBONE stream");
                crate::net::drain::spawn(async move {
                    let mut tunnel = match hyper::upgrade::on(req).await {
                        Ok(up) => TokioIo::new(up),
                        Err(e) => {
                            tracing::info!(%peer, error = %e, "gateway: HBONE stream reset before it opened");
                            return;
                        }
                    };
                    self.metrics.hbone_stream(metrics::GATEWAY);
                    let labels = TcpLabels::new(metrics::GATEWAY, service, true);
                    self.metrics.opened(&labels);
                    let mut upstream = upstream;
                    let r = crate::net::relay(&mut tunnel, &mut upstream).await;
                    self.metrics.closed(&labels, r.a_to_b, r.b_to_a);
                    tracing::info!(%peer, endpoint = %target.endpoint, sent = r.a_to_b, received = r.b_to_a, end = %r.end, duration_ms = started.elapsed().as_millis() as u64, "gateway HBONE stream closed");
                });
                let mut r = Response::new(Empty::new());
                *r.status_mut() = StatusCode::OK;
                r
            }
            Err(why) => {
                self.metrics.gateway_refused(why.label());
                tracing::warn!(%peer, %authority, reason = %why, "gateway: HBONE stream refused");
                let mut r = Response::new(Empty::new());
                *r.status_mut() = why.status();
                r
            }
        }
    }

    /// The service port the stream names and a connected endpoint of it.
    async fn open(
        &self,
        req: &Request<hyper::body::Incoming>,
        authority: &str,
    ) -> Result<(String, Target, TcpStream), StreamRefused> {
        if req.method() != Method::CONNECT {
            return Err(StreamRefused::NotConnect(req.method().clone()));
        }
        let bad = || StreamRefused::BadAuthority(authority.to_string());
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let table = self.store.load();
        let unknown = || StreamRefused::Unknown(authority.to_string());
        let svc = table
            .service_by_host(&host.to_ascii_lowercase())
            .ok_or_else(unknown)?;
        let sp = svc.port(port).ok_or_else(unknown)?;
        let plan = route::gateway_hbone_plan(svc, sp, &self.network);
        let targets = route::order(plan, &self.outliers);
        if targets.is_empty() {
            return Err(StreamRefused::NoEndpoint(authority.to_string()));
        }
        let (i, upstream) = try_targets(
            &targets,
            crate::transport::Attempts::at_most(MAX_ATTEMPTS),
            &self.outliers,
            &self.metrics,
            svc.host.as_str(),
            &RawTcp(&self.dialer),
        )
        .await
        .map_err(|_| StreamRefused::Unreachable(authority.to_string()))?;
        Ok((svc.host.to_string(), targets[i].clone(), upstream))
    }
}
