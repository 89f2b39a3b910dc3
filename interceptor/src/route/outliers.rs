//! Observed health: endpoints that failed lately. Not in the mesh table (that is what sources
//! say; this is what we saw). One store per process, keyed by endpoint, read by endpoint
//! choice (`order`) and written by the dial path (`transport::try_targets`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{EndpointAddr, Skipped};
use crate::mesh::traffic::OutlierDetection;

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

/// A failure record: when, how many in a row, and the cluster's outlier detection (None: ours).
type Failures = (Instant, u32, Option<OutlierDetection>);

/// How long an endpoint stays ejected after `n` failures in a row under `policy` (zero: not
/// ejected). Ours: from the first failure, `EJECTION` times the failures. A DestinationRule's
/// (Envoy's): from `consecutive_errors` failures, its base time times the ejections.
fn ejected_for(n: u32, policy: Option<OutlierDetection>) -> Duration {
    match policy {
        None => ejection(n),
        Some(p) if p.consecutive_errors == 0 || n < p.consecutive_errors => Duration::ZERO,
        Some(p) => Duration::from_millis(p.base_ejection_ms)
            .saturating_mul(n - p.consecutive_errors + 1)
            .min(MAX_EJECTION),
    }
}

#[derive(Default)]
pub struct Outliers {
    /// When each endpoint last failed, how many times in a row, under which policy.
    failed: Mutex<HashMap<EndpointAddr, Failures>>,
    /// (service, network) pairs already reported unreachable: said once, not per connection.
    warned: Mutex<HashSet<(String, String)>>,
}

impl Outliers {
    pub fn failed(&self, endpoint: &EndpointAddr) {
        self.failed_under(endpoint, None)
    }

    /// A failure, judged by the cluster's outlier detection (None: ours).
    pub fn failed_under(&self, endpoint: &EndpointAddr, policy: Option<OutlierDetection>) {
        let mut m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let e = m
            .entry(endpoint.clone())
            .or_insert((Instant::now(), 0, policy));
        // In a row: failing again soon after its ejection ended (when it is tried again), or
        // before it was ejected at all. A failure long after that starts the count over.
        let window = ejected_for(e.1, e.2).max(EJECTION).saturating_mul(2);
        let in_a_row = e.0.elapsed() < window;
        *e = (
            Instant::now(),
            if in_a_row { e.1.saturating_add(1) } else { 1 },
            policy,
        );
        if m.len() > MAX_FAILED {
            m.retain(|_, (t, n, p)| t.elapsed() < ejected_for(*n, *p).max(EJECTION));
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
                .is_some_and(|(t, n, p)| t.elapsed() < ejected_for(*n, *p))
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
