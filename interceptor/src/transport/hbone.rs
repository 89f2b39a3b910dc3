//! HBONE's client side (SPEC 11; I: ztunnel src/proxy/pool.rs, src/proxy/h2/client.rs): one
//! `CONNECT` stream per proxied connection, in pooled HTTP/2 connections over TLS 1.3. A new
//! application connection to a peer we already hold a connection to costs one stream and no
//! handshake.
//!
//! Pool key: (our certificate, the peer's address, the identities it must present). The
//! source IP of ztunnel's key is always this VM's, so it is left out; a rotated certificate is
//! another key, so new streams go out under the new one while old connections drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::baggage::{self, Workload};
use crate::metrics::{Metrics, OUTBOUND};
use crate::net::{buffered, drain};
use crate::spiffe::SpiffeId;
use crate::tls::{self, Configs};

/// Streams per connection before another connection is made (ztunnel's limit; peers that
/// allow fewer make h2 queue the excess until a stream ends).
pub const MAX_STREAMS: usize = 100;
/// Windows large enough that one stream is not flow-control bound on a fast link.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 1 << 20;
/// What h2 buffers per stream before a write waits: one window, so a window is filled and
/// flushed in one go (ztunnel's choice; hyper's default is 1 MiB).
pub const SEND_BUFFER: usize = STREAM_WINDOW as usize;
/// CONNECT headers are small; anything larger is not HBONE.
pub const MAX_HEADERS: u32 = 16 << 10;
/// A connection without streams this long is closed.
pub const IDLE: Duration = Duration::from_secs(300);
/// HTTP/2 pings keep NATs open and find dead peers.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 as every HBONE client here speaks it: SPEC 11's windows, frames and limits. Its
/// connection tasks are the drain's, so a stop waits for their GOAWAY and close_notify.
pub fn client_h2() -> hyper::client::conn::http2::Builder<drain::Executor> {
    let mut b = hyper::client::conn::http2::Builder::new(drain::Executor);
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buf_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADERS);
    b
}

/// HTTP/2 as every HBONE server here (inbound 15008, the gateway's 15008) speaks it.
pub fn server_h2() -> hyper::server::conn::http2::Builder<drain::Executor> {
    let mut b = hyper::server::conn::http2::Builder::new(drain::Executor);
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buf_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADERS)
        .max_concurrent_streams(MAX_STREAMS as u32)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    b
}

/// Serves one HBONE connection with `service` until the peer closes it. On a stop it sends
/// GOAWAY at once (no new streams), lets the open streams end (the drain closes them at its
/// deadline) and then closes with TLS close_notify.
pub async fn serve_draining<IO, S>(io: IO, service: S) -> Result<(), hyper::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Empty<Bytes>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = server_h2().serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        () = drain::started() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Why a stream could not be opened: a log line and a metric label (through `DialError`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HTTP/2 handshake: {0}")]
    H2Handshake(hyper::Error),
    #[error("CONNECT: {0}")]
    Stream(hyper::Error),
    #[error("CONNECT answered {0}")]
    Status(StatusCode),
    #[error("CONNECT {0:?} is not a valid authority")]
    Authority(String),
    #[error("the connection this stream waited for could not be made")]
    PeerFailed,
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Error::H2Handshake(_) => "hbone_handshake",
            Error::Stream(_) => "hbone_stream",
            Error::Status(_) => "hbone_refused",
            Error::Authority(_) => "hbone_authority",
            Error::PeerFailed => "hbone_peer_failed",
        }
    }
}

type Key = (usize, SocketAddr, Vec<SpiffeId>);

/// One pooled connection.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<Streams>,
    /// Who answered, from its certificate.
    peer: Option<SpiffeId>,
    /// Our address on it: the address the peer can route back to this VM.
    local: Option<std::net::IpAddr>,
}

/// The open streams of one connection and when it was last used.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
}

