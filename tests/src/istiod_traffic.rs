//! The test control plane's traffic intent, generated from Istio YAML (VirtualService,
//! DestinationRule) as istiod does for a sidecar, never as a mirror of our client
//! (`../shared/istio-traffic-policy.md` 1.1-1.4, 3.1-3.2):
//! - per DestinationRule subset and service port, a cluster `outbound|PORT|SUBSET|HOST` (SNI
//!   `outbound_.PORT_.SUBSET_.HOST`) whose EDS holds the endpoints whose labels are a superset
//!   of the subset's (I: endpoint_builder.go `getSubSetLabels`);
//! - `virtualOutbound` (0.0.0.0:15001, use_original_dst; a blackhole chain for port 15001 and a
//!   catch-all to PassthroughCluster, or BlackHoleCluster under REGISTRY_ONLY);
//! - per TCP service port with a VIP, `<VIP>_<port>` (bind_to_port false) whose one chain has
//!   `tcp_proxy.cluster` (one destination), or `weighted_clusters` (several; weight 0 dropped,
//!   stat_prefix `<vs>.<ns>`, chain metadata `istio.config` naming the VirtualService) from the
//!   first `tcp[]` rule that applies (no match, or a match on this port) (I: tls.go
//!   `buildSidecarOutboundTCPFilterChainOpts`, networkfilter.go
//!   `buildOutboundNetworkFiltersWithWeightedClusters`).

use std::collections::BTreeMap;

use interceptor_proto::envoy::config::core::v3::{
    address::Address as AddressKind, socket_address::PortSpecifier, Address, Metadata,
    SocketAddress, TrafficDirection,
};
use interceptor_proto::envoy::config::listener::v3::{
    filter::ConfigType, Filter, FilterChain, FilterChainMatch, Listener,
};
use interceptor_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::{
    weighted_cluster::ClusterWeight, ClusterSpecifier, WeightedCluster,
};
use interceptor_proto::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use interceptor_proto::google::protobuf::{
    value::Kind, Any, BoolValue, Struct, UInt32Value, Value,
};
use interceptor_proto::type_url;
use prost::Message;
use serde::Deserialize;

