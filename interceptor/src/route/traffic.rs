//! Where a connection to a service port goes: the route (istiod's listener for the address,
//! else the mesh files' VirtualServices evaluated for this VM, else the service itself), one of
//! its weighted destinations, and that cluster's endpoints (a DestinationRule subset, given
//! by istiod or selected by labels). The outbound data path and `explain` call the same
//! functions.
//!
//! As istiod programs a sidecar (I: pilot/pkg/networking/core/tls.go
//! `buildSidecarOutboundTCPFilterChainOpts`, networkfilter.go
//! `buildOutboundNetworkFiltersWithWeightedClusters`; route/route.go `GetDestinationCluster`;
//! xds/endpoints/endpoint_builder.go `getSubSetLabels`; model/push_context.go
//! `destinationRule` lookup order).

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;
use serde::Serialize;

use super::policy::Subject;
use std::collections::BTreeMap;

use crate::mesh::traffic::{
    visible, Destination, DestinationRule, Target, TcpMatch, TrafficPolicy, VirtualService,
};
use crate::mesh::{Host, Service, ServicePort, Table, Workload};

/// The gateway name that means "the sidecars of the mesh".
const MESH_GATEWAY: &str = "mesh";

/// What decided a connection's route: a log field, a metric label and an `explain` line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteBy {
    /// No route: the service itself.
    Service,
    /// A VirtualService of the mesh files, its `tcp[rule]`.
    VirtualService { name: String, rule: usize },
    /// istiod's listener (and the VirtualService it was made from, when it says).
    Listener {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        config: Option<String>,
    },
}

impl fmt::Display for RouteBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteBy::Service => f.write_str("service"),
            RouteBy::VirtualService { name, rule } => {
                write!(f, "VirtualService {name} tcp[{rule}]")
            }
            RouteBy::Listener { name, config: None } => write!(f, "istiod listener {name}"),
            RouteBy::Listener {
                name,
                config: Some(c),
            } => write!(f, "istiod listener {name} ({c})"),
        }
    }
}

/// The route of a connection: where it may go (borrowed from the table), and who said so.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route<'t> {
    pub target: Cow<'t, Target>,
    pub by: RouteBy,
}

/// Why a connection has nowhere to go: a log field and a metric label (Envoy's response flags
/// in parentheses).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// The route names a cluster that does not exist (`NC`).
    #[error(
        "no cluster {cluster} (the route names a service, port or subset the mesh does not have)"
    )]
    NoCluster { cluster: String },
    /// istiod's BlackHoleCluster (REGISTRY_ONLY, or a route to nowhere).
    #[error("refused by {by} (BlackHoleCluster)")]
    BlackHole { by: RouteBy },
    /// The cluster's connectionPool.tcp.maxConnections are all open (`UO`).
    #[error("{cluster} has its maxConnections ({max}) open (UO)")]
    Overflow { cluster: String, max: u32 },
}

impl NoRoute {
    pub fn label(&self) -> &'static str {
        match self {
            NoRoute::NoCluster { .. } => "no_cluster",
            NoRoute::BlackHole { .. } => "black_hole",
            NoRoute::Overflow { .. } => "overflow",
        }
    }
}

/// A cluster a connection was routed to: the service port, subset and its endpoints.
#[derive(Clone, Debug)]
pub struct Cluster<'t> {
    pub service: &'t Arc<Service>,
    pub port: &'t ServicePort,
    pub subset: String,
    pub endpoints: Cow<'t, [Arc<Workload>]>,
    /// How its endpoints are chosen and connected to (the DestinationRule's, or istiod's).
    pub policy: TrafficPolicy,
}

impl Cluster<'_> {
    /// Istio's cluster name, `outbound|PORT|SUBSET|HOST`.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

/// The name, written only where it is wanted (a log line that is on).
impl fmt::Display for Cluster<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbound|{}|{}|{}",
            self.port.number, self.subset, self.service.host
        )
    }
}

