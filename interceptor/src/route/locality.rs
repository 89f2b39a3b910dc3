//! Locality failover for the mesh files' clusters: with outlier detection set (and locality
//! load balancing not turned off), each endpoint's priority is how far its locality is from
//! this VM's, so the nearest healthy ones are used and farther ones only when those fail or
//! are ejected (I: pilot/pkg/networking/core/loadbalancer/loadbalancer.go
//! `applyLocalityFailover`, pilot/pkg/networking/util `LbPriority`). istiod's clusters come
//! with these priorities already in their EDS, computed for the locality our node gives.

use super::traffic::Cluster;
use super::{Plan, Via};
use crate::mesh::traffic::LocalityLb;

pub(super) fn apply(plan: &mut Plan, c: &Cluster<'_>, ours: &str) {
    let from_istiod = c.service.policies.is_some();
    let Some(_) = c.policy.outlier.filter(|_| !from_istiod) else {
        return;
    };
    let setting = c.policy.locality.clone().unwrap_or(LocalityLb {
        enabled: true,
        failover: vec![],
    });
    if !setting.enabled {
        return;
    }
    for w in &mut plan.targets {
        let theirs = match &w.target.via {
            Via::Direct(wl) => priority(ours, &wl.locality, &setting.failover),
            // Behind a gateway: as near as the nearest of them.
            Via::Gateway { behind, .. } => behind
                .iter()
                .map(|b| priority(ours, &b.locality, &setting.failover))
                .min()
                .unwrap_or(3),
            Via::ServiceHost | Via::OriginalDestination => continue,
        };
        // Istio keeps the endpoint's own priority as the major key (times 5).
        w.priority = w.priority.saturating_mul(5).saturating_add(theirs);
    }
}

/// `LbPriority` (0: same region, zone and subzone; 1: zone; 2: region; 3: elsewhere), and 4
/// for another region a `failover` from ours does not lead to.
fn priority(ours: &str, theirs: &str, failover: &[(String, String)]) -> u32 {
    let part = |l: &str, i: usize| l.split('/').nth(i).unwrap_or("").to_string();
    let same = |i: usize| part(ours, i) == part(theirs, i);
    let p = match (same(0), same(1), same(2)) {
        (true, true, true) => 0,
        (true, true, false) => 1,
        (true, false, _) => 2,
        (false, _, _) => 3,
    };
    if p == 3 {
        if let Some((_, to)) = failover.iter().find(|(from, _)| *from == part(ours, 0)) {
            if part(theirs, 0) != *to {
                return 4;
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearer_localities_come_first_and_failover_names_the_next_region() {
        let ours = "us-east/a/1";
        assert_eq!(priority(ours, "us-east/a/1", &[]), 0);
        assert_eq!(priority(ours, "us-east/a/2", &[]), 1);
        assert_eq!(priority(ours, "us-east/b/1", &[]), 2);
        assert_eq!(priority(ours, "eu-west/a/1", &[]), 3);
        assert_eq!(priority(ours, "", &[]), 3);
        assert_eq!(priority("", "", &[]), 0, "Istio: unknown matches unknown");
        let f = [("us-east".to_string(), "us-west".to_string())];
        assert_eq!(priority(ours, "us-west/a/1", &f), 3);
        assert_eq!(priority(ours, "eu-west/a/1", &f), 4);
    }
}