/// A VirtualService or DestinationRule, the fields istiod reads for a sidecar's TCP routes.
#[derive(Clone, Debug, Deserialize)]
pub struct Doc {
    pub kind: String,
    pub metadata: Meta,
    pub spec: Spec,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Meta {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
}

fn default_ns() -> String {
    "default".into()
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    #[serde(default)]
    pub http: Vec<crate::istiod_http::HttpRoute>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    pub traffic_policy: Option<TrafficPolicy>,
    /// PeerAuthentication, AuthorizationPolicy.
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u16, Mtls>,
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Mtls {
    pub mode: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<AuthzFrom>,
    #[serde(default)]
    pub to: Vec<AuthzTo>,
    #[serde(default)]
    pub when: Vec<AuthzCondition>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthzCondition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
}

impl AuthzRule {
    /// It names what only HTTP carries (checkError's HTTP-only fields).
    fn is_http(&self) -> bool {
        self.to.iter().any(|t| {
            let o = &t.operation;
            !(o.methods.is_empty() && o.paths.is_empty() && o.hosts.is_empty())
        }) || self.when.iter().any(|c| c.key.starts_with("request."))
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthzFrom {
    pub source: AuthzSource,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthzTo {
    pub operation: AuthzOperation,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthzOperation {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The part of a DestinationRule's trafficPolicy istiod turns into L4 cluster fields.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<Outlier>,
    pub tls: Option<ClientTls>,
}

/// A DestinationRule's `ClientTLSSettings`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    pub mode: Option<String>,
    pub sni: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub ca_certificates: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<serde_yaml_ng::Value>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    #[serde(default)]
    pub http1_max_pending_requests: u32,
    #[serde(default)]
    pub http2_max_requests: u32,
    #[serde(default)]
    pub max_requests_per_connection: u32,
    #[serde(default)]
    pub max_retries: u32,
    pub idle_timeout: Option<String>,
    pub h2_upgrade_policy: Option<String>,
    #[serde(default)]
    pub use_client_protocol: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outlier {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<TcpMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TcpMatch {
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    pub sni_hosts: Vec<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<u32>,
    /// An HTTP route destination's own header operations.
    #[serde(default)]
    pub headers: Option<crate::istiod_http::Headers>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: String,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Every document of a YAML stream.
pub fn parse(yaml: &str) -> Vec<Doc> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_yaml_ng::Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml_ng::from_value(v).expect("a VirtualService or DestinationRule"))
        .collect()
}

/// The documents by the host they are for (a VirtualService under each of its hosts), so a
/// large mesh is not scanned once per service.
pub fn by_host(docs: Vec<Doc>) -> std::collections::HashMap<String, Vec<Doc>> {
    let mut out: std::collections::HashMap<String, Vec<Doc>> = Default::default();
    for d in docs {
        let hosts: Vec<String> = if d.kind == "DestinationRule" {
            vec![fqdn(&d.spec.host, &d.metadata.namespace)]
        } else {
            d.spec
                .hosts
                .iter()
                .map(|h| fqdn(h, &d.metadata.namespace))
                .collect()
        };
        for h in hosts {
            out.entry(h).or_default().push(d.clone());
        }
    }
    out
}

/// Istio's `ResolveShortnameToFQDN`.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// The subsets DestinationRules define for `host`: (name, labels).
pub fn subsets_of(docs: &[Doc], host: &str) -> Vec<(String, BTreeMap<String, String>)> {
    docs.iter()
        .filter(|d| {
            d.kind == "DestinationRule" && fqdn(&d.spec.host, &d.metadata.namespace) == host
        })
        .flat_map(|d| {
            d.spec
                .subsets
                .iter()
                .map(|s| (s.name.clone(), s.labels.clone()))
        })
        .collect()
}

fn strukt(fields: &[(&str, &str)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

fn tcp_proxy(stat_prefix: &str, spec: ClusterSpecifier) -> Filter {
    let tp = TcpProxy {
        stat_prefix: stat_prefix.into(),
        cluster_specifier: Some(spec),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(ConfigType::TypedConfig(Any {
            type_url: type_url::TCP_PROXY.into(),
            value: tp.encode_to_vec(),
        })),
    }
}

fn address(ip: &str, port: u16) -> Option<Address> {
    Some(Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    })
}

pub fn socket_address(ip: &str, port: u16) -> Option<Address> {
    address(ip, port)
}

/// The catch-all to PassthroughCluster (an HTTP listener's default chain, sheet 1.2).
pub fn passthrough_chain() -> FilterChain {
    FilterChain {
        filters: vec![tcp_proxy(
            "PassthroughCluster",
            ClusterSpecifier::Cluster("PassthroughCluster".into()),
        )],
        ..Default::default()
    }
}

/// `envoy.filters.listener.http_inspector`, on listeners whose chains match by ALPN.
pub fn http_inspector() -> interceptor_proto::envoy::config::listener::v3::ListenerFilter {
    use interceptor_proto::envoy::config::listener::v3::listener_filter::ConfigType as LfConfig;
    interceptor_proto::envoy::config::listener::v3::ListenerFilter {
        name: "envoy.filters.listener.http_inspector".into(),
        config_type: Some(LfConfig::TypedConfig(Any {
            type_url:
                "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
                    .into(),
            value: vec![],
        })),
        filter_disabled: None,
    }
}

/// `virtualOutbound` as istiod builds it (sheet 1.1).
pub fn virtual_outbound(registry_only: bool) -> Listener {
    let catch_all = if registry_only {
        "BlackHoleCluster"
    } else {
        "PassthroughCluster"
    };
    Listener {
        name: "virtualOutbound".into(),
        address: address("0.0.0.0", 15001),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![
            FilterChain {
                name: "virtualOutbound-blackhole".into(),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(UInt32Value { value: 15001 }),
                    ..Default::default()
                }),
                filters: vec![tcp_proxy(
                    "BlackHoleCluster",
                    ClusterSpecifier::Cluster("BlackHoleCluster".into()),
                )],
                ..Default::default()
            },
            FilterChain {
                name: "virtualOutbound-catchall-tcp".into(),
                filters: vec![tcp_proxy(
                    catch_all,
                    ClusterSpecifier::Cluster(catch_all.into()),
                )],
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

/// `<VIP>_<port>` for a service port (sheet 1.2-1.4): on a TLS port, one chain per distinct
/// `tls` match by its sniHosts (istiod's `buildSidecarOutboundTLSFilterChainOpts`; the first
/// of equal matches wins; none: the service's own chain); on a TCP port the first `tcp` rule
/// for the port (`buildSidecarOutboundTCPFilterChainOpts`), else the service's own.
pub fn service_listener(
    docs: &[Doc],
    host: &str,
    vip: &str,
    port: u16,
    service_ports: &[u16],
    tls: bool,
) -> Listener {
    let default = format!("outbound|{port}||{host}");
    let for_host = || {
        docs.iter()
            .filter(|d| d.kind == "VirtualService")
            .filter(|d| {
                d.spec
                    .hosts
                    .iter()
                    .any(|h| fqdn(h, &d.metadata.namespace) == host)
            })
    };
    let mut chains = Vec::new();
    if tls {
        let mut seen: Vec<&Vec<String>> = Vec::new();
        for d in for_host() {
            for r in &d.spec.tls {
                for m in &r.matches {
                    if m.port.is_some_and(|p| p != port) || seen.contains(&&m.sni_hosts) {
                        continue;
                    }
                    seen.push(&m.sni_hosts);
                    let (filter, metadata) = route_filter(d, &r.route, port, service_ports);
                    chains.push(FilterChain {
                        filter_chain_match: Some(FilterChainMatch {
                            server_names: m.sni_hosts.clone(),
                            ..Default::default()
                        }),
                        filters: vec![filter],
                        metadata,
                        ..Default::default()
                    });
                }
            }
        }
    } else {
        let vs_rule = for_host().find_map(|d| {
            d.spec
                .tcp
                .iter()
                .find(|r| {
                    r.matches.is_empty()
                        || r.matches.iter().any(|m| m.port.is_none_or(|p| p == port))
                })
                .map(|r| (d, r))
        });
        if let Some((vs, rule)) = vs_rule {
            let (filter, metadata) = route_filter(vs, &rule.route, port, service_ports);
            chains.push(FilterChain {
                filters: vec![filter],
                metadata,
                ..Default::default()
            });
        }
    }
    if chains.is_empty() {
        chains.push(FilterChain {
            filters: vec![tcp_proxy(
                &default,
                ClusterSpecifier::Cluster(default.clone()),
            )],
            ..Default::default()
        });
    }
    let sni = chains.iter().any(|c| {
        c.filter_chain_match
            .as_ref()
            .is_some_and(|m| !m.server_names.is_empty())
    });
    Listener {
        name: format!("{vip}_{port}"),
        address: address(vip, port),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        continue_on_listener_filters_timeout: true,
        listener_filters: if sni { vec![tls_inspector()] } else { vec![] },
        filter_chains: chains,
        ..Default::default()
    }
}

/// `envoy.filters.listener.tls_inspector`, added when a chain matches by SNI (sheet 1.4).
fn tls_inspector() -> interceptor_proto::envoy::config::listener::v3::ListenerFilter {
    use interceptor_proto::envoy::config::listener::v3::listener_filter::ConfigType as LfConfig;
    interceptor_proto::envoy::config::listener::v3::ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(LfConfig::TypedConfig(Any {
            type_url:
                "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                    .into(),
            value: vec![],
        })),
        filter_disabled: None,
    }
}

/// The tcp_proxy of a route's destinations (`buildOutboundNetworkFilters`): one cluster, or
/// weighted clusters; the chain's `istio.config` metadata names the VirtualService.
fn route_filter(
    vs: &Doc,
    route: &[RouteDestination],
    port: u16,
    service_ports: &[u16],
) -> (Filter, Option<Metadata>) {
    let single = route.len() == 1;
    let clusters: Vec<(String, u32)> = route
        .iter()
        .map(|r| {
            let d = &r.destination;
            let dport = match (&d.port, service_ports) {
                (Some(p), _) => p.number,
                (None, [only]) => *only,
                (None, _) => port,
            };
            let w = r.weight.unwrap_or(if single { 100 } else { 0 });
            (
                format!(
                    "outbound|{dport}|{}|{}",
                    d.subset,
                    fqdn(&d.host, &vs.metadata.namespace)
                ),
                w,
            )
        })
        .filter(|(_, w)| *w > 0)
        .collect();
    let config = format!(
        "/apis/networking.istio.io/v1/namespaces/{}/virtual-service/{}",
        vs.metadata.namespace, vs.metadata.name
    );
    let filter = if let [(name, _)] = clusters.as_slice() {
        tcp_proxy(name, ClusterSpecifier::Cluster(name.clone()))
    } else {
        tcp_proxy(
            &format!("{}.{}", vs.metadata.name, vs.metadata.namespace),
            ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: clusters
                    .into_iter()
                    .map(|(name, weight)| ClusterWeight {
                        name,
                        weight,
                        ..Default::default()
                    })
                    .collect(),
            }),
        )
    };
    (
        filter,
        Some(Metadata {
            filter_metadata: [("istio".to_string(), strukt(&[("config", &config)]))].into(),
            ..Default::default()
        }),
    )
}

/// The trafficPolicy that applies to `host`'s `subset` ("" for the service): the subset's
/// blocks over the rule's (istiod's `MergeSubsetTrafficPolicy`; no port-level settings here).
pub fn policy_of(docs: &[Doc], host: &str, subset: &str) -> TrafficPolicy {
    let Some(dr) = docs
        .iter()
        .find(|d| d.kind == "DestinationRule" && fqdn(&d.spec.host, &d.metadata.namespace) == host)
    else {
        return TrafficPolicy::default();
    };
    let base = dr.spec.traffic_policy.clone().unwrap_or_default();
    let sub = dr
        .spec
        .subsets
        .iter()
        .find(|s| s.name == subset)
        .and_then(|s| s.traffic_policy.clone())
        .unwrap_or_default();
    TrafficPolicy {
        load_balancer: sub.load_balancer.or(base.load_balancer),
        connection_pool: sub.connection_pool.or(base.connection_pool),
        outlier_detection: sub.outlier_detection.or(base.outlier_detection),
        tls: sub.tls.or(base.tls),
    }
}

fn seconds(s: &str) -> interceptor_proto::google::protobuf::Duration {
    let ms = duration_ms(s);
    interceptor_proto::google::protobuf::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// `10s`, `1.5s`, `300ms` in milliseconds.
pub fn duration_ms(s: &str) -> u64 {
    if let Some(ms) = s.strip_suffix("ms") {
        ms.parse().expect("ms")
    } else {
        (s.strip_suffix('s')
            .expect("a duration in s or ms")
            .parse::<f64>()
            .expect("seconds")
            * 1000.0) as u64
    }
}

/// istiod's `applyTrafficPolicy` for the L4 fields (sheet 3.3): lb_policy (LEAST_REQUEST by
/// default; consistentHash -> RING_HASH), circuit breakers (UINT32_MAX unless maxConnections),
/// connect_timeout (the mesh's 10 s unless set), outlier_detection only when set
/// (consecutive_5xx and enforcing 100, base_ejection_time, enforcing_success_rate 0).
pub fn apply_policy(
    c: &mut interceptor_proto::envoy::config::cluster::v3::Cluster,
    p: &TrafficPolicy,
    service: &crate::istiod::Service,
) {
    if let Some(t) = &p.tls {
        apply_tls(c, t, service);
    }
    use interceptor_proto::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    use interceptor_proto::envoy::config::cluster::v3::cluster::LbPolicy;
    use interceptor_proto::envoy::config::cluster::v3::{CircuitBreakers, OutlierDetection};
    if c.lb_policy != LbPolicy::ClusterProvided as i32 {
        c.lb_policy = match &p.load_balancer {
            Some(LoadBalancerSettings {
                consistent_hash: Some(_),
                ..
            }) => LbPolicy::RingHash,
            Some(LoadBalancerSettings {
                simple: Some(s), ..
            }) => match s.as_str() {
                "ROUND_ROBIN" => LbPolicy::RoundRobin,
                "RANDOM" => LbPolicy::Random,
                _ => LbPolicy::LeastRequest,
            },
            _ => LbPolicy::LeastRequest,
        } as i32;
    }
    let tcp = p.connection_pool.as_ref().and_then(|cp| cp.tcp.as_ref());
    let http = p
        .connection_pool
        .as_ref()
        .and_then(|cp| cp.http.clone())
        .unwrap_or_default();
    let max = tcp.and_then(|t| t.max_connections).unwrap_or(u32::MAX);
    // applyConnectionPool: a count above 0 replaces the UINT32_MAX default.
    let limit = |v: u32| UInt32Value {
        value: if v > 0 { v } else { u32::MAX },
    };
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: Some(UInt32Value { value: max }),
            max_pending_requests: Some(limit(http.http1_max_pending_requests)),
            max_requests: Some(limit(http.http2_max_requests)),
            max_retries: Some(limit(http.max_retries)),
            ..Default::default()
        }],
        ..Default::default()
    });
    apply_http_protocol_options(c, &http);
    c.connect_timeout = Some(seconds(
        tcp.and_then(|t| t.connect_timeout.as_deref())
            .unwrap_or("10s"),
    ));
    if let Some(o) = &p.outlier_detection {
        let n = o.consecutive_5xx_errors;
        c.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: n.map(|v| UInt32Value { value: v }),
            enforcing_consecutive_5xx: n.map(|v| UInt32Value {
                value: if v == 0 { 0 } else { 100 },
            }),
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            base_ejection_time: o.base_ejection_time.as_deref().map(seconds),
            // istiod: only when the rule sets it above 0 (Envoy's 10 % otherwise).
            max_ejection_percent: o
                .max_ejection_percent
                .filter(|p| *p > 0)
                .map(|value| UInt32Value { value }),
            ..Default::default()
        });
    }
}

/// istiod's `applyConnectionPool` + `clusterWrapper.build` for the HTTP options: the idle timeout
/// and requests per connection go into the `HttpProtocolOptions` extension's common options
/// (an HTTP/1.1 cluster's explicit config beside them; sheet 3.3's example), with the upstream
/// protocol `setUpstreamProtocol` picks: `use_downstream_protocol_config` for
/// `useClientProtocol`, explicit HTTP/2 for `h2UpgradePolicy: UPGRADE`.
fn apply_http_protocol_options(
    c: &mut interceptor_proto::envoy::config::cluster::v3::Cluster,
    http: &HttpPool,
) {
    use interceptor_proto::envoy::config::core::v3::{
        Http1ProtocolOptions, HttpProtocolOptions as Common,
    };
    use interceptor_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    };
    use interceptor_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let upgrade = http.h2_upgrade_policy.as_deref() == Some("UPGRADE");
    if http.max_requests_per_connection == 0
        && http.idle_timeout.is_none()
        && !upgrade
        && !http.use_client_protocol
    {
        return;
    }
    use interceptor_proto::envoy::config::core::v3::Http2ProtocolOptions;
    use interceptor_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::UseDownstreamHttpConfig;
    let protocol = if http.use_client_protocol {
        UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
            http_protocol_options: Some(Http1ProtocolOptions::default()),
            http2_protocol_options: Some(Http2ProtocolOptions::default()),
            ..Default::default()
        })
    } else if upgrade {
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                Http2ProtocolOptions::default(),
            )),
        })
    } else {
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::HttpProtocolOptions(
                Http1ProtocolOptions::default(),
            )),
        })
    };
    let options = HttpProtocolOptions {
        common_http_protocol_options: Some(Common {
            idle_timeout: http.idle_timeout.as_deref().map(seconds),
            max_requests_per_connection: (http.max_requests_per_connection > 0).then_some(
                UInt32Value {
                    value: http.max_requests_per_connection,
                },
            ),
            ..Default::default()
        }),
        upstream_protocol_options: Some(protocol),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        interceptor_proto::google::protobuf::Any {
            type_url: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                .into(),
            value: prost::Message::encode_to_vec(&options),
        },
    );
}

