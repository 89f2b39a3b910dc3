//! What a connection speaks, told from its first bytes as Envoy's `http_inspector` tells it
//! (the listener filter istiod puts on sniffed ports, sheet 1.2): an HTTP/1.x request line, or
//! the HTTP/2 connection preface (h2c). Anything else — or nothing within the wait, as a
//! server-first protocol sends nothing — is bytes. The bytes are only peeked: whoever serves
//! the connection reads them again.

use std::time::Duration;

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
}
