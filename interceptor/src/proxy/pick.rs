//! Choosing endpoints: healthy ones, weighted, with recently failed ones tried last. Network
//! aware (SPEC section 5, I: pilot/pkg/networking/core/loadbalancer EndpointsByNetworkFilter):
//! endpoints of our network are reached directly, those of another network through its
//! east-west gateway, weighted by how many endpoints stand behind it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::TcpStream;

use crate::mesh::{Address, Health, Networks, Service, ServicePort, Workload};

/// How a target reaches the service.
#[derive(Clone, Debug)]
pub enum Via {
    /// The endpoint itself.
    Direct(Arc<Workload>),
    /// The east-west gateway of `network`, which routes by SNI to one of `behind`.
    Gateway {
        network: String,
        behind: Vec<Arc<Workload>>,
    },
}

/// One place a connection for a service port can go.
#[derive(Clone, Debug)]
pub struct Target {
    pub via: Via,
    pub address: Address,
    pub port: u16,
}

impl Target {
    pub fn direct(workload: Arc<Workload>, port: &ServicePort) -> Self {
        Self {
            address: workload.address.clone(),
            port: workload.target_port(port),
            via: Via::Direct(workload),
        }
    }

    pub fn label(&self) -> String {
        match &self.address {
            Address::Ip(ip) => SocketAddr::new(*ip, self.port).to_string(),
            Address::Hostname(h) => format!("{h}:{}", self.port),
        }
    }

    /// The workloads that may answer at the far end of this target (whose identities TLS must
    /// accept).
    pub fn workloads(&self) -> &[Arc<Workload>] {
        match &self.via {
            Via::Direct(w) => std::slice::from_ref(w),
            Via::Gateway { behind, .. } => behind,
        }
    }

    /// mTLS per Istio's auto-mTLS label; through a gateway always (it routes by SNI).
    pub fn speaks_istio_mtls(&self) -> bool {
        match &self.via {
            Via::Direct(w) => w.speaks_istio_mtls(),
            Via::Gateway { .. } => true,
        }
    }

    pub fn gateway_network(&self) -> Option<&str> {
        match &self.via {
            Via::Direct(_) => None,
            Via::Gateway { network, .. } => Some(network),
        }
    }

    /// A TCP connection to the target, bounded by `timeout`.
    pub async fn connect(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        let fut = async {
            let stream = match &self.address {
                Address::Ip(ip) => TcpStream::connect(SocketAddr::new(*ip, self.port)).await?,
                Address::Hostname(h) => TcpStream::connect((h.as_str(), self.port)).await?,
            };
            stream.set_nodelay(true)?;
            Ok(stream)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })
    }
}

/// Where the chooser stands, which decides what it can reach.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// A sidecar in `network` ("" = the default network): endpoints there directly, others
    /// through their network's gateway. Without any gateway in `networks` the mesh is flat and
    /// every endpoint is reached directly (Istio: multi-network is off).
    Sidecar {
        network: &'a str,
        networks: &'a Networks,
    },
    /// An east-west gateway of `network`: only that network's endpoints that speak mTLS (the
    /// bytes it relays are the client's TLS).
    Gateway { network: &'a str },
}

fn is_local(w: &Workload, network: &str) -> bool {
    w.network.is_empty() || w.network == network
}

/// Endpoints that failed a connect lately. Kept by the proxy, not in the mesh table: the table
/// is what sources say, this is what we observed.
#[derive(Default)]
pub struct Outliers {
    failed: Mutex<HashMap<String, Instant>>,
    /// (service, network) pairs already reported unreachable: said once, not per connection.
    warned: Mutex<HashSet<(String, String)>>,
}

const EJECTION: Duration = Duration::from_secs(10);

impl Outliers {
    /// True the first time `network` is reported for `service`.
    fn first_warning(&self, service: &str, network: &str) -> bool {
        let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        w.len() < 4096 && w.insert((service.to_string(), network.to_string()))
    }

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

/// An endpoint that cannot be reached from where the chooser stands, and why.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub endpoint: String,
    pub network: String,
    pub reason: String,
}