/// istiod's `setUseDownstreamProtocol` for a sniffed port's cluster (sheet 7.2): requests go
/// upstream in the protocol they came in (HTTP/1.1 stays 1.1, h2c goes as h2).
pub fn use_downstream_protocol(c: &mut interceptor_proto::envoy::config::cluster::v3::Cluster) {
    use interceptor_proto::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
    use interceptor_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        UpstreamProtocolOptions, UseDownstreamHttpConfig,
    };
    use interceptor_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    const KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    if c.typed_extension_protocol_options.contains_key(KEY) {
        return;
    }
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            UseDownstreamHttpConfig {
                http_protocol_options: Some(Http1ProtocolOptions::default()),
                http2_protocol_options: Some(Http2ProtocolOptions::default()),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        KEY.into(),
        interceptor_proto::google::protobuf::Any {
            type_url: format!("type.googleapis.com/{KEY}"),
            value: prost::Message::encode_to_vec(&options),
        },
    );
}

/// istiod's `applyUpstreamTLSSettings` for a DestinationRule's mode (sheet 3.5; cluster_tls.go
/// `buildUpstreamClusterTLSContext`, `constructUpstreamTLS`; cluster_builder.go
/// `buildAutoMtlsSettings`): a user-supplied mode replaces the auto-mTLS matches with one
/// `transport_socket` (DISABLE: none at all); files become file-SDS secrets
/// (`file-root:PATH`, default `system`; `file-cert:CERT~KEY`); a registry-external service's
/// subjectAltNames fill in when the rule gives none; insecureSkipVerify is an empty
/// validation context.
fn apply_tls(
    c: &mut interceptor_proto::envoy::config::cluster::v3::Cluster,
    t: &ClientTls,
    service: &crate::istiod::Service,
) {
    use interceptor_proto::envoy::config::core::v3::transport_socket::ConfigType;
    use interceptor_proto::envoy::config::core::v3::TransportSocket;
    use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::common_tls_context::{
        CombinedCertificateValidationContext, ValidationContextType,
    };
    use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, CommonTlsContext, UpstreamTlsContext,
    };
    use interceptor_proto::envoy::r#type::matcher::v3::{
        string_matcher::MatchPattern, StringMatcher,
    };
    c.transport_socket_matches.clear();
    c.transport_socket = None;
    let exact = |names: &[String]| -> Vec<StringMatcher> {
        names
            .iter()
            .map(|s| StringMatcher {
                match_pattern: Some(MatchPattern::Exact(s.clone())),
                ..Default::default()
            })
            .collect()
    };
    let combined = |sans: &[String], root: &str| {
        #[allow(deprecated)]
        Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_subject_alt_names: exact(sans),
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(crate::istiod::sds_secret(root)),
                ..Default::default()
            },
        ))
    };
    let mode = t.mode.as_deref().unwrap_or("DISABLE");
    let mut ctx = UpstreamTlsContext {
        sni: t.sni.clone().unwrap_or_default(),
        common_tls_context: Some(CommonTlsContext::default()),
        ..Default::default()
    };
    let common = ctx.common_tls_context.as_mut().expect("set above");
    match mode {
        "DISABLE" => return,
        "ISTIO_MUTUAL" => {
            let (port, subset, host) = {
                let mut p = c.name.splitn(4, '|').skip(1);
                (
                    p.next().unwrap_or(""),
                    p.next().unwrap_or(""),
                    p.next().unwrap_or(""),
                )
            };
            if ctx.sni.is_empty() {
                ctx.sni = format!("outbound_.{port}_.{subset}_.{host}");
            }
            let sans = if t.subject_alt_names.is_empty() {
                service.sans.clone()
            } else {
                t.subject_alt_names.clone()
            };
            common.alpn_protocols = vec!["istio-peer-exchange".into(), "istio".into()];
            common.tls_certificate_sds_secret_configs = vec![crate::istiod::sds_secret("default")];
            common.validation_context_type = combined(&sans, "ROOTCA");
        }
        "SIMPLE" | "MUTUAL" => {
            let sans = if t.subject_alt_names.is_empty() && !service.kubernetes {
                service.sans.clone()
            } else {
                t.subject_alt_names.clone()
            };
            if mode == "MUTUAL" {
                let (Some(cert), Some(key)) = (&t.client_certificate, &t.private_key) else {
                    // istiod logs the error and leaves the cluster without TLS.
                    return;
                };
                common.tls_certificate_sds_secret_configs = vec![crate::istiod::sds_secret(
                    &format!("file-cert:{cert}~{key}"),
                )];
            }
            common.validation_context_type = if t.insecure_skip_verify.unwrap_or(false) {
                Some(ValidationContextType::ValidationContext(
                    CertificateValidationContext::default(),
                ))
            } else {
                let ca = t.ca_certificates.as_deref().unwrap_or("system");
                combined(&sans, &format!("file-root:{ca}"))
            };
        }
        other => panic!("DestinationRule tls mode {other:?}"),
    }
    c.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(ConfigType::TypedConfig(crate::istiod::any(
            interceptor_proto::type_url::UPSTREAM_TLS,
            &ctx,
        ))),
    });
}

