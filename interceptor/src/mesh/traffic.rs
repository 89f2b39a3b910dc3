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
    /// An HTTP route destination's own header operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Box<super::http_route::DestinationHeaders>>,
}

/// Where a route's connections go when it names no service (istiod's catch-all clusters).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The service the connection was made to, as it is (no route says otherwise).
    Service,
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

/// A VirtualService `tls[].match[]` entry: `sni_hosts` (and destination subnets) are checked on
/// each connection's ClientHello; the rest against this VM, as istiod's `matchTLS` does.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TlsMatch {
    /// Exact names, or `*.suffix`.
    pub sni_hosts: Vec<String>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    pub destination_subnets: Vec<Cidr>,
}

/// One `tls[]` rule (only on a service's TLS/HTTPS ports, as in Istio).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TlsRule {
    pub matches: Vec<TlsMatch>,
    pub destinations: Vec<Destination>,
}

/// Does the SNI `name` match `pattern` (exact, or `*.suffix` for any name under it)? The
/// score says how specific the match is (Envoy's server_names: exact first, then the
/// longest wildcard).
pub fn sni_score(pattern: &str, name: &str) -> Option<usize> {
    if pattern.eq_ignore_ascii_case(name) {
        return Some(usize::MAX);
    }
    let suffix = pattern.strip_prefix('*')?;
    (suffix.starts_with('.')
        && name.len() > suffix.len()
        && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix))
    .then_some(suffix.len())
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsRule>,
    /// Only on a service's HTTP ports (as istiod builds RDS for them alone).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<super::http_route::HttpRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy block by block.
    #[serde(skip_serializing_if = "Policies::is_empty")]
    pub policy: Policies,
}

/// How connections to a cluster's endpoints are made: what a DestinationRule's (or istiod's
/// cluster's) traffic policy says at L4. Unset: the defaults (least request, no limit, the
/// daemon's connect timeout, our own failed-last rule).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// connectionPool: one block (a subset's replaces the rule's whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierDetection>,
    /// `tls`: None is Istio's auto mTLS (mTLS to endpoints that speak it, else plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// `loadBalancer.localityLbSetting` (part of the loadBalancer block). None: the mesh's
    /// default, locality failover on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalityLb>,
}

/// Locality load balancing: with outlier detection set, endpoints are tried by how close their
/// locality is to this VM's (same region/zone/subzone first, then zone, region, elsewhere),
/// as istiod prioritises them for a sidecar (I: pilot/pkg/networking/core/loadbalancer
/// `applyLocalityFailover`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalityLb {
    pub enabled: bool,
    /// `failover`: (from region, to region): from `from`, only `to` is a fallback beyond it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<(String, String)>,
}

/// A DestinationRule's `tls.mode` (I: destination_rule.proto `ClientTLSSettings.TLSmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Plaintext, even to endpoints that speak mTLS.
    Disable,
    /// TLS origination: the server's certificate checked against a CA bundle.
    Simple,
    /// TLS origination presenting a client certificate from files.
    Mutual,
    /// Istio's mTLS to every endpoint, sidecar or not.
    IstioMutual,
}

impl TlsMode {
    /// As Istio spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "DISABLE",
            TlsMode::Simple => "SIMPLE",
            TlsMode::Mutual => "MUTUAL",
            TlsMode::IstioMutual => "ISTIO_MUTUAL",
        }
    }
}

/// How connections to a cluster are secured when a DestinationRule (or istiod's cluster) says:
/// what `ClientTLSSettings` gives a sidecar. Files are read when a connection needs them (and
/// again when they change), so a rotated client certificate takes effect without a reload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UpstreamTls {
    pub mode: TlsMode,
    /// SIMPLE/MUTUAL: None sends the service's host name (Envoy's auto_sni does so for HTTP; a
    /// TCP proxy would send none, which most TLS servers refuse). ISTIO_MUTUAL: None is Istio's
    /// `outbound_.P_.SUBSET_.HOST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The server must present one of these (exact, DNS or URI SAN). Empty: SIMPLE/MUTUAL check
    /// the SNI as a host name, ISTIO_MUTUAL the service accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// PEM roots; None: the system bundle (Istio's `system`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

impl UpstreamTls {
    pub fn mode(mode: TlsMode) -> Self {
        Self {
            mode,
            sni: None,
            subject_alt_names: Vec::new(),
            ca_certificates: None,
            client_certificate: None,
            private_key: None,
            insecure_skip_verify: false,
        }
    }

