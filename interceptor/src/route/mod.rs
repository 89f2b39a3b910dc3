//! Routing policy, as pure functions of the mesh table: which endpoints a connection for a
//! service port may go to, how (the transport: plaintext or Istio mTLS with its SNI and the
//! identities the server must present), and who may connect inbound. The data paths and
//! `interceptor explain` call the same functions, so what explain says is what the data path does.
//!
//! Network aware as istiod's split horizon (SPEC section 5, I: pilot/pkg/xds/endpoints/
//! ep_filters.go EndpointsByNetworkFilter): endpoints of our network are reached directly, as
//! are those of a network without a gateway; mTLS endpoints of a network with gateways through
//! its gateways, weighted by how many endpoints stand behind them; plaintext ones there are
//! unreachable. A source that applied the rule itself (istiod) gives endpoints as they are
//! reached, and they are taken as given.

mod allow;
pub mod balance;
pub mod cors;
pub mod http;
mod locality;
mod outliers;
pub mod policy;
pub mod rbac;
pub mod traffic;
mod upstream_tls;
mod wire;

pub use allow::{AllowList, AllowListError, InboundPolicy, MtlsMode};
pub use outliers::Outliers;
pub use wire::{
    expected_identities, inbound_protocol, inbound_service, parse_sni, sni, sni_served,
};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::mesh::{Address, Health, Networks, Resolution, Service, ServicePort, Workload};
use crate::spiffe::SpiffeId;

/// Where every HBONE peer takes tunnels (SPEC 11).
pub const HBONE_PORT: u16 = 15008;

/// The east-west gateway's identity in a trust domain when nothing says otherwise: the
/// service account of Istio's `istio-eastwestgateway` chart in `istio-system`.
pub fn eastwest_gateway_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, "istio-system", "istio-eastwestgateway")
}

/// Where a connection is made: an address (an IP, or a host name resolved when connecting) and
/// a port. Also the key of observed health: one endpoint, one outlier record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointAddr {
    pub address: Address,
    pub port: u16,
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Ip(ip) => SocketAddr::new(*ip, self.port).fmt(f),
            Address::Hostname(h) => write!(f, "{h}:{}", self.port),
        }
    }
}

/// How the bytes of a connection travel to a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP as is: a plaintext endpoint, or the gateway relaying its client's TLS untouched.
    Plain,
    /// Istio's sidecar wire: TLS with this VM's certificate, SNI `outbound_.P_._.H`, ALPN
    /// `istio`; the server must present one of `identities`.
    Tls {
        sni: Arc<str>,
        identities: Vec<SpiffeId>,
    },
    /// HBONE (SPEC 11): one `CONNECT authority` stream in a pooled HTTP/2 connection over
    /// TLS 1.3 to the endpoint (the workload's IP, port 15008); the server must present one of
    /// `identities`.
    Hbone {
        authority: SocketAddr,
        identities: Vec<SpiffeId>,
    },
    /// Double HBONE (SPEC 11), to an endpoint in another network: an outer pooled HBONE
    /// stream to that network's east-west gateway (15008; it must present one of
    /// `gateway_identities`) for `authority` = `<service host>:<port>`, and inside it a new TLS
    /// session expecting `identities` (the endpoints behind the gateway) carrying an inner
    /// CONNECT for the same authority, `x-forwarded-network: <network>` (ours).
    DoubleHbone {
        authority: Arc<str>,
        gateway_identities: Vec<SpiffeId>,
        identities: Vec<SpiffeId>,
        network: Arc<str>,
    },
    /// TLS we originate (a DestinationRule's SIMPLE or MUTUAL): the application's plaintext
    /// leaves encrypted, to a server checked against `tls`'s CA bundle and names.
    Originate {
        /// None: no SNI (an IP endpoint with neither a DR `sni` nor a host name).
        sni: Option<Arc<str>>,
        tls: Arc<crate::mesh::traffic::UpstreamTls>,
    },
}

