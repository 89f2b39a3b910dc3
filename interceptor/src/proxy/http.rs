//! What the outbound and inbound HTTP paths share: hyper's server with our limits, the client
//! handshake, Envoy-shaped local answers and the hop-by-hop rules.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::breaker::Slot;
use super::pool::{Body, Sender};
use crate::metrics::{Metrics, RequestLabels};
use crate::route::http::authority;

/// Request heads larger than this are refused (Envoy's default 60 KiB limit, rounded up).
pub const MAX_HEAD: usize = 64 * 1024;
/// A client has this long to send a request's head (slowloris).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams one client connection may have open at once (Envoy's sidecar: 2^31; a VM's
/// apps need far fewer, and a bound keeps memory bounded).
pub const MAX_STREAMS: u32 = 1024;

/// Headers that belong to one hop (RFC 9110 7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// Serves `io` as HTTP/1.1 or HTTP/2 (by the client's first bytes), each request answered by
/// `answer`, within the limits above.
pub async fn serve<I, F, Fut>(
    io: I,
    answer: F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let fut = answer(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEAD as u32);
    builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
}

/// A client connection over `io` (HTTP/2 or HTTP/1.1), its driver spawned; `held` (a
/// circuit breaker's count of it) lives as long as the connection.
pub async fn handshake<I>(io: I, h2: bool, held: Option<Slot>) -> Result<Sender, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    Ok(if h2 {
        let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            let _held = held;
            conn.await
        });
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _held = held;
            conn.with_upgrades().await
        });
        Sender::H1(s)
    })
}

/// An answer of our own, as Envoy writes its local replies (text/plain when it has a body).
pub fn local_response(status: u16, body: Bytes) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let len = body.len();
    let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    if len > 0 {
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    r
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// The request as it goes to the endpoint: origin-form with a Host header over HTTP/1.1,
/// absolute with `:authority` over HTTP/2.
pub fn upstream_request(parts: &Parts, body: Body, h2: bool) -> Request<Body> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let host = authority(parts).to_string();
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(hyper::header::HOST);
        // HTTP/2 has no connection-level headers (an upgrade cannot cross to it).
        req.headers_mut().remove(hyper::header::CONNECTION);
        req.headers_mut().remove(hyper::header::UPGRADE);
        *req.uri_mut() = format!("http://{host}{path}")
            .parse()
            .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    } else {
        *req.version_mut() = Version::HTTP_11;
        *req.uri_mut() = path
            .parse()
            .unwrap_or_else(|_| hyper::Uri::from_static("/"));
        if let Ok(v) = HeaderValue::from_str(&host) {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
    }
    req
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` and `Upgrade`,
/// as a websocket's handshake), before the hop-by-hop headers are stripped.
pub fn upgrade_protocol(parts: &Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let asks = parts
        .headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| parts.headers.get(hyper::header::UPGRADE).cloned())
        .flatten()
}

/// Puts back the two hop-by-hop headers an upgrade travels in (as Envoy's `upgrade_configs`
/// do for websocket, which Istio turns on).
pub fn set_upgrade(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    headers.insert(hyper::header::UPGRADE, protocol.clone());
}

/// After a 101 both ways: the client's and the upstream's switched connections, relayed to
/// each other until either ends.
pub fn relay_upgraded(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
            tracing::debug!("HTTP upgrade: a side never switched");
            return;
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "HTTP upgrade: the relay ended with an error");
        }
    });
}

/// Follows a 101 the upstream answered to an upgrade request: the relay is set up and the
/// upgrade headers go back to the client. A 101 that cannot be followed (no upgrade asked, or
/// a side that cannot switch) becomes a 502.
pub fn follow_upgrade(
    response: &mut Response<Body>,
    protocol: Option<&HeaderValue>,
    client: Option<hyper::upgrade::OnUpgrade>,
) {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let upstream = response
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    match (protocol, client, upstream) {
        (Some(p), Some(client), Some(upstream)) => {
            set_upgrade(response.headers_mut(), p);
            relay_upgraded(client, upstream);
        }
        _ => {
            *response = local_response(
                502,
                Bytes::from_static(b"upstream switched protocols unasked"),
            )
        }
    }
}

/// Istio's `request_protocol` label: `grpc` when the request says it is gRPC, else `http`.
pub fn request_protocol(headers: &HeaderMap) -> &'static str {
    let grpc = headers
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        "grpc"
    } else {
        "http"
    }
}

/// gRPC's status codes as label values (0 to 16).
const GRPC_STATUS: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

fn grpc_status(headers: &HeaderMap) -> Option<&'static str> {
    let n: usize = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    GRPC_STATUS.get(n).copied()
}

/// A response body's duty of counting its request when it is done (sent whole, or dropped
/// on a reset), as Istio counts a request at its end: the duration is to the last byte and the
/// gRPC status is the one its trailers (or its trailers-only head) carry. It keeps the
/// request's breaker slot, if any, as long as it lasts.
pub struct Counted {
    metrics: Arc<Metrics>,
    labels: Option<RequestLabels>,
    started: Instant,
    _held: Option<Slot>,
}

impl Counted {
    pub fn wrap(
        response: Response<Body>,
        metrics: Arc<Metrics>,
        mut labels: RequestLabels,
        started: Instant,
        held: Option<Slot>,
    ) -> Response<Body> {
        if let Some(s) = grpc_status(response.headers()) {
            labels.grpc_response_status = s;
        }
        let counted = Counted {
            metrics,
            labels: Some(labels),
            started,
            _held: held,
        };
        response.map(|inner| super::body::Watched::new(inner, counted).boxed())
    }
}

impl super::body::Watch for Counted {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        let status = frame.trailers_ref().and_then(grpc_status);
        if let (Some(s), Some(labels)) = (status, self.labels.as_mut()) {
            labels.grpc_response_status = s;
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(labels) = self.labels.take() {
            self.metrics.request(&labels, self.started.elapsed());
        }
    }
}