/// Every reachable target for `port` of `svc` with its weight, and the endpoints left out. The
/// one decision both the data path (`order`) and `interceptor explain` read.
pub fn candidates(
    svc: &Service,
    port: &ServicePort,
    scope: Scope<'_>,
) -> (Vec<(f64, Target)>, Vec<Skipped>) {
    let mut weighted: Vec<(f64, Target)> = Vec::new();
    let mut skipped = Vec::new();
    let mut remote: BTreeMap<&str, Vec<Arc<Workload>>> = BTreeMap::new();
    let skip = |w: &Workload, reason: &str| Skipped {
        endpoint: w.name.clone(),
        network: w.network.clone(),
        reason: reason.to_string(),
    };
    for w in svc.endpoints.iter() {
        if w.health != Health::Healthy {
            skipped.push(skip(w, "unhealthy"));
            continue;
        }
        let direct = (f64::from(w.weight.max(1)), Target::direct(w.clone(), port));
        match scope {
            Scope::Gateway { network } if is_local(w, network) && w.speaks_istio_mtls() => {
                weighted.push(direct)
            }
            Scope::Gateway { .. } if !w.speaks_istio_mtls() => {
                skipped.push(skip(w, "no mTLS: the gateway relays TLS only"))
            }
            Scope::Gateway { .. } => skipped.push(skip(w, "not in the gateway's network")),
            Scope::Sidecar { network, networks } => {
                if is_local(w, network) || !networks.has_gateways() {
                    weighted.push(direct);
                } else if w.speaks_istio_mtls() {
                    remote
                        .entry(w.network.as_str())
                        .or_default()
                        .push(w.clone());
                } else {
                    // The gateway routes by the SNI of our mTLS: plaintext cannot cross.
                    skipped.push(skip(w, "another network and no mTLS"));
                }
            }
        }
    }
    if let Scope::Sidecar { networks, .. } = scope {
        for (network, behind) in remote {
            let gateways = networks.gateways(network);
            if gateways.is_empty() {
                skipped.extend(
                    behind
                        .iter()
                        .map(|w| skip(w, "another network without a gateway")),
                );
                continue;
            }
            // Istio: a gateway weighs as the endpoints behind it, shared among the network's
            // gateways.
            let weight = behind.len() as f64 / gateways.len() as f64;
            for gw in gateways {
                let target = Target {
                    via: Via::Gateway {
                        network: network.to_string(),
                        behind: behind.clone(),
                    },
                    address: gw.address.clone(),
                    port: gw.port,
                };
                weighted.push((weight, target));
            }
        }
    }
    (weighted, skipped)
}

