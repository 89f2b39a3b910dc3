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
    sni_score, visible, Destination, DestinationRule, Target, TcpMatch, TlsMatch, TrafficPolicy,
    VirtualService,
};
use crate::mesh::Cidr;
use crate::mesh::{Host, Service, ServicePort, Table, Workload};

/// The gateway name that means "the sidecars of the mesh".
const MESH_GATEWAY: &str = "mesh";

/// What decided a connection's route: a log field, a metric label and an `explain` line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteBy {
    /// No route: the service itself.
    Service,
    /// A VirtualService of the mesh files, its `tcp[rule]` or `tls[rule]`.
    VirtualService {
        name: String,
        rule: usize,
        kind: RuleKind,
    },
    /// The VirtualServices' `tls` rules name other SNIs only (Envoy: no filter chain).
    NoSniMatch { sni: String },
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
            RouteBy::VirtualService { name, rule, kind } => {
                write!(f, "VirtualService {name} {}[{rule}]", kind.as_str())
            }
            RouteBy::NoSniMatch { sni } => {
                write!(f, "no VirtualService tls rule for SNI {sni}")
            }
            RouteBy::Listener { name, config: None } => write!(f, "istiod listener {name}"),
            RouteBy::Listener {
                name,
                config: Some(c),
            } => write!(f, "istiod listener {name} ({c})"),
        }
    }
}

/// Which of a VirtualService's rule lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Tcp,
    Tls,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Tcp => "tcp",
            RuleKind::Tls => "tls",
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
    ForProxy {
        gateways: &m.gateways,
        port: m.port,
        source_labels: &m.source_labels,
        source_namespace: m.source_namespace.as_deref(),
    }
    .applies(vs, subject, dst.port())
        && (m.destination_subnets.is_empty()
            || m.destination_subnets.iter().any(|c| c.contains(dst.ip())))
}

/// Whether a VirtualService is for this VM's sidecar at all (exportTo, gateways).
pub(super) fn applies_here(vs: &VirtualService, subject: &Subject) -> bool {
    visible(&vs.namespace, &vs.export_to, &subject.namespace)
        && (vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == MESH_GATEWAY))
}

/// The route the VirtualServices for `svc` give a connection to `dst`: on a TLS port their `tls`
/// rules by SNI (none matching: refused, as Envoy has no chain for it), else the first `tcp`
/// rule that applies to this VM (istiod's `buildSidecarOutboundTLSFilterChainOpts` and
/// `buildSidecarOutboundTCPFilterChainOpts`: a port is one or the other).
fn virtual_service_route<'t>(
    table: &'t Table,
    subject: &Subject,
    svc: &Service,
    dst: SocketAddr,
    sni: Option<&str>,
) -> Option<Route<'t>> {
    if svc.port(dst.port()).is_some_and(|p| p.is_tls()) {
        return tls_route(table, subject, &svc.host, dst, sni);
    }
    for vs in table.traffic.virtual_services_for(&svc.host) {
        if !applies_here(vs, subject) {
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
                        kind: RuleKind::Tcp,
                    },
                });
            }
        }
    }
    None
}

/// The `tls` rules' chains for this VM, in istiod's order (the first of equal runtime matches
/// wins), chosen by SNI and destination as Envoy chooses.
fn tls_route<'t>(
    table: &'t Table,
    subject: &Subject,
    host: &Host,
    dst: SocketAddr,
    sni: Option<&str>,
) -> Option<Route<'t>> {
    let mut chains: Vec<Chain<'_, (&VirtualService, usize)>> = Vec::new();
    for vs in table.traffic.virtual_services_for(host) {
        if !applies_here(vs, subject) {
            continue;
        }
        for (i, rule) in vs.tls.iter().enumerate() {
            for m in &rule.matches {
                let duplicate = chains
                    .iter()
                    .any(|(s, n, _)| **s == m.destination_subnets && **n == m.sni_hosts);
                if tls_match_applies(m, vs, subject, dst.port()) && !duplicate {
                    chains.push((&m.destination_subnets, &m.sni_hosts, (vs, i)));
                }
            }
        }
    }
    if chains.is_empty() {
        return None;
    }
    let chosen = envoy_chain(chains.iter().map(|(s, n, t)| (*s, *n, *t)), dst.ip(), sni);
    Some(match chosen {
        Some((vs, i)) => Route {
            target: Cow::Owned(Target::Clusters(vs.tls[i].destinations.clone())),
            by: RouteBy::VirtualService {
                name: vs.name.clone(),
                rule: i,
                kind: RuleKind::Tls,
            },
        },
        None => Route {
            target: Cow::Owned(Target::BlackHole),
            by: RouteBy::NoSniMatch {
                sni: sni.unwrap_or("(none)").to_string(),
            },
        },
    })
}