pub fn cluster_name(port: u16, subset: &str, host: &Host) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Does a `tcp[].match[]` apply to this VM's connections to `dst`? (istiod's `matchTCP`,
/// plus destinationSubnets, which it turns into a chain match on the destination.)
fn tcp_match_applies(
    m: &TcpMatch,
    vs: &VirtualService,
    subject: &Subject,
    dst: SocketAddr,
) -> bool {
    let gateways = if m.gateways.is_empty() {
        &vs.gateways
    } else {
        &m.gateways
    };
    (gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY))
        && m.port.is_none_or(|p| p == dst.port())
        && selects(&m.source_labels, &subject.labels)
        && m.source_namespace
            .as_ref()
            .is_none_or(|ns| *ns == subject.namespace)
        && (m.destination_subnets.is_empty()
            || m.destination_subnets.iter().any(|c| c.contains(dst.ip())))
}

/// The first TCP rule of the VirtualServices for `host` that applies to this VM.
fn virtual_service_route<'t>(
    table: &'t Table,
    subject: &Subject,
    host: &Host,
    dst: SocketAddr,
) -> Option<Route<'t>> {
    for vs in table.traffic.virtual_services_for(host) {
        if !visible(&vs.namespace, &vs.export_to, &subject.namespace) {
            continue;
        }
        if !vs.gateways.is_empty() && !vs.gateways.iter().any(|g| g == MESH_GATEWAY) {
            continue;
        }
        for (i, rule) in vs.tcp.iter().enumerate() {
            let applies = rule.matches.is_empty()
                || rule
                    .matches
                    .iter()
                    .any(|m| tcp_match_applies(m, vs, subject, dst));
            if applies {
                return Some(Route {
                    target: Cow::Owned(Target::Clusters(rule.destinations.clone())),
                    by: RouteBy::VirtualService {
                        name: vs.name.clone(),
                        rule: i,
                    },
                });
            }
        }
    }
    None
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The route for a connection to `dst` (a VIP and port of `svc`).
pub fn route<'t>(table: &'t Table, subject: &Subject, svc: &Service, dst: SocketAddr) -> Route<'t> {
    let dst = SocketAddr::new(unmapped(dst.ip()), dst.port());
    if let Some(l) = table.traffic.listener_route(dst) {
        let rule = l
            .rules
            .iter()
            .find(|r| r.subnets.is_empty() || r.subnets.iter().any(|c| c.contains(dst.ip())));
        if let Some(rule) = rule {
            return Route {
                target: Cow::Borrowed(&rule.target),
                by: RouteBy::Listener {
                    name: l.listener.clone(),
                    config: rule.config.clone(),
                },
            };
        }
    }
    let routed = table
        .traffic
        .may_route(&svc.host)
        .then(|| virtual_service_route(table, subject, &svc.host, dst))
        .flatten();
    routed.unwrap_or(Route {
        target: Cow::Owned(Target::Service),
        by: RouteBy::Service,
    })
}

/// The cluster of `svc` itself for a connection to `port` (no route, no subset).
pub fn service_cluster<'t>(
    table: &'t Table,
    subject: &Subject,
    svc: &'t Arc<Service>,
    port: &'t ServicePort,
) -> Cluster<'t> {
    Cluster {
        service: svc,
        port,
        subset: String::new(),
        endpoints: Cow::Borrowed(svc.endpoints_for(port)),
        policy: policy_of(table, subject, svc, port.number, ""),
    }
}

/// A cluster's traffic policy: as the source gave it, else from the DestinationRules.
fn policy_of(
    table: &Table,
    subject: &Subject,
    svc: &Service,
    port: u16,
    subset: &str,
) -> TrafficPolicy {
    match &svc.policies {
        Some(given) => given
            .iter()
            .find(|p| p.port == port && p.subset == subset)
            .map(|p| p.policy.clone())
            .unwrap_or_default(),
        None if !table.traffic.may_have_rule(&svc.host) => TrafficPolicy::default(),
        None => destination_rules(table, subject, &svc.host, &svc.namespace)
            .first()
            .map(|d| d.policy(port, subset))
            .unwrap_or_default(),
    }
}

/// One destination of `destinations` by weight.
pub fn pick(destinations: &[Destination]) -> Option<&Destination> {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return destinations.first();
    }
    let mut at = rand::rng().random_range(0..total);
    for d in destinations {
        if at < u64::from(d.weight) {
            return Some(d);
        }
        at -= u64::from(d.weight);
    }
    destinations.last()
}

