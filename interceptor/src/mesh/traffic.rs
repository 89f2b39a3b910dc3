//! The mesh's traffic intent: VirtualService routes and DestinationRule subsets, as the mesh
//! files give them (`networking.istio.io` v1, v1beta1, v1alpha3), and the routes istiod already
//! evaluated for this proxy (its `<VIP>_<port>` listeners). Which of them applies to a
//! connection, and where it goes, is `route::traffic`'s; this module reads and checks them.
//!
//! I: istio/api networking/v1alpha3 virtual_service.proto, destination_rule.proto (fields);
//! pilot/pkg/networking/core/tls.go `buildSidecarOutboundTCPFilterChainOpts` (TCP routes);
//! pilot/pkg/model/service.go `ResolveShortnameToFQDN` (short hosts).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use super::model::Host;
use super::networks::Cidr;

/// One destination of a route: a cluster (service host, port, subset) and its weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub host: Host,
    /// Empty: the whole service.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    /// None: the port the connection was made to (Istio: the listener's port, or the
    /// service's only port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative (Envoy's weighted clusters); Istio's are percentages.
    pub weight: u32,
}

/// Where a route's connections go when it names no service (istiod's catch-all clusters).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Clusters(Vec<Destination>),
    /// `BlackHoleCluster`: refused.
    BlackHole,
    /// `PassthroughCluster`: to where the application was connecting, as is.
    Passthrough,
}

/// A VirtualService `tcp[].match[]` entry, as far as a sidecar evaluates it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TcpMatch {
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    /// Empty: `mesh` (the VirtualService's own gateways, else mesh).
    pub gateways: Vec<String>,
    pub destination_subnets: Vec<Cidr>,
}

