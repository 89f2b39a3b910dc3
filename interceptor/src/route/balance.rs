//! Load balancing as a cluster's policy says (a DestinationRule's `loadBalancer`, istiod's
//! `lb_policy`): the first target of a plan's best group (healthy, lowest priority) is chosen
//! by least request (Istio's default: of two drawn by weight, the one with fewer open
//! connections), round robin (weighted), random (weighted) or a hash of the client's address
//! (rendezvous, weighted: the same client keeps its endpoint while the set stands). The rest
//! follow in weighted random order, ejected ones last, as `order` does.
//!
//! `Load` counts what is open per endpoint and per cluster: least request reads it, a
//! cluster's `maxConnections` is checked against it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::{EndpointAddr, Outliers, Plan, Target};
use crate::mesh::traffic::LoadBalancer;

/// Bounds on the round-robin cursors kept (one per cluster).
const MAX_CURSORS: usize = 65_536;

#[derive(Default, Debug)]
pub struct Load {
    endpoints: Mutex<HashMap<EndpointAddr, u32>>,
    clusters: Mutex<HashMap<String, u32>>,
    cursors: Mutex<HashMap<String, u64>>,
}

/// One connection counted open until dropped.
#[derive(Debug)]
pub struct Opened {
    load: Arc<Load>,
    /// Counted per cluster too (only where a limit reads it).
    cluster: Option<String>,
    endpoint: EndpointAddr,
}

impl Drop for Opened {
    fn drop(&mut self) {
        fn release<K: Hash + Eq>(m: &Mutex<HashMap<K, u32>>, k: &K) {
            let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        release(&self.load.endpoints, &self.endpoint);
        if let Some(c) = &self.cluster {
            release(&self.load.clusters, c);
        }
    }
}

impl Load {
    /// Counts a connection to `endpoint` as open, and to `cluster` when given.
    pub fn open(self: &Arc<Self>, cluster: Option<&str>, endpoint: &EndpointAddr) -> Opened {
        *self
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint.clone())
            .or_default() += 1;
        if let Some(c) = cluster {
            *self
                .clusters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(c.to_string())
                .or_default() += 1;
        }
        Opened {
            load: self.clone(),
            cluster: cluster.map(str::to_string),
            endpoint: endpoint.clone(),
        }
    }

    /// Connections open to `cluster` now.
    pub fn cluster(&self, cluster: &str) -> u32 {
        let m = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        m.get(cluster).copied().unwrap_or(0)
    }

    fn endpoint(&self, endpoint: &EndpointAddr) -> u32 {
        let m = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        m.get(endpoint).copied().unwrap_or(0)
    }

    fn next(&self, cluster: &str) -> u64 {
        let mut m = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_CURSORS && !m.contains_key(cluster) {
            m.clear();
        }
        let c = m.entry(cluster.to_string()).or_default();
        *c = c.wrapping_add(1);
        *c - 1
    }
}

/// Who is asking, for the policies that depend on it.
#[derive(Clone, Copy, Debug)]
pub struct Balance<'a> {
    pub policy: LoadBalancer,
    pub load: &'a Load,
    /// The cluster's name: round robin's cursor.
    pub cluster: &'a str,
    /// The application's address: the source-IP hash's key.
    pub source: IpAddr,
    /// The cluster's outlier detection's cap on ejected endpoints, in percent (None: ours,
    /// no cap).
    pub max_ejection_percent: Option<u32>,
}