impl Streams {
    fn opened(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn closed(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        since.map(|t| t.elapsed())
    }
}

/// The connections of one key. The async lock is held while a connection is made, so that
/// streams that arrive together share the one connection instead of each making their own.
type Slot = Arc<tokio::sync::Mutex<Conns>>;

#[derive(Default)]
struct Conns {
    open: Vec<Conn>,
    /// When the last attempt to make a connection failed: streams that waited for that attempt
    /// fail with it (and try another endpoint) instead of each waiting out the same timeout.
    failed_at: Option<Instant>,
}

/// What a stream is opened with, besides the pool.
pub struct Connect<'a> {
    pub tls: &'a Configs,
    pub endpoint: SocketAddr,
    /// `IP:port` of the destination, or `host:port` of a service (double HBONE).
    pub authority: &'a str,
    pub identities: &'a [SpiffeId],
    /// The application connection this stream carries, for `forwarded`.
    pub origin: Option<Origin<'a>>,
}

/// What a CONNECT says of the application connection it carries (ztunnel's `forwarded`).
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    /// The application's socket as we accepted it.
    pub client: SocketAddr,
    /// The service it meant.
    pub service: &'a str,
}

impl Origin<'_> {
    /// `forwarded` as ztunnel sends it: the application's own address and the service. Capture
    /// hands us the application's socket over loopback, whose address means nothing to the
    /// peer: the address is then ours on the connection to the peer (what the application's
    /// would have been without capture), with the application's port.
    fn forwarded(&self, local: Option<std::net::IpAddr>) -> String {
        let client = match local {
            Some(ip) if self.client.ip().to_canonical().is_loopback() => {
                SocketAddr::new(ip.to_canonical(), self.client.port())
            }
            _ => self.client,
        };
        baggage::forwarded(client, Some(self.service))
    }
}

pub struct Pool {
    slots: Arc<Mutex<HashMap<Key, Slot>>>,
    metrics: Arc<Metrics>,
    idle: Duration,
    /// Ours, in each CONNECT's `baggage`.
    baggage: Option<Arc<str>>,
}

