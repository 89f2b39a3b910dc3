//! Choosing endpoints: healthy ones, weighted, with recently failed ones tried last.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::mesh::{Address, Health, Service, ServicePort, Workload};

/// One place a connection for a service port can go.
#[derive(Clone, Debug)]
pub struct Target {
    pub workload: Arc<Workload>,
    pub address: Address,
    pub port: u16,
}

impl Target {
    pub fn label(&self) -> String {
        match &self.address {
            Address::Ip(ip) => SocketAddr::new(*ip, self.port).to_string(),
            Address::Hostname(h) => format!("{h}:{}", self.port),
        }
    }
}

/// Endpoints that failed a connect lately. Kept by the proxy, not in the mesh table: the table
/// is what sources say, this is what we observed.
#[derive(Default)]
pub struct Outliers {
    failed: Mutex<HashMap<String, Instant>>,
}

const EJECTION: Duration = Duration::from_secs(10);

impl Outliers {
    pub fn failed(&self, target: &Target) {
        let mut m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(target.label(), Instant::now());
        if m.len() > 4096 {
            m.retain(|_, t| t.elapsed() < EJECTION);
        }
    }

    pub fn succeeded(&self, target: &Target) {
        let mut m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if !m.is_empty() {
            m.remove(&target.label());
        }
    }

    fn is_ejected(&self, target: &Target) -> bool {
        let m = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        !m.is_empty()
            && m.get(&target.label())
                .is_some_and(|t| t.elapsed() < EJECTION)
    }
}

/// The endpoints of `svc` for `port` in the order to try them: a weighted random order of the
/// healthy ones, recently failed ones moved to the back.
pub fn order(svc: &Service, port: &ServicePort, outliers: &Outliers) -> Vec<Target> {
    let mut rng = rand::rng();
    let mut keyed: Vec<(f64, Target)> = svc
        .endpoints
        .iter()
        .filter(|w| w.health == Health::Healthy)
        .map(|w| {
            let target = Target {
                workload: w.clone(),
                address: w.address.clone(),
                port: w.target_port(port),
            };
            // Efraimidis-Spirakis: sorting by u^(1/w) is weighted sampling without replacement.
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            (u.powf(1.0 / f64::from(w.weight.max(1))), target)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut good, ejected): (Vec<Target>, Vec<Target>) = keyed
        .into_iter()
        .map(|(_, t)| t)
        .partition(|t| !outliers.is_ejected(t));
    good.extend(ejected);
    good
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Host, Location, Resolution};
    use std::collections::BTreeMap;

    fn svc(weights: &[u32]) -> (Service, ServicePort) {
        let port = ServicePort {
            number: 80,
            name: "http".into(),
            protocol: "HTTP".into(),
            target_port: None,
        };
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Workload {
                    name: format!("w{i}"),
                    namespace: "default".into(),
                    address: Address::Ip(format!("10.0.0.{}", i + 1).parse().unwrap()),
                    labels: BTreeMap::new(),
                    ports: [("http".to_string(), 8000 + i as u16)].into(),
                    network: String::new(),
                    locality: String::new(),
                    weight: *w,
                    service_account: "sa".into(),
                    health: if *w == 0 {
                        Health::Unhealthy
                    } else {
                        Health::Healthy
                    },
                })
            })
            .collect();
        let s = Service {
            host: Host::new("a"),
            origin: "default/a".into(),
            namespace: "default".into(),
            vips: vec![],
            auto_allocated: false,
            ports: vec![port.clone()],
            resolution: Resolution::Static,
            location: Location::MeshInternal,
            subject_alt_names: vec![],
            endpoints,
        };
        (s, port)
    }

    #[test]
    fn weights_skew_the_first_choice() {
        let (s, p) = svc(&[1, 3]);
        let o = Outliers::default();
        let firsts = (0..4000)
            .filter(|_| order(&s, &p, &o)[0].workload.name == "w1")
            .count();
        assert!((2700..3300).contains(&firsts), "{firsts}");
        assert_eq!(order(&s, &p, &o)[0].port / 1000, 8);
    }

    #[test]
    fn unhealthy_skipped_failed_last() {
        let (s, p) = svc(&[1, 0, 1]);
        let o = Outliers::default();
        let all = order(&s, &p, &o);
        assert_eq!(all.len(), 2);
        let w0 = all
            .iter()
            .find(|t| t.workload.name == "w0")
            .unwrap()
            .clone();
        o.failed(&w0);
        for _ in 0..50 {
            assert_eq!(order(&s, &p, &o)[0].workload.name, "w2");
        }
        o.succeeded(&w0);
        assert!((0..200).any(|_| order(&s, &p, &o)[0].workload.name == "w0"));
    }
}
