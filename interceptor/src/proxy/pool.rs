//! Upstream HTTP connections kept for the next request, across client connections: a client
//! that opens a connection per request still reuses handshaked (mTLS) upstream connections,
//! as Envoy's cluster connection pools do. An HTTP/1.1 connection carries one request at a
//! time and comes back when its response has been read to the end; an HTTP/2 connection is
//! shared by every request to its endpoint. A DestinationRule's `maxRequestsPerConnection`
//! and `idleTimeout` retire connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::{http1, http2};

use super::breaker::Breaker;

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
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// What retires a connection (a DestinationRule's `connectionPool.http`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnLimits {
    /// Requests it carries before it is closed.
    pub max_requests: Option<u32>,
    /// Idle this long, it is not used again (and closed).
    pub idle_timeout: Option<Duration>,
}

/// A connection with its use count.
pub struct Pooled {
    sender: Sender,
    /// Requests sent on it (shared by an HTTP/2 connection's handles).
    uses: Arc<AtomicU32>,
    limits: ConnLimits,
    idle_since: Instant,
    /// Who answered, as its certificate proved (None: plaintext): Istio's
    /// `destination_principal` for every request it carries.
    peer: Option<Arc<str>>,
}

impl Pooled {
    /// A connection just made, about to carry its first request.
    pub fn new(sender: Sender, limits: ConnLimits) -> Self {
        Pooled {
            sender,
            uses: Arc::new(AtomicU32::new(1)),
            limits,
            idle_since: Instant::now(),
            peer: None,
        }
    }

    /// The identity the connection's mTLS proved.
    pub fn with_peer(mut self, peer: Option<Arc<str>>) -> Self {
        self.peer = peer;
        self
    }

    pub fn peer(&self) -> Option<&Arc<str>> {
        self.peer.as_ref()
    }

    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    /// Whether it has carried all the requests it may.
    fn spent(&self) -> bool {
        self.limits
            .max_requests
            .is_some_and(|m| self.uses.load(Ordering::Relaxed) >= m)
    }

    fn expired(&self, now: Instant) -> bool {
        self.sender.is_closed()
            || self
                .limits
                .idle_timeout
                .is_some_and(|t| now.duration_since(self.idle_since) >= t)
    }

    /// Sends `req`, once an HTTP/1.1 connection given back at the end of a response has
    /// finished reading it.
    pub async fn send(
        &mut self,
        req: hyper::Request<Body>,
    ) -> Result<hyper::Response<Incoming>, hyper::Error> {
        match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
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
    idle: Mutex<HashMap<Key, Vec<Pooled>>>,
}

impl Pool {
    /// A connection to `key` for a request, if one is kept (closed, idle-expired and spent ones
    /// are dropped, which closes them).
    pub fn take(&self, key: &Key) -> Option<Pooled> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let kept = idle.get_mut(key)?;
        kept.retain(|p| !p.expired(now) && !p.spent());
        let at = kept.len().checked_sub(1)?;
        let p = &kept[at];
        p.uses.fetch_add(1, Ordering::Relaxed);
        let taken = match &p.sender {
            // HTTP/2: shared, it stays in the pool until it has carried its requests.
            Sender::H2(s) => Pooled {
                sender: Sender::H2(s.clone()),
                uses: p.uses.clone(),
                limits: p.limits,
                idle_since: p.idle_since,
                peer: p.peer.clone(),
            },
            Sender::H1(_) => return kept.pop(),
        };
        if taken.spent() {
            kept.pop();
        }
        Some(taken)
    }

    /// Keeps `conn` for the next request to `key`, unless it is spent.
    pub fn put(&self, key: Key, mut conn: Pooled) {
        if conn.spent() || conn.sender.is_closed() {
            return;
        }
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let kept = idle.entry(key).or_default();
        match &conn.sender {
            Sender::H2(_) => match kept.iter_mut().find(|p| !p.sender.is_closed()) {
                Some(shared) => shared.idle_since = conn.idle_since,
                None => kept.push(conn),
            },
            Sender::H1(_) if kept.len() < MAX_IDLE_PER_KEY => kept.push(conn),
            Sender::H1(_) => {}
        }
    }

    /// The response's body; its connection comes back to the pool: an HTTP/2 one now, an
    /// HTTP/1.1 one when the body has been read to its end (dropped early, the connection
    /// closes). A breaker's waiting requests are woken when it does.
    pub fn return_with(
        self: &Arc<Self>,
        key: Key,
        conn: Pooled,
        body: Incoming,
        breaker: Option<Arc<Breaker>>,
    ) -> Body {
        // An empty body may never be polled: its connection is free already.
        let done = conn.is_h2() || body.is_end_stream();
        let mut back = GiveBack(Some((self.clone(), key, conn, breaker)));
        if done {
            super::body::Watch::ended(&mut back);
            return body.boxed();
        }
        super::body::Watched::new(body, back).boxed()
    }
}

type Back = (Arc<Pool>, Key, Pooled, Option<Arc<Breaker>>);

/// An HTTP/1.1 response body's duty: give its connection back once read to the end (an error
/// ends the connection: it is not given back).
struct GiveBack(Option<Back>);

impl super::body::Watch for GiveBack {
    fn ended(&mut self) {
        if let Some((pool, key, conn, breaker)) = self.0.take() {
            pool.put(key, conn);
            if let Some(b) = breaker {
                b.release();
            }
        }
    }

    fn failed(&mut self) {
        self.0 = None;
    }
}
