//! Upstream HTTP connections kept for the next request, across client connections: a client
//! that opens a connection per request still reuses handshaked (mTLS) upstream connections,
//! as Envoy's cluster connection pools do. HTTP/1.1 connections carry one request at a time;
//! an HTTP/2 connection is shared by every request to its endpoint.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};

/// The body every request and response is carried in.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// At most this many idle HTTP/1.1 connections are kept per endpoint.
const MAX_IDLE_PER_KEY: usize = 32;

/// An upstream connection's request half.
pub enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn usable(&self) -> bool {
        match self {
            Sender::H1(s) => !s.is_closed() && s.is_ready(),
            Sender::H2(s) => !s.is_closed() && s.is_ready(),
        }
    }

    pub async fn send(
        &mut self,
        req: hyper::Request<Body>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

/// What an upstream connection is for: the cluster, the endpoint and how it was reached (the
/// transport's label and the protocol), so a connection is reused only where it would have been
/// made the same way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub cluster: String,
    pub endpoint: String,
    pub transport: &'static str,
    pub h2: bool,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Sender>>>,
}

impl Pool {
    /// A connection to `key` ready for a request, if one is kept (closed ones are dropped).
    pub fn take(&self, key: &Key) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let kept = idle.get_mut(key)?;
        kept.retain(|s| match s {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        });
        let at = kept.iter().position(Sender::usable)?;
        match &kept[at] {
            // HTTP/2: shared, it stays in the pool.
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::H1(_) => Some(kept.swap_remove(at)),
        }
    }

    /// Keeps `sender` for the next request to `key`.
    pub fn put(&self, key: Key, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let kept = idle.entry(key).or_default();
        match sender {
            Sender::H2(_)
                if kept
                    .iter()
                    .any(|s| matches!(s, Sender::H2(s) if !s.is_closed())) => {}
            s if kept.len() < MAX_IDLE_PER_KEY => kept.push(s),
            _ => {}
        }
    }
}
