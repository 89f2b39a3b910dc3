//! Moving bytes both ways between two streams, half-close included, with bounded buffers:
//! a side that stops reading stops us reading from the other (backpressure). Whatever ends a
//! connection, the bytes moved each way are counted and how it ended is said: an access log
//! and Istio's byte counters must not lose a request and its response because the client
//! closed without TLS close_notify.

use std::future::Future;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest read per direction: large enough for full TLS records and few syscalls on a
/// bulk transfer (16 KiB reads cost 20 % more CPU per GB through an mTLS pair, measured).
pub const BUFFER: usize = 64 * 1024;

/// How much a direction reads at a time once it has moved so many bytes. A connection starts
/// small and earns larger reads by moving data (as ztunnel does): most connections in a mesh
/// are idle or chatty and then hold a few KiB, not 2 x 64 KiB each (10 000 held connections
/// took 75-83 KiB apiece with fixed 64 KiB buffers, measured by the soak), while a bulk
/// transfer is at full size after its first MiB.
const READ_SIZES: [(u64, usize); 3] = [(0, 4 * 1024), (128 * 1024, 16 * 1024), (1 << 20, BUFFER)];

fn read_size(moved: u64) -> usize {
    READ_SIZES
        .iter()
        .rev()
        .find(|(after, _)| moved >= *after)
        .map_or(READ_SIZES[0].1, |(_, size)| *size)
}

/// How a relayed connection ended: the access log's `end` and a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed cleanly.
    Eof,
    /// A TLS peer closed its side without close_notify. Its bytes count and the other way goes
    /// on, as after a clean close: many clients (Python's ssl, curl with some backends) do it.
    TlsNoCloseNotify,
    /// A side reset the connection (or its stream).
    Reset,
    /// A side timed out.
    Timeout,
    /// The process stopped and its grace ran out: both sides were closed cleanly by us.
    Drained,
    /// Any other error of either side.
    Error,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Eof => "eof",
            End::TlsNoCloseNotify => "tls_no_close_notify",
            End::Reset => "reset",
            End::Timeout => "timeout",
            End::Drained => "drained",
            End::Error => "error",
        }
    }

    fn of(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            // What tokio-rustls says of a TCP FIN without close_notify first.
            K::UnexpectedEof => End::TlsNoCloseNotify,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => End::Reset,
            K::TimedOut => End::Timeout,
            _ => End::Error,
        }
    }

    /// Of two ends, the one worth telling: an error over a missing close_notify over a clean
    /// close.
    fn worse(self, other: End) -> End {
        let rank = |e: End| match e {
            End::Eof => 0,
            End::TlsNoCloseNotify => 1,
            _ => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// What a relay moved, each way, and how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes from a to b.
    pub a_to_b: u64,
    /// Bytes from b to a.
    pub b_to_a: u64,
    pub end: End,
    /// The error behind `end`, for the log (None for a clean end).
    pub error: Option<std::io::ErrorKind>,
}

/// Relays until both directions are done, or until the process's drain deadline; see
/// `relay_until`.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    relay_until(a, b, super::drain::deadline()).await
}

/// Relays until both directions are done. EOF on one side (or a TLS close without
/// close_notify) is passed on as shutdown(write) on the other while the opposite direction
/// goes on: a half-closed request still gets its whole response. Any other error ends both
/// directions (a reset side can take nothing more). When `stop` resolves first, both sides are
/// shut down cleanly (close_notify, END_STREAM, FIN) and the relay ends as `Drained`. Bytes are
/// counted as written, whatever ends it.
pub async fn relay_until<A, B>(a: &mut A, b: &mut B, stop: impl Future<Output = ()>) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
    let outcome = {
        // Both halves are polled from this one task, so split's lock is never contended.
        let (mut a_read, mut a_write) = tokio::io::split(&mut *a);
        let (mut b_read, mut b_write) = tokio::io::split(&mut *b);
        let forward = one_way(&mut a_read, &mut b_write, &mut a_to_b);
        let backward = one_way(&mut b_read, &mut a_write, &mut b_to_a);
        both_ways(forward, backward, stop).await
    };
    let (end, error) = match outcome {
        Some(r) => r,
        None => {
            // Each side is told we are done; a side that is gone already cannot be told.
            let _ = tokio::time::timeout(SHUTDOWN, a.shutdown()).await;
            let _ = tokio::time::timeout(SHUTDOWN, b.shutdown()).await;
            (End::Drained, None)
        }
    };
    Relayed {
        a_to_b,
        b_to_a,
        end,
        error,
    }
}

