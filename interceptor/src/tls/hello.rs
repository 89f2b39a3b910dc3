//! Reading a TLS ClientHello without consuming it: the inbound side decides between
//! termination and passthrough, the gateway routes by SNI, both on the untouched byte stream.
//! The bytes are parsed by rustls's own Acceptor.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// What the first flight of a connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peeked {
    Tls(ClientHello),
    /// Bytes that are not a TLS handshake.
    Plain,
    /// No byte within the wait (a server-first protocol, or an idle client).
    Silent,
    /// A TLS record that is not a valid ClientHello.
    Malformed(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

impl ClientHello {
    pub fn has_istio_alpn(&self) -> bool {
        self.alpn.iter().any(|a| super::is_istio_alpn(a))
    }
}

/// A ClientHello larger than this is refused (rustls allows 64 KiB handshake messages).
const MAX_HELLO: usize = 64 * 1024 + 5;

/// Parses the start of a connection. `Ok(None)`: a TLS handshake whose ClientHello is not
/// complete yet. Never panics, whatever the bytes (fuzzed).
pub fn parse_client_hello(bytes: &[u8]) -> Result<Option<ClientHello>, String> {
    if bytes.len() < 5 {
        return Ok(None);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut cursor = std::io::Cursor::new(bytes);
    while (cursor.position() as usize) < bytes.len() {
        match acceptor.read_tls(&mut cursor) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Ok(Some(ClientHello {
                sni: hello.server_name().map(str::to_string),
                alpn: hello
                    .alpn()
                    .map(|it| it.map(<[u8]>::to_vec).collect())
                    .unwrap_or_default(),
            }))
        }
        Ok(None) if bytes.len() >= MAX_HELLO => Err("ClientHello too large".into()),
        Ok(None) => Ok(None),
        Err((e, _)) => Err(e.to_string()),
    }
}

/// A TLS record header: handshake (22), major version 3.
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03
}

/// What a ClientHello's peek buffer starts at: most hellos fit (post-quantum key shares make
/// them ~1.8 KiB); it grows only for those that do not. A slow client holds no more than this.
const FIRST_PEEK: usize = 4 * 1024;

/// Peeks at `stream` until its first flight is classified. `first_byte` bounds the wait for
/// any byte; `whole` bounds the wait for the rest of a ClientHello. Between peeks it sleeps
/// until more bytes arrive, so a client sending its hello a byte at a time (slowloris) costs
/// a wake-up per byte, not a busy loop.
pub async fn peek_client_hello(
    stream: &TcpStream,
    first_byte: Duration,
    whole: Duration,
) -> std::io::Result<Peeked> {
    let mut buf = vec![0u8; FIRST_PEEK];
    let n = match tokio::time::timeout(first_byte, stream.peek(&mut buf)).await {
        Ok(r) => r?,
        Err(_) => return Ok(Peeked::Silent),
    };
    if n == 0 {
        return Ok(Peeked::Silent);
    }
    // One byte of a handshake record is not enough to tell: wait for more, as for the rest
    // of a hello (a client may well send its first segment a byte at a time).
    let maybe_tls = if n == 1 {
        buf[0] == 0x16
    } else {
        looks_like_tls(&buf[..n])
    };
    if !maybe_tls {
        return Ok(Peeked::Plain);
    }
    let deadline = Instant::now() + whole;
    let mut seen = n;
    loop {
        if seen >= 2 && !looks_like_tls(&buf[..seen]) {
            return Ok(Peeked::Plain);
        }
        match parse_client_hello(&buf[..seen]) {
            Ok(Some(hello)) => return Ok(Peeked::Tls(hello)),
            Err(e) => return Ok(Peeked::Malformed(e)),
            Ok(None) => {}
        }
        if seen == buf.len() {
            if buf.len() >= MAX_HELLO {
                return Ok(Peeked::Malformed("ClientHello too large".into()));
            }
            buf.resize((buf.len() * 4).min(MAX_HELLO), 0);
            seen = peek_now(stream, &mut buf)?.unwrap_or(seen);
            continue;
        }
        // Peeking leaves the socket readable, so waiting for readability would return at once:
        // forget that readiness, look once more (bytes may have come in between), then wait
        // for the next arrival.
        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
        match peek_now(stream, &mut buf)? {
            Some(0) => return Ok(Peeked::Malformed("closed during ClientHello".into())),
            Some(n) if n > seen => {
                seen = n;
                continue;
            }
            _ => {}
        }
        if tokio::time::timeout_at(deadline, stream.readable())
            .await
            .is_err()
        {
            return Ok(Peeked::Malformed("incomplete ClientHello".into()));
        }
        match peek_now(stream, &mut buf)? {
            Some(0) => return Ok(Peeked::Malformed("closed during ClientHello".into())),
            Some(n) => seen = n.max(seen),
            None => {}
        }
    }
}

/// One non-blocking peek: Some(bytes queued, up to `buf`'s size; 0 at EOF), None if none yet.
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    // SAFETY: buf is valid for writes of its length; MSG_PEEK | MSG_DONTWAIT only reads.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, produced by a rustls client.
    fn hello_bytes(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let _ = &mut roots;
        let mut cfg = rustls::ClientConfig::builder_with_provider(super::super::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            sni.to_string().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn parses_sni_and_alpn() {
        let b = hello_bytes(
            "outbound_.8080_._.product.default.svc.cluster.local",
            &[b"istio"],
        );
        let h = parse_client_hello(&b).unwrap().unwrap();
        assert_eq!(
            h.sni.as_deref(),
            Some("outbound_.8080_._.product.default.svc.cluster.local")
        );
        assert!(h.has_istio_alpn());
        // Cut short: not complete yet, not an error.
        assert_eq!(parse_client_hello(&b[..b.len() / 2]), Ok(None));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_client_hello(&[0x16, 3, 1, 0, 4, 1, 0, 0, 0]).is_err());
        assert!(!looks_like_tls(b"GET / HTTP/1.1\r\n"));
    }
}