impl Transport {
    /// Istio's mTLS (sidecar or HBONE), not TLS we originate to a server outside the mesh.
    pub fn is_mtls(&self) -> bool {
        !matches!(self, Transport::Plain | Transport::Originate { .. })
    }

    /// The identities the server must present (none for plain TCP).
    pub fn identities(&self) -> &[SpiffeId] {
        match self {
            Transport::Plain | Transport::Originate { .. } => &[],
            Transport::Tls { identities, .. }
            | Transport::Hbone { identities, .. }
            | Transport::DoubleHbone { identities, .. } => identities,
        }
    }

    /// What `explain` and the access log call it.
    pub fn label(&self) -> &'static str {
        match self {
            Transport::Plain => "plaintext",
            Transport::Tls { .. } => "sidecar_mtls",
            Transport::Hbone { .. } => "hbone",
            Transport::DoubleHbone { .. } => "double_hbone",
            Transport::Originate { .. } => "tls_origination",
        }
    }
}

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
    /// The service's own host name (a DNS service without endpoints, as Istio does).
    ServiceHost,
    /// Where the application was connecting (Istio's ORIGINAL_DST: a service of resolution
    /// NONE, a headless service).
    OriginalDestination,
}

/// One place a connection for a service port can go, and how.
#[derive(Clone, Debug)]
pub struct Target {
    pub endpoint: EndpointAddr,
    pub via: Via,
    pub transport: Transport,
}

impl Target {
    /// The workloads that may answer at the far end (whose identities TLS accepts).
    pub fn workloads(&self) -> &[Arc<Workload>] {
        match &self.via {
            Via::Direct(w) => std::slice::from_ref(w),
            Via::Gateway { behind, .. } => behind,
            Via::ServiceHost | Via::OriginalDestination => &[],
        }
    }

    pub fn gateway_network(&self) -> Option<&str> {
        match &self.via {
            Via::Gateway { network, .. } => Some(network),
            _ => None,
        }
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
        /// Trust domain of the identities expected from endpoints (ours).
        trust_domain: &'a str,
        /// Where the application was connecting, for services reached there as is.
        original: Option<SocketAddr>,
        /// The identity east-west gateways present for double HBONE (None: the default of
        /// Istio's east-west gateway chart in our trust domain).
        gateway_identity: Option<&'a SpiffeId>,
        /// This VM's `region/zone/subzone`, for locality failover.
        locality: &'a str,
    },
    /// An east-west gateway of `network`: only that network's endpoints that speak mTLS (the
    /// bytes it relays are the client's TLS).
    Gateway { network: &'a str },
}

/// Why an endpoint is left out: a log line, a metric label and an `explain` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    Unhealthy,
    /// The gateway relays TLS only.
    GatewayNeedsMtls,
    /// Seen from a gateway: the endpoint is in another network.
    NotInGatewayNetwork,
    /// Plaintext cannot cross to another network (the gateway routes by our mTLS's SNI).
    RemotePlaintext,
    /// Seen from a gateway's 15008: the endpoint takes no HBONE.
    GatewayNeedsHbone,
    /// The DestinationRule's TLS (DISABLE, SIMPLE, MUTUAL) cannot cross an east-west gateway,
    /// which routes by Istio's mTLS SNI.
    RemoteNeedsIstioMtls,
}

impl SkipReason {
    /// The value of a `reason` metric label.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::Unhealthy => "unhealthy",
            SkipReason::GatewayNeedsMtls => "gateway_needs_mtls",
            SkipReason::NotInGatewayNetwork => "not_in_gateway_network",
            SkipReason::RemotePlaintext => "remote_plaintext",
            SkipReason::GatewayNeedsHbone => "gateway_needs_hbone",
            SkipReason::RemoteNeedsIstioMtls => "remote_needs_istio_mtls",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::Unhealthy => "unhealthy",
            SkipReason::GatewayNeedsMtls => "no mTLS: the gateway relays TLS only",
            SkipReason::NotInGatewayNetwork => "not in the gateway's network",
            SkipReason::RemotePlaintext => "another network (behind its gateway) and no mTLS",
            SkipReason::GatewayNeedsHbone => "no HBONE: the gateway's 15008 tunnels to HBONE only",
            SkipReason::RemoteNeedsIstioMtls => {
                "another network, and the DestinationRule's TLS mode is not Istio's mTLS"
            }
        })
    }
}