/// istiod's `matchTLS`: the parts of a `tls[].match[]` known before the connection.
fn tls_match_applies(m: &TlsMatch, vs: &VirtualService, subject: &Subject, port: u16) -> bool {
    ForProxy {
        gateways: &m.gateways,
        port: m.port,
        source_labels: &m.source_labels,
        source_namespace: m.source_namespace.as_deref(),
    }
    .applies(vs, subject, port)
}

/// The parts of a VirtualService match (tcp, tls or http) istiod evaluates for the proxy
/// itself rather than per connection or request (`sourceMatchHTTP`, `matchTCP`, `matchTLS`).
pub(super) struct ForProxy<'a> {
    pub gateways: &'a [String],
    pub port: Option<u16>,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: Option<&'a str>,
}

impl ForProxy<'_> {
    /// For this VM's connections to `port` (a match's own gateways, else the VirtualService's).
    pub fn applies(&self, vs: &VirtualService, subject: &Subject, port: u16) -> bool {
        let gateways = if self.gateways.is_empty() {
            &vs.gateways[..]
        } else {
            self.gateways
        };
        (gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY))
            && self.port.is_none_or(|p| p == port)
            && selects(self.source_labels, &subject.labels)
            && self
                .source_namespace
                .is_none_or(|ns| ns == subject.namespace)
    }
}

pub(super) fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The route for a connection to `dst` (a VIP and port of `svc`) whose ClientHello named
/// `sni` (None: not read, or not TLS; see `needs_sni`).
pub fn route<'t>(
    table: &'t Table,
    subject: &Subject,
    svc: &Service,
    dst: SocketAddr,
    sni: Option<&str>,
) -> Route<'t> {
    let dst = SocketAddr::new(unmapped(dst.ip()), dst.port());
    if let Some(l) = table.traffic.listener_route(dst) {
        let by = |config: Option<String>| RouteBy::Listener {
            name: l.listener.clone(),
            config,
        };
        let rules = l.rules.iter().map(|r| (&r.subnets, &r.server_names, r));
        match envoy_chain(rules, dst.ip(), sni) {
            Some(rule) => {
                return Route {
                    target: Cow::Borrowed(&rule.target),
                    by: by(rule.config.clone()),
                }
            }
            // Chains by SNI only, none for this hello: Envoy closes the connection.
            None if l.rules.iter().any(|r| !r.server_names.is_empty()) => {
                return Route {
                    target: Cow::Owned(Target::BlackHole),
                    by: by(None),
                }
            }
            None => {}
        }
    }
    let routed = table
        .traffic
        .may_route(&svc.host)
        .then(|| virtual_service_route(table, subject, svc, dst, sni))
        .flatten();
    routed.unwrap_or(Route {
        target: Cow::Owned(Target::Service),
        by: RouteBy::Service,
    })
}

/// Whether the route of a connection to `dst` depends on its SNI: istiod's listener has chains
/// by server name, or (files) the port is TLS and a VirtualService has `tls` rules for it. Only
/// then is the ClientHello read before routing.
pub fn needs_sni(table: &Table, subject: &Subject, svc: &Service, dst: SocketAddr) -> bool {
    let dst = SocketAddr::new(unmapped(dst.ip()), dst.port());
    if let Some(l) = table.traffic.listener_route(dst) {
        return l.rules.iter().any(|r| !r.server_names.is_empty());
    }
    table.traffic.may_route(&svc.host)
        && svc.port(dst.port()).is_some_and(|p| p.is_tls())
        && table
            .traffic
            .virtual_services_for(&svc.host)
            .any(|vs| applies_here(vs, subject) && !vs.tls.is_empty())
}

