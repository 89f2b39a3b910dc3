//! Moving bytes both ways between two streams, half-close included, with bounded buffers:
//! a side that stops reading stops us reading from the other (backpressure).

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

/// Relays until both directions are done. Returns (bytes a->b, bytes b->a). EOF on one side is
/// passed on as shutdown(write) on the other while the opposite direction goes on: a
/// half-closed request still gets its whole response. An error on either direction ends both.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // Both halves are polled from this one task, so split's lock is never contended.
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    tokio::try_join!(
        one_way(&mut a_read, &mut b_write),
        one_way(&mut b_read, &mut a_write)
    )
}

async fn one_way<R, W>(from: &mut R, to: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Grows only when written: read_buf fills spare capacity without zeroing it first, so an
    // idle connection's pages are never touched.
    let mut buf = BytesMut::new();
    let mut moved = 0u64;
    loop {
        buf.reserve(read_size(moved));
        if from.read_buf(&mut buf).await? == 0 {
            break;
        }
        to.write_all(&buf).await?;
        // TLS writers hold records until flushed; plain TCP makes this a no-op.
        to.flush().await?;
        moved += buf.len() as u64;
        buf.clear();
    }
    to.shutdown().await?;
    Ok(moved)
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
        let moved = relay.await.expect("relay task").expect("relay");
        assert_eq!(moved, (data.len() as u64, data.len() as u64));
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
        assert_eq!(relay.await.expect("task").expect("relay"), (3, 100_000));
    }
}
