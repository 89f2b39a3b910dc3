//! Reading a TLS ClientHello without consuming it: the inbound side decides between
//! termination and passthrough, the gateway routes by SNI, both on the untouched byte stream.
//! The bytes are parsed by rustls's own Acceptor.

use std::time::Duration;

use tokio::net::TcpStream;

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

/// Peeks at `stream` until its first flight is classified. `first_byte` bounds the wait for
/// any byte; `whole` bounds the wait for the rest of a ClientHello.
pub async fn peek_client_hello(
    stream: &TcpStream,
    first_byte: Duration,
    whole: Duration,
) -> std::io::Result<Peeked> {
    let decide = |b: &[u8]| {
        // One byte of a handshake record is not enough to tell: wait for more, as for the
        // rest of a hello (a client may well send its first segment a byte at a time).
        if b.len() == 1 {
            return (b[0] != 0x16).then_some(Peeked::Plain);
        }
        if !looks_like_tls(b) {
            return Some(Peeked::Plain);
        }
        match parse_client_hello(b) {
            Ok(Some(hello)) => Some(Peeked::Tls(hello)),
            Err(e) => Some(Peeked::Malformed(e)),
            Ok(None) => None,
        }
    };
    let malformed = |m: &str| Peeked::Malformed(m.into());
    Ok(
        match crate::net::peek_until(stream, first_byte, whole, MAX_HELLO, decide).await? {
            crate::net::Peek::Decided(p) => p,
            crate::net::Peek::Nothing => Peeked::Silent,
            crate::net::Peek::Closed => malformed("closed during ClientHello"),
            crate::net::Peek::TimedOut => malformed("incomplete ClientHello"),
            crate::net::Peek::Full => malformed("ClientHello too large"),
        },
    )
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
