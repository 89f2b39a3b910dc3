//! proxy::Inbound: connections sk_lookup steered to us for this VM's own service ports.
//! PERMISSIVE and STRICT as Istio's sidecar (SPEC section 6; I: pilot/pkg/networking/core/
//! filterchain_options.go). The accepted socket's local address is the original destination.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::relay::{buffered, relay};
use crate::config::MtlsMode;
use crate::identity::{self, uri_sans, SpiffeId};
use crate::metrics::{self, Metrics, TcpLabels};
use crate::tls::{self, Peeked};

/// How long to wait for a client's first bytes before treating it as a server-first protocol.
const FIRST_BYTES: Duration = Duration::from_millis(200);
const HELLO: Duration = Duration::from_secs(5);
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Allowed client identities: for every port, and per port. Empty: every verified identity.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    pub all_ports: Vec<SpiffeId>,
    pub by_port: HashMap<u16, Vec<SpiffeId>>,
}

impl AllowList {
    /// Entries `spiffe://...` (every port) or `PORT=spiffe://...`.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut out = Self::default();
        for e in entries {
            let (port, id) = match e.split_once('=') {
                Some((p, id)) => (
                    Some(
                        p.trim()
                            .parse::<u16>()
                            .map_err(|_| format!("{e:?}: bad port"))?,
                    ),
                    id,
                ),
                None => (None, e.as_str()),
            };
            let id =
                SpiffeId::parse(id.trim()).ok_or_else(|| format!("{e:?}: not a spiffe:// id"))?;
            match port {
                Some(p) => out.by_port.entry(p).or_default().push(id),
                None => out.all_ports.push(id),
            }
        }
        Ok(out)
    }

    pub fn allows(&self, port: u16, id: Option<&SpiffeId>) -> bool {
        let per_port = self.by_port.get(&port);
        if self.all_ports.is_empty() && per_port.is_none() {
            return true;
        }
        id.is_some_and(|id| self.all_ports.contains(id) || per_port.is_some_and(|l| l.contains(id)))
    }
}

pub struct Inbound {
    identity: Arc<identity::Store>,
    mode: MtlsMode,
    allow: AllowList,
    /// Our listener port: a connection whose original destination is it would loop.
    own_port: u16,
    metrics: Arc<Metrics>,
}

/// How a connection was handled, for the access log.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Mtls,
    /// mTLS on a resumed session: the client's chain was verified when the session was made.
    MtlsResumed,
    TlsPassthrough,
    Plaintext,
}