impl Pool {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Arc::default(),
            metrics,
            idle: IDLE,
            baggage: None,
        }
    }

    /// Each CONNECT carries `workload`'s baggage.
    pub fn with_workload(mut self, workload: &Workload) -> Self {
        self.baggage = workload.header().map(Arc::from);
        self
    }

    /// Opens a CONNECT stream for `req.authority` at `req.endpoint`, on a pooled connection if
    /// one has room; `tcp` makes a new connection's TCP leg.
    pub async fn connect<F, Fut>(
        &self,
        req: Connect<'_>,
        handshake: Duration,
        tcp: F,
    ) -> Result<Stream, super::DialError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<TcpStream, super::DialError>>,
    {
        let key: Key = (
            Arc::as_ptr(&req.tls.hbone_client) as usize,
            req.endpoint,
            req.identities.to_vec(),
        );
        let slot = self.slot(key);
        let waited_from = Instant::now();
        let (mut sender, streams, peer, local) = {
            let mut conns = slot.lock().await;
            conns.open.retain(|c| !c.sender.is_closed());
            let free = conns.open.iter().find(|c| {
                c.sender.is_ready() && c.streams.open.load(Ordering::Acquire) < MAX_STREAMS
            });
            match free {
                Some(c) => {
                    c.streams.opened();
                    (c.sender.clone(), c.streams.clone(), c.peer.clone(), c.local)
                }
                None if conns.failed_at.is_some_and(|t| t >= waited_from) => {
                    return Err(super::DialError::Hbone(Error::PeerFailed));
                }
                None => {
                    let made = match tcp().await {
                        Ok(stream) => {
                            self.handshake(req.tls, req.identities, stream, handshake)
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    let c = match made {
                        Ok(c) => c,
                        Err(e) => {
                            conns.failed_at = Some(Instant::now());
                            return Err(e);
                        }
                    };
                    c.streams.opened();
                    let out = (c.sender.clone(), c.streams.clone(), c.peer.clone(), c.local);
                    conns.open.push(c);
                    out
                }
            }
        };
        let guard = StreamGuard(streams);
        let forwarded = req.origin.map(|o| o.forwarded(local));
        let head = Head {
            authority: req.authority,
            forwarded: forwarded.as_deref(),
            baggage: self.baggage.as_deref(),
            network: None,
        };
        let request = head.request()?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| super::DialError::Hbone(Error::Stream(e)))?;
        if response.status() != StatusCode::OK {
            return Err(super::DialError::Hbone(Error::Status(response.status())));
        }
        let peer_workload = peer_baggage(&response);
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| super::DialError::Hbone(Error::Stream(e)))?;
        self.metrics.hbone_stream(OUTBOUND);
        Ok(Stream {
            io: TokioIo::new(upgraded),
            peer,
            peer_workload,
            head: Some(OuterHead {
                forwarded,
                baggage: self.baggage.clone(),
            }),
            _guard: Some(guard),
            write_closed: false,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn slot(&self, key: Key) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get(&key) {
            return s.clone();
        }
        // A new key: forget the keys whose connections are all gone (closed when idle, or
        // made with a certificate since rotated).
        slots.retain(|_, s| {
            s.try_lock()
                .map_or(true, |c| c.open.iter().any(|c| !c.sender.is_closed()))
        });
        slots.entry(key).or_default().clone()
    }

    async fn handshake(
        &self,
        configs: &Configs,
        identities: &[SpiffeId],
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<Conn, super::DialError> {
        let local = tcp.local_addr().ok().map(|a| a.ip());
        let (tls, peer) = tls_handshake(configs, identities, buffered(tcp), timeout).await?;
        let (sender, conn) = client_h2()
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| super::DialError::Hbone(Error::H2Handshake(e)))?;
        self.metrics.hbone_connection(OUTBOUND);
        let streams = Arc::new(Streams::default());
        let watched = streams.clone();
        let idle = self.idle;
        let metrics = self.metrics.clone();
        let slots = self.slots.clone();
        drain::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(error = %e, "HBONE connection ended");
                },
                () = idle_out(&watched, idle) => tracing::debug!("HBONE connection idle; closed"),
                () = drain::started() => {
                    // Nothing new goes out on the pool's connections: once their streams are
                    // done, each sends GOAWAY and close_notify (h2 does, once no one can open
                    // a stream on it).
                    slots.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    if let Err(e) = conn.as_mut().await {
                        tracing::debug!(error = %e, "HBONE connection ended while draining");
                    }
                }
            }
            metrics.hbone_connection_closed(OUTBOUND);
        });
        Ok(Conn {
            sender,
            streams,
            peer,
            local,
        })
    }
}

/// HBONE's TLS over `io` (a TCP connection, or the outer stream of double HBONE), and who
/// answered, from its certificate.
async fn tls_handshake<IO>(
    configs: &Configs,
    identities: &[SpiffeId],
    io: IO,
    timeout: Duration,
) -> Result<(tokio_rustls::client::TlsStream<IO>, Option<SpiffeId>), super::DialError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let config = tls::hbone_client_for(&configs.hbone_client, &configs.roots, identities.to_vec());
    // No SNI is sent (the config says so) and the verifier checks SPIFFE ids, not names: the
    // name only satisfies the API.
    let name =
        rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([0, 0, 0, 0]).into());
    let handshake = TlsConnector::from(config).connect(name, io);
    let tls = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| super::DialError::HandshakeTimeout)?
        .map_err(super::handshake_error)?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| {
            crate::spiffe::uri_sans(leaf)
                .into_iter()
                .find(|id| identities.is_empty() || identities.contains(id))
        });
    Ok((tls, peer))
}