/// The workload `virtualInbound` is built for: its namespace, labels and declared ports.
#[derive(Clone, Debug, Default)]
pub struct InboundWorkload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<u16>,
    /// Those of `ports` a service declares HTTP: istiod gives them HTTP chains.
    pub http_ports: Vec<u16>,
}

const ROOT_NAMESPACE: &str = "istio-system";

fn selects(sel: &Option<WorkloadSelector>, labels: &BTreeMap<String, String>) -> bool {
    sel.as_ref()
        .is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// istiod's `ComposePeerAuthentication` for `w`: (the workload's mode, per-port modes).
fn peer_modes(docs: &[Doc], w: &InboundWorkload) -> (String, BTreeMap<u16, String>) {
    let pas = docs.iter().filter(|d| d.kind == "PeerAuthentication");
    let (mut mesh, mut ns, mut workload) = (None, None, None);
    for d in pas {
        let mode = d.spec.mtls.as_ref().map(|m| m.mode.clone());
        let at_root = d.metadata.namespace == ROOT_NAMESPACE;
        match (&d.spec.selector, at_root) {
            (None, true) => mesh = mesh.or(mode),
            (None, false) if d.metadata.namespace == w.namespace => ns = ns.or(mode),
            (Some(_), false)
                if d.metadata.namespace == w.namespace && selects(&d.spec.selector, &w.labels) =>
            {
                workload = workload.or(Some(d))
            }
            _ => {}
        }
    }
    let unset = |m: &Option<String>| m.as_deref().is_none_or(|m| m == "UNSET");
    let mut mode = "PERMISSIVE".to_string();
    for m in [&mesh, &ns] {
        if !unset(m) {
            mode = m.clone().unwrap_or_default();
        }
    }
    let mut ports = BTreeMap::new();
    if let Some(d) = workload {
        let m = d.spec.mtls.as_ref().map(|m| m.mode.clone());
        if !unset(&m) {
            mode = m.unwrap_or_default();
        }
        for (p, pm) in &d.spec.port_level_mtls {
            if pm.mode != "UNSET" {
                ports.insert(*p, pm.mode.clone());
            }
        }
    }
    (mode, ports)
}

/// One action's rules and the dry-run stat prefix istiod gives its filter, TCP or HTTP alike.
pub(crate) fn rbac_rules(
    action: i32,
    policies: Vec<(String, interceptor_proto::envoy::config::rbac::v3::Policy)>,
) -> (interceptor_proto::envoy::config::rbac::v3::Rbac, String) {
    let rules = interceptor_proto::envoy::config::rbac::v3::Rbac {
        action,
        policies: policies.into_iter().collect(),
        ..Default::default()
    };
    let shadow = match action {
        1 => "istio_dry_run_deny_",
        _ => "istio_dry_run_allow_",
    };
    (rules, shadow.into())
}

fn rbac_filter(
    action: i32,
    policies: Vec<(String, interceptor_proto::envoy::config::rbac::v3::Policy)>,
) -> Filter {
    use interceptor_proto::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
    let (rules, shadow_rules_stat_prefix) = rbac_rules(action, policies);
    let f = NetRbac {
        stat_prefix: "tcp.".into(),
        rules: Some(rules),
        shadow_rules_stat_prefix,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC".into(),
            value: f.encode_to_vec(),
        })),
    }
}

