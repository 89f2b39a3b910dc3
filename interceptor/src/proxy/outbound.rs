//! proxy::Outbound: accepts captured connections, finds the service from the original
//! destination and forwards to a healthy endpoint, trying the next on failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::pick::{self, Outliers, Target};
use crate::capture::OriginalDst;
use crate::mesh::{Address, Store};

/// At most this many endpoints are tried for one connection.
const MAX_ATTEMPTS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Outbound {
    store: Arc<Store>,
    orig: Arc<OriginalDst>,
    outliers: Outliers,
    /// Our own listener addresses: a connection whose original destination is one of them would
    /// loop.
    own: Vec<SocketAddr>,
}

impl Outbound {
    pub fn new(store: Arc<Store>, orig: Arc<OriginalDst>, own: Vec<SocketAddr>) -> Arc<Self> {
        Arc::new(Self {
            store,
            orig,
            outliers: Outliers::default(),
            own,
        })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.handle(client, peer).await });
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        let Some(dst) = self.orig.lookup(&client) else {
            tracing::warn!(%peer, "outbound: no original destination for connection; closing");
            return;
        };
        if self.own.contains(&dst) {
            tracing::warn!(%peer, %dst, "outbound: connection to the proxy itself; closing");
            return;
        }
        let table = self.store.load();
        let Some((svc, port)) = table.service_for(dst) else {
            tracing::warn!(%peer, original = %dst, "outbound: no mesh service at the original destination; closing");
            return;
        };
        let mut targets = pick::order(svc, port, &self.outliers);
        if targets.is_empty() && svc.resolution == crate::mesh::Resolution::Dns {
            // A DNS service without endpoints is reached at its own host name (Istio does this).
            if let Some(w) = dns_self_target(svc, port) {
                targets.push(w);
            }
        }
        let host = svc.host.clone();
        drop(table);
        let started = Instant::now();
        for target in targets.iter().take(MAX_ATTEMPTS) {
            match connect(target).await {
                Ok(upstream) => {
                    self.outliers.succeeded(target);
                    tracing::info!(%peer, original = %dst, service = %host, endpoint = %target.label(), "outbound connection");
                    relay(client, upstream, &host, dst, target, started).await;
                    return;
                }
                Err(e) => {
                    self.outliers.failed(target);
                    tracing::warn!(original = %dst, service = %host, endpoint = %target.label(), error = %e, "outbound: endpoint failed; trying the next");
                }
            }
        }
        tracing::warn!(%peer, original = %dst, service = %host, tried = targets.len().min(MAX_ATTEMPTS), "outbound: no endpoint reachable; closing");
    }
}

fn dns_self_target(svc: &crate::mesh::Service, port: &crate::mesh::ServicePort) -> Option<Target> {
    let w = crate::mesh::Workload {
        name: format!("{}#dns", svc.origin),
        namespace: svc.namespace.clone(),
        address: Address::Hostname(svc.host.to_string()),
        labels: Default::default(),
        ports: Default::default(),
        network: String::new(),
        locality: String::new(),
        weight: 1,
        service_account: String::new(),
        health: crate::mesh::Health::Healthy,
    };
    Some(Target {
        address: w.address.clone(),
        port: w.target_port(port),
        workload: Arc::new(w),
    })
}

async fn connect(target: &Target) -> std::io::Result<TcpStream> {
    let fut = async {
        let stream = match &target.address {
            Address::Ip(ip) => TcpStream::connect(SocketAddr::new(*ip, target.port)).await?,
            Address::Hostname(h) => TcpStream::connect((h.as_str(), target.port)).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })
}

async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    host: &crate::mesh::Host,
    dst: SocketAddr,
    target: &Target,
    started: Instant,
) {
    let result =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 64 * 1024, 64 * 1024)
            .await;
    let _ = client.shutdown().await;
    match result {
        Ok((sent, received)) => tracing::info!(
            original = %dst, service = %host, endpoint = %target.label(), sent, received,
            duration_ms = started.elapsed().as_millis() as u64, "outbound connection closed"
        ),
        Err(e) => tracing::info!(
            original = %dst, service = %host, endpoint = %target.label(), error = %e,
            duration_ms = started.elapsed().as_millis() as u64, "outbound connection reset"
        ),
    }
}