/// The DestinationRules that apply to `host` for this VM, merged as istiod merges them
/// (push_context.go: our namespace's rules, else the service namespace's, else the root
/// namespace's; of one namespace's rules the first to define a subset or a policy wins).
pub fn destination_rules<'t>(
    table: &'t Table,
    subject: &Subject,
    host: &'t Host,
    service_namespace: &str,
) -> Vec<&'t Arc<DestinationRule>> {
    let rank = |ns: &str| {
        if ns == subject.namespace {
            0
        } else if ns == service_namespace {
            1
        } else if ns == subject.root_namespace {
            2
        } else {
            3
        }
    };
    let rules: Vec<_> = table
        .traffic
        .destination_rules_for(host)
        .filter(|d| visible(&d.namespace, &d.export_to, &subject.namespace))
        .collect();
    let Some(best) = rules.iter().map(|d| rank(&d.namespace)).min() else {
        return vec![];
    };
    rules
        .into_iter()
        .filter(|d| rank(&d.namespace) == best)
        .collect()
}

/// The labels `subset` selects by and the rule that defines it.
pub fn subset_labels<'t>(
    rules: &[&'t Arc<DestinationRule>],
    subset: &str,
) -> Option<(&'t BTreeMap<String, String>, &'t str)> {
    rules.iter().find_map(|d| {
        d.subsets
            .iter()
            .find(|s| s.name == subset)
            .map(|s| (&s.labels, d.name.as_str()))
    })
}