    /// Whether we originate TLS ourselves (SIMPLE, MUTUAL) rather than speak Istio's mTLS.
    pub fn originates(&self) -> bool {
        matches!(self.mode, TlsMode::Simple | TlsMode::Mutual)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancer {
    /// Istio's default: of two endpoints drawn by weight, the one with fewer connections.
    LeastRequest,
    RoundRobin,
    Random,
    /// consistentHash on the client's address (the only hash Istio gives TCP).
    SourceIpHash,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Connections open to the cluster at once; beyond, refused (Envoy's UO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Requests waiting for a connection at once (`http1MaxPendingRequests`); beyond: 503 UO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the cluster at once (`http2MaxRequests`; Envoy applies it to
    /// every protocol); beyond: 503 UO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight to the cluster at once (`maxRetries`); beyond, a request is not
    /// retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Requests one upstream connection carries before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// An upstream HTTP connection idle this long is closed (Envoy's default: 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// How requests go upstream where the port's declared protocol does not say HTTP/2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamProtocol>,
}

/// The DestinationRule's choice of upstream HTTP protocol (istiod's `setUpstreamProtocol`,
/// sheet 7.2): `useClientProtocol` (Envoy's `use_downstream_protocol_config`) or
/// `h2UpgradePolicy: UPGRADE` (HTTP/2 to every endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    AsClient,
    Http2,
}

impl Pool {
    /// Whether a limit only the HTTP data path can keep is set (so an HTTP port with it is
    /// served per request even where no VirtualService routes it).
    pub fn limits_requests(&self) -> bool {
        self.max_pending_requests.is_some()
            || self.max_requests.is_some()
            || self.max_retries.is_some()
            || self.max_requests_per_connection.is_some()
            || self.idle_timeout_ms.is_some()
    }

    /// Whether anything is set at all (istiod writes a cluster's breakers on every cluster).
    pub fn is_set(&self) -> bool {
        self.max_connections.is_some()
            || self.connect_timeout_ms.is_some()
            || self.limits_requests()
            || self.upstream.is_some()
    }
}

/// Envoy's outlier detection as a TCP proxy sees it: failures to connect in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlierDetection {
    /// Consecutive failures that eject (0: never).
    pub consecutive_errors: u32,
    /// Ejected for this long times the times ejected in a row (at most 300 s).
    pub base_ejection_ms: u64,
    /// At most this share of the cluster's endpoints ejected at once (Istio's and Envoy's
    /// default: 10 %, so a cluster of fewer than ten endpoints ejects none unless raised).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

/// Envoy's `max_ejection_percent` default, which istiod leaves in place unless the rule sets it.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

fn default_max_ejection_percent() -> u32 {
    DEFAULT_MAX_EJECTION_PERCENT
}

/// A rule's policy and its per-port replacements (portLevelSettings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policies {
    #[serde(default)]
    pub all: TrafficPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<(u16, TrafficPolicy)>,
}

impl Policies {
    pub fn is_empty(&self) -> bool {
        *self == Policies::default()
    }

