//! Resource caps. Each is a count of work in progress (connections of one direction, DNS TCP
//! connections, handshakes not finished yet) with a maximum: at the maximum new work is
//! refused at once (a reset, so a client fails fast instead of waiting on an accepted socket
//! nobody serves) and counted by cap; work in progress goes on. Configured by `config::Limits`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One cap.
#[derive(Debug)]
pub struct Limit {
    /// The metric label: `outbound_connections`, `inbound_connections`, ...
    pub name: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    refused: AtomicU64,
    /// Set while refusing: one warning when the cap is reached, one line when it is left.
    saturated: AtomicBool,
}

/// A unit of work counted against its cap until dropped.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Limit {
    pub fn new(name: &'static str, max: usize) -> Arc<Self> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            name,
            max,
            slots: Arc::new(Semaphore::new(max)),
            refused: AtomicU64::new(0),
            saturated: AtomicBool::new(false),
        })
    }

    /// A permit, or None (counted) at the cap.
    pub fn try_take(&self) -> Option<Permit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(p) => {
                if self.saturated.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        limit = self.name,
                        max = self.max,
                        refused = self.refused(),
                        "below the cap again"
                    );
                }
                Some(Permit(p))
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if !self.saturated.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        limit = self.name,
                        max = self.max,
                        "at the cap: new work is refused until some finishes"
                    );
                }
                None
            }
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Every cap the daemon enforces.
#[derive(Debug)]
pub struct Limits {
    pub outbound: Arc<Limit>,
    pub inbound: Arc<Limit>,
    pub dns_tcp: Arc<Limit>,
    pub dns_forwards: Arc<Limit>,
    pub handshakes: Arc<Limit>,
    /// Every listener of `interceptor gateway` together.
    pub gateway: Arc<Limit>,
    /// The admin endpoint: scrapes, probes and the CLI need a few; a local client opening
    /// thousands must not take the daemon's descriptors.
    pub admin: Arc<Limit>,
}

/// Admin connections at once.
pub const ADMIN_CONNECTIONS: usize = 128;

impl Limits {
    pub fn new(c: &crate::config::Limits) -> Arc<Self> {
        Arc::new(Self {
            outbound: Limit::new("outbound_connections", c.outbound_connections),
            inbound: Limit::new("inbound_connections", c.inbound_connections),
            dns_tcp: Limit::new("dns_tcp_connections", c.dns_tcp_connections),
            dns_forwards: Limit::new("dns_forwards", c.dns_forwards),
            handshakes: Limit::new("pending_handshakes", c.pending_handshakes),
            gateway: Limit::new("gateway_connections", c.gateway_connections),
            admin: Limit::new("admin_connections", ADMIN_CONNECTIONS),
        })
    }

    pub fn all(&self) -> [&Arc<Limit>; 7] {
        [
            &self.outbound,
            &self.inbound,
            &self.dns_tcp,
            &self.dns_forwards,
            &self.handshakes,
            &self.gateway,
            &self.admin,
        ]
    }
}

/// Closes `stream` with a reset: the peer sees ECONNRESET now, not an EOF it could take for an
/// empty answer.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_new_work_is_refused_and_counted_and_a_finished_one_frees_a_slot() {
        let l = Limit::new("t", 2);
        let a = l.try_take().unwrap();
        let _b = l.try_take().unwrap();
        assert_eq!(l.in_use(), 2);
        assert!(l.try_take().is_none());
        assert!(l.try_take().is_none());
        assert_eq!(l.refused(), 2);
        drop(a);
        assert!(l.try_take().is_some());
        assert_eq!(l.refused(), 2);
    }
}