/// An endpoint that cannot be reached from where the chooser stands, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Skipped {
    pub endpoint: String,
    pub network: String,
    pub reason: SkipReason,
}

/// Every reachable target for a service port with its weight and priority, and the endpoints
/// left out.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub targets: Vec<Weighted>,
    pub skipped: Vec<Skipped>,
}

/// A target with its share of the load and its priority (0 first).
#[derive(Clone, Debug)]
pub struct Weighted {
    pub weight: f64,
    pub priority: u32,
    pub target: Target,
}

fn is_local(w: &Workload, network: &str) -> bool {
    w.network.is_empty() || w.network == network
}

/// The plan for `port` of `svc` from `scope`: the one decision the data paths (`order`) and
/// `interceptor explain` read.
pub fn plan(svc: &Service, port: &ServicePort, scope: Scope<'_>) -> Plan {
    plan_endpoints(svc, port, "", svc.endpoints_for(port), scope)
}

/// The plan for a cluster a route chose (`traffic::cluster`): a subset's endpoints, and its
/// SNI (`outbound_.PORT_.SUBSET_.HOST`).
pub fn plan_cluster(c: &traffic::Cluster<'_>, scope: Scope<'_>) -> Plan {
    let mut plan = plan_endpoints(c.service, c.port, &c.subset, &c.endpoints, scope);
    if let Scope::Sidecar {
        trust_domain,
        locality: ours,
        ..
    } = scope
    {
        if let Some(tls) = &c.policy.tls {
            upstream_tls::apply(&mut plan, tls, c, trust_domain);
        }
        locality::apply(&mut plan, c, ours);
    }
    plan
}