/// One `tcp[]` rule: it applies when any of its matches does (or it has none).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpRule {
    pub matches: Vec<TcpMatch>,
    pub destinations: Vec<Destination>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualService {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    /// As written until `resolve` (the table does it): then a short host is a service of the
    /// VirtualService's namespace, as in Istio.
    pub hosts: Vec<Host>,
    /// Empty: every namespace (Istio's default `*`).
    pub export_to: Vec<String>,
    pub gateways: Vec<String>,
    pub tcp: Vec<TcpRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRule {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub host: Host,
    pub export_to: Vec<String>,
    pub subsets: Vec<Subset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// A route istiod computed for this proxy: the TCP proxy of its `<VIP>_<port>` listener (or of
/// `virtualOutbound`'s catch-all), rules in chain order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerRoute {
    /// The listener's name (`10.96.0.20_5432`, `virtualOutbound`).
    pub listener: String,
    /// Where the listener takes connections (None: `virtualOutbound`, everything else).
    pub address: Option<SocketAddr>,
    pub rules: Vec<ListenerRule>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerRule {
    /// The chain's `prefix_ranges` (a VirtualService's destinationSubnets); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<Cidr>,
    pub target: Target,
    /// The VirtualService istiod made it from (`/apis/.../virtual-service/<name>`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// Istio's `ResolveShortnameToFQDN`: a host without a dot is a service of `namespace`.
pub fn resolve_host(host: &str, namespace: &str, cluster_domain: &str) -> Host {
    if host.contains('.') || host == "*" {
        Host::new(host)
    } else {
        Host::new(&format!("{host}.{namespace}.svc.{cluster_domain}"))
    }
}

impl VirtualService {
    /// Short hosts (its own and its destinations') as services of its namespace.
    pub fn resolve(&mut self, cluster_domain: &str) {
        let ns = &self.namespace;
        for h in &mut self.hosts {
            *h = resolve_host(h.as_str(), ns, cluster_domain);
        }
        for d in self.tcp.iter_mut().flat_map(|r| &mut r.destinations) {
            d.host = resolve_host(d.host.as_str(), ns, cluster_domain);
        }
    }
}

impl DestinationRule {
    pub fn resolve(&mut self, cluster_domain: &str) {
        self.host = resolve_host(self.host.as_str(), &self.namespace, cluster_domain);
    }
}

/// Is a resource of `namespace` with `export_to` visible from `from`?
pub fn visible(namespace: &str, export_to: &[String], from: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == from || (e == "." && namespace == from))
}

/// A problem in one field of a VirtualService or DestinationRule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct VirtualServiceSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    export_to: Vec<String>,
    #[serde(default)]
    tcp: Vec<TcpRouteSpec>,
    /// Read by the HTTP data path (not yet): kept so the document is not refused.
    #[serde(default)]
    pub(super) http: Vec<Value>,
    #[serde(default)]
    pub(super) tls: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpRouteSpec {
    #[serde(default, rename = "match")]
    matches: Vec<TcpMatchSpec>,
    #[serde(default)]
    route: Vec<RouteDestinationSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpMatchSpec {
    #[serde(default)]
    destination_subnets: Vec<String>,
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    source_namespace: Option<String>,
    /// Deprecated in istio/api; refused as istiod's validation does not use it for sidecars.
    #[serde(default)]
    source_subnet: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteDestinationSpec {
    destination: DestinationSpec,
    weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DestinationSpec {
    host: String,
    subset: Option<String>,
    port: Option<PortSelectorSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSelectorSpec {
    number: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DestinationRuleSpec {
    host: String,
    #[serde(default)]
    subsets: Vec<SubsetSpec>,
    #[serde(default)]
    export_to: Vec<String>,
    /// Connection pool, load balancer, outlier detection, TLS: not yet honoured (logged).
    pub(super) traffic_policy: Option<Value>,
    pub(super) workload_selector: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsetSpec {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(rename = "trafficPolicy")]
    traffic_policy: Option<Value>,
}

fn port(field: String, p: u32) -> Result<u16, Invalid> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(field, format!("{p} is not a port (1-65535)")))
}

fn destinations(at: &str, route: Vec<RouteDestinationSpec>) -> Result<Vec<Destination>, Invalid> {
    if route.is_empty() {
        return Err(invalid(format!("{at}.route"), "at least one destination"));
    }
    let single = route.len() == 1;
    let mut out = Vec::new();
    for (j, r) in route.into_iter().enumerate() {
        let field = format!("{at}.route[{j}]");
        let weight = match r.weight {
            // Istio: a lone destination takes everything; among several, an unset weight is 0.
            None if single => 100,
            None => 0,
            Some(w) => u32::try_from(w)
                .map_err(|_| invalid(format!("{field}.weight"), "must be 0 or more"))?,
        };
        let host = r.destination.host;
        if host.is_empty() || host.starts_with('*') {
            return Err(invalid(
                format!("{field}.destination.host"),
                "a service host is required (no wildcards)",
            ));
        }
        let port = r
            .destination
            .port
            .map(|p| port(format!("{field}.destination.port.number"), p.number))
            .transpose()?;
        out.push(Destination {
            host: Host::new(&host),
            subset: r.destination.subset.unwrap_or_default(),
            port,
            weight,
        });
    }
    if out.iter().all(|d| d.weight == 0) {
        return Err(invalid(
            format!("{at}.route"),
            "the weights add up to 0: nothing would be routed",
        ));
    }
    // Istio drops destinations of weight 0 (networkfilter.go).
    out.retain(|d| d.weight > 0);
    Ok(out)
}

pub(super) fn virtual_service(
    name: String,
    namespace: String,
    created: Option<String>,
    spec: VirtualServiceSpec,
) -> Result<VirtualService, Invalid> {
    if spec.hosts.is_empty() {
        return Err(invalid("hosts", "at least one host is required"));
    }
    let hosts = spec.hosts.iter().map(|h| Host::new(h)).collect();
    let mut tcp = Vec::new();
    for (i, r) in spec.tcp.into_iter().enumerate() {
        let at = format!("tcp[{i}]");
        let mut matches = Vec::new();
        for (k, m) in r.matches.into_iter().enumerate() {
            let field = format!("{at}.match[{k}]");
            if m.source_subnet.is_some() {
                return Err(invalid(
                    format!("{field}.sourceSubnet"),
                    "not supported (deprecated in Istio); use an AuthorizationPolicy",
                ));
            }
            let mut subnets = Vec::new();
            for (n, s) in m.destination_subnets.iter().enumerate() {
                subnets.push(Cidr::parse(s).map_err(|e| {
                    invalid(format!("{field}.destinationSubnets[{n}]"), e.to_string())
                })?);
            }
            matches.push(TcpMatch {
                port: m
                    .port
                    .map(|p| port(format!("{field}.port"), p))
                    .transpose()?,
                source_labels: m.source_labels,
                source_namespace: m.source_namespace,
                gateways: m.gateways,
                destination_subnets: subnets,
            });
        }
        let destinations = destinations(&at, r.route)?;
        tcp.push(TcpRule {
            matches,
            destinations,
        });
    }
    Ok(VirtualService {
        name: format!("{namespace}/{name}"),
        namespace,
        hosts,
        export_to: spec.export_to,
        gateways: spec.gateways,
        tcp,
        created,
    })
}

pub(super) fn destination_rule(
    name: String,
    namespace: String,
    created: Option<String>,
    spec: DestinationRuleSpec,
) -> Result<DestinationRule, Invalid> {
    if spec.host.is_empty() {
        return Err(invalid("host", "a service host is required"));
    }
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.into_iter().enumerate() {
        if s.name.is_empty() || s.name.contains('|') {
            return Err(invalid(
                format!("subsets[{i}].name"),
                "a non-empty name without '|' is required",
            ));
        }
        if subsets.iter().any(|o| o.name == s.name) {
            return Err(invalid(
                format!("subsets[{i}].name"),
                format!("subset {:?} defined twice", s.name),
            ));
        }
        if s.traffic_policy.is_some() {
            tracing::warn!(rule = %format!("{namespace}/{name}"), subset = %s.name, "subset trafficPolicy is not honoured yet; the subset's endpoints are");
        }
        subsets.push(Subset {
            name: s.name,
            labels: s.labels,
        });
    }
    Ok(DestinationRule {
        name: format!("{namespace}/{name}"),
        host: Host::new(&spec.host),
        namespace,
        export_to: spec.export_to,
        subsets,
        created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(yaml: &str) -> Result<VirtualService, Invalid> {
        let spec: VirtualServiceSpec = serde_yaml_ng::from_str(yaml).unwrap();
        let mut v = virtual_service("pg".into(), "db".into(), None, spec)?;
        v.resolve("cluster.local");
        Ok(v)
    }

    #[test]
    fn tcp_routes_resolve_short_hosts_and_drop_zero_weights() {
        let v = vs("hosts: [pg]\ntcp:\n- route:\n  - destination: {host: pg, subset: v1}\n    weight: 100\n  - destination: {host: pg.other.svc.cluster.local, subset: v2, port: {number: 5433}}\n    weight: 0\n").unwrap();
        assert_eq!(v.hosts, vec![Host::new("pg.db.svc.cluster.local")]);
        assert_eq!(v.tcp[0].destinations.len(), 1);
        assert_eq!(v.tcp[0].destinations[0].subset, "v1");
        let lone = vs("hosts: [pg]\ntcp:\n- route:\n  - destination: {host: pg}\n").unwrap();
        assert_eq!(lone.tcp[0].destinations[0].weight, 100);
    }

    #[test]
    fn bad_routes_are_refused_with_the_field() {
        let e = vs("hosts: [pg]\ntcp:\n- route:\n  - destination: {host: a}\n    weight: 0\n  - destination: {host: b}\n").unwrap_err();
        assert_eq!(e.field, "tcp[0].route");
        let e = vs(
            "hosts: [pg]\ntcp:\n- match: [{port: 70000}]\n  route: [{destination: {host: a}}]\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "tcp[0].match[0].port");
        assert!(vs("hosts: []\n").is_err());
    }

    #[test]
    fn visibility_follows_export_to() {
        assert!(visible("a", &[], "b"));
        assert!(visible("a", &[".".into()], "a"));
        assert!(!visible("a", &[".".into()], "b"));
        assert!(visible("a", &["b".into()], "b"));
        assert!(visible("a", &["*".into()], "c"));
    }
}