    /// Istio's `GetPortLevelTrafficPolicy`: a port's settings replace the rule's entirely.
    pub fn for_port(&self, port: u16) -> &TrafficPolicy {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(&self.all, |(_, t)| t)
    }
}

impl TrafficPolicy {
    /// Istio's `MergeSubsetTrafficPolicy`: the subset's blocks over the rule's.
    pub fn merged_with(&self, subset: &TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: subset.load_balancer.or(self.load_balancer),
            pool: subset.pool.or(self.pool),
            outlier: subset.outlier.or(self.outlier),
            tls: subset.tls.clone().or_else(|| self.tls.clone()),
            // Part of the loadBalancer block: replaced with it.
            locality: if subset.load_balancer.is_some() || subset.locality.is_some() {
                subset.locality.clone()
            } else {
                self.locality.clone()
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRule {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub host: Host,
    pub export_to: Vec<String>,
    pub subsets: Vec<Subset>,
    #[serde(skip_serializing_if = "Policies::is_empty")]
    pub policy: Policies,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

impl DestinationRule {
    /// The policy for `port` of `subset` ("" for the service itself).
    pub fn policy(&self, port: u16, subset: &str) -> TrafficPolicy {
        let base = self.policy.for_port(port);
        match self.subsets.iter().find(|s| s.name == subset) {
            Some(s) if !s.policy.is_empty() => base.merged_with(s.policy.for_port(port)),
            _ => base.clone(),
        }
    }
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
    /// The chain's `server_names` (a VirtualService's tls sniHosts); empty: any SNI or none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
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
        let tcp = self.tcp.iter_mut().flat_map(|r| &mut r.destinations);
        let tls = self.tls.iter_mut().flat_map(|r| &mut r.destinations);
        let http = self.http.iter_mut().flat_map(|r| r.destinations_mut());
        for d in tcp.chain(tls).chain(http) {
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

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
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
    #[serde(default)]
    tls: Vec<TlsRouteSpec>,
    #[serde(default)]
    http: Vec<super::http_route::HttpRouteSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsRouteSpec {
    #[serde(default, rename = "match")]
    matches: Vec<TlsMatchSpec>,
    #[serde(default)]
    route: Vec<RouteDestinationSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsMatchSpec {
    #[serde(default)]
    sni_hosts: Vec<String>,
    #[serde(default)]
    destination_subnets: Vec<String>,
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    source_namespace: Option<String>,
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
pub(super) struct RouteDestinationSpec {
    pub(super) destination: DestinationSpec,
    pub(super) weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DestinationSpec {
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
    pub(super) traffic_policy: Option<TrafficPolicySpec>,
    pub(super) workload_selector: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct TrafficPolicySpec {
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierSpec>,
    #[serde(default)]
    port_level_settings: Vec<PortTrafficPolicySpec>,
    tls: Option<TlsSettingsSpec>,
    /// Read so the document is not refused; not honoured yet (logged).
    pub(super) tunnel: Option<Value>,
    pub(super) proxy_protocol: Option<Value>,
    pub(super) retry_budget: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortTrafficPolicySpec {
    port: Option<PortSelectorSpec>,
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierSpec>,
    tls: Option<TlsSettingsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsSettingsSpec {
    mode: Option<String>,
    client_certificate: Option<String>,
    private_key: Option<String>,
    ca_certificates: Option<String>,
    credential_name: Option<String>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    sni: Option<String>,
    insecure_skip_verify: Option<bool>,
    ca_crl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoadBalancerSpec {
    simple: Option<String>,
    consistent_hash: Option<ConsistentHashSpec>,
    locality_lb_setting: Option<Value>,
    warmup_duration_secs: Option<Value>,
    warmup: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConsistentHashSpec {
    use_source_ip: Option<bool>,
    http_header_name: Option<String>,
    http_cookie: Option<Value>,
    http_query_parameter_name: Option<String>,
    ring_hash: Option<Value>,
    maglev: Option<Value>,
    minimum_ring_size: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionPoolSpec {
    tcp: Option<TcpPoolSpec>,
    http: Option<HttpPoolSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpPoolSpec {
    http1_max_pending_requests: Option<i64>,
    http2_max_requests: Option<i64>,
    max_requests_per_connection: Option<i64>,
    max_retries: Option<i64>,
    idle_timeout: Option<String>,
    h2_upgrade_policy: Option<String>,
    use_client_protocol: Option<bool>,
    max_concurrent_streams: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpPoolSpec {
    max_connections: Option<i64>,
    connect_timeout: Option<String>,
    tcp_keepalive: Option<Value>,
    max_connection_duration: Option<Value>,
    idle_timeout: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierSpec {
    consecutive_errors: Option<i64>,
    consecutive_gateway_errors: Option<u32>,
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<i64>,
    min_health_percent: Option<i64>,
    split_external_local_origin_errors: Option<bool>,
    consecutive_local_origin_failures: Option<u32>,
}

/// A protobuf duration as Istio writes it: `10s`, `1.5s`, `100ms`, `1m`, `1h30m`.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, ms) = [
            ("ms", 1.0),
            ("h", 3_600_000.0),
            ("m", 60_000.0),
            ("s", 1000.0),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))?;
        rest = &rest[unit.len()..];
        total += value * ms;
    }
    Some(total.round() as u64)
}

pub(super) fn duration(field: String, s: &str) -> Result<u64, Invalid> {
    parse_duration_ms(s)
        .ok_or_else(|| invalid(field, format!("{s:?} is not a duration (10s, 1.5s, 100ms)")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalityLbSpec {
    enabled: Option<bool>,
    #[serde(default)]
    distribute: Vec<Value>,
    #[serde(default)]
    failover: Vec<FailoverSpec>,
    #[serde(default)]
    failover_priority: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverSpec {
    from: String,
    to: String,
}

/// `localityLbSetting`, checked as Istio's validation does (validateLocalityLbSetting:
/// distribute and failover are exclusive; a failover goes to another region).
fn locality_lb(at: &str, v: Option<&Value>) -> Result<Option<LocalityLb>, Invalid> {
    let Some(v) = v else {
        return Ok(None);
    };
    let field = format!("{at}.loadBalancer.localityLbSetting");
    let spec: LocalityLbSpec =
        serde_yaml_ng::from_value(v.clone()).map_err(|e| invalid(field.clone(), e.to_string()))?;
    if !spec.distribute.is_empty() && !spec.failover.is_empty() {
        return Err(invalid(field, "distribute and failover cannot both be set"));
    }
    for (i, f) in spec.failover.iter().enumerate() {
        if f.from == f.to {
            return Err(invalid(
                format!("{field}.failover[{i}]"),
                "from and to must be different regions",
            ));
        }
    }
    if !spec.distribute.is_empty() || !spec.failover_priority.is_empty() {
        tracing::warn!(at = %field, "localityLbSetting distribute/failoverPriority are not honoured yet (failover by locality is)");
    }
    Ok(Some(LocalityLb {
        enabled: spec.enabled.unwrap_or(true),
        failover: spec.failover.into_iter().map(|f| (f.from, f.to)).collect(),
    }))
}

fn load_balancer(at: &str, lb: LoadBalancerSpec) -> Result<Option<LoadBalancer>, Invalid> {
    if let Some(hash) = lb.consistent_hash {
        let http_key = hash.http_header_name.is_some()
            || hash.http_cookie.is_some()
            || hash.http_query_parameter_name.is_some();
        if hash.use_source_ip == Some(true) && !http_key {
            if hash.ring_hash.is_some() || hash.maglev.is_some() || hash.minimum_ring_size.is_some()
            {
                tracing::debug!(
                    at,
                    "consistentHash table settings: a rendezvous hash needs none"
                );
            }
            return Ok(Some(LoadBalancer::SourceIpHash));
        }
        return Err(invalid(
            format!("{at}.loadBalancer.consistentHash"),
            "only useSourceIp is supported at L4 (a header, cookie or query hash needs the HTTP data path)",
        ));
    }
    if lb.warmup.is_some() || lb.warmup_duration_secs.is_some() {
        tracing::warn!(at, "loadBalancer warmup is not honoured yet");
    }
    Ok(match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") => None,
        Some("LEAST_REQUEST" | "LEAST_CONN") => Some(LoadBalancer::LeastRequest),
        Some("ROUND_ROBIN") => Some(LoadBalancer::RoundRobin),
        Some("RANDOM") => Some(LoadBalancer::Random),
        Some("PASSTHROUGH") => {
            return Err(invalid(
                format!("{at}.loadBalancer.simple"),
                "PASSTHROUGH is not supported: the VM routes to the mesh's endpoints",
            ))
        }
        Some(other) => {
            return Err(invalid(
                format!("{at}.loadBalancer.simple"),
                format!("unknown policy {other:?}"),
            ))
        }
    })
}

fn pool(at: &str, p: ConnectionPoolSpec) -> Result<Option<Pool>, Invalid> {
    let mut pool = match p.tcp {
        Some(tcp) => tcp_pool(at, tcp)?,
        None => Pool::default(),
    };
    if let Some(http) = p.http {
        http_pool(at, http, &mut pool)?;
    }
    Ok(pool.is_set().then_some(pool))
}

/// `connectionPool.http` as istiod's `applyConnectionPool` reads it: a count of 0 (proto3's
/// unset) leaves Envoy's unlimited default; a negative one is refused (Istio's validation).
fn http_pool(at: &str, h: HttpPoolSpec, pool: &mut Pool) -> Result<(), Invalid> {
    let count = |name: &str, v: Option<i64>| -> Result<Option<u32>, Invalid> {
        match v {
            None | Some(0) => Ok(None),
            Some(n) if n > 0 => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
            Some(_) => Err(invalid(
                format!("{at}.connectionPool.http.{name}"),
                "must be 0 or more",
            )),
        }
    };
    pool.max_pending_requests = count("http1MaxPendingRequests", h.http1_max_pending_requests)?;
    pool.max_requests = count("http2MaxRequests", h.http2_max_requests)?;
    pool.max_requests_per_connection =
        count("maxRequestsPerConnection", h.max_requests_per_connection)?;
    pool.max_retries = count("maxRetries", h.max_retries)?;
    pool.idle_timeout_ms = h
        .idle_timeout
        .map(|t| duration(format!("{at}.connectionPool.http.idleTimeout"), &t))
        .transpose()?
        .filter(|ms| *ms > 0);
    // istiod: useClientProtocol before h2UpgradePolicy; DO_NOT_UPGRADE and DEFAULT (the
    // mesh's, DO_NOT_UPGRADE unless set) leave the port's protocol.
    pool.upstream = match (h.use_client_protocol, h.h2_upgrade_policy.as_deref()) {
        (Some(true), _) => Some(UpstreamProtocol::AsClient),
        (_, Some("UPGRADE")) => Some(UpstreamProtocol::Http2),
        (_, None | Some("DEFAULT" | "DO_NOT_UPGRADE")) => None,
        (_, Some(other)) => {
            return Err(invalid(
                format!("{at}.connectionPool.http.h2UpgradePolicy"),
                format!("unknown policy {other:?} (DEFAULT, DO_NOT_UPGRADE, UPGRADE)"),
            ))
        }
    };
    if h.max_concurrent_streams.is_some() {
        tracing::warn!(
            at,
            "connectionPool.http maxConcurrentStreams is not honoured yet"
        );
    }
    Ok(())
}

fn tcp_pool(at: &str, tcp: TcpPoolSpec) -> Result<Pool, Invalid> {
    if tcp.tcp_keepalive.is_some()
        || tcp.max_connection_duration.is_some()
        || tcp.idle_timeout.is_some()
    {
        tracing::warn!(at, "connectionPool.tcp tcpKeepalive/maxConnectionDuration/idleTimeout are not honoured yet");
    }
    let max_connections = match tcp.max_connections {
        None => None,
        Some(n) if n > 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        Some(_) => {
            return Err(invalid(
                format!("{at}.connectionPool.tcp.maxConnections"),
                "must be 1 or more",
            ))
        }
    };
    let connect_timeout_ms = tcp
        .connect_timeout
        .map(|t| duration(format!("{at}.connectionPool.tcp.connectTimeout"), &t))
        .transpose()?;
    Ok(Pool {
        max_connections,
        connect_timeout_ms,
        ..Pool::default()
    })
}

/// As istiod's `applyOutlierDetection` reads it for a TCP cluster: consecutive5xxErrors (or
/// the deprecated consecutiveErrors) counts failed connections; Envoy's defaults otherwise.
fn outlier(at: &str, o: OutlierSpec) -> Result<OutlierDetection, Invalid> {
    let consecutive = match (o.consecutive_5xx_errors, o.consecutive_errors) {
        (Some(n), _) => n,
        (None, Some(n)) => u32::try_from(n).map_err(|_| {
            invalid(
                format!("{at}.outlierDetection.consecutiveErrors"),
                "must be 0 or more",
            )
        })?,
        // Envoy's default when the rule sets outlierDetection without a count.
        (None, None) => 5,
    };
    if o.consecutive_gateway_errors.is_some()
        || o.split_external_local_origin_errors.is_some()
        || o.min_health_percent.is_some()
        || o.interval.is_some()
        || o.consecutive_local_origin_failures.is_some()
    {
        tracing::debug!(at, "outlierDetection: interval, minHealthPercent and the gateway/local-origin counts are not used at L4");
    }
    let max_ejection_percent = match o.max_ejection_percent {
        None => DEFAULT_MAX_EJECTION_PERCENT,
        Some(p) => u32::try_from(p).ok().filter(|p| *p <= 100).ok_or_else(|| {
            invalid(
                format!("{at}.outlierDetection.maxEjectionPercent"),
                format!("{p} is not a percentage (0-100)"),
            )
        })?,
    };
    let base_ejection_ms = o
        .base_ejection_time
        .map(|t| duration(format!("{at}.outlierDetection.baseEjectionTime"), &t))
        .transpose()?
        .unwrap_or(30_000);
    Ok(OutlierDetection {
        consecutive_errors: consecutive,
        base_ejection_ms,
        max_ejection_percent,
    })
}

/// `ClientTLSSettings` checked as Istio's validation does (validateTLS): MUTUAL needs a client
/// certificate and key; file paths are absolute.
fn tls(at: &str, s: TlsSettingsSpec) -> Result<UpstreamTls, Invalid> {
    let mode = match s.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" => TlsMode::Disable,
        "SIMPLE" => TlsMode::Simple,
        "MUTUAL" => TlsMode::Mutual,
        "ISTIO_MUTUAL" => TlsMode::IstioMutual,
        other => {
            return Err(invalid(
                format!("{at}.mode"),
                format!("{other:?} is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
            ))
        }
    };
    let path = |field: &str, v: Option<String>| -> Result<Option<std::path::PathBuf>, Invalid> {
        match v.filter(|v| !v.is_empty()) {
            Some(v) if v.starts_with('/') || (field == "caCertificates" && v == "system") => {
                Ok((v != "system").then(|| std::path::PathBuf::from(v)))
            }
            Some(v) => Err(invalid(
                format!("{at}.{field}"),
                format!("{v:?} is not an absolute path"),
            )),
            None => Ok(None),
        }
    };
    if let Some(name) = s.credential_name.filter(|n| !n.is_empty()) {
        // Istio ignores it on sidecars unless the rule has a workloadSelector: the secret is
        // a Kubernetes one that a VM cannot read.
        tracing::warn!(at = %format!("{at}.credentialName"), name, "credentialName names a Kubernetes secret; a VM uses the file paths");
    }
    if s.ca_crl.is_some() {
        tracing::warn!(at = %format!("{at}.caCrl"), "revocation lists are not checked yet");
    }
    let out = UpstreamTls {
        mode,
        sni: s.sni.filter(|v| !v.is_empty()),
        subject_alt_names: s.subject_alt_names,
        ca_certificates: path("caCertificates", s.ca_certificates)?,
        client_certificate: path("clientCertificate", s.client_certificate)?,
        private_key: path("privateKey", s.private_key)?,
        insecure_skip_verify: s.insecure_skip_verify.unwrap_or(false),
    };
    if mode == TlsMode::Mutual {
        if out.client_certificate.is_none() {
            return Err(invalid(
                format!("{at}.clientCertificate"),
                "client certificate required for mutual tls",
            ));
        }
        if out.private_key.is_none() {
            return Err(invalid(
                format!("{at}.privateKey"),
                "private key required for mutual tls",
            ));
        }
    }
    Ok(out)
}

fn policy_blocks(
    at: &str,
    lb: Option<LoadBalancerSpec>,
    cp: Option<ConnectionPoolSpec>,
    od: Option<OutlierSpec>,
) -> Result<TrafficPolicy, Invalid> {
    let locality = lb
        .as_ref()
        .map(|l| locality_lb(at, l.locality_lb_setting.as_ref()))
        .transpose()?
        .flatten();
    Ok(TrafficPolicy {
        locality,
        load_balancer: lb.map(|l| load_balancer(at, l)).transpose()?.flatten(),
        pool: cp.map(|p| pool(at, p)).transpose()?.flatten(),
        outlier: od.map(|o| outlier(at, o)).transpose()?,
        tls: None,
    })
}

fn policies(at: &str, spec: Option<TrafficPolicySpec>) -> Result<Policies, Invalid> {
    let Some(t) = spec else {
        return Ok(Policies::default());
    };
    if t.tunnel.is_some() || t.proxy_protocol.is_some() || t.retry_budget.is_some() {
        tracing::warn!(
            at,
            "trafficPolicy tunnel/proxyProtocol/retryBudget are not honoured yet"
        );
    }
    let mut all = policy_blocks(at, t.load_balancer, t.connection_pool, t.outlier_detection)?;
    all.tls = t.tls.map(|s| tls(&format!("{at}.tls"), s)).transpose()?;
    let mut ports = Vec::new();
    for (i, p) in t.port_level_settings.into_iter().enumerate() {
        let field = format!("{at}.portLevelSettings[{i}]");
        let number = p
            .port
            .ok_or_else(|| invalid(format!("{field}.port"), "a port is required"))?;
        let number = port(format!("{field}.port.number"), number.number)?;
        let mut policy = policy_blocks(
            &field,
            p.load_balancer,
            p.connection_pool,
            p.outlier_detection,
        )?;
        policy.tls = p.tls.map(|s| tls(&format!("{field}.tls"), s)).transpose()?;
        ports.push((number, policy));
    }
    Ok(Policies { all, ports })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsetSpec {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(rename = "trafficPolicy")]
    traffic_policy: Option<TrafficPolicySpec>,
}

pub(super) fn port(field: String, p: u32) -> Result<u16, Invalid> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(field, format!("{p} is not a port (1-65535)")))
}

/// One destination that carries no weight (a mirror's).
pub(super) fn single_destination(at: &str, d: DestinationSpec) -> Result<Destination, Invalid> {
    let spec = RouteDestinationSpec {
        destination: d,
        weight: None,
    };
    let mut one = destinations(at, vec![spec])?;
    Ok(one.remove(0))
}

pub(super) fn destinations(
    at: &str,
    route: Vec<RouteDestinationSpec>,
) -> Result<Vec<Destination>, Invalid> {
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
            headers: None,
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
    let hosts: Vec<Host> = spec.hosts.iter().map(|h| Host::new(h)).collect();
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
    let tls = tls_rules(spec.tls, &hosts)?;
    let http = super::http_route::http_rules(spec.http)?;
    Ok(VirtualService {
        name: format!("{namespace}/{name}"),
        namespace,
        hosts,
        export_to: spec.export_to,
        gateways: spec.gateways,
        tcp,
        tls,
        http,
        created,
    })
}

fn subnets(field: &str, given: &[String]) -> Result<Vec<Cidr>, Invalid> {
    given
        .iter()
        .enumerate()
        .map(|(n, s)| {
            Cidr::parse(s)
                .map_err(|e| invalid(format!("{field}.destinationSubnets[{n}]"), e.to_string()))
        })
        .collect()
}

/// `tls[]` rules checked as Istio's validation does (validateTLSRoute, validateTLSMatch): a
/// match is required, with at least one sniHost, each within one of the VirtualService's hosts.
fn tls_rules(spec: Vec<TlsRouteSpec>, hosts: &[Host]) -> Result<Vec<TlsRule>, Invalid> {
    let mut out = Vec::new();
    for (i, r) in spec.into_iter().enumerate() {
        let at = format!("tls[{i}]");
        if r.matches.is_empty() {
            return Err(invalid(format!("{at}.match"), "a TLS route needs a match"));
        }
        let mut matches = Vec::new();
        for (k, m) in r.matches.into_iter().enumerate() {
            let field = format!("{at}.match[{k}]");
            if m.sni_hosts.is_empty() {
                return Err(invalid(
                    format!("{field}.sniHosts"),
                    "at least one SNI host",
                ));
            }
            for (n, sni) in m.sni_hosts.iter().enumerate() {
                // Istio: the SNI host is a subset of one of the hosts.
                let within = hosts.iter().any(|h| h.matches(sni));
                if !within {
                    return Err(invalid(
                        format!("{field}.sniHosts[{n}]"),
                        format!("{sni:?} is not one of the VirtualService's hosts"),
                    ));
                }
            }
            matches.push(TlsMatch {
                destination_subnets: subnets(&field, &m.destination_subnets)?,
                sni_hosts: m.sni_hosts,
                port: m
                    .port
                    .map(|p| port(format!("{field}.port"), p))
                    .transpose()?,
                source_labels: m.source_labels,
                source_namespace: m.source_namespace,
                gateways: m.gateways,
            });
        }
        out.push(TlsRule {
            matches,
            destinations: destinations(&at, r.route)?,
        });
    }
    Ok(out)
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
        let policy = policies(&format!("subsets[{i}].trafficPolicy"), s.traffic_policy)?;
        subsets.push(Subset {
            name: s.name,
            labels: s.labels,
            policy,
        });
    }
    let policy = policies("trafficPolicy", spec.traffic_policy)?;
    Ok(DestinationRule {
        name: format!("{namespace}/{name}"),
        host: Host::new(&spec.host),
        namespace,
        export_to: spec.export_to,
        subsets,
        policy,
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
    fn tls_routes_need_sni_hosts_within_the_virtual_services_hosts() {
        let v = vs("hosts: ['*.example.com']\ntls:\n- match: [{sniHosts: [api.example.com], port: 443}]\n  route: [{destination: {host: api.example.com}}]\n").unwrap();
        assert_eq!(v.tls[0].matches[0].sni_hosts, vec!["api.example.com"]);
        assert_eq!(v.tls[0].matches[0].port, Some(443));
        for (bad, field) in [
            ("tls:\n- route: [{destination: {host: a.example.com}}]\n", "tls[0].match"),
            ("tls:\n- match: [{port: 443}]\n  route: [{destination: {host: a.example.com}}]\n", "tls[0].match[0].sniHosts"),
            ("tls:\n- match: [{sniHosts: [a.example.org]}]\n  route: [{destination: {host: a.example.com}}]\n", "tls[0].match[0].sniHosts[0]"),
        ] {
            let e = vs(&format!("hosts: ['*.example.com']\n{bad}")).unwrap_err();
            assert_eq!(e.field, field, "{bad}");
        }
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

    fn dr(yaml: &str) -> Result<DestinationRule, Invalid> {
        let spec: DestinationRuleSpec = serde_yaml_ng::from_str(yaml).unwrap();
        destination_rule("pg".into(), "db".into(), None, spec)
    }

    #[test]
    fn http_pool_settings_are_read_as_istiod_applies_them() {
        let d = dr("host: pg
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 1}
    http: {http1MaxPendingRequests: 1, http2MaxRequests: 0, maxRequestsPerConnection: 1, maxRetries: 3, idleTimeout: 30s}
")
        .unwrap();
        let pool = d.policy(5432, "").pool.unwrap();
        assert_eq!(
            pool,
            Pool {
                max_connections: Some(1),
                max_pending_requests: Some(1),
                // 0 is proto3's unset: Envoy's unlimited default stays.
                max_requests: None,
                max_requests_per_connection: Some(1),
                max_retries: Some(3),
                idle_timeout_ms: Some(30_000),
                connect_timeout_ms: None,
                upstream: None,
            }
        );
        assert!(pool.limits_requests());
        // The upstream protocol: useClientProtocol before h2UpgradePolicy, as istiod.
        for (http, want) in [
            ("{h2UpgradePolicy: UPGRADE}", Some(UpstreamProtocol::Http2)),
            ("{h2UpgradePolicy: DO_NOT_UPGRADE}", None),
            (
                "{useClientProtocol: true, h2UpgradePolicy: UPGRADE}",
                Some(UpstreamProtocol::AsClient),
            ),
        ] {
            let d = dr(&format!(
                "host: pg\ntrafficPolicy: {{connectionPool: {{http: {http}}}}}\n"
            ))
            .unwrap();
            assert_eq!(
                d.policy(5432, "").pool.and_then(|p| p.upstream),
                want,
                "{http}"
            );
        }
        assert!(dr(
            "host: pg\ntrafficPolicy: {connectionPool: {http: {h2UpgradePolicy: SOMETIMES}}}\n"
        )
        .is_err());
        let only_http =
            dr("host: pg\ntrafficPolicy: {connectionPool: {http: {http2MaxRequests: 10}}}\n")
                .unwrap();
        assert_eq!(
            only_http.policy(5432, "").pool.unwrap().max_requests,
            Some(10)
        );
        let e = dr("host: pg\ntrafficPolicy: {connectionPool: {http: {maxRetries: -1}}}\n")
            .unwrap_err();
        assert_eq!(e.field, "trafficPolicy.connectionPool.http.maxRetries");
        let e = dr("host: pg\ntrafficPolicy: {connectionPool: {http: {idleTimeout: soon}}}\n")
            .unwrap_err();
        assert_eq!(e.field, "trafficPolicy.connectionPool.http.idleTimeout");
    }

    #[test]
    fn port_settings_replace_and_subsets_override_block_by_block() {
        let d = dr("host: pg
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 100, connectTimeout: 1.5s}}
  portLevelSettings:
  - port: {number: 5433}
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 500ms}
subsets:
- name: v2
  labels: {version: v2}
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true}}
")
        .unwrap();
        let all = d.policy(5432, "");
        assert_eq!(all.load_balancer, Some(LoadBalancer::RoundRobin));
        assert_eq!(
            all.pool,
            Some(Pool {
                max_connections: Some(100),
                connect_timeout_ms: Some(1500),
                ..Pool::default()
            })
        );
        // Port level replaces the whole policy: no ROUND_ROBIN, no pool there.
        let p = d.policy(5433, "");
        assert_eq!((p.load_balancer, p.pool), (None, None));
        assert_eq!(p.outlier.unwrap().base_ejection_ms, 500);
        let v2 = d.policy(5432, "v2");
        assert_eq!(v2.load_balancer, Some(LoadBalancer::SourceIpHash));
        assert_eq!(v2.pool, all.pool);
        assert!(dr(
            "host: pg\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x}}}\n"
        )
        .is_err());
        assert!(
            dr("host: pg\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: soon}}}\n")
                .is_err()
        );
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
    }

    #[test]
    fn tls_settings_are_checked_as_istio_validates_them_and_override_per_port_and_subset() {
        let d = dr("host: pg
trafficPolicy:
  tls: {mode: SIMPLE, sni: db.example.com, caCertificates: /etc/db/ca.pem}
  portLevelSettings:
  - port: {number: 5433}
    tls: {mode: DISABLE}
subsets:
- name: v2
  trafficPolicy:
    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, credentialName: ignored}
")
        .unwrap();
        let t = d.policy(5432, "").tls.unwrap();
        assert_eq!(t.mode, TlsMode::Simple);
        assert_eq!(t.sni.as_deref(), Some("db.example.com"));
        assert_eq!(t.ca_certificates, Some("/etc/db/ca.pem".into()));
        assert!(t.originates());
        assert_eq!(d.policy(5433, "").tls.unwrap().mode, TlsMode::Disable);
        let v2 = d.policy(5432, "v2").tls.unwrap();
        assert_eq!(v2.mode, TlsMode::Mutual);
        assert_eq!(v2.private_key, Some("/k.pem".into()));
        // `system` is the default bundle, not a path.
        let sys =
            dr("host: pg\ntrafficPolicy: {tls: {mode: SIMPLE, caCertificates: system}}\n").unwrap();
        assert_eq!(sys.policy(1, "").tls.unwrap().ca_certificates, None);
        for (bad, field) in [
            ("{mode: MUTUAL, clientCertificate: /c.pem}", "privateKey"),
            ("{mode: MUTUAL, privateKey: /k.pem}", "clientCertificate"),
            ("{mode: SIMPLE, caCertificates: ca.pem}", "caCertificates"),
            ("{mode: STRICT}", "mode"),
        ] {
            let e = dr(&format!("host: pg\ntrafficPolicy: {{tls: {bad}}}\n")).unwrap_err();
            assert!(e.field.ends_with(field), "{bad}: {e:?}");
        }
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