fn plan_endpoints(
    svc: &Service,
    port: &ServicePort,
    subset: &str,
    endpoints: &[Arc<Workload>],
    scope: Scope<'_>,
) -> Plan {
    let mut out = Plan::default();
    let mut remote: BTreeMap<(&str, u32), Vec<Arc<Workload>>> = BTreeMap::new();
    let mut remote_hbone: BTreeMap<(&str, u32), Vec<Arc<Workload>>> = BTreeMap::new();
    let skip = |w: &Workload, reason: SkipReason| Skipped {
        endpoint: w.name.clone(),
        network: w.network.clone(),
        reason,
    };
    // One SNI for every mTLS target of this service port, made only if there is one.
    let sni: std::cell::OnceCell<Arc<str>> = std::cell::OnceCell::new();
    let tls = |workloads: &[Arc<Workload>], trust_domain: &str| Transport::Tls {
        sni: sni
            .get_or_init(|| Arc::from(wire::sni(port.number, subset, svc.host.as_str())))
            .clone(),
        identities: expected_identities(svc, workloads, trust_domain),
    };
    let direct = |w: &Arc<Workload>, transport: Transport| Weighted {
        weight: f64::from(w.weight.max(1)),
        priority: w.priority,
        target: Target {
            endpoint: EndpointAddr {
                address: w.address.clone(),
                port: w.target_port(port),
            },
            via: Via::Direct(w.clone()),
            transport,
        },
    };
    for w in endpoints {
        if w.health != Health::Healthy {
            out.skipped.push(skip(w, SkipReason::Unhealthy));
            continue;
        }
        match scope {
            Scope::Gateway { network } if is_local(w, network) && w.speaks_istio_mtls() => {
                out.targets.push(direct(w, Transport::Plain))
            }
            Scope::Gateway { .. } if !w.speaks_istio_mtls() => {
                out.skipped.push(skip(w, SkipReason::GatewayNeedsMtls))
            }
            Scope::Gateway { .. } => out.skipped.push(skip(w, SkipReason::NotInGatewayNetwork)),
            Scope::Sidecar {
                network,
                networks,
                trust_domain,
                ..
            } => {
                // Istio: InNetwork(epNetwork) || len(gateways) == 0 -> as is.
                if svc.endpoints_as_given
                    || is_local(w, network)
                    || networks.gateways(&w.network).is_empty()
                {
                    match &w.address {
                        // HBONE wins where both are spoken, as in ztunnel.
                        Address::Ip(ip) if w.speaks_hbone() => out.targets.push(Weighted {
                            weight: f64::from(w.weight.max(1)),
                            priority: w.priority,
                            target: Target {
                                endpoint: EndpointAddr {
                                    address: w.address.clone(),
                                    port: HBONE_PORT,
                                },
                                via: Via::Direct(w.clone()),
                                transport: Transport::Hbone {
                                    authority: SocketAddr::new(*ip, w.target_port(port)),
                                    identities: expected_identities(
                                        svc,
                                        std::slice::from_ref(w),
                                        trust_domain,
                                    ),
                                },
                            },
                        }),
                        _ if w.speaks_istio_mtls() => out
                            .targets
                            .push(direct(w, tls(std::slice::from_ref(w), trust_domain))),
                        _ => out.targets.push(direct(w, Transport::Plain)),
                    }
                } else if w.speaks_hbone() && !w.speaks_istio_mtls() {
                    remote_hbone
                        .entry((w.network.as_str(), w.priority))
                        .or_default()
                        .push(w.clone());
                } else if w.speaks_istio_mtls() {
                    remote
                        .entry((w.network.as_str(), w.priority))
                        .or_default()
                        .push(w.clone());
                } else {
                    out.skipped.push(skip(w, SkipReason::RemotePlaintext));
                }
            }
        }
    }
    if let Scope::Sidecar {
        network: ours,
        networks,
        trust_domain,
        original,
        gateway_identity,
        ..
    } = scope
    {
        for ((network, priority), behind) in remote_hbone {
            // Double HBONE: the outer tunnel is the gateway's, the inner TLS the endpoints'.
            let transport = Transport::DoubleHbone {
                authority: Arc::from(format!("{}:{}", svc.host.as_str(), port.number)),
                gateway_identities: vec![gateway_identity
                    .cloned()
                    .unwrap_or_else(|| eastwest_gateway_identity(trust_domain))],
                identities: expected_identities(svc, &behind, trust_domain),
                network: Arc::from(ours),
            };
            let gateways = networks.gateways(network);
            via_gateways(
                &mut out,
                gateways,
                network,
                priority,
                behind,
                Some(HBONE_PORT),
                transport,
            );
        }
        for ((network, priority), behind) in remote {
            // Through a gateway any endpoint behind it may answer, and it is their identities
            // we check, never the gateway's (it only relays our TLS).
            let transport = tls(&behind, trust_domain);
            let gateways = networks.gateways(network);
            via_gateways(
                &mut out, gateways, network, priority, behind, None, transport,
            );
        }
        if out.targets.is_empty() && out.skipped.is_empty() {
            // No endpoints at all: a DNS service is reached at its own host name, a service of
            // resolution NONE where the application was going (both as Istio does).
            let at = match (svc.resolution, original) {
                (Resolution::Dns, _) => Some((
                    EndpointAddr {
                        address: Address::Hostname(svc.host.to_string()),
                        port: port.target_port.unwrap_or(port.number),
                    },
                    Via::ServiceHost,
                )),
                (Resolution::None, Some(dst)) => Some((
                    EndpointAddr {
                        address: Address::Ip(dst.ip()),
                        port: dst.port(),
                    },
                    Via::OriginalDestination,
                )),
                _ => None,
            };
            if let Some((endpoint, via)) = at {
                out.targets.push(Weighted {
                    weight: 1.0,
                    priority: 0,
                    target: Target {
                        endpoint,
                        via,
                        transport: Transport::Plain,
                    },
                });
            }
        }
    }
    out
}