/// Returns once the connection has had no stream for `idle`.
async fn idle_out(streams: &Streams, idle: Duration) {
    loop {
        let wait = match streams.idle_for() {
            Some(d) if d >= idle => return,
            Some(d) => idle - d,
            None => idle,
        };
        tokio::time::sleep(wait).await;
    }
}

/// A CONNECT's headers (SPEC 11), as ztunnel sends them on every CONNECT, the inner one of
/// double HBONE included (I: ztunnel src/proxy/outbound.rs `create_hbone_request`).
struct Head<'a> {
    /// `IP:port` or `host:port`, authority-form.
    authority: &'a str,
    forwarded: Option<&'a str>,
    baggage: Option<&'a str>,
    /// The inner CONNECT of double HBONE names our network.
    network: Option<&'a str>,
}

impl Head<'_> {
    fn request(&self) -> Result<Request<Empty<Bytes>>, super::DialError> {
        let bad = || super::DialError::Hbone(Error::Authority(self.authority.to_string()));
        let uri = hyper::Uri::builder()
            .authority(self.authority)
            .build()
            .map_err(|_| bad())?;
        let mut b = Request::builder().method(Method::CONNECT).uri(uri);
        if let Some(f) = self.forwarded {
            b = b.header("forwarded", f);
        }
        if let Some(baggage) = self.baggage {
            b = b.header("baggage", baggage);
        }
        let mut rng = rand::rng();
        let trace: u128 = rng.random();
        let span: u64 = rng.random();
        b = b.header("traceparent", format!("00-{trace:032x}-{span:016x}-00"));
        if let Some(network) = self.network.filter(|n| !n.is_empty()) {
            b = b.header("x-forwarded-network", network);
        }
        b.body(Empty::new()).map_err(|_| bad())
    }
}

/// What the outer CONNECT said, for the inner one of double HBONE to say again.
#[derive(Debug)]
struct OuterHead {
    forwarded: Option<String>,
    baggage: Option<Arc<str>>,
}

/// The peer's `baggage` on its 200: who answered, for our access log.
fn peer_baggage<B>(response: &hyper::Response<B>) -> Option<Workload> {
    let values: Vec<&str> = response
        .headers()
        .get_all("baggage")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| Workload::parse(values))
}

/// The inner half of double HBONE (SPEC 11): over the outer stream to the gateway, a new,
/// unpooled TLS session expecting the destination's `identities`, HTTP/2 on it and one CONNECT
/// for `authority` with `x-forwarded-network: network`. The inner connection lives as long as
/// its one stream; the outer stream (and its pool slot) with it.
pub async fn inner(
    configs: &Configs,
    mut outer: Stream,
    authority: &str,
    identities: &[SpiffeId],
    network: &str,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Stream, super::DialError> {
    // The inner CONNECT says what the outer one said, as ztunnel's.
    let outer_head = outer.head.take();
    let (tls, peer) = tls_handshake(configs, identities, outer, timeout).await?;
    // No pings of its own: the outer connection's keep it alive.
    let (mut sender, conn) = client_h2()
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| super::DialError::Hbone(Error::H2Handshake(e)))?;
    drain::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "inner HBONE connection ended");
        }
    });
    let head = Head {
        authority,
        forwarded: outer_head.as_ref().and_then(|h| h.forwarded.as_deref()),
        baggage: outer_head.as_ref().and_then(|h| h.baggage.as_deref()),
        network: Some(network),
    };
    let request = head.request()?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| super::DialError::Hbone(Error::Stream(e)))?;
    if response.status() != StatusCode::OK {
        return Err(super::DialError::Hbone(Error::Status(response.status())));
    }
    let peer_workload = peer_baggage(&response);
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| super::DialError::Hbone(Error::Stream(e)))?;
    metrics.hbone_stream(crate::metrics::DOUBLE);
    Ok(Stream {
        io: TokioIo::new(upgraded),
        peer,
        peer_workload,
        head: None,
        _guard: None,
        write_closed: false,
    })
}

