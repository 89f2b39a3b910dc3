//! dns::Server: answers mesh names from the table and forwards everything else upstream, on UDP
//! and TCP.

mod answer;
mod resolve;
mod upstream;

pub use resolve::{Error as ResolveError, Resolver};
pub use upstream::{ResolvConf, ResolvError, Upstream};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::mesh::Store;
use crate::net::udp::{RecvBatch, SendBatch};

/// Where an answer came from, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Table,
    Upstream,
    ServFail,
    FormErr,
}

/// Query counters by outcome (read by the admin endpoint).
#[derive(Default, Debug)]
pub struct Stats {
    pub table: AtomicU64,
    pub upstream: AtomicU64,
    pub servfail: AtomicU64,
    pub formerr: AtomicU64,
    pub dropped: AtomicU64,
}

impl Stats {
    fn count(&self, source: Option<Source>) {
        let c = match source {
            Some(Source::Table) => &self.table,
            Some(Source::Upstream) => &self.upstream,
            Some(Source::ServFail) => &self.servfail,
            Some(Source::FormErr) => &self.formerr,
            None => &self.dropped,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What to do with one packet, decided without waiting on anything.
enum Decision {
    Reply(Vec<u8>, Source),
    Forward(Message),
    Drop,
}

pub struct Server {
    store: Arc<Store>,
    upstream: Upstream,
    /// The first search domain of the VM's resolv.conf (for the CNAME rule).
    search_domain: Option<String>,
    stats: Arc<Stats>,
    /// Queries waiting on upstream: a flood of names outside the mesh (random names, a dead
    /// upstream) must not pile up tasks, sockets and buffers without end. At the cap a query
    /// gets SERVFAIL at once.
    forwards: Arc<crate::net::Limit>,
    /// When "upstream failed" was last logged (ms since `started`): once a second at most.
    last_warned: AtomicU64,
    started: std::time::Instant,
}

impl Server {
    pub fn new(
        store: Arc<Store>,
        upstream: Upstream,
        search_domain: Option<String>,
        stats: Arc<Stats>,
        forwards: Arc<crate::net::Limit>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            upstream,
            search_domain,
            stats,
            forwards,
            last_warned: AtomicU64::new(0),
            started: std::time::Instant::now(),
        })
    }

    /// True at most once a second: per-query failures under a flood would drown the log.
    fn may_warn(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1000;
        let last = self.last_warned.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1000
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn decide(&self, packet: &[u8], tcp: bool) -> Decision {
        let query = match Message::from_vec(packet) {
            Ok(q) if q.message_type() == MessageType::Query => q,
            Ok(_) => return Decision::Drop,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS query");
                return match answer::formerr(packet) {
                    Some(b) => Decision::Reply(b, Source::FormErr),
                    None => Decision::Drop,
                };
            }
        };
        // One snapshot per query: a reload in between can never mix two tables.
        let table = self.store.load_dns();
        match answer::from_table(&query, &table.names, self.search_domain.as_deref()) {
            Some(resp) => match answer::encode(resp, max_size(&query, tcp)) {
                Some(b) => Decision::Reply(b, Source::Table),
                None => Decision::Drop,
            },
            None => Decision::Forward(query),
        }
    }

    /// The answer to `packet` when it needs no upstream (a table answer, FORMERR), else None.
    /// Never panics, whatever the bytes: the fuzz target drives this.
    pub fn answer_locally(&self, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
        if !tcp {
            let (mut key, mut out) = (String::new(), Vec::new());
            if answer::fast(packet, &self.store.load_dns().names, &mut key, &mut out) {
                return Some(out);
            }
        }
        match self.decide(packet, tcp) {
            Decision::Reply(b, _) => Some(b),
            _ => None,
        }
    }

    async fn forward(&self, query: Message, packet: &[u8], tcp: bool) -> Option<(Vec<u8>, Source)> {
        let max = max_size(&query, tcp);
        let exchanged = match self.forwards.try_take() {
            Some(_permit) => self.upstream.exchange(packet, tcp, max).await,
            None => Err(upstream::Error::Busy(self.forwards.max())),
        };
        match exchanged {
            // Bigger than the client takes (an upstream ignoring its payload size): tell it to
            // ask over TCP, rather than relay a cut datagram.
            Ok(bytes) if bytes.len() > max => {
                let mut tc = answer::response_to(&query, ResponseCode::NoError);
                tc.set_truncated(true);
                answer::encode(tc, max).map(|b| (b, Source::Upstream))
            }
            Ok(bytes) => Some((bytes, Source::Upstream)),
            Err(e) => {
                let name = query
                    .queries()
                    .first()
                    .map(|q| q.name().to_string())
                    .unwrap_or_default();
                if self.may_warn() {
                    tracing::warn!(%name, error = %e, "DNS upstream failed; SERVFAIL (logged once a second at most)");
                }
                answer::encode(
                    answer::response_to(&query, ResponseCode::ServFail),
                    max_size(&query, tcp),
                )
                .map(|b| (b, Source::ServFail))
            }
        }
    }

    /// The response to one query packet, or None to drop it.
    pub async fn handle(&self, packet: &[u8], tcp: bool) -> Option<(Vec<u8>, Source)> {
        let out = match self.decide(packet, tcp) {
            Decision::Reply(b, s) => Some((b, s)),
            Decision::Forward(q) => self.forward(q, packet, tcp).await,
            Decision::Drop => None,
        };
        self.stats.count(out.as_ref().map(|(_, s)| *s));
        out
    }

    /// Answers datagrams in batches (net::udp): every query waiting is taken with one
    /// syscall and every table answer it produced sent with one more.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut batch = RecvBatch::new();
        let mut replies = SendBatch::default();
        let mut key = String::with_capacity(256);
        loop {
            let n = match batch.recv(&socket).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            };
            // One table for the batch's fast answers: queries that arrived together.
            let table = self.store.load_dns();
            for i in 0..n {
                let Some(d) = batch.get(i) else { continue };
                let Some(from) = d.from else {
                    self.stats.count(None);
                    continue;
                };
                if d.truncated {
                    // Bigger than any query a resolver sends: its header still says whom to
                    // tell.
                    match answer::formerr(d.bytes) {
                        Some(b) => {
                            self.stats.count(Some(Source::FormErr));
                            replies.push(b, from);
                        }
                        None => self.stats.count(None),
                    }
                    continue;
                }
                if answer::fast(d.bytes, &table.names, &mut key, replies.slot(from)) {
                    self.stats.count(Some(Source::Table));
                    continue;
                }
                replies.unslot();
                match self.decide(d.bytes, false) {
                    // Table answers go out with the batch: no task, no copy of the query.
                    Decision::Reply(resp, source) => {
                        self.stats.count(Some(source));
                        replies.push(resp, from);
                    }
                    Decision::Drop => self.stats.count(None),
                    // Upstream may be slow: never hold up the next query for it.
                    Decision::Forward(query) => {
                        let (this, socket, packet) =
                            (self.clone(), socket.clone(), d.bytes.to_vec());
                        tokio::spawn(async move {
                            let out = this.forward(query, &packet, false).await;
                            this.stats.count(out.as_ref().map(|(_, s)| *s));
                            if let Some((resp, _)) = out {
                                let _ = socket.send_to(&resp, from).await;
                            }
                        });
                    }
                }
            }
            if !replies.is_empty() {
                replies.flush(&socket).await;
            }
        }
    }

    /// Serves DNS over TCP on `listener`, at most `limit`'s connections at once.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, limit: Arc<crate::net::Limit>) {
        crate::net::accept_loop(
            listener,
            "dns",
            Some(limit),
            crate::net::Tasks::Detached,
            move |stream, _| {
                let this = self.clone();
                async move { this.tcp_connection(stream).await }
            },
        )
        .await
    }

    /// Queries on one connection are answered as they complete (RFC 7766 pipelining): a slow
    /// upstream answer does not hold up a table answer behind it. Bounded against clients
    /// that misbehave: each query must arrive whole within `TCP_IDLE`, at most
    /// `TCP_PIPELINE` wait for their answer (then reading pauses), and a client that does not
    /// read its answers within `TCP_IDLE` loses the connection.
    async fn tcp_connection(self: Arc<Self>, stream: TcpStream) {
        let (mut rd, wr) = stream.into_split();
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            while inflight.len() >= TCP_PIPELINE {
                inflight.join_next().await;
            }
            if stalled.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!("DNS TCP: the client stopped reading its answers; closing");
                return;
            }
            let query = async {
                let len = rd.read_u16().await?;
                let mut packet = vec![0u8; usize::from(len)];
                rd.read_exact(&mut packet).await?;
                Ok::<_, std::io::Error>(packet)
            };
            let Ok(Ok(packet)) = tokio::time::timeout(TCP_IDLE, query).await else {
                break;
            };
            let (this, wr, stalled) = (self.clone(), wr.clone(), stalled.clone());
            inflight.spawn(async move {
                if let Some((resp, _)) = this.handle(&packet, true).await {
                    if let Ok(rlen) = u16::try_from(resp.len()) {
                        let mut framed = Vec::with_capacity(resp.len() + 2);
                        framed.extend_from_slice(&rlen.to_be_bytes());
                        framed.extend_from_slice(&resp);
                        let write = async { wr.lock().await.write_all(&framed).await };
                        if !matches!(tokio::time::timeout(TCP_IDLE, write).await, Ok(Ok(()))) {
                            stalled.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
            while inflight.try_join_next().is_some() {}
        }
        // The client half-closed: finish what it asked before closing.
        while inflight.join_next().await.is_some() {}
    }
}

/// How long a DNS TCP client may take to send a whole query, or to read an answer.
const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// Queries of one TCP connection answered at once.
const TCP_PIPELINE: usize = 64;

fn max_size(query: &Message, tcp: bool) -> usize {
    if tcp {
        65535
    } else {
        usize::from(query.max_payload())
    }
}
