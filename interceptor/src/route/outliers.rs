//! Observed health: endpoints that failed lately. Not in the mesh table (that is what sources
//! say; this is what we saw). One store per process, keyed by endpoint, read by endpoint
//! choice (`order`) and written by the dial path (`transport::try_targets`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{EndpointAddr, Skipped};

/// How long a failed endpoint is tried last.
pub const EJECTION: Duration = Duration::from_secs(10);
/// Bounds on what is remembered, so a churning mesh cannot grow this without end.
const MAX_FAILED: usize = 4096;
const MAX_WARNED: usize = 4096;

#[derive(Default)]
pub struct Outliers {
    failed: Mutex<HashMap<EndpointAddr, Instant>>,
    /// (service, network) pairs already reported unreachable: said once, not per connection.
    warned: Mutex<HashSet<(String, String)>>,
}

impl Outliers {
    pub fn failed(&self, endpoint: &EndpointAddr) {
        let mut m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(endpoint.clone(), Instant::now());
        if m.len() > MAX_FAILED {
            m.retain(|_, t| t.elapsed() < EJECTION);
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
        !m.is_empty() && m.get(endpoint).is_some_and(|t| t.elapsed() < EJECTION)
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
