//! Observed health: endpoints that failed lately. Not in the mesh table (that is what sources
//! say; this is what we saw). One store per process, keyed by endpoint, read by endpoint
//! choice (`order`) and written by the dial path (`transport::try_targets`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{EndpointAddr, Skipped};

/// How long a failed endpoint is tried last, after its first failure; each further failure in
/// a row adds as much again (Envoy's outlier detection: base ejection time times ejections), up
/// to `MAX_EJECTION`, so an endpoint that stays broken is probed less and less often.
pub const EJECTION: Duration = Duration::from_secs(10);
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Bounds on what is remembered, so a churning mesh cannot grow this without end.
const MAX_FAILED: usize = 4096;
const MAX_WARNED: usize = 4096;

/// How long an endpoint that failed `n` times in a row stays ejected.
fn ejection(n: u32) -> Duration {
    EJECTION.saturating_mul(n.max(1)).min(MAX_EJECTION)
}

#[derive(Default)]
pub struct Outliers {
    /// When each endpoint last failed, and how many times in a row.
    failed: Mutex<HashMap<EndpointAddr, (Instant, u32)>>,
    /// (service, network) pairs already reported unreachable: said once, not per connection.
    warned: Mutex<HashSet<(String, String)>>,
}

impl Outliers {
    pub fn failed(&self, endpoint: &EndpointAddr) {
        let mut m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(endpoint.clone()).or_insert((Instant::now(), 0));
        // In a row: failing again soon after its ejection ended (when it is tried again).
        // A failure long after that starts the count over.
        let in_a_row = e.0.elapsed() < ejection(e.1).saturating_mul(2);
        *e = (
            Instant::now(),
            if in_a_row { e.1.saturating_add(1) } else { 1 },
        );
        if m.len() > MAX_FAILED {
            m.retain(|_, (t, n)| t.elapsed() < ejection(*n));
        }
    }

    pub fn succeeded(&self, endpoint: &EndpointAddr) {
        let mut m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if !m.is_empty() {
            m.remove(endpoint);
        }
    }

    pub fn is_ejected(&self, endpoint: &EndpointAddr) -> bool {
        let m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        !m.is_empty()
            && m.get(endpoint)
                .is_some_and(|(t, n)| t.elapsed() < ejection(*n))
    }

    /// Logs, once per (service, network), the endpoints a plan could not reach for a reason
    /// other than health (which sources report and change on their own).
    pub fn warn_unreachable(&self, service: &str, skipped: &[Skipped]) {
        for s in skipped
            .iter()
            .filter(|s| s.reason != super::SkipReason::Unhealthy)
        {
            let first = {
                let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
                w.len() < MAX_WARNED && w.insert((service.to_string(), s.network.clone()))
            };
            if first {
                tracing::warn!(%service, network = %s.network, endpoint = %s.endpoint, reason = %s.reason, "endpoint unreachable from here; skipped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_grows_with_failures_in_a_row_and_a_success_ends_it() {
        assert_eq!(ejection(0), EJECTION);
        assert_eq!(ejection(3), EJECTION * 3);
        assert_eq!(ejection(1000), MAX_EJECTION);
        let o = Outliers::default();
        let e = EndpointAddr {
            address: crate::mesh::Address::Ip([10, 0, 0, 1].into()),
            port: 80,
        };
        o.failed(&e);
        o.failed(&e);
        assert_eq!(o.failed.lock().unwrap()[&e].1, 2);
        assert!(o.is_ejected(&e));
        o.succeeded(&e);
        assert!(!o.is_ejected(&e));
    }
}