/// How long a clean shutdown of one side may take once the drain closes it.
const SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// Drives both directions: a clean end of one lets the other go on; an error of one ends both.
/// None when `stop` came first.
async fn both_ways(
    forward: impl Future<Output = Result<End, std::io::Error>>,
    backward: impl Future<Output = Result<End, std::io::Error>>,
    stop: impl Future<Output = ()>,
) -> Option<(End, Option<std::io::ErrorKind>)> {
    tokio::pin!(forward, backward, stop);
    let (mut fwd, mut bwd): (Option<End>, Option<End>) = (None, None);
    loop {
        let done = tokio::select! {
            r = &mut forward, if fwd.is_none() => (r, true),
            r = &mut backward, if bwd.is_none() => (r, false),
            () = &mut stop => return None,
        };
        match done {
            (Ok(end), true) => fwd = Some(end),
            (Ok(end), false) => bwd = Some(end),
            (Err(e), _) => return Some((End::of(&e), Some(e.kind()))),
        }
        if let (Some(f), Some(b)) = (fwd, bwd) {
            return Some((f.worse(b), None));
        }
    }
}

/// One direction until its source ends: Ok with how it ended (clean, or a TLS close without
/// close_notify, passed on as a clean close), Err for anything else. `moved` counts what was
/// written, as it is written.
async fn one_way<R, W>(from: &mut R, to: &mut W, moved: &mut u64) -> std::io::Result<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Grows only when written: read_buf fills spare capacity without zeroing it first, so an
    // idle connection's pages are never touched.
    let mut buf = BytesMut::new();
    let end = loop {
        buf.reserve(read_size(*moved));
        match from.read_buf(&mut buf).await {
            Ok(0) => break End::Eof,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break End::TlsNoCloseNotify,
            Err(e) => return Err(e),
        }
        let mut at = 0;
        while at < buf.len() {
            let n = to.write(&buf[at..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            at += n;
            *moved += n as u64;
        }
        // TLS writers hold records until flushed; plain TCP makes this a no-op.
        to.flush().await?;
        buf.clear();
    };
    to.shutdown().await?;
    Ok(end)
}

/// Read-ahead under a TLS stream. rustls pulls at most 4 KiB from its transport per call, so a
/// 16 KiB record costs four read syscalls or more; room for one whole record (payload, header,
/// tag) turns them into one. 64 KiB measured no faster and costs memory per connection.
pub const TLS_READ_AHEAD: usize = 17 * 1024;

/// A TCP stream with read-ahead, for TLS on top (writes pass straight through).
pub type Buffered = tokio::io::BufReader<tokio::net::TcpStream>;

pub fn buffered(tcp: tokio::net::TcpStream) -> Buffered {
    tokio::io::BufReader::with_capacity(TLS_READ_AHEAD, tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_with_the_bytes_moved() {
        assert_eq!(read_size(0), 4096);
        assert_eq!(read_size(128 * 1024 - 1), 4096);
        assert_eq!(read_size(128 * 1024), 16 * 1024);
        assert_eq!(read_size(5 << 20), BUFFER);
    }

    /// Three MiB each way at once, every byte in order, then a half-close each way in turn:
    /// the side still open is relayed to the end.
    #[tokio::test]
    async fn both_ways_intact_and_half_close_passed_on() {
        let (mut client, mut proxy_down) = tokio::io::duplex(8192);
        let (mut proxy_up, mut server) = tokio::io::duplex(8192);
        let relay = tokio::spawn(async move { relay(&mut proxy_down, &mut proxy_up).await });
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let (c, s) = (data.clone(), data.clone());
        let (mut client_read, mut client_write) = tokio::io::split(&mut client);
        let (mut server_read, mut server_write) = tokio::io::split(&mut server);
        let client_sends = async {
            client_write.write_all(&c).await.expect("client writes");
            client_write.shutdown().await.expect("client half-closes");
        };
        let server_sends = async {
            server_write.write_all(&s).await.expect("server writes");
            server_write.shutdown().await.expect("server half-closes");
        };
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        let server_gets = server_read.read_to_end(&mut got_up);
        let client_gets = client_read.read_to_end(&mut got_down);
        let (_, _, up, down) = tokio::join!(client_sends, server_sends, server_gets, client_gets);
        up.expect("server reads");
        down.expect("client reads");
        assert!(got_up == data, "client to server corrupted");
        assert!(got_down == data, "server to client corrupted");
        let moved = relay.await.expect("relay task");
        assert_eq!(
            (moved.a_to_b, moved.b_to_a),
            (data.len() as u64, data.len() as u64)
        );
        assert_eq!(moved.end, End::Eof);
    }

    /// A request half-closed before its response: the response still comes back whole.
    #[tokio::test]
    async fn a_response_after_the_request_side_closed() {
        let (mut client, mut proxy_down) = tokio::io::duplex(1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut proxy_down, &mut proxy_up).await });
        client.write_all(b"GET").await.expect("request");
        client.shutdown().await.expect("half-close");
        let mut req = Vec::new();
        server
            .read_to_end(&mut req)
            .await
            .expect("server reads to EOF");
        assert_eq!(req, b"GET");
        let responder = tokio::spawn(async move {
            server.write_all(&[7u8; 100_000]).await.expect("response");
        });
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.expect("client reads");
        assert_eq!(resp.len(), 100_000);
        responder.await.expect("responder");
        let r = relay.await.expect("task");
        assert_eq!((r.a_to_b, r.b_to_a, r.end), (3, 100_000, End::Eof));
    }

    /// A stream that ends as tokio-rustls says a TLS peer ended without close_notify.
    struct NoCloseNotify(tokio::io::DuplexStream);

    impl AsyncRead for NoCloseNotify {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    std::task::Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()))
                }
                other => other,
            }
        }
    }

    impl AsyncWrite for NoCloseNotify {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A client that sends its request and closes without close_notify still gets its whole
    /// response, and both ways are counted (issue 25: they were lost as 0 and 0).
    #[tokio::test]
    async fn a_close_without_close_notify_keeps_its_bytes_and_the_response() {
        let (mut client, proxy_down) = tokio::io::duplex(1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            let mut down = NoCloseNotify(proxy_down);
            relay(&mut down, &mut proxy_up).await
        });
        client
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("request");
        client.shutdown().await.expect("client closes its side");
        let responder = tokio::spawn(async move {
            let mut req = Vec::new();
            server.read_to_end(&mut req).await.expect("server reads");
            server.write_all(&[1u8; 5000]).await.expect("response");
            server.shutdown().await.expect("server closes");
        });
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.expect("client reads");
        assert_eq!(resp.len(), 5000);
        responder.await.expect("responder");
        let r = relay.await.expect("task");
        assert_eq!((r.a_to_b, r.b_to_a), (18, 5000));
        assert_eq!(r.end, End::TlsNoCloseNotify);
    }

    /// A reset ends both ways, and what moved before it still counts.
    #[tokio::test]
    async fn a_reset_keeps_the_counts_of_what_moved_before() {
        let (mut client, mut proxy_down) = tokio::io::duplex(1024);
        let (mut proxy_up, server) = tokio::io::duplex(1024);
        let (mut server_read, server_write) = tokio::io::split(server);
        let relay = tokio::spawn(async move { relay(&mut proxy_down, &mut proxy_up).await });
        client.write_all(b"hello").await.expect("request");
        let mut got = [0u8; 5];
        server_read
            .read_exact(&mut got)
            .await
            .expect("server reads");
        // The server side goes away whole: the relay's next write to it fails.
        drop((server_read, server_write));
        client.write_all(b"more").await.expect("more");
        let r = relay.await.expect("task");
        assert_eq!(r.a_to_b, 5);
        assert_eq!(r.end, End::Reset, "{r:?}");
    }

    /// At the drain deadline both sides are shut down cleanly: each sees EOF.
    #[tokio::test]
    async fn a_stop_closes_both_sides_cleanly() {
        let (mut client, mut proxy_down) = tokio::io::duplex(1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(1024);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            relay_until(&mut proxy_down, &mut proxy_up, async {
                let _ = stop_rx.await;
            })
            .await
        });
        client.write_all(b"held").await.expect("request");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("server reads");
        stop_tx.send(()).expect("stop");
        let r = relay.await.expect("task");
        assert_eq!((r.a_to_b, r.end), (4, End::Drained));
        let (mut rest_c, mut rest_s) = (Vec::new(), Vec::new());
        client
            .read_to_end(&mut rest_c)
            .await
            .expect("client sees EOF");
        server
            .read_to_end(&mut rest_s)
            .await
            .expect("server sees EOF");
        assert!(rest_c.is_empty() && rest_s.is_empty());
    }
}