/// Where an east-west gateway sends the outer tunnel of double HBONE for `port` of `svc`:
/// the healthy HBONE endpoints of its own network, each at IP:15008. The bytes it relays are
/// the client's inner TLS, so the transport is plain TCP.
pub fn gateway_hbone_plan(svc: &Service, port: &ServicePort, network: &str) -> Plan {
    let mut out = Plan::default();
    for w in svc.endpoints_for(port) {
        let reason = if w.health != Health::Healthy {
            Some(SkipReason::Unhealthy)
        } else if !is_local(w, network) {
            Some(SkipReason::NotInGatewayNetwork)
        } else if !w.speaks_hbone() {
            Some(SkipReason::GatewayNeedsHbone)
        } else {
            None
        };
        match reason {
            Some(reason) => out.skipped.push(Skipped {
                endpoint: w.name.clone(),
                network: w.network.clone(),
                reason,
            }),
            None => out.targets.push(Weighted {
                weight: f64::from(w.weight.max(1)),
                priority: w.priority,
                target: Target {
                    endpoint: EndpointAddr {
                        address: w.address.clone(),
                        port: HBONE_PORT,
                    },
                    via: Via::Direct(w.clone()),
                    transport: Transport::Plain,
                },
            }),
        }
    }
    out
}

/// One target per gateway of `network` for the endpoints `behind` them, at `port` (None: the
/// gateway's own). Istio: a gateway weighs as the endpoints behind it, shared among the
/// network's gateways.
fn via_gateways(
    out: &mut Plan,
    gateways: &[crate::mesh::Gateway],
    network: &str,
    priority: u32,
    behind: Vec<Arc<Workload>>,
    port: Option<u16>,
    transport: Transport,
) {
    let weight = behind.len() as f64 / gateways.len() as f64;
    for gw in gateways {
        out.targets.push(Weighted {
            weight,
            priority,
            target: Target {
                endpoint: EndpointAddr {
                    address: gw.address.clone(),
                    port: port.unwrap_or(gw.port),
                },
                via: Via::Gateway {
                    network: network.to_string(),
                    behind: behind.clone(),
                },
                transport: transport.clone(),
            },
        });
    }
}