/// A filter chain's match (destination prefixes, server names) and what it leads to.
type Chain<'a, T> = (&'a Vec<Cidr>, &'a Vec<String>, T);

/// Envoy's filter chain choice for a connection (listener_components.proto `FilterChainMatch`):
/// the most specific destination prefix, then the most specific server name (exact, then the
/// longest wildcard), else a chain without server names; chains in order among equals.
fn envoy_chain<'a, T>(
    chains: impl Iterator<Item = Chain<'a, T>> + Clone,
    ip: IpAddr,
    sni: Option<&str>,
) -> Option<T> {
    // -1: no prefix (matches any address), below every prefix that matches.
    let ip_score = |subnets: &Vec<Cidr>| -> Option<i16> {
        if subnets.is_empty() {
            return Some(-1);
        }
        subnets
            .iter()
            .filter(|c| c.contains(ip))
            .map(|c| i16::from(c.prefix))
            .max()
    };
    let best_ip = chains.clone().filter_map(|(s, _, _)| ip_score(s)).max()?;
    let same_ip = chains.filter(|(s, _, _)| ip_score(s) == Some(best_ip));
    let mut best: Option<(usize, T)> = None;
    let mut without_names = None;
    for (_, names, t) in same_ip {
        if names.is_empty() {
            without_names = without_names.or(Some(t));
            continue;
        }
        let score = sni.and_then(|sni| names.iter().filter_map(|p| sni_score(p, sni)).max());
        if let Some(score) = score {
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, t));
            }
        }
    }
    best.map(|(_, t)| t).or(without_names)
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