/// istiod's authz builder for a TCP chain (sheet 4.3): one filter per action (AUDIT, DENY,
/// ALLOW), a policy per rule named `ns[NS]-policy[NAME]-rule[I]`.
fn rbac_filters(docs: &[Doc], w: &InboundWorkload) -> Vec<Filter> {
    rbac_policies(docs, w, false)
        .into_iter()
        .map(|(a, ps)| rbac_filter(a, ps))
        .collect()
}

/// The policies of each action, in filter order, for a TCP chain or (`http`) an HTTP one. On
/// a TCP chain an ALLOW rule naming HTTP-only fields is dropped whole and a DENY or AUDIT
/// rule loses those conditions (checkError); on an HTTP chain they are matchers: methods on
/// `:method`, paths on `url_path`, hosts on `:authority` ignoring case, and
/// `request.headers[X]` as a principal on header X.
pub(crate) fn rbac_policies(
    docs: &[Doc],
    w: &InboundWorkload,
    http: bool,
) -> Vec<(
    i32,
    Vec<(String, interceptor_proto::envoy::config::rbac::v3::Policy)>,
)> {
    use interceptor_proto::envoy::config::core::v3::CidrRange;
    use interceptor_proto::envoy::config::rbac::v3::permission::{
        Rule as PermRule, Set as PermSet,
    };
    use interceptor_proto::envoy::config::rbac::v3::principal::{
        Authenticated, Identifier, Set as IdSet,
    };
    use interceptor_proto::envoy::config::rbac::v3::{Permission, Policy, Principal};
    use interceptor_proto::envoy::r#type::matcher::v3::{
        string_matcher::MatchPattern, RegexMatcher, StringMatcher,
    };
    let authenticated = |m: MatchPattern| Principal {
        identifier: Some(Identifier::Authenticated(Authenticated {
            principal_name: Some(StringMatcher {
                match_pattern: Some(m),
                ..Default::default()
            }),
        })),
    };
    let or_ids = |ids: Vec<Principal>| Principal {
        identifier: Some(Identifier::OrIds(IdSet { ids })),
    };
    let any_id = Principal {
        identifier: Some(Identifier::Any(true)),
    };
    let any_perm = Permission {
        rule: Some(PermRule::Any(true)),
    };
    let mut by_action: BTreeMap<i32, Vec<(String, Policy)>> = BTreeMap::new();
    for d in docs.iter().filter(|d| d.kind == "AuthorizationPolicy") {
        let ns = &d.metadata.namespace;
        if !(ns == &w.namespace || ns == ROOT_NAMESPACE) || !selects(&d.spec.selector, &w.labels) {
            continue;
        }
        let action = match d.spec.action.as_deref() {
            Some("DENY") => 1,
            Some("AUDIT") => 2,
            _ => 0,
        };
        if action == 0 {
            // An ALLOW policy makes its filter even when no rule is left of it (deny all).
            by_action.entry(0).or_default();
        }
        for (i, r) in d.spec.rules.iter().enumerate() {
            if !http && action == 0 && r.is_http() {
                continue;
            }
            let headers: Vec<Principal> = r
                .when
                .iter()
                .filter(|_| http)
                .filter_map(|c| {
                    let name = c.key.strip_prefix("request.headers[")?.strip_suffix(']')?;
                    Some(or_ids(
                        c.values.iter().map(|v| header_id(name, v, false)).collect(),
                    ))
                })
                .collect();
            let principals = if r.from.is_empty() && !headers.is_empty() {
                vec![Principal {
                    identifier: Some(Identifier::AndIds(IdSet {
                        ids: headers.clone(),
                    })),
                }]
            } else if r.from.is_empty() {
                vec![any_id.clone()]
            } else {
                r.from
                    .iter()
                    .map(|f| {
                        let s = &f.source;
                        let mut ands = Vec::new();
                        if !s.principals.is_empty() {
                            ands.push(or_ids(
                                s.principals
                                    .iter()
                                    .map(|p| {
                                        authenticated(MatchPattern::Exact(format!("spiffe://{p}")))
                                    })
                                    .collect(),
                            ));
                        }
                        if !s.namespaces.is_empty() {
                            ands.push(or_ids(
                                s.namespaces
                                    .iter()
                                    .map(|n| {
                                        authenticated(MatchPattern::SafeRegex(RegexMatcher {
                                            regex: format!(".*/ns/{n}/.*"),
                                            ..Default::default()
                                        }))
                                    })
                                    .collect(),
                            ));
                        }
                        if !s.ip_blocks.is_empty() {
                            ands.push(or_ids(
                                s.ip_blocks
                                    .iter()
                                    .map(|b| {
                                        let (a, l) = b.split_once('/').unwrap_or((b, "32"));
                                        Principal {
                                            identifier: Some(Identifier::DirectRemoteIp(
                                                CidrRange {
                                                    address_prefix: a.into(),
                                                    prefix_len: Some(UInt32Value {
                                                        value: l.parse().expect("prefix"),
                                                    }),
                                                },
                                            )),
                                        }
                                    })
                                    .collect(),
                            ));
                        }
                        ands.extend(headers.iter().cloned());
                        if ands.is_empty() {
                            any_id.clone()
                        } else {
                            Principal {
                                identifier: Some(Identifier::AndIds(IdSet { ids: ands })),
                            }
                        }
                    })
                    .collect()
            };
            let permissions = if r.to.is_empty() {
                vec![any_perm.clone()]
            } else {
                r.to.iter()
                    .map(|t| {
                        let o = &t.operation;
                        let or = |rules: Vec<Permission>| Permission {
                            rule: Some(PermRule::OrRules(PermSet { rules })),
                        };
                        let mut ands = Vec::new();
                        if !o.ports.is_empty() {
                            ands.push(or(o
                                .ports
                                .iter()
                                .map(|p| Permission {
                                    rule: Some(PermRule::DestinationPort(p.parse().expect("port"))),
                                })
                                .collect()));
                        }
                        if http {
                            if !o.methods.is_empty() {
                                ands.push(or(o
                                    .methods
                                    .iter()
                                    .map(|m| header_perm(":method", m, false))
                                    .collect()));
                            }
                            if !o.paths.is_empty() {
                                ands.push(or(o.paths.iter().map(|p| path_perm(p)).collect()));
                            }
                            if !o.hosts.is_empty() {
                                ands.push(or(o
                                    .hosts
                                    .iter()
                                    .map(|h| header_perm(":authority", h, true))
                                    .collect()));
                            }
                        }
                        if ands.is_empty() {
                            return any_perm.clone();
                        }
                        Permission {
                            rule: Some(PermRule::AndRules(PermSet { rules: ands })),
                        }
                    })
                    .collect()
            };
            by_action.entry(action).or_default().push((
                format!("ns[{ns}]-policy[{}]-rule[{i}]", d.metadata.name),
                Policy {
                    permissions,
                    principals,
                    ..Default::default()
                },
            ));
        }
    }
    // AUDIT (LOG), then DENY, then ALLOW.
    [2, 1, 0]
        .into_iter()
        .filter_map(|a| by_action.remove(&a).map(|ps| (a, ps)))
        .collect()
}

