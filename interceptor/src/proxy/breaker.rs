//! Envoy's circuit breakers for the HTTP path, per cluster, as a DestinationRule's
//! `connectionPool` sets them (istiod's `applyConnectionPool` → the cluster's first threshold
//! and its HTTP protocol options): connections open to the cluster (`maxConnections`), requests
//! waiting for a connection (`http1MaxPendingRequests`), requests in flight
//! (`http2MaxRequests`), retries in flight (`maxRetries`). Kept only for clusters that set one.
//!
//! As Envoy's connection pool (source/common/conn_pool/conn_pool_base.cc
//! `tryCreateNewConnection`): a request that finds no idle connection and no room for another
//! waits as pending, unless its endpoint has no connection at all, which always gets one (else
//! it could wait behind other endpoints' connections forever).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Which limit a request ran into (the metric's reason and Envoy's counter it mirrors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `upstream_rq_pending_overflow`.
    Pending,
    /// `upstream_rq_overflow`.
    Requests,
}

impl Overflow {
    pub fn label(self) -> &'static str {
        match self {
            Overflow::Pending => "pending_overflow",
            Overflow::Requests => "request_overflow",
        }
    }
}

#[derive(Default)]
struct Counts {
    connections: u32,
    by_endpoint: HashMap<String, u32>,
    requests: u32,
    pending: u32,
    retries: u32,
}

/// One cluster's counts.
#[derive(Default)]
pub struct Breaker {
    counts: Mutex<Counts>,
    /// Woken when a connection closes or goes back to the pool.
    freed: Notify,
}

/// What a slot counts, released when it is dropped.
enum Held {
    Connection(String),
    Request,
    Pending,
    Retry,
}

/// A connection, request, pending request or retry counted until dropped.
pub struct Slot {
    breaker: Arc<Breaker>,
    held: Held,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.breaker.lock();
        match &self.held {
            Held::Connection(endpoint) => {
                c.connections = c.connections.saturating_sub(1);
                if let Some(n) = c.by_endpoint.get_mut(endpoint) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        c.by_endpoint.remove(endpoint);
                    }
                }
            }
            Held::Request => c.requests = c.requests.saturating_sub(1),
            Held::Pending => c.pending = c.pending.saturating_sub(1),
            Held::Retry => c.retries = c.retries.saturating_sub(1),
        }
        drop(c);
        if matches!(self.held, Held::Connection(_)) {
            self.breaker.freed.notify_waiters();
        }
    }
}

fn under(n: u32, max: Option<u32>) -> bool {
    max.is_none_or(|m| n < m)
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(self: &Arc<Self>, held: Held) -> Slot {
        Slot {
            breaker: self.clone(),
            held,
        }
    }

    /// A request in flight, unless `max` are already.
    pub fn request(self: &Arc<Self>, max: Option<u32>) -> Result<Slot, Overflow> {
        let mut c = self.lock();
        if !under(c.requests, max) {
            return Err(Overflow::Requests);
        }
        c.requests += 1;
        Ok(self.slot(Held::Request))
    }

    /// A retry in flight, unless `max` are already (the request is then not retried).
    pub fn retry(self: &Arc<Self>, max: Option<u32>) -> Option<Slot> {
        let mut c = self.lock();
        if !under(c.retries, max) {
            return None;
        }
        c.retries += 1;
        Some(self.slot(Held::Retry))
    }

    /// A new connection to `endpoint`, where the cluster has room for one or the endpoint has
    /// none.
    pub fn connection(self: &Arc<Self>, endpoint: &str, max: Option<u32>) -> Option<Slot> {
        let mut c = self.lock();
        if !under(c.connections, max) && c.by_endpoint.contains_key(endpoint) {
            return None;
        }
        c.connections += 1;
        *c.by_endpoint.entry(endpoint.to_string()).or_default() += 1;
        Some(self.slot(Held::Connection(endpoint.to_string())))
    }

    /// A request waiting for a connection, unless `max` are already.
    pub fn pending(self: &Arc<Self>, max: Option<u32>) -> Result<Slot, Overflow> {
        let mut c = self.lock();
        if !under(c.pending, max) {
            return Err(Overflow::Pending);
        }
        c.pending += 1;
        Ok(self.slot(Held::Pending))
    }

    #[cfg(test)]
    fn pending_now(&self) -> u32 {
        self.lock().pending
    }

    /// Resolves when a connection closes or is put back for another request. Create it before
    /// looking, so a release between the look and the wait is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Wakes the requests waiting for a connection (one went back to the pool).
    pub fn release(&self) {
        self.freed.notify_waiters();
    }
}

/// Every cluster's breaker, created when a cluster with limits is first used.
#[derive(Default)]
pub struct Breakers {
    clusters: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    pub fn get(&self, cluster: &str) -> Arc<Breaker> {
        let mut m = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = m.get(cluster) {
            return b.clone();
        }
        let b = Arc::new(Breaker::default());
        m.insert(cluster.to_string(), b.clone());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_until_slots_are_dropped() {
        let b = Arc::new(Breaker::default());
        let r1 = b.request(Some(1)).unwrap();
        assert_eq!(b.request(Some(1)).err(), Some(Overflow::Requests));
        drop(r1);
        assert!(b.request(Some(1)).is_ok());
        let p = b.pending(Some(1)).unwrap();
        assert_eq!(b.pending_now(), 1);
        assert_eq!(b.pending(Some(1)).err(), Some(Overflow::Pending));
        drop(p);
        assert_eq!(b.pending_now(), 0);
        let t = b.retry(Some(1)).unwrap();
        assert!(b.retry(Some(1)).is_none());
        drop(t);
        assert!(b.retry(None).is_some());
    }

    #[test]
    fn an_endpoint_without_a_connection_always_gets_one() {
        let b = Arc::new(Breaker::default());
        let a = b.connection("a", Some(1)).unwrap();
        // The cluster is full, and "a" has its connection: wait.
        assert!(b.connection("a", Some(1)).is_none());
        // "b" has none: it gets one anyway (Envoy's conn pool does the same).
        let bb = b.connection("b", Some(1)).unwrap();
        drop(a);
        // Still two open ("b" has one) → "b" must wait; "a" has none again.
        assert!(b.connection("b", Some(1)).is_none());
        assert!(b.connection("a", Some(1)).is_some());
        drop(bb);
    }
}