/// A deterministic number in (0, 1) for (source, endpoint).
fn unit_hash(source: IpAddr, endpoint: &EndpointAddr) -> f64 {
    // Fixed keys: the same client maps to the same endpoint across restarts too.
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    source.hash(&mut h);
    endpoint.hash(&mut h);
    ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Envoy's max_ejection_percent: an ejection counts only while (ejected + 1) / endpoints stays
/// within the cap; past it the endpoint is used as if healthy (the ones earlier in the plan keep
/// theirs).
fn cap_ejections<T>(keyed: &mut [(bool, u32, f64, f64, T)], max_percent: Option<u32>) {
    let Some(max) = max_percent else {
        return;
    };
    let allowed = keyed.len() * max as usize / 100;
    let mut kept = 0;
    for k in keyed.iter_mut().filter(|k| k.0) {
        if kept < allowed {
            kept += 1;
        } else {
            k.0 = false;
        }
    }
}

/// The targets of `plan` in the order to try them under `balance`.
pub fn order(plan: Plan, outliers: &Outliers, balance: Balance<'_>) -> Vec<Target> {
    let mut rng = rand::rng();
    // (ejected, priority, key, weight, target): weighted random keys (Efraimidis-Spirakis).
    let mut keyed: Vec<(bool, u32, f64, f64, Target)> = plan
        .targets
        .into_iter()
        .map(|w| {
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            let ejected = outliers.is_ejected(&w.target.endpoint);
            (
                ejected,
                w.priority,
                u.powf(1.0 / w.weight),
                w.weight,
                w.target,
            )
        })
        .collect();
    cap_ejections(&mut keyed, balance.max_ejection_percent);
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.total_cmp(&a.2)));
    let best = keyed
        .iter()
        .take_while(|k| keyed.first().is_some_and(|f| (f.0, f.1) == (k.0, k.1)))
        .count();
    let group = &mut keyed[..best];
    match balance.policy {
        LoadBalancer::Random => {}
        LoadBalancer::LeastRequest => {
            // Power of two choices over the two drawn first by weight.
            if group.len() >= 2
                && balance.load.endpoint(&group[1].4.endpoint)
                    < balance.load.endpoint(&group[0].4.endpoint)
            {
                group.swap(0, 1);
            }
        }
        LoadBalancer::SourceIpHash => {
            for k in group.iter_mut() {
                k.2 = unit_hash(balance.source, &k.4.endpoint).powf(1.0 / k.3);
            }
            group.sort_by(|a, b| b.2.total_cmp(&a.2));
        }
        LoadBalancer::RoundRobin => {
            // Weighted: each target holds as many slots as its weight (at least one), in a
            // stable order; the cluster's cursor walks the slots.
            group.sort_by_cached_key(|k| k.4.endpoint.to_string());
            let slots: Vec<u64> = group.iter().map(|k| k.3.round().max(1.0) as u64).collect();
            let total: u64 = slots.iter().sum();
            if total > 0 {
                let mut at = balance.load.next(balance.cluster) % total;
                let mut first = 0;
                for (i, s) in slots.iter().enumerate() {
                    if at < *s {
                        first = i;
                        break;
                    }
                    at -= s;
                }
                group.rotate_left(first);
            }
        }
    }
    keyed.into_iter().map(|k| k.4).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::tests::svc;
    use crate::route::{plan, Scope};

    fn targets(lb: LoadBalancer, load: &Load, source: &str) -> Vec<String> {
        let (s, p) = svc(&[(1, "", false), (1, "", false), (1, "", false)]);
        let networks = Default::default();
        let scope = Scope::Sidecar {
            network: "",
            networks: &networks,
            trust_domain: "td",
            original: None,
            gateway_identity: None,
            locality: "",
        };
        order(
            plan(&s, &p, scope),
            &Outliers::default(),
            Balance {
                policy: lb,
                load,
                cluster: "c",
                source: source.parse().unwrap(),
                max_ejection_percent: None,
            },
        )
        .into_iter()
        .map(|t| t.endpoint.to_string())
        .collect()
    }

    #[test]
    fn round_robin_walks_the_endpoints_in_turn() {
        let load = Load::default();
        let firsts: Vec<String> = (0..6)
            .map(|_| targets(LoadBalancer::RoundRobin, &load, "10.0.0.9")[0].clone())
            .collect();
        assert_eq!(firsts[0..3], firsts[3..6]);
        assert_ne!(firsts[0], firsts[1]);
        assert_ne!(firsts[1], firsts[2]);
        assert_ne!(firsts[0], firsts[2]);
    }

    #[test]
    fn a_source_keeps_its_endpoint_and_sources_spread() {
        let load = Load::default();
        let one = targets(LoadBalancer::SourceIpHash, &load, "10.0.0.9")[0].clone();
        for _ in 0..20 {
            assert_eq!(
                targets(LoadBalancer::SourceIpHash, &load, "10.0.0.9")[0],
                one
            );
        }
        let spread: std::collections::HashSet<String> = (1..60)
            .map(|i| targets(LoadBalancer::SourceIpHash, &load, &format!("10.1.0.{i}"))[0].clone())
            .collect();
        assert_eq!(spread.len(), 3);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let load = Arc::new(Load::default());
        let all = targets(LoadBalancer::LeastRequest, &load, "10.0.0.9");
        // Two of three endpoints busy: of any two drawn, the idle one (if drawn) wins.
        let busy: Vec<EndpointAddr> = all[..2]
            .iter()
            .map(|e| {
                let sa: std::net::SocketAddr = e.parse().unwrap();
                EndpointAddr {
                    address: crate::mesh::Address::Ip(sa.ip()),
                    port: sa.port(),
                }
            })
            .collect();
        let _held: Vec<Opened> = busy.iter().map(|e| load.open(Some("c"), e)).collect();
        assert_eq!(load.cluster("c"), 2);
        let idle_first = (0..300)
            .filter(|_| targets(LoadBalancer::LeastRequest, &load, "10.0.0.9")[0] == all[2])
            .count();
        // Drawn among the first two 2/3 of the time: then it always wins.
        assert!(idle_first > 170, "{idle_first}");
        drop(_held);
        assert_eq!(load.cluster("c"), 0);
    }

    #[test]
    fn ejections_stay_within_the_clusters_cap() {
        let mut keyed: Vec<(bool, u32, f64, f64, ())> =
            (0..3).map(|_| (true, 0, 1.0, 1.0, ())).collect();
        // Envoy's default 10 % of three endpoints: not even one.
        cap_ejections(&mut keyed, Some(10));
        assert!(keyed.iter().all(|k| !k.0));
        let mut keyed: Vec<(bool, u32, f64, f64, ())> =
            (0..3).map(|_| (true, 0, 1.0, 1.0, ())).collect();
        cap_ejections(&mut keyed, Some(50));
        assert_eq!(keyed.iter().filter(|k| k.0).count(), 1);
        let mut keyed: Vec<(bool, u32, f64, f64, ())> =
            (0..3).map(|_| (true, 0, 1.0, 1.0, ())).collect();
        cap_ejections(&mut keyed, Some(100));
        assert_eq!(keyed.iter().filter(|k| k.0).count(), 3);
        cap_ejections(&mut keyed, None);
        assert_eq!(keyed.iter().filter(|k| k.0).count(), 3, "ours: no cap");
    }
}
