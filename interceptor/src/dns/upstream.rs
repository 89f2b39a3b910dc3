//! Forwarding to the nameservers of the resolv.conf in force when capture started. Queries and
//! answers are passed byte for byte, so EDNS, DNSSEC bits and truncation stay the upstream's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

/// What the VM's resolv.conf said.
#[derive(Clone, Debug, Default)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolvError {
    #[error("{}: {source}", file.display())]
    Read {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", file.display())]
    Parse {
        file: std::path::PathBuf,
        source: resolv_conf::ParseError,
    },
}

impl ResolvConf {
    pub fn read(path: &Path) -> Result<Self, ResolvError> {
        let bytes = std::fs::read(path).map_err(|source| ResolvError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes).map_err(|source| ResolvError::Parse {
            file: path.to_path_buf(),
            source,
        })
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, resolv_conf::ParseError> {
        let conf = resolv_conf::Config::parse(bytes)?;
        let nameservers = conf
            .nameservers
            .iter()
            .map(|ns| SocketAddr::new(IpAddr::from(ns), 53))
            .collect();
        let search = conf
            .get_search()
            .cloned()
            .or_else(|| conf.get_domain().map(|d| vec![d.clone()]))
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(Self {
            nameservers,
            search,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no upstream nameserver configured")]
    NoServers,
    #[error("every upstream failed within {0:?}")]
    AllFailed(Duration),
    #[error("{0} queries already wait on upstream (--max-dns-forwards)")]
    Busy(usize),
}

pub struct Upstream {
    servers: Vec<SocketAddr>,
    timeout: Duration,
}

impl Upstream {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self { servers, timeout }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Sends `query` to each server in turn until one answers. The whole exchange is bounded by
    /// one timeout, shared among the servers, so the client gets SERVFAIL before it gives up.
    /// `max`: the largest answer the client takes (its EDNS payload, 512 without, 65535 over
    /// TCP); an upstream answers a query within it, so that is all a UDP answer needs.
    pub async fn exchange(&self, query: &[u8], tcp: bool, max: usize) -> Result<Vec<u8>, Error> {
        if self.servers.is_empty() {
            return Err(Error::NoServers);
        }
        let deadline = Instant::now() + self.timeout;
        for (i, server) in self.servers.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            // Leave later servers their share instead of letting the first eat the budget.
            let share = left / (self.servers.len() - i) as u32;
            let attempt = async {
                if tcp {
                    exchange_tcp(*server, query).await
                } else {
                    exchange_udp(*server, query, max).await
                }
            };
            match tokio::time::timeout(share, attempt).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "upstream failed"),
                Err(_) => tracing::debug!(%server, "upstream timed out"),
            }
        }
        Err(Error::AllFailed(self.timeout))
    }
}

fn id_of(msg: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.first()?, *msg.get(1)?]))
}

async fn exchange_udp(server: SocketAddr, query: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    // Connected: a closed port fails fast (ICMP) and only this server's datagrams arrive.
    sock.connect(server).await?;
    sock.send(query).await?;
    // One byte more than the client takes: a bigger answer is seen as such, not cut silently.
    let mut buf = vec![0u8; max.clamp(512, 65535) + 1];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 12 && id_of(&buf[..n]) == id_of(query) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::Error::other("query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    s.write_all(&framed).await?;
    let n = s.read_u16().await? as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}