/// The cluster `dest` names, for a connection made to port `listener_port`.
pub fn cluster<'t>(
    table: &'t Table,
    subject: &Subject,
    dest: &Destination,
    listener_port: u16,
) -> Result<Cluster<'t>, NoRoute> {
    let no_cluster = |port: u16| NoRoute::NoCluster {
        cluster: cluster_name(port, &dest.subset, &dest.host),
    };
    let svc = table
        .service_by_host(dest.host.as_str())
        .ok_or_else(|| no_cluster(dest.port.unwrap_or(listener_port)))?;
    // Istio: no port given and the service has one: that one; else the listener's.
    let number = match (dest.port, svc.ports.as_slice()) {
        (Some(p), _) => p,
        (None, [only]) => only.number,
        (None, _) => listener_port,
    };
    let port = svc.port(number).ok_or_else(|| no_cluster(number))?;
    let endpoints = if dest.subset.is_empty() {
        Cow::Borrowed(svc.endpoints_for(port))
    } else if !svc.subsets.is_empty() {
        Cow::Borrowed(
            svc.given_subset(port.number, &dest.subset)
                .ok_or_else(|| no_cluster(number))?,
        )
    } else {
        let rules = destination_rules(table, subject, &svc.host, &svc.namespace);
        let (labels, _) = subset_labels(&rules, &dest.subset).ok_or_else(|| no_cluster(number))?;
        Cow::Owned(
            svc.endpoints_for(port)
                .iter()
                .filter(|w| selects(labels, &w.labels))
                .cloned()
                .collect(),
        )
    };
    let policy = policy_of(table, subject, svc, port.number, &dest.subset);
    Ok(Cluster {
        service: svc,
        port,
        subset: dest.subset.clone(),
        endpoints,
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::traffic::{Subset, TcpRule};
    use crate::mesh::{Resources, ServiceDecl};

    fn table(vs: Vec<VirtualService>, dr: Vec<DestinationRule>) -> Table {
        let mut decl = crate::mesh::table_tests::product();
        decl.addresses = vec!["10.96.0.20".parse().unwrap()];
        let res = Resources {
            services: vec![Arc::new(ServiceDecl {
                selector: None,
                endpoints: vec![
                    Arc::new(crate::mesh::table_tests::workload(
                        "default",
                        "10.0.0.1",
                        &[("version", "v1")],
                    )),
                    Arc::new(crate::mesh::table_tests::workload(
                        "default",
                        "10.0.0.2",
                        &[("version", "v2")],
                    )),
                ],
                ..decl
            })],
            virtual_services: vs.into_iter().map(Arc::new).collect(),
            destination_rules: dr.into_iter().map(Arc::new).collect(),
            ..Default::default()
        };
        Table::build(res, Default::default())
    }

    fn split(match_labels: &[(&str, &str)]) -> VirtualService {
        VirtualService {
            name: "default/product".into(),
            namespace: "default".into(),
            hosts: vec![Host::new("product")],
            export_to: vec![],
            gateways: vec![],
            tcp: vec![
                TcpRule {
                    matches: vec![TcpMatch {
                        source_labels: match_labels
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }],
                    destinations: vec![Destination {
                        host: Host::new("product"),
                        subset: "v2".into(),
                        port: None,
                        weight: 100,
                    }],
                },
                TcpRule {
                    matches: vec![],
                    destinations: vec![
                        Destination {
                            host: Host::new("product"),
                            subset: "v1".into(),
                            port: None,
                            weight: 80,
                        },
                        Destination {
                            host: Host::new("product.default.svc.cluster.local"),
                            subset: "v2".into(),
                            port: None,
                            weight: 20,
                        },
                    ],
                },
            ],
            created: None,
        }
    }

    fn subsets() -> DestinationRule {
        DestinationRule {
            name: "default/product".into(),
            namespace: "default".into(),
            host: Host::new("product"),
            export_to: vec![],
            subsets: ["v1", "v2"]
                .iter()
                .map(|v| Subset {
                    name: v.to_string(),
                    labels: [("version".to_string(), v.to_string())].into(),
                    policy: Default::default(),
                })
                .collect(),
            policy: Default::default(),
            created: None,
        }
    }

    fn dst() -> SocketAddr {
        "10.96.0.20:8080".parse().unwrap()
    }

    #[test]
    fn a_weighted_split_picks_subsets_by_weight_and_selects_their_endpoints() {
        let t = table(vec![split(&[("canary", "yes")])], vec![subsets()]);
        let svc = t.service_for(dst()).unwrap().0.clone();
        let r = route(&t, &Subject::default(), &svc, dst());
        assert_eq!(
            r.by,
            RouteBy::VirtualService {
                name: "default/product".into(),
                rule: 1
            }
        );
        let Target::Clusters(ds) = r.target.as_ref() else {
            panic!("{r:?}")
        };
        let v1 = (0..10_000)
            .filter(|_| pick(ds).unwrap().subset == "v1")
            .count();
        assert!((7700..8300).contains(&v1), "{v1}");
        let c = cluster(&t, &Subject::default(), &ds[1], 8080).unwrap();
        assert_eq!(c.endpoints.len(), 1);
        assert_eq!(c.endpoints[0].labels["version"], "v2");
        assert_eq!(
            c.name(),
            "outbound|8080|v2|product.default.svc.cluster.local"
        );
    }

    #[test]
    fn source_labels_select_a_rule_and_unknown_subsets_are_no_cluster() {
        let t = table(vec![split(&[("canary", "yes")])], vec![subsets()]);
        let svc = t.service_for(dst()).unwrap().0.clone();
        let canary = Subject {
            labels: [("canary".to_string(), "yes".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            route(&t, &canary, &svc, dst()).by,
            RouteBy::VirtualService {
                name: "default/product".into(),
                rule: 0
            }
        );
        // Without the DestinationRule the subsets do not exist.
        let bare = table(vec![split(&[])], vec![]);
        let r = route(&bare, &Subject::default(), &svc, dst());
        let Target::Clusters(ds) = r.target.as_ref() else {
            panic!()
        };
        assert_eq!(
            cluster(&bare, &Subject::default(), &ds[0], 8080).unwrap_err(),
            NoRoute::NoCluster {
                cluster: "outbound|8080|v2|product.default.svc.cluster.local".into()
            }
        );
        // No VirtualService: the service.
        let none = table(vec![], vec![]);
        assert_eq!(
            route(&none, &Subject::default(), &svc, dst()).by,
            RouteBy::Service
        );
    }

    #[test]
    fn a_virtual_service_exported_elsewhere_or_for_gateways_does_not_apply() {
        let mut private = split(&[]);
        private.export_to = vec![".".into()];
        let t = table(vec![private], vec![subsets()]);
        let svc = t.service_for(dst()).unwrap().0.clone();
        let other = Subject {
            namespace: "other".into(),
            ..Default::default()
        };
        assert_eq!(route(&t, &other, &svc, dst()).by, RouteBy::Service);
        let mut gw = split(&[]);
        gw.gateways = vec!["istio-system/ingress".into()];
        let t = table(vec![gw], vec![subsets()]);
        assert_eq!(
            route(&t, &Subject::default(), &svc, dst()).by,
            RouteBy::Service
        );
    }
}
