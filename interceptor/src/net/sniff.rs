//! What a connection speaks, told from its first bytes as Envoy's `http_inspector` tells it
//! (the listener filter istiod puts on sniffed ports, sheet 1.2): an HTTP/1.x request line, or
//! the HTTP/2 connection preface (h2c). Anything else — or nothing within the wait, as a
//! server-first protocol sends nothing — is bytes. The bytes are only peeked: whoever serves
//! the connection reads them again (a stream that cannot be peeked is read, and what was read
//! replayed first: `sniff_read`, `Rewind`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The HTTP/2 client connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not waited for: the connection is taken as bytes.
const MAX_REQUEST_LINE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    H2c,
    /// Bytes that are not HTTP.
    Other,
    /// Nothing, or not enough to tell, within the wait (or the client closed first).
    Silent,
}

impl Sniffed {
    pub fn is_http(self) -> bool {
        matches!(self, Sniffed::Http1 | Sniffed::H2c)
    }

    /// For metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Sniffed::Http1 => "http1",
            Sniffed::H2c => "h2c",
            Sniffed::Other => "tcp",
            Sniffed::Silent => "silent",
        }
    }
}

/// What `bytes` (a connection's start) are; None: not enough to tell yet. Never panics,
/// whatever the bytes (fuzzed).
pub fn classify(bytes: &[u8]) -> Option<Sniffed> {
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Sniffed::H2c);
    }
    // No room for headers: the request line alone decides.
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(bytes);
    if req.version.is_some() {
        return Some(Sniffed::Http1);
    }
    match parsed {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) | Err(_) => Some(Sniffed::Other),
    }
}

/// Peeks at `stream` until its first bytes tell what it speaks, at most `wait` in all.
pub async fn sniff(stream: &TcpStream, wait: Duration) -> std::io::Result<Sniffed> {
    Ok(
        match super::peek_until(stream, wait, wait, MAX_REQUEST_LINE, classify).await? {
            super::Peek::Decided(s) => s,
            super::Peek::Full => Sniffed::Other,
            super::Peek::Nothing | super::Peek::Closed | super::Peek::TimedOut => Sniffed::Silent,
        },
    )
}

/// Reads `stream`'s first bytes until they tell what it speaks, for a stream that cannot be
/// peeked (an HBONE stream's bytes are inside HTTP/2 frames): Silent if nothing comes within
/// `first` (a server-first protocol), else at most `wait` in all. Returns what was read with
/// the verdict: the caller replays it (`Rewind`) to whoever serves the stream.
pub async fn sniff_read<R>(
    stream: &mut R,
    first: Duration,
    wait: Duration,
) -> std::io::Result<(Sniffed, Vec<u8>)>
where
    R: AsyncRead + Unpin,
{
    let mut read = Vec::new();
    let started = tokio::time::Instant::now();
    let verdict = loop {
        let deadline = started + if read.is_empty() { first } else { wait };
        if let Some(v) = (!read.is_empty()).then(|| classify(&read)).flatten() {
            break v;
        }
        if read.len() >= MAX_REQUEST_LINE {
            break Sniffed::Other;
        }
        let mut chunk = [0u8; 4096];
        let want = chunk.len().min(MAX_REQUEST_LINE - read.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(0)) | Err(_) => break Sniffed::Silent,
            Ok(Ok(n)) => read.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((verdict, read))
}

/// A stream whose first bytes were already read: they are read again first, then the stream.
/// Writes go straight through.
pub struct Rewind<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_preface_are_http_and_the_rest_is_not() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /orders?id=1 HTTP/1.0\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"GET http://a.example/ HTTP/1.1\r\nbad header\r\n",
        ] {
            assert_eq!(classify(http), Some(Sniffed::Http1), "{http:?}");
        }
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::H2c));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Some(Sniffed::H2c)
        );
        for not in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"PING\r\n",
            b"HELO mail.example\r\n",
            b"GET / HTTP/2.0\r\n",
            b"PRI * HTTP/2.0\r\n\r\nXX",
            b"\0\0\0\x08\x04\xd2\x16\x2f",
        ] {
            assert_eq!(classify(not), Some(Sniffed::Other), "{not:?}");
        }
        // Not enough yet: a method, part of a path, part of the preface.
        for partial in [&b"G"[..], b"GET /ord", b"GET / HTTP/1.", b"PRI * HT"] {
            assert_eq!(classify(partial), None, "{partial:?}");
        }
    }

    #[tokio::test]
    async fn a_read_sniff_returns_what_it_read_and_a_rewind_replays_it_first() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GET /a HT").await.unwrap();
        let task = tokio::spawn(async move {
            let mut server = server;
            let (v, read) = sniff_read(&mut server, Duration::from_secs(5), Duration::from_secs(5))
                .await
                .unwrap();
            let mut all = Vec::new();
            Rewind::new(read, server)
                .read_to_end(&mut all)
                .await
                .unwrap();
            (v, all)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(b"TP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        drop(client);
        let (v, all) = task.await.unwrap();
        assert_eq!(v, Sniffed::Http1);
        assert_eq!(all, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test]
    async fn a_silent_stream_is_silent_after_the_wait_and_bytes_are_other() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (v, read) = sniff_read(
            &mut server,
            Duration::from_millis(30),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!((v, read.len()), (Sniffed::Silent, 0));
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"\0\x01binary")
            .await
            .unwrap();
        let (v, read) = sniff_read(&mut server, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((v, read.as_slice()), (Sniffed::Other, &b"\0\x01binary"[..]));
    }
}