impl Inbound {
    pub fn new(
        identity: Arc<identity::Store>,
        mode: MtlsMode,
        allow: AllowList,
        own_port: u16,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            identity,
            mode,
            allow,
            own_port,
            metrics,
        })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        super::accept_loop(listener, "inbound", move |stream, peer| {
            let this = self.clone();
            async move { this.handle(stream, peer).await }
        })
        .await
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        let Ok(dst) = stream.local_addr() else { return };
        if dst.port() == self.own_port {
            tracing::warn!(%peer, %dst, "inbound: connection to the proxy itself; closing");
            return;
        }
        let _ = stream.set_nodelay(true);
        let first = if self.mode == MtlsMode::Strict {
            HELLO
        } else {
            FIRST_BYTES
        };
        let peeked = match tls::peek_client_hello(&stream, first, HELLO).await {
            Ok(p) => p,
            Err(e) => {
                return access_log(peer, dst, None, None, 0, 0, started, &format!("error: {e}"))
            }
        };
        let strict = self.mode == MtlsMode::Strict;
        match peeked {
            Peeked::Tls(hello) if strict || hello.has_istio_alpn() => {
                self.terminate(stream, peer, dst, started).await
            }
            Peeked::Tls(_) => {
                self.passthrough(stream, peer, dst, Kind::TlsPassthrough, started)
                    .await
            }
            Peeked::Plain | Peeked::Silent if !strict => {
                self.passthrough(stream, peer, dst, Kind::Plaintext, started)
                    .await
            }
            Peeked::Plain | Peeked::Silent => access_log(
                peer,
                dst,
                None,
                None,
                0,
                0,
                started,
                "rejected: plaintext in STRICT mode",
            ),
            Peeked::Malformed(e) if !strict => {
                // Not ours to judge: the app may speak something TLS-like.
                tracing::debug!(%peer, error = %e, "inbound: unparsable TLS passed through");
                self.passthrough(stream, peer, dst, Kind::TlsPassthrough, started)
                    .await
            }
            Peeked::Malformed(e) => access_log(
                peer,
                dst,
                None,
                None,
                0,
                0,
                started,
                &format!("rejected: {e}"),
            ),
        }
    }

    async fn terminate(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        started: Instant,
    ) {
        let Some(id) = self.identity.current() else {
            return access_log(
                peer,
                dst,
                Some(Kind::Mtls),
                None,
                0,
                0,
                started,
                "rejected: mTLS needs a certificate (--certs)",
            );
        };
        let accept = TlsAcceptor::from(id.server.clone()).accept(buffered(stream));
        let mut tls = match tokio::time::timeout(HANDSHAKE, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return access_log(
                    peer,
                    dst,
                    Some(Kind::Mtls),
                    None,
                    0,
                    0,
                    started,
                    &format!("handshake failed: {e}"),
                )
            }
            Err(_) => {
                return access_log(
                    peer,
                    dst,
                    Some(Kind::Mtls),
                    None,
                    0,
                    0,
                    started,
                    "handshake timed out",
                )
            }
        };
        let client_id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| uri_sans(leaf).into_iter().next());
        if !self.allow.allows(dst.port(), client_id.as_ref()) {
            let _ = tls.shutdown().await;
            return access_log(
                peer,
                dst,
                Some(Kind::Mtls),
                client_id.as_ref(),
                0,
                0,
                started,
                "denied: identity not allowed",
            );
        }
        let mut app = match connect_app(dst).await {
            Ok(a) => a,
            Err(e) => {
                return access_log(
                    peer,
                    dst,
                    Some(Kind::Mtls),
                    client_id.as_ref(),
                    0,
                    0,
                    started,
                    &format!("app unreachable: {e}"),
                )
            }
        };
        let kind = match tls.get_ref().1.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => Kind::MtlsResumed,
            _ => Kind::Mtls,
        };
        let labels = TcpLabels::new(metrics::DESTINATION, dst.to_string(), true);
        self.metrics.opened(&labels);
        let (rx, tx) = relay(&mut tls, &mut app).await.unwrap_or((0, 0));
        self.metrics.closed(&labels, rx, tx);
        access_log(
            peer,
            dst,
            Some(kind),
            client_id.as_ref(),
            rx,
            tx,
            started,
            "ok",
        );
    }

    async fn passthrough(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        kind: Kind,
        started: Instant,
    ) {
        let mut app = match connect_app(dst).await {
            Ok(a) => a,
            Err(e) => {
                return access_log(
                    peer,
                    dst,
                    Some(kind),
                    None,
                    0,
                    0,
                    started,
                    &format!("app unreachable: {e}"),
                )
            }
        };
        let labels = TcpLabels::new(metrics::DESTINATION, dst.to_string(), false);
        self.metrics.opened(&labels);
        let (rx, tx) = relay(&mut stream, &mut app).await.unwrap_or((0, 0));
        self.metrics.closed(&labels, rx, tx);
        access_log(peer, dst, Some(kind), None, rx, tx, started, "ok");
    }
}

/// Connects to the local app at the original destination. IPv4 from 127.0.0.6, as Istio's
/// sidecar does, which sk_lookup skips so we are not captured again; IPv6 over loopback.
async fn connect_app(dst: SocketAddr) -> std::io::Result<TcpStream> {
    let (socket, target) = if dst.is_ipv4() {
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddr::from((
            interceptor_ebpf::abi::INBOUND_SOURCE4,
            0,
        )))?;
        (s, dst)
    } else {
        (
            TcpSocket::new_v6()?,
            SocketAddr::from((Ipv6Addr::LOCALHOST, dst.port())),
        )
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    peer: SocketAddr,
    dst: SocketAddr,
    kind: Option<Kind>,
    identity: Option<&SpiffeId>,
    received: u64,
    sent: u64,
    started: Instant,
    result: &str,
) {
    tracing::info!(
        %peer, service = %dst, mode = ?kind, identity = identity.map(SpiffeId::as_str).unwrap_or("-"),
        received, sent, duration_ms = started.elapsed().as_millis() as u64, result, "inbound connection"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let a = AllowList::parse(&[
            "spiffe://td/ns/a/sa/x".into(),
            "8080=spiffe://td/ns/b/sa/y".into(),
        ])
        .unwrap();
        let x = SpiffeId::parse("spiffe://td/ns/a/sa/x").unwrap();
        let y = SpiffeId::parse("spiffe://td/ns/b/sa/y").unwrap();
        assert!(a.allows(9090, Some(&x)) && !a.allows(9090, Some(&y)));
        assert!(a.allows(8080, Some(&y)) && !a.allows(8080, None));
        assert!(AllowList::default().allows(1, None));
        assert!(AllowList::parse(&["x=spiffe://a/b".into()]).is_err());
    }
}