/// The targets of `plan` in the order to try them: by priority (0 first), and within one a
/// weighted random order; recently failed ones moved to the back.
pub fn order(plan: Plan, outliers: &Outliers) -> Vec<Target> {
    let mut rng = rand::rng();
    let mut keyed: Vec<(bool, u32, f64, Target)> = plan
        .targets
        .into_iter()
        .map(|w| {
            // Efraimidis-Spirakis: sorting by u^(1/w) is weighted sampling without replacement.
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            let ejected = outliers.is_ejected(&w.target.endpoint);
            (ejected, w.priority, u.powf(1.0 / w.weight), w.target)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.total_cmp(&a.2)));
    keyed.into_iter().map(|k| k.3).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Host, Location, TLS_MODE_LABEL};

    /// Endpoints (weight, network, mTLS); weight 0 = unhealthy.
    pub(crate) fn svc(endpoints: &[(u32, &str, bool)]) -> (Service, ServicePort) {
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
                    labels: Arc::new(if *mtls {
                        [(TLS_MODE_LABEL.to_string(), "istio".to_string())].into()
                    } else {
                        Default::default()
                    }),
                    ports: [("http".to_string(), 8000 + i as u16)].into(),
                    port: None,
                    network: network.to_string(),
                    locality: String::new(),
                    weight: *w,
                    service_account: format!("sa{i}"),
                    health: if *w == 0 {
                        Health::Unhealthy
                    } else {
                        Health::Healthy
                    },
                    priority: 0,
                })
            })
            .collect();
        let s = Service {
            host: Host::new("a.default.svc.cluster.local"),
            origin: "default/a".into(),
            namespace: "default".into(),
            vips: vec![],
            auto_allocated: false,
            ports: vec![port.clone()],
            resolution: Resolution::Static,
            location: Location::MeshInternal,
            subject_alt_names: vec![],
            endpoints,
            port_endpoints: Default::default(),
            endpoints_as_given: false,
            subsets: vec![],
            policies: None,
        };
        (s, port)
    }

    fn flat() -> Networks {
        Networks::default()
    }

    pub(crate) fn sidecar<'a>(network: &'a str, networks: &'a Networks) -> Scope<'a> {
        Scope::Sidecar {
            network,
            networks,
            trust_domain: "td",
            original: None,
            gateway_identity: None,
            locality: "",
        }
    }

    fn name(t: &Target) -> &str {
        &t.workloads()[0].name
    }

    fn ordered(s: &Service, p: &ServicePort, scope: Scope<'_>, o: &Outliers) -> Vec<Target> {
        order(plan(s, p, scope), o)
    }

    #[test]
    fn weights_skew_the_first_choice() {
        let (s, p) = svc(&[(1, "", false), (3, "", false)]);
        let (o, n) = (Outliers::default(), flat());
        let firsts = (0..4000)
            .filter(|_| name(&ordered(&s, &p, sidecar("", &n), &o)[0]) == "w1")
            .count();
        assert!((2700..3300).contains(&firsts), "{firsts}");
        assert_eq!(
            ordered(&s, &p, sidecar("", &n), &o)[0].endpoint.port / 1000,
            8
        );
    }

    #[test]
    fn unhealthy_skipped_failed_last() {
        let (s, p) = svc(&[(1, "", false), (0, "", false), (1, "", false)]);
        let (o, n) = (Outliers::default(), flat());
        let all = ordered(&s, &p, sidecar("", &n), &o);
        assert_eq!(all.len(), 2);
        let skipped = plan(&s, &p, sidecar("", &n)).skipped;
        assert_eq!(skipped[0].reason, SkipReason::Unhealthy);
        let w0 = all.iter().find(|t| name(t) == "w0").unwrap().clone();
        o.failed(&w0.endpoint);
        for _ in 0..50 {
            assert_eq!(name(&ordered(&s, &p, sidecar("", &n), &o)[0]), "w2");
        }
        o.succeeded(&w0.endpoint);
        assert!((0..200).any(|_| name(&ordered(&s, &p, sidecar("", &n), &o)[0]) == "w0"));
    }

    #[test]
    fn mtls_targets_carry_sni_and_the_endpoint_identity() {
        let (s, p) = svc(&[(1, "", true), (1, "", false)]);
        let n = flat();
        let targets = plan(&s, &p, sidecar("", &n)).targets;
        let tls = targets.iter().find(|w| name(&w.target) == "w0").unwrap();
        match &tls.target.transport {
            Transport::Tls { sni, identities } => {
                assert_eq!(&**sni, "outbound_.80_._.a.default.svc.cluster.local");
                assert_eq!(
                    identities,
                    &vec![SpiffeId::parse("spiffe://td/ns/default/sa/sa0").unwrap()]
                );
            }
            other => panic!("{other:?}"),
        }
        let plain = targets.iter().find(|w| name(&w.target) == "w1").unwrap();
        assert_eq!(plain.target.transport, Transport::Plain);
        assert_eq!(plain.target.endpoint.to_string(), "10.0.0.2:8001");
    }

    pub(crate) fn two_networks() -> Networks {
        Networks::from_yaml(
            "networks:\n  a: {}\n  b:\n    gateways: [{address: 192.0.2.10, port: 15443}]\n  c: {}\n",
        )
        .unwrap()
    }

    #[test]
    fn remote_endpoints_go_through_their_gateway_weighted_by_count() {
        // One local endpoint; three mTLS endpoints in b; one plaintext in b; one in c, a network
        // without a gateway, which is reached directly (SPEC 5 as istiod does it).
        let (s, p) = svc(&[
            (1, "a", true),
            (1, "b", true),
            (1, "b", true),
            (1, "b", true),
            (1, "b", false),
            (1, "c", true),
        ]);
        let (o, n) = (Outliers::default(), two_networks());
        let targets = ordered(&s, &p, sidecar("a", &n), &o);
        assert_eq!(targets.len(), 3, "{targets:?}");
        let in_c = targets
            .iter()
            .find(|t| t.endpoint.to_string() == "10.0.0.6:8005");
        assert!(
            in_c.is_some_and(|t| t.gateway_network().is_none() && t.transport.is_mtls()),
            "{targets:?}"
        );
        let gw = targets
            .iter()
            .find(|t| t.gateway_network().is_some())
            .unwrap();
        assert_eq!(gw.endpoint.to_string(), "192.0.2.10:15443");
        assert_eq!(gw.gateway_network(), Some("b"));
        assert_eq!(gw.workloads().len(), 3);
        // Through the gateway: the identities of every endpoint behind it, never the gateway's.
        match &gw.transport {
            Transport::Tls { identities, .. } => assert_eq!(identities.len(), 3),
            other => panic!("{other:?}"),
        }
        let reasons: Vec<SkipReason> = plan(&s, &p, sidecar("a", &n))
            .skipped
            .iter()
            .map(|s| s.reason)
            .collect();
        assert_eq!(reasons, vec![SkipReason::RemotePlaintext]);
        // The gateway weighs 3, the local endpoint and the one in c 1 each.
        let via_gw = (0..5000)
            .filter(|_| {
                ordered(&s, &p, sidecar("a", &n), &o)[0]
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
        let all = ordered(&s, &p, sidecar("a", &n), &o);
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|t| t.gateway_network().is_none()));
        let gw = ordered(&s, &p, Scope::Gateway { network: "b" }, &o);
        assert_eq!(gw.len(), 1);
        assert_eq!(name(&gw[0]), "w1");
        // The gateway relays its client's TLS: it never speaks TLS itself.
        assert_eq!(gw[0].transport, Transport::Plain);
    }

    #[test]
    fn a_dns_service_without_endpoints_is_reached_at_its_host() {
        let (mut s, p) = svc(&[]);
        s.resolution = Resolution::Dns;
        let n = flat();
        let targets = plan(&s, &p, sidecar("", &n)).targets;
        assert_eq!(targets.len(), 1);
        assert_eq!(
            targets[0].target.endpoint.to_string(),
            "a.default.svc.cluster.local:80"
        );
    }

    #[test]
    fn a_service_of_resolution_none_goes_where_the_application_went() {
        let (mut s, p) = svc(&[]);
        s.resolution = Resolution::None;
        let n = flat();
        let scope = Scope::Sidecar {
            network: "",
            networks: &n,
            trust_domain: "td",
            original: Some("10.9.9.9:5432".parse().unwrap()),
            gateway_identity: None,
            locality: "",
        };
        let t = &plan(&s, &p, scope).targets[0].target;
        assert_eq!(t.endpoint.to_string(), "10.9.9.9:5432");
        assert!(matches!(t.via, Via::OriginalDestination));
    }

    #[test]
    fn lower_priorities_first_failed_ones_last() {
        let (mut s, p) = svc(&[(1, "", false), (1, "", false), (1, "", false)]);
        for (i, w) in s.endpoints.iter_mut().enumerate() {
            Arc::make_mut(w).priority = if i == 0 { 1 } else { 0 };
        }
        let (o, n) = (Outliers::default(), flat());
        for _ in 0..50 {
            let t = ordered(&s, &p, sidecar("", &n), &o);
            assert_eq!(name(&t[2]), "w0", "priority 1 after both of priority 0");
        }
        o.failed(&EndpointAddr {
            address: Address::Ip("10.0.0.2".parse().unwrap()),
            port: 8001,
        });
        o.failed(&EndpointAddr {
            address: Address::Ip("10.0.0.3".parse().unwrap()),
            port: 8002,
        });
        assert_eq!(name(&ordered(&s, &p, sidecar("", &n), &o)[0]), "w0");
    }

    #[test]
    fn endpoints_as_given_ignore_our_network_rule() {
        let (mut s, p) = svc(&[(1, "b", true)]);
        s.endpoints_as_given = true;
        let (o, n) = (Outliers::default(), two_networks());
        let t = ordered(&s, &p, sidecar("a", &n), &o);
        assert_eq!(t.len(), 1);
        assert!(t[0].gateway_network().is_none());
        assert_eq!(t[0].endpoint.to_string(), "10.0.0.1:8000");
    }

    fn tunnelled(s: &mut Service, i: usize) {
        let w = Arc::make_mut(&mut s.endpoints[i]);
        Arc::make_mut(&mut w.labels).insert(crate::mesh::TUNNEL_LABEL.into(), "http".into());
    }

    #[test]
    fn hbone_endpoints_are_tunnelled_to_15008_for_their_address_and_port() {
        // w0 sidecar mTLS, w1 HBONE and sidecar (HBONE wins), w2 HBONE only.
        let (mut s, p) = svc(&[(1, "", true), (1, "", true), (1, "", false)]);
        tunnelled(&mut s, 1);
        tunnelled(&mut s, 2);
        let n = flat();
        let targets = plan(&s, &p, sidecar("", &n)).targets;
        let by = |n: &str| {
            &targets
                .iter()
                .find(|w| name(&w.target) == n)
                .unwrap()
                .target
        };
        assert_eq!(by("w0").transport.label(), "sidecar_mtls");
        for (w, ip, port) in [("w1", "10.0.0.2", 8001), ("w2", "10.0.0.3", 8002)] {
            let t = by(w);
            assert_eq!(t.endpoint.to_string(), format!("{ip}:15008"));
            match &t.transport {
                Transport::Hbone {
                    authority,
                    identities,
                } => {
                    assert_eq!(authority.to_string(), format!("{ip}:{port}"));
                    assert_eq!(identities.len(), 1);
                }
                other => panic!("{other:?}"),
            }
        }
        // In another network behind a gateway: sidecar mTLS through the gateway if spoken,
        // else double HBONE to the gateway's 15008.
        let (mut s, p) = svc(&[(1, "b", true), (1, "b", false)]);
        tunnelled(&mut s, 0);
        tunnelled(&mut s, 1);
        let n = two_networks();
        let plan = plan(&s, &p, sidecar("a", &n));
        assert_eq!(plan.targets.len(), 2, "{plan:?}");
        let label = |l: &str| {
            plan.targets
                .iter()
                .find(|t| t.target.transport.label() == l)
        };
        let sidecar_wire = label("sidecar_mtls").expect("through the gateway's 15443");
        assert_eq!(sidecar_wire.target.endpoint.to_string(), "192.0.2.10:15443");
        let double = label("double_hbone").expect("double HBONE");
        assert_eq!(double.target.endpoint.to_string(), "192.0.2.10:15008");
        match &double.target.transport {
            Transport::DoubleHbone {
                authority,
                gateway_identities,
                identities,
                network,
            } => {
                assert_eq!(&**authority, "a.default.svc.cluster.local:80");
                assert_eq!(
                    gateway_identities[0].as_str(),
                    "spiffe://td/ns/istio-system/sa/istio-eastwestgateway"
                );
                assert_eq!(identities[0].as_str(), "spiffe://td/ns/default/sa/sa1");
                assert_eq!(&**network, "a");
            }
            other => panic!("{other:?}"),
        }
        // --gateway-identity names another one.
        let named = SpiffeId::parse("spiffe://td/ns/gw/sa/east-west").unwrap();
        let scope = Scope::Sidecar {
            network: "a",
            networks: &n,
            trust_domain: "td",
            original: None,
            gateway_identity: Some(&named),
            locality: "",
        };
        let plan = super::plan(&s, &p, scope);
        let double = plan
            .targets
            .iter()
            .find(|t| t.target.transport.label() == "double_hbone")
            .unwrap();
        match &double.target.transport {
            Transport::DoubleHbone {
                gateway_identities, ..
            } => assert_eq!(gateway_identities, &vec![named.clone()]),
            other => panic!("{other:?}"),
        }
    }
}