/// The cluster a connection to `dst` (service `dialed`) goes to under `route`: the service's
/// own, or one of the route's destinations drawn by weight; a black hole (or a passthrough,
/// which a VIP has nowhere to pass to) is refused.
pub fn chosen_cluster<'t>(
    table: &'t Table,
    subject: &Subject,
    route: &Route<'_>,
    dialed: &'t Arc<Service>,
    dialed_port: &'t ServicePort,
    dst: SocketAddr,
) -> Result<Cluster<'t>, NoRoute> {
    match route.target.as_ref() {
        Target::Service => Ok(service_cluster(table, subject, dialed, dialed_port)),
        Target::Clusters(ds) => pick(ds)
            .ok_or_else(|| NoRoute::NoCluster {
                cluster: "(a route without destinations)".into(),
            })
            .and_then(|d| cluster(table, subject, d, dst.port())),
        Target::BlackHole | Target::Passthrough => Err(NoRoute::BlackHole {
            by: route.by.clone(),
        }),
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
    // The file source's rules for this VM, looked up once for the subset and the policy.
    let rules = if svc.policies.is_none() && table.traffic.may_have_rule(&svc.host) {
        destination_rules(table, subject, &svc.host, &svc.namespace)
    } else {
        Vec::new()
    };
    let endpoints = if dest.subset.is_empty() {
        Cow::Borrowed(svc.endpoints_for(port))
    } else if !svc.subsets.is_empty() {
        Cow::Borrowed(
            svc.given_subset(port.number, &dest.subset)
                .ok_or_else(|| no_cluster(number))?,
        )
    } else {
        let (labels, _) = subset_labels(&rules, &dest.subset).ok_or_else(|| no_cluster(number))?;
        Cow::Owned(
            svc.endpoints_for(port)
                .iter()
                .filter(|w| selects(labels, &w.labels))
                .cloned()
                .collect(),
        )
    };
    let policy = match &svc.policies {
        Some(_) => policy_of(table, subject, svc, port.number, &dest.subset),
        None => rules
            .first()
            .map(|d| d.policy(port.number, &dest.subset))
            .unwrap_or_default(),
    };
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
    use crate::mesh::traffic::{Subset, TcpRule, TlsRule};
    use crate::mesh::{Resources, ServiceDecl};

    fn table(vs: Vec<VirtualService>, dr: Vec<DestinationRule>) -> Table {
        table_with(vs, dr, "HTTP")
    }

    fn table_with(vs: Vec<VirtualService>, dr: Vec<DestinationRule>, protocol: &str) -> Table {
        let mut decl = crate::mesh::table_tests::product();
        decl.addresses = vec!["10.96.0.20".parse().unwrap()];
        decl.ports[0].protocol = protocol.into();
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
                        headers: None,
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
                            headers: None,
                        },
                        Destination {
                            host: Host::new("product.default.svc.cluster.local"),
                            subset: "v2".into(),
                            port: None,
                            weight: 20,
                            headers: None,
                        },
                    ],
                },
            ],
            tls: vec![],
            http: vec![],
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
        let r = route(&t, &Subject::default(), &svc, dst(), None);
        assert_eq!(
            r.by,
            RouteBy::VirtualService {
                name: "default/product".into(),
                rule: 1,
                kind: RuleKind::Tcp,
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
            route(&t, &canary, &svc, dst(), None).by,
            RouteBy::VirtualService {
                name: "default/product".into(),
                rule: 0,
                kind: RuleKind::Tcp,
            }
        );
        // Without the DestinationRule the subsets do not exist.
        let bare = table(vec![split(&[])], vec![]);
        let r = route(&bare, &Subject::default(), &svc, dst(), None);
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
            route(&none, &Subject::default(), &svc, dst(), None).by,
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
        assert_eq!(route(&t, &other, &svc, dst(), None).by, RouteBy::Service);
        let mut gw = split(&[]);
        gw.gateways = vec!["istio-system/ingress".into()];
        let t = table(vec![gw], vec![subsets()]);
        assert_eq!(
            route(&t, &Subject::default(), &svc, dst(), None).by,
            RouteBy::Service
        );
    }

    fn by_sni(sni: &[&str], subset: &str) -> TlsRule {
        TlsRule {
            matches: vec![TlsMatch {
                sni_hosts: sni.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }],
            destinations: vec![Destination {
                host: Host::new("product"),
                subset: subset.into(),
                port: None,
                weight: 100,
                headers: None,
            }],
        }
    }

    #[test]
    fn tls_rules_route_by_sni_as_envoy_picks_server_names() {
        let mut vs = split(&[]);
        vs.hosts = vec![Host::new("*.example.com"), Host::new("product")];
        vs.tls = vec![
            by_sni(&["*.example.com"], "v2"),
            by_sni(&["api.example.com"], "v1"),
            // Same runtime match as the first: never reached (istiod drops it).
            by_sni(&["*.example.com"], "v3"),
        ];
        let t = table_with(vec![vs.clone()], vec![subsets()], "TLS");
        let svc = t.service_for(dst()).unwrap().0.clone();
        let s = Subject::default();
        assert!(needs_sni(&t, &s, &svc, dst()));
        let subset_for = |sni: Option<&str>| {
            let r = route(&t, &s, &svc, dst(), sni);
            match r.target.as_ref() {
                Target::Clusters(ds) => ds[0].subset.clone(),
                other => format!("{other:?} by {}", r.by),
            }
        };
        // Exact beats a wildcard listed before it; a wildcard covers deeper names.
        assert_eq!(subset_for(Some("api.example.com")), "v1");
        assert_eq!(subset_for(Some("web.example.com")), "v2");
        assert_eq!(subset_for(Some("a.b.example.com")), "v2");
        // No chain for this SNI, or no TLS at all: refused, as Envoy closes it.
        assert!(subset_for(Some("example.org")).starts_with("BlackHole"));
        assert!(subset_for(None).contains("no VirtualService tls rule"));
        // On a TCP port the tls rules do not exist (the tcp ones do: the first applies).
        let tcp = table_with(vec![vs], vec![subsets()], "TCP");
        let svc = tcp.service_for(dst()).unwrap().0.clone();
        assert!(!needs_sni(&tcp, &s, &svc, dst()));
        assert_eq!(
            route(&tcp, &s, &svc, dst(), Some("api.example.com")).by,
            RouteBy::VirtualService {
                name: "default/product".into(),
                rule: 0,
                kind: RuleKind::Tcp,
            }
        );
    }

    #[test]
    fn sni_scores_rank_exact_then_longest_wildcard() {
        assert_eq!(
            sni_score("a.example.com", "A.example.com"),
            Some(usize::MAX)
        );
        assert!(
            sni_score("*.b.example.com", "a.b.example.com")
                > sni_score("*.example.com", "a.b.example.com")
        );
        assert_eq!(sni_score("*.example.com", "example.com"), None);
        assert_eq!(sni_score("*example.com", "aexample.com"), None);
    }
}