/// The targets for `port` of `svc` in the order to try them: a weighted random order of the
/// reachable ones, recently failed ones moved to the back.
pub fn order(
    svc: &Service,
    port: &ServicePort,
    scope: Scope<'_>,
    outliers: &Outliers,
) -> Vec<Target> {
    let (weighted, skipped) = candidates(svc, port, scope);
    let sidecar = matches!(scope, Scope::Sidecar { .. });
    for s in skipped
        .iter()
        .filter(|s| sidecar && s.reason != "unhealthy")
    {
        if outliers.first_warning(svc.host.as_str(), &s.network) {
            tracing::warn!(service = %svc.host, network = %s.network, endpoint = %s.endpoint, reason = %s.reason, "endpoint unreachable from here; skipped");
        }
    }
    let mut rng = rand::rng();
    let mut keyed: Vec<(f64, Target)> = weighted
        .into_iter()
        .map(|(weight, target)| {
            // Efraimidis-Spirakis: sorting by u^(1/w) is weighted sampling without replacement.
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            (u.powf(1.0 / weight), target)
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
    use crate::mesh::{Host, Location, Resolution, TLS_MODE_LABEL};

    /// Endpoints (weight, network, mTLS); weight 0 = unhealthy.
    fn svc(endpoints: &[(u32, &str, bool)]) -> (Service, ServicePort) {
        let port = ServicePort {
            number: 80,
            name: "http".into(),
            protocol: "HTTP".into(),
            target_port: None,
        };
        let endpoints = endpoints
            .iter()
            .enumerate()
            .map(|(i, (w, network, mtls))| {
                Arc::new(Workload {
                    name: format!("w{i}"),
                    namespace: "default".into(),
                    address: Address::Ip(format!("10.0.0.{}", i + 1).parse().unwrap()),
                    labels: if *mtls {
                        [(TLS_MODE_LABEL.to_string(), "istio".to_string())].into()
                    } else {
                        Default::default()
                    },
                    ports: [("http".to_string(), 8000 + i as u16)].into(),
                    network: network.to_string(),
                    locality: String::new(),
                    weight: *w,
                    service_account: format!("sa{i}"),
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

    fn flat() -> Networks {
        Networks::default()
    }

    fn sidecar<'a>(network: &'a str, networks: &'a Networks) -> Scope<'a> {
        Scope::Sidecar { network, networks }
    }

    fn name(t: &Target) -> &str {
        &t.workloads()[0].name
    }

    #[test]
    fn weights_skew_the_first_choice() {
        let (s, p) = svc(&[(1, "", false), (3, "", false)]);
        let (o, n) = (Outliers::default(), flat());
        let firsts = (0..4000)
            .filter(|_| name(&order(&s, &p, sidecar("", &n), &o)[0]) == "w1")
            .count();
        assert!((2700..3300).contains(&firsts), "{firsts}");
        assert_eq!(order(&s, &p, sidecar("", &n), &o)[0].port / 1000, 8);
    }

    #[test]
    fn unhealthy_skipped_failed_last() {
        let (s, p) = svc(&[(1, "", false), (0, "", false), (1, "", false)]);
        let (o, n) = (Outliers::default(), flat());
        let all = order(&s, &p, sidecar("", &n), &o);
        assert_eq!(all.len(), 2);
        let w0 = all.iter().find(|t| name(t) == "w0").unwrap().clone();
        o.failed(&w0);
        for _ in 0..50 {
            assert_eq!(name(&order(&s, &p, sidecar("", &n), &o)[0]), "w2");
        }
        o.succeeded(&w0);
        assert!((0..200).any(|_| name(&order(&s, &p, sidecar("", &n), &o)[0]) == "w0"));
    }

    fn two_networks() -> Networks {
        Networks::from_yaml(
            "networks:\n  a: {}\n  b:\n    gateways: [{address: 192.0.2.10, port: 15443}]\n  c: {}\n",
        )
        .unwrap()
    }

    #[test]
    fn remote_endpoints_go_through_their_gateway_weighted_by_count() {
        // One local endpoint; three mTLS endpoints in b; one plaintext in b; one in c (no gateway).
        let (s, p) = svc(&[
            (1, "a", true),
            (1, "b", true),
            (1, "b", true),
            (1, "b", true),
            (1, "b", false),
            (1, "c", true),
        ]);
        let (o, n) = (Outliers::default(), two_networks());
        let targets = order(&s, &p, sidecar("a", &n), &o);
        assert_eq!(targets.len(), 2, "{targets:?}");
        let gw = targets
            .iter()
            .find(|t| t.gateway_network().is_some())
            .unwrap();
        assert_eq!(gw.label(), "192.0.2.10:15443");
        assert_eq!(gw.gateway_network(), Some("b"));
        assert_eq!(gw.workloads().len(), 3);
        assert!(gw.speaks_istio_mtls());
        // The gateway weighs 3, the local endpoint 1.
        let via_gw = (0..4000)
            .filter(|_| {
                order(&s, &p, sidecar("a", &n), &o)[0]
                    .gateway_network()
                    .is_some()
            })
            .count();
        assert!((2700..3300).contains(&via_gw), "{via_gw}");
    }

    #[test]
    fn without_gateways_the_mesh_is_flat_and_a_gateway_sees_only_its_network() {
        let (s, p) = svc(&[(1, "a", true), (1, "b", true), (1, "b", false)]);
        let o = Outliers::default();
        let n = flat();
        let all = order(&s, &p, sidecar("a", &n), &o);
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|t| t.gateway_network().is_none()));
        let gw = order(&s, &p, Scope::Gateway { network: "b" }, &o);
        assert_eq!(gw.len(), 1);
        assert_eq!(name(&gw[0]), "w1");
    }
}