/// Istio's string forms as Envoy matchers: `*` any (present), `p*` prefix, `*s` suffix, else
/// exact (authz/matcher `StringMatcher`).
fn istio_string(
    v: &str,
    ignore_case: bool,
) -> Option<interceptor_proto::envoy::r#type::matcher::v3::StringMatcher> {
    use interceptor_proto::envoy::r#type::matcher::v3::{
        string_matcher::MatchPattern, StringMatcher,
    };
    let pattern = if v == "*" {
        return None;
    } else if let Some(p) = v.strip_suffix('*') {
        MatchPattern::Prefix(p.into())
    } else if let Some(s) = v.strip_prefix('*') {
        MatchPattern::Suffix(s.into())
    } else {
        MatchPattern::Exact(v.into())
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    })
}

fn header_matcher(
    name: &str,
    v: &str,
    ignore_case: bool,
) -> interceptor_proto::envoy::config::route::v3::HeaderMatcher {
    use interceptor_proto::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
    interceptor_proto::envoy::config::route::v3::HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(match istio_string(v, ignore_case) {
            Some(m) => HeaderMatchSpecifier::StringMatch(m),
            None => HeaderMatchSpecifier::PresentMatch(true),
        }),
        ..Default::default()
    }
}

fn header_perm(
    name: &str,
    v: &str,
    ignore_case: bool,
) -> interceptor_proto::envoy::config::rbac::v3::Permission {
    use interceptor_proto::envoy::config::rbac::v3::permission::Rule;
    interceptor_proto::envoy::config::rbac::v3::Permission {
        rule: Some(Rule::Header(header_matcher(name, v, ignore_case))),
    }
}