/// Keeps a connection's stream count true for as long as the stream lives.
struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.closed();
    }
}

/// An open CONNECT stream: the tunnel's bytes both ways.
pub struct Stream {
    io: TokioIo<hyper::upgrade::Upgraded>,
    peer: Option<SpiffeId>,
    /// Who answered, from its `baggage`.
    peer_workload: Option<Workload>,
    /// What this stream's CONNECT said (an outer stream's, for the inner CONNECT).
    head: Option<OuterHead>,
    /// The pooled connection's count (none for an unpooled inner tunnel).
    _guard: Option<StreamGuard>,
    /// The peer stopped taking data (see `poll_write`).
    write_closed: bool,
}

impl Stream {
    /// Who answered the connection this stream rides on, as its certificate proved.
    pub fn peer(&self) -> Option<&SpiffeId> {
        self.peer.as_ref()
    }

    /// Who answered, as its `baggage` says.
    pub fn peer_workload(&self) -> Option<&Workload> {
        self.peer_workload.as_ref()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // RFC 9113 8.1: a peer that has sent its whole response may reset the stream
        // (RST_STREAM NO_ERROR, as Envoy does once its upstream closed) to stop our sending,
        // and the response must not be lost for it. So a failed write closes our sending side
        // only (what we send is dropped) and the relay goes on reading what the peer sent.
        if self.write_closed {
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "HBONE stream no longer takes data; reading on");
                self.write_closed = true;
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Err(_)) => {
                self.write_closed = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        // A peer that has ended its side may reset the stream (RST_STREAM NO_ERROR, as Envoy
        // does once its upstream closed): our END_STREAM then has nowhere to go, and nothing
        // is lost by that.
        match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "HBONE stream already closed by the peer");
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::DialError;

    fn configs() -> Arc<Configs> {
        let (c, k, r) = crate::identity::tests::pem(Some("spiffe://td/ns/a/sa/b"), false);
        let id =
            crate::identity::Identity::from_pem(c.as_bytes(), k.as_bytes(), r.as_bytes()).unwrap();
        let store = tls::Store::new();
        store
            .install(
                id.spiffe.clone(),
                id.chain.clone(),
                &id.key,
                &id.roots,
                id.not_after,
            )
            .unwrap();
        store.current().unwrap()
    }

    #[tokio::test]
    async fn streams_that_waited_for_a_failed_connection_fail_with_it() {
        let configs = configs();
        let pool = Pool::new(Arc::default());
        let req = || Connect {
            tls: &configs,
            endpoint: "192.0.2.1:15008".parse().unwrap(),
            authority: "192.0.2.1:80",
            identities: &[],
            origin: None,
        };
        let dials = AtomicUsize::new(0);
        // A peer that blackholes: the TCP leg times out after a while.
        let blackhole = || async {
            dials.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err::<TcpStream, _>(DialError::Connect(std::io::ErrorKind::TimedOut.into()))
        };
        let (a, b, c) = tokio::join!(
            pool.connect(req(), Duration::from_secs(1), blackhole),
            pool.connect(req(), Duration::from_secs(1), blackhole),
            pool.connect(req(), Duration::from_secs(1), blackhole),
        );
        let labels: Vec<_> = [a, b, c]
            .into_iter()
            .map(|r| r.err().map(|e| e.label()))
            .collect();
        assert_eq!(
            labels,
            [
                Some("connect_timeout"),
                Some("hbone_peer_failed"),
                Some("hbone_peer_failed")
            ]
        );
        assert_eq!(
            dials.load(Ordering::SeqCst),
            1,
            "one attempt, not three in a row"
        );
        // A later stream tries again.
        let again = pool.connect(req(), Duration::from_secs(1), blackhole).await;
        assert_eq!(again.err().map(|e| e.label()), Some("connect_timeout"));
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }
}
