//! The listeners of `interceptor run`: bound before capture attaches, or adopted from the
//! process before this one through systemd's descriptor store (`fdstore`), so a restart never
//! closes a port a captured connection is steered to.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};

use super::parts::DNS_UPSTREAM_TIMEOUT;
use super::{Ctx, Handle};
use crate::capture::OriginalDst;
use crate::config::Settings;
use crate::dns::{self, ResolvConf, Resolver, Upstream};
use crate::fdstore::FdStore;
use crate::net;
use crate::proxy::{Inbound, Outbound};
use crate::transport::Dialer;

/// Every listener of `interceptor run`, bound before capture attaches.
pub struct Listeners {
    outbound: Vec<TcpListener>,
    outbound_addrs: Vec<SocketAddr>,
    inbound: Vec<TcpListener>,
    dns_tcp: Vec<TcpListener>,
    dns_udp: Vec<UdpSocket>,
}

impl Listeners {
    /// Each listener is the one stored under its name if the previous process left it (and it
    /// is bound where this configuration wants it), else a new one, stored for the next.
    pub fn bind(s: &Settings, store: &mut FdStore) -> anyhow::Result<Self> {
        let outbound_addrs = net::loopback(s.ports.outbound).to_vec();
        let dns_addrs = net::loopback(s.ports.dns);
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(Self {
            outbound: tcp(store, "outbound", &outbound_addrs).context("outbound listener")?,
            outbound_addrs,
            inbound: if s.inbound.enabled() {
                tcp(store, "inbound", &net::any(s.ports.inbound)).context("inbound listener")?
            } else {
                vec![]
            },
            dns_tcp: tcp(store, "dns-tcp", &dns_addrs).context("DNS TCP listener")?,
            dns_udp: udp(store, &dns_addrs, workers).context("DNS UDP listener")?,
        })
    }

    /// The inbound listeners, IPv4 first, for sk_lookup.
    pub fn inbound_fds(&self) -> Vec<RawFd> {
        self.inbound.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// The data paths on these listeners: (outbound, inbound if any, DNS).
    pub fn start(
        self,
        ctx: &Ctx,
        s: &Settings,
        orig: Arc<OriginalDst>,
        resolv: ResolvConf,
    ) -> anyhow::Result<(Handle, Option<Handle>, Handle)> {
        let resolver = Arc::new(Resolver::new(Upstream::new(
            resolv.nameservers.clone(),
            DNS_UPSTREAM_TIMEOUT,
        )));
        let outbound = Outbound::new(
            ctx.store.clone(),
            ctx.tls.clone(),
            orig,
            Dialer::new(ctx.tls.clone(), s.timeouts)
                .with_resolver(resolver)
                .with_metrics(ctx.metrics.clone(), &s.workload()),
            ctx.outliers.clone(),
            self.outbound_addrs,
            s.network.clone(),
            s.gateway_identity.clone(),
            s.policy.subject.clone(),
            Arc::new(s.local_telemetry()),
            s.protocol_detection,
            ctx.metrics.clone(),
        );
        let limits = ctx.limits.clone();
        let outbound = Handle::loops(
            "outbound",
            self.outbound
                .into_iter()
                .map(move |l| outbound.clone().serve(l, limits.outbound.clone())),
        );
        let inbound = (!self.inbound.is_empty()).then(|| {
            let inbound = Inbound::new(
                ctx.tls.clone(),
                ctx.store.clone(),
                s.policy.clone(),
                s.ports.inbound,
                s.inbound.hbone,
                s.workload(),
                Arc::new(s.local_telemetry()),
                interceptor_ebpf::abi::INBOUND_SOURCE4,
                ctx.limits.handshakes.clone(),
                ctx.metrics.clone(),
            );
            let limit = ctx.limits.inbound.clone();
            Handle::loops(
                "inbound",
                self.inbound
                    .into_iter()
                    .map(move |l| inbound.clone().serve(l, limit.clone())),
            )
        });
        let upstream = Upstream::new(resolv.nameservers.clone(), DNS_UPSTREAM_TIMEOUT);
        let server = dns::Server::new(
            ctx.store.clone(),
            upstream,
            resolv.search.first().cloned(),
            ctx.dns_stats.clone(),
            ctx.limits.dns_forwards.clone(),
        );
        tracing::info!(upstream = ?resolv.nameservers, "DNS forwarding");
        let tcp = self.dns_tcp.into_iter().map({
            let server = server.clone();
            let limit = ctx.limits.dns_tcp.clone();
            move |l| {
                let (server, limit) = (server.clone(), limit.clone());
                Box::pin(async move { server.serve_tcp(l, limit).await })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            }
        });
        let udp = self.dns_udp.into_iter().map(move |u| {
            let server = server.clone();
            Box::pin(async move { server.serve_udp(u).await })
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        });
        let dns = Handle::loops("dns", tcp.chain(udp).collect::<Vec<_>>());
        Ok((outbound, inbound, dns))
    }
}

/// TCP listeners on `addrs`, adopted or bound, as `net::bind_all` (a missing family is a
/// warning).
pub(super) fn tcp(
    store: &mut FdStore,
    what: &str,
    addrs: &[SocketAddr],
) -> std::io::Result<Vec<TcpListener>> {
    net::bind_each(addrs, what, |i, addr| {
        let name = format!("listen.{what}.{i}");
        if let Some(fd) = store.take(&name) {
            match net::adopt_tcp(fd, addr) {
                Ok(l) => return Ok(l),
                Err(e) => {
                    tracing::warn!(name, error = %e, "a stored listener does not fit: binding anew");
                    store.reject(&name);
                }
            }
        }
        let l = net::bind_tcp(addr)?;
        store
            .put(&name, l.as_fd(), true)
            .map_err(std::io::Error::other)?;
        Ok(l)
    })
}

/// `per_addr` DNS UDP sockets on each address (SO_REUSEPORT), adopted or bound.
fn udp(
    store: &mut FdStore,
    addrs: &[SocketAddr],
    per_addr: usize,
) -> std::io::Result<Vec<UdpSocket>> {
    let groups = net::bind_each(addrs, "DNS", |i, addr| {
        let mut group = Vec::new();
        for j in 0..per_addr.max(1) {
            let name = format!("listen.dns-udp.{i}.{j}");
            if let Some(fd) = store.take(&name) {
                match net::adopt_udp(fd, addr) {
                    Ok(u) => {
                        group.push(u);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(name, error = %e, "a stored DNS socket does not fit: binding anew");
                        store.reject(&name);
                    }
                }
            }
            let u = net::bind_udp_one(addr)?;
            store
                .put(&name, u.as_fd(), true)
                .map_err(std::io::Error::other)?;
            group.push(u);
        }
        Ok(group)
    })?;
    Ok(groups.into_iter().flatten().collect())
}