fn header_id(
    name: &str,
    v: &str,
    ignore_case: bool,
) -> interceptor_proto::envoy::config::rbac::v3::Principal {
    use interceptor_proto::envoy::config::rbac::v3::principal::Identifier;
    interceptor_proto::envoy::config::rbac::v3::Principal {
        identifier: Some(Identifier::Header(header_matcher(name, v, ignore_case))),
    }
}

/// `paths`: url_path exact / prefix / suffix, `*` any path (`.+`).
fn path_perm(v: &str) -> interceptor_proto::envoy::config::rbac::v3::Permission {
    use interceptor_proto::envoy::config::rbac::v3::permission::Rule;
    use interceptor_proto::envoy::r#type::matcher::v3::{
        path_matcher::Rule as PathRule, string_matcher::MatchPattern, PathMatcher, RegexMatcher,
        StringMatcher,
    };
    let m = istio_string(v, false).unwrap_or(StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
            regex: ".+".into(),
            ..Default::default()
        })),
        ..Default::default()
    });
    interceptor_proto::envoy::config::rbac::v3::Permission {
        rule: Some(Rule::UrlPath(PathMatcher {
            rule: Some(PathRule::Path(m)),
        })),
    }
}

fn downstream_tls() -> interceptor_proto::envoy::config::core::v3::TransportSocket {
    use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
    use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, DownstreamTlsContext,
    };
    // BuildInboundTLS: the workload certificate and the root from SDS, a client certificate
    // required, ALPN for TCP chains.
    let ctx = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["istio-peer-exchange".into(), "h2".into(), "http/1.1".into()],
            tls_certificate_sds_secret_configs: vec![crate::istiod::sds_secret("default")],
            validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                crate::istiod::sds_secret("ROOTCA"),
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    interceptor_proto::envoy::config::core::v3::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(interceptor_proto::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext".into(),
            value: ctx.encode_to_vec(),
        })),
    }
}

