//! dns::Server: answers mesh names from the table and forwards everything else upstream, on UDP
//! and TCP.

mod answer;
mod upstream;

pub use upstream::{ResolvConf, Upstream};

use std::sync::Arc;

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::mesh::Store;

/// Where an answer came from, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Table,
    Upstream,
    ServFail,
    FormErr,
}

pub struct Server {
    store: Arc<Store>,
    upstream: Upstream,
    /// The first search domain of the VM's resolv.conf (for the CNAME rule).
    search_domain: Option<String>,
}

impl Server {
    pub fn new(store: Arc<Store>, upstream: Upstream, search_domain: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            store,
            upstream,
            search_domain,
        })
    }

    /// The response to one query packet, or None to drop it.
    pub async fn handle(&self, packet: &[u8], tcp: bool) -> Option<(Vec<u8>, Source)> {
        let query = match Message::from_vec(packet) {
            Ok(q) if q.message_type() == hickory_proto::op::MessageType::Query => q,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS query");
                return answer::formerr(packet).map(|b| (b, Source::FormErr));
            }
        };
        let max = if tcp {
            65535
        } else {
            usize::from(query.max_payload())
        };
        let table = self.store.load();
        if let Some(resp) = answer::from_table(&query, &table.names, self.search_domain.as_deref())
        {
            return answer::encode(resp, max).map(|b| (b, Source::Table));
        }
        drop(table);
        match self.upstream.exchange(packet, tcp).await {
            Ok(bytes) => Some((bytes, Source::Upstream)),
            Err(e) => {
                let name = query
                    .queries()
                    .first()
                    .map(|q| q.name().to_string())
                    .unwrap_or_default();
                tracing::warn!(%name, error = %e, "DNS upstream failed; SERVFAIL");
                answer::encode(answer::response_to(&query, ResponseCode::ServFail), max)
                    .map(|b| (b, Source::ServFail))
            }
        }
    }

    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            };
            let packet = buf[..n].to_vec();
            let (this, socket) = (self.clone(), socket.clone());
            // One task per query: a slow upstream never holds up the next query.
            tokio::spawn(async move {
                if let Some((resp, _)) = this.handle(&packet, false).await {
                    let _ = socket.send_to(&resp, from).await;
                }
            });
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.tcp_connection(stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn tcp_connection(&self, mut stream: TcpStream) {
        let idle = std::time::Duration::from_secs(10);
        loop {
            let Ok(Ok(len)) = tokio::time::timeout(idle, stream.read_u16()).await else {
                return;
            };
            let mut packet = vec![0u8; usize::from(len)];
            if stream.read_exact(&mut packet).await.is_err() {
                return;
            }
            let Some((resp, _)) = self.handle(&packet, true).await else {
                continue;
            };
            let Ok(rlen) = u16::try_from(resp.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(resp.len() + 2);
            framed.extend_from_slice(&rlen.to_be_bytes());
            framed.extend_from_slice(&resp);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}