/// The chains of one port (None: the passthrough chains) in `mode`, as the sheet's table:
/// a TCP port's network RBAC and TCP proxy, or an HTTP port's connection manager (`hcm`,
/// its HTTP RBAC inside). Auto ports' extra HTTP chains are left out.
fn inbound_chains(
    port: Option<u16>,
    mode: &str,
    filters: &[Filter],
    hcm: Option<Filter>,
) -> Vec<FilterChain> {
    let cluster = match port {
        Some(p) => format!("inbound|{p}||"),
        None => "InboundPassthroughCluster".into(),
    };
    let fs = match hcm {
        Some(hcm) => vec![hcm],
        None => {
            let mut fs = filters.to_vec();
            fs.push(tcp_proxy(
                &cluster,
                ClusterSpecifier::Cluster(cluster.clone()),
            ));
            fs
        }
    };
    let name = port.map_or("virtualInbound".to_string(), |p| format!("0.0.0.0_{p}"));
    let m = |transport: &str, alpn: &[&str]| FilterChainMatch {
        destination_port: port.map(|p| UInt32Value {
            value: u32::from(p),
        }),
        transport_protocol: transport.into(),
        application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let tls = |alpn: &[&str]| FilterChain {
        name: name.clone(),
        filter_chain_match: Some(m("tls", alpn)),
        transport_socket: Some(downstream_tls()),
        filters: fs.clone(),
        ..Default::default()
    };
    let plain = FilterChain {
        name: name.clone(),
        filter_chain_match: Some(m("raw_buffer", &[])),
        filters: fs.clone(),
        ..Default::default()
    };
    let all_mtls = [
        "istio",
        "istio-peer-exchange",
        "istio-http/1.0",
        "istio-http/1.1",
        "istio-h2",
    ];
    match mode {
        "STRICT" => vec![tls(&[])],
        "DISABLE" => vec![plain],
        _ => vec![tls(&all_mtls), plain],
    }
}

/// `virtualInbound` for `w` (sheet 4.2): the blackhole chain, the passthrough chains in the
/// workload's mode, then each declared port's chains in its mode; RBAC on every one.
pub fn virtual_inbound(docs: &[Doc], w: &InboundWorkload) -> Listener {
    let (mode, port_modes) = peer_modes(docs, w);
    let filters = rbac_filters(docs, w);
    let mut chains = vec![FilterChain {
        name: "virtualInbound-blackhole".into(),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: Some(UInt32Value { value: 15006 }),
            ..Default::default()
        }),
        filters: vec![tcp_proxy(
            "BlackHoleCluster",
            ClusterSpecifier::Cluster("BlackHoleCluster".into()),
        )],
        ..Default::default()
    }];
    chains.extend(inbound_chains(None, &mode, &filters, None));
    let http_rbac = crate::istiod_http::http_rbac_filters(rbac_policies(docs, w, true));
    let mut ports: Vec<u16> = w.ports.clone();
    // A portLevelMtls port no service declares gets passthrough chains of its own.
    ports.extend(port_modes.keys().filter(|p| !w.ports.contains(p)));
    ports.sort_unstable();
    ports.dedup();
    for p in ports {
        let m = port_modes.get(&p).unwrap_or(&mode);
        let hcm = w
            .http_ports
            .contains(&p)
            .then(|| crate::istiod_http::inbound_hcm(p, http_rbac.clone()));
        chains.extend(inbound_chains(Some(p), m, &filters, hcm));
    }
    Listener {
        name: "virtualInbound".into(),
        address: address("0.0.0.0", 15006),
        traffic_direction: TrafficDirection::Inbound as i32,
        continue_on_listener_filters_timeout: true,
        // istiod's: the chains match on the original destination, TLS or not, and ALPN.
        use_original_dst: Some(BoolValue { value: true }),
        listener_filters: vec![original_dst(), tls_inspector(), http_inspector()],
        filter_chains: chains,
        ..Default::default()
    }
}

/// `envoy.filters.listener.original_dst`: the connection's destination before iptables
/// REDIRECT, which the inbound chains match on.
fn original_dst() -> interceptor_proto::envoy::config::listener::v3::ListenerFilter {
    use interceptor_proto::envoy::config::listener::v3::listener_filter::ConfigType as LfConfig;
    interceptor_proto::envoy::config::listener::v3::ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(LfConfig::TypedConfig(Any {
            type_url:
                "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                    .into(),
            value: vec![],
        })),
        filter_disabled: None,
    }
}
