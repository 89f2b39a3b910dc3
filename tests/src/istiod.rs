//! A test control plane that behaves as SPEC section 10 says istiod does, not as a mirror of our
//! client: ADS over TLS (certificate for `istiod.istio-system.svc` from its own root), the bearer
//! token checked (or a client certificate from its root), Delta and SotW, CDS with clusters a
//! client must ignore (inbound, BlackHole, Passthrough), STRICT_DNS clusters with host names
//! inline, ORIGINAL_DST clusters, EDS per cluster with remote-network endpoints already
//! rewritten to their gateway (split horizon), NDS as one resource with an empty name, streams
//! recycled on demand. It records every request it sees.
//!
//! It runs in-process, on a thread moved into a test namespace, so the VM reaches it over that
//! namespace's network while the test drives it directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use interceptor_proto::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy, TransportSocketMatch,
};
use interceptor_proto::envoy::config::cluster::v3::Cluster;
use interceptor_proto::envoy::config::core::v3::address::Address as AddressKind;
use interceptor_proto::envoy::config::core::v3::api_config_source::ApiType;
use interceptor_proto::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use interceptor_proto::envoy::config::core::v3::grpc_service::{EnvoyGrpc, TargetSpecifier};
use interceptor_proto::envoy::config::core::v3::socket_address::PortSpecifier;
use interceptor_proto::envoy::config::core::v3::transport_socket::ConfigType;
use interceptor_proto::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiConfigSource, ApiVersion, ConfigSource, GrpcService,
    Locality, Metadata, SocketAddress, TransportSocket,
};
use interceptor_proto::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use interceptor_proto::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints,
};
use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::common_tls_context::{
    CombinedCertificateValidationContext, ValidationContextType,
};
use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, UpstreamTlsContext,
};
use interceptor_proto::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use interceptor_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use interceptor_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use interceptor_proto::google::protobuf::{
    value::Kind, Any, Duration, ListValue, Struct, UInt32Value, Value,
};
use interceptor_proto::nds::{name_table::NameInfo, NameTable};
use interceptor_proto::type_url;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::certs::Ca;
use crate::{wait_for, NetnsRef};

/// How a service's endpoints are found.
#[derive(Clone, Debug, PartialEq)]
pub enum Discovery {
    /// EDS.
    Eds,
    /// STRICT_DNS with these host names inline in the cluster.
    Dns(Vec<String>),
    /// ORIGINAL_DST (resolution NONE, headless).
    OriginalDst,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Where the endpoint serves the service's first port; its other ports are served on
    /// their own numbers.
    pub port: u16,
    pub weight: u32,
    /// Envoy's HealthStatus: 1 HEALTHY, 2 UNHEALTHY, 3 DRAINING.
    pub health: i32,
    pub mtls: bool,
    pub network: String,
    pub locality: String,
    pub priority: u32,
    pub name: String,
    /// An ambient workload (ztunnel pod, waypoint, a WorkloadEntry labelled
    /// `networking.istio.io/tunnel=http`): istiod gives it as an internal `connect_originate`
    /// address (SPEC 10) to a node that does not send `DISABLE_HBONE_SEND`.
    pub hbone: bool,
    /// The workload's labels (DestinationRule subsets select by them).
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    pub fn new(ip: &str, port: u16) -> Self {
        Self {
            ip: ip.parse().expect("endpoint IP"),
            port,
            weight: 1,
            health: 1,
            mtls: true,
            network: String::new(),
            locality: String::new(),
            priority: 0,
            name: format!("ep-{ip}"),
            hbone: false,
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub host: String,
    pub namespace: String,
    /// The VIPs NDS gives (istiod-allocated 240.240/16 ones included).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    /// The identities a server must present (CDS SAN matchers).
    pub sans: Vec<String>,
    pub discovery: Discovery,
    pub endpoints: Vec<Endpoint>,
    /// A Kubernetes service (NDS registry `Kubernetes`: short names answer too).
    pub kubernetes: bool,
    /// Ports declared TLS/HTTPS: their listeners route by SNI (VirtualService `tls`).
    pub tls_ports: Vec<u16>,
    /// Ports declared HTTP: one `0.0.0.0_<port>` listener and RDS `"<port>"` for them all
    /// (VirtualService `http`).
    pub http_ports: Vec<u16>,
    /// Ports of no declared protocol: sniffed, their `<VIP>_<port>` listener with an HTTP
    /// chain taking RDS `"<fqdn>:<port>"` beside the TCP one.
    pub auto_ports: Vec<u16>,
}

impl Service {
    pub fn new(host: &str, vip: &str, port: u16) -> Self {
        let namespace = host.split('.').nth(1).unwrap_or("default").to_string();
        Self {
            host: host.to_string(),
            namespace,
            vips: vec![vip.parse().expect("VIP")],
            ports: vec![port],
            sans: vec![],
            discovery: Discovery::Eds,
            endpoints: vec![],
            kubernetes: host.ends_with(".svc.cluster.local"),
            tls_ports: vec![],
            http_ports: vec![],
            auto_ports: vec![],
        }
    }
}

/// What the control plane serves.
#[derive(Clone, Debug, Default)]
pub struct Mesh {
    /// The first version this control plane numbers its pushes from (a restarted istiod has
    /// moved on).
    pub first_version: u64,
    pub services: Vec<Service>,
    /// network -> its east-west gateway: endpoints there are sent as the gateway (split
    /// horizon), to clients in other networks.
    pub gateways: BTreeMap<String, SocketAddr>,
    /// Sent as a cluster's load assignment once: an endpoint address that is not an address.
    pub corrupt_endpoints_of: Option<String>,
    /// VirtualServices and DestinationRules (Istio YAML), turned into LDS, subset clusters and
    /// their EDS as istiod does (`istiod_traffic`).
    pub traffic: String,
    /// meshConfig outboundTrafficPolicy REGISTRY_ONLY (virtualOutbound's catch-all).
    pub registry_only: bool,
    /// Sent as a listener while set: a TCP proxy that is not one.
    pub corrupt_listener: Option<String>,
    /// The workload `virtualInbound` is made for (from the PeerAuthentications and
    /// AuthorizationPolicies in `traffic`); None: no virtualInbound.
    pub inbound: Option<crate::istiod_traffic::InboundWorkload>,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub type_url: String,
    pub nonce: String,
    pub names: Vec<String>,
    pub error: Option<String>,
    pub delta: bool,
    /// The node's metadata, from the stream's first request.
    pub metadata: BTreeMap<String, String>,
    pub node_id: String,
    /// When it arrived.
    pub at: std::time::SystemTime,
}

pub(crate) struct Shared {
    pub(crate) ca_state: crate::istiod_ca::CaState,
    mesh: Mutex<Mesh>,
    version: Mutex<u64>,
    pushes: watch::Sender<u64>,
    recycle: watch::Sender<u64>,
    seen: Mutex<Vec<Seen>>,
    /// ADS streams the client ended.
    ended: std::sync::atomic::AtomicU64,
    token: Mutex<String>,
    pub(crate) ca: Ca,
    secrets: Mutex<Option<crate::istiod_sds::Secrets>>,
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn strukt(fields: &[(&str, Value)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

/// Whether two encodings of a resource of type `ty` say the same thing. Bytes alone do not
/// tell: a `Struct` (metadata) is a map that prost encodes in hash order, so istiod's "push only
/// what changed" is judged on the decoded message.
fn same_resource(ty: &str, a: &[u8], b: &[u8]) -> bool {
    fn eq<M: Message + Default + PartialEq>(a: &[u8], b: &[u8]) -> bool {
        matches!((M::decode(a), M::decode(b)), (Ok(x), Ok(y)) if x == y)
    }
    a == b
        || match ty {
            type_url::CLUSTER => eq::<Cluster>(a, b),
            type_url::ENDPOINT => eq::<ClusterLoadAssignment>(a, b),
            type_url::NAME_TABLE => eq::<NameTable>(a, b),
            type_url::LISTENER => {
                eq::<interceptor_proto::envoy::config::listener::v3::Listener>(a, b)
            }
            _ => false,
        }
}

pub(crate) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

fn socket(address: &str, port: u16) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: address.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// istiod's address of a tunnelling endpoint: the `connect_originate` internal listener, the
/// workload's IP:port as the endpoint id.
fn internal(endpoint_id: &str) -> Address {
    use interceptor_proto::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
    use interceptor_proto::envoy::config::core::v3::EnvoyInternalAddress;
    Address {
        address: Some(AddressKind::EnvoyInternalAddress(EnvoyInternalAddress {
            address_name_specifier: Some(AddressNameSpecifier::ServerListenerName(
                "connect_originate".into(),
            )),
            endpoint_id: endpoint_id.to_string(),
        })),
    }
}

fn cluster_name(port: u16, host: &str) -> String {
    subset_cluster_name(port, "", host)
}

fn subset_cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

fn lb_endpoint(e: &Endpoint, service: &Service, port: u16) -> LbEndpoint {
    let target = if service.ports.first() == Some(&port) {
        e.port
    } else {
        port
    };
    let mut filter = HashMap::new();
    if e.hbone {
        let at = SocketAddr::new(e.ip, target).to_string();
        filter.insert(
            "envoy.transport_socket_match".to_string(),
            strukt(&[("tunnel", string("http"))]),
        );
        filter.insert(
            "envoy.filters.listener.original_dst".to_string(),
            strukt(&[("local", string(&at))]),
        );
    } else if e.mtls {
        filter.insert(
            "envoy.transport_socket_match".to_string(),
            strukt(&[("tlsMode", string("istio"))]),
        );
    }
    filter.insert(
        "istio".to_string(),
        strukt(&[(
            "workload",
            string(&format!(
                "{};{};{};v1;Kubernetes",
                e.name, service.namespace, service.host
            )),
        )]),
    );
    LbEndpoint {
        health_status: e.health,
        metadata: Some(Metadata {
            filter_metadata: filter,
            ..Default::default()
        }),
        load_balancing_weight: Some(UInt32Value { value: e.weight }),
        host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
            address: Some(if e.hbone {
                internal(&SocketAddr::new(e.ip, target).to_string())
            } else {
                socket(&e.ip.to_string(), target)
            }),
            ..Default::default()
        })),
    }
}

fn locality(endpoints: Vec<LbEndpoint>, loc: &str, priority: u32) -> LocalityLbEndpoints {
    let mut parts = loc.split('/');
    LocalityLbEndpoints {
        locality: Some(Locality {
            region: parts.next().unwrap_or("").to_string(),
            zone: parts.next().unwrap_or("").to_string(),
            sub_zone: parts.next().unwrap_or("").to_string(),
        }),
        load_balancing_weight: Some(UInt32Value {
            value: endpoints
                .iter()
                .map(|e| e.load_balancing_weight.map(|w| w.value).unwrap_or(1))
                .sum(),
        }),
        lb_endpoints: endpoints,
        priority,
        ..Default::default()
    }
}

/// Who a stream is for, as its node says: its network and locality.
#[derive(Clone, Debug, Default)]
pub(crate) struct Client {
    network: String,
    /// `region/zone/subzone`.
    locality: String,
}

impl Client {
    fn of(
        node: Option<&interceptor_proto::envoy::config::core::v3::Node>,
        md: &BTreeMap<String, String>,
    ) -> Self {
        Self {
            network: md.get("NETWORK").cloned().unwrap_or_default(),
            locality: node
                .and_then(|n| n.locality.as_ref())
                .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
                .unwrap_or_default(),
        }
    }
}

/// istiod's `LbPriority` of an endpoint's locality for a proxy's (both `region/zone/subzone`).
fn lb_priority(proxy: &str, endpoint: &str) -> u32 {
    let part = |l: &str, i: usize| l.split('/').nth(i).unwrap_or("").to_string();
    let same = |i: usize| part(proxy, i) == part(endpoint, i);
    match (same(0), same(1), same(2)) {
        (true, true, true) => 0,
        (true, true, false) => 1,
        (true, false, _) => 2,
        (false, _, _) => 3,
    }
}

/// The endpoints of `service` as `client` gets them: endpoints of another network with a
/// gateway become that gateway, weighing as many as stand behind it; with `failover` (the
/// DestinationRule sets outlier detection) each locality's priority is its distance from the
/// client's (istiod's `applyLocalityFailover`: the given priority times 5 plus `LbPriority`).
fn load_assignment(
    mesh: &Mesh,
    service: &Service,
    port: u16,
    client: &Client,
    subset: Option<&(String, BTreeMap<String, String>)>,
    failover: bool,
) -> ClusterLoadAssignment {
    let client_network = client.network.as_str();
    let name = match subset {
        Some((s, _)) => subset_cluster_name(port, s, &service.host),
        None => cluster_name(port, &service.host),
    };
    let mut groups: BTreeMap<(String, u32), Vec<LbEndpoint>> = BTreeMap::new();
    let mut remote: BTreeMap<String, u32> = BTreeMap::new();
    // A subset's endpoints: labels a superset of the subset's (istiod's getSubSetLabels).
    let in_subset = |e: &&Endpoint| {
        subset.is_none_or(|(_, labels)| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
    };
    for e in service.endpoints.iter().filter(in_subset) {
        let remote_gw = (!e.network.is_empty() && e.network != client_network)
            .then(|| mesh.gateways.get(&e.network))
            .flatten();
        match remote_gw {
            Some(_) if e.mtls => *remote.entry(e.network.clone()).or_default() += e.weight,
            Some(_) => {} // plaintext cannot cross a gateway
            None => {
                let priority = if failover {
                    e.priority * 5 + lb_priority(&client.locality, &e.locality)
                } else {
                    e.priority
                };
                groups
                    .entry((e.locality.clone(), priority))
                    .or_default()
                    .push(lb_endpoint(e, service, port))
            }
        }
    }
    for (network, weight) in remote {
        let gw = mesh.gateways[&network];
        // The gateway serves every port of the service on its own port.
        let mut gateway = service.clone();
        gateway.ports = vec![port];
        let mut e = Endpoint::new(&gw.ip().to_string(), gw.port());
        e.weight = weight;
        e.name = format!("gateway-{network}");
        groups
            .entry((String::new(), 0))
            .or_default()
            .push(lb_endpoint(&e, &gateway, port));
    }
    // istiod compacts priorities to 0..N without gaps, as Envoy wants them.
    let mut levels: Vec<u32> = groups.keys().map(|(_, p)| *p).collect();
    levels.sort_unstable();
    levels.dedup();
    let rank = |p: u32| levels.iter().position(|l| *l == p).unwrap_or(0) as u32;
    let mut endpoints: Vec<LocalityLbEndpoints> = groups
        .into_iter()
        .map(|((loc, prio), eps)| locality(eps, &loc, rank(prio)))
        .collect();
    if mesh.corrupt_endpoints_of.as_deref() == Some(name.as_str()) {
        endpoints.push(locality(
            vec![LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
                    address: Some(socket("", 80)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            "",
            0,
        ));
    }
    ClusterLoadAssignment {
        cluster_name: name,
        endpoints,
        ..Default::default()
    }
}

/// A secret the proxy gets from istio-agent over SDS, as istiod names it (I:
/// pilot/pkg/model/authentication.go ConstructSdsSecretConfig: cluster `sds-grpc`, no initial
/// fetch timeout).
pub(crate) fn sds_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    set_node_on_first_message_only: true,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                            cluster_name: "sds-grpc".into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            initial_fetch_timeout: Some(Duration {
                seconds: 0,
                nanos: 0,
            }),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

#[allow(deprecated)]
fn istio_tls(service: &Service, port: u16, subset: &str) -> TransportSocketMatch {
    let tls = UpstreamTlsContext {
        sni: format!("outbound_.{port}_.{subset}_.{}", service.host),
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            tls_certificate_sds_secret_configs: vec![sds_secret("default")],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_subject_alt_names: service
                            .sans
                            .iter()
                            .map(|s| StringMatcher {
                                match_pattern: Some(MatchPattern::Exact(s.clone())),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds_secret("ROOTCA")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocketMatch {
        name: "tlsMode-istio".into(),
        r#match: Some(strukt(&[("tlsMode", string("istio"))])),
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(ConfigType::TypedConfig(any(type_url::UPSTREAM_TLS, &tls))),
        }),
    }
}

fn cluster(service: &Service, port: u16, subset: &str) -> Cluster {
    let kind = match service.discovery {
        Discovery::Eds => DiscoveryType::Eds,
        Discovery::Dns(_) => DiscoveryType::StrictDns,
        Discovery::OriginalDst => DiscoveryType::OriginalDst,
    };
    let services = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: vec![Value {
                kind: Some(Kind::StructValue(strukt(&[
                    ("host", string(&service.host)),
                    (
                        "name",
                        string(service.host.split('.').next().unwrap_or_default()),
                    ),
                    ("namespace", string(&service.namespace)),
                ]))),
            }],
        })),
    };
    let mut c = Cluster {
        name: subset_cluster_name(port, subset, &service.host),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(kind as i32)),
        transport_socket_matches: vec![
            istio_tls(service, port, subset),
            TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                r#match: Some(Struct::default()),
                transport_socket: Some(TransportSocket {
                    name: "envoy.transport_sockets.raw_buffer".into(),
                    // As istiod: Envoy finds the extension by the typed config's type.
                    config_type: Some(ConfigType::TypedConfig(Any {
                        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer".into(),
                        value: vec![],
                    })),
                }),
            },
        ],
        metadata: Some(Metadata {
            filter_metadata: [("istio".to_string(), strukt(&[("services", services)]))].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    match &service.discovery {
        Discovery::Eds => {
            c.eds_cluster_config = Some(EdsClusterConfig {
                eds_config: Some(ConfigSource {
                    config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                        AggregatedConfigSource {},
                    )),
                    ..Default::default()
                }),
                service_name: String::new(),
            })
        }
        Discovery::Dns(hosts) => {
            c.load_assignment = Some(ClusterLoadAssignment {
                cluster_name: c.name.clone(),
                endpoints: vec![locality(
                    hosts
                        .iter()
                        .map(|h| LbEndpoint {
                            host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
                                address: Some(socket(h, port)),
                                ..Default::default()
                            })),
                            ..Default::default()
                        })
                        .collect(),
                    "",
                    0,
                )],
                ..Default::default()
            })
        }
        // As istiod: Envoy takes no other policy for ORIGINAL_DST.
        Discovery::OriginalDst => c.lb_policy = LbPolicy::ClusterProvided as i32,
    }
    c
}

/// Clusters istiod sends that a VM client must ignore.
fn ignored_clusters(inbound: Option<&crate::istiod_traffic::InboundWorkload>) -> Vec<Cluster> {
    let mut out: Vec<Cluster> = [
        "BlackHoleCluster",
        "PassthroughCluster",
        "InboundPassthroughCluster",
        "inbound|8080||",
    ]
    .iter()
    .map(|n| Cluster {
        name: n.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        ..Default::default()
    })
    .collect();
    // A workload's inbound clusters as istiod builds them for a sidecar: the original
    // destination, reached from 127.0.0.6 (which istio-init's rules leave alone).
    for p in inbound.map(|w| w.ports.as_slice()).unwrap_or_default() {
        use interceptor_proto::envoy::config::cluster::v3::cluster::LbPolicy;
        use interceptor_proto::envoy::config::core::v3::{BindConfig, SocketAddress};
        out.retain(|c| c.name != format!("inbound|{p}||"));
        out.push(Cluster {
            name: format!("inbound|{p}||"),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32,
            )),
            lb_policy: LbPolicy::ClusterProvided as i32,
            upstream_bind_config: Some(BindConfig {
                source_address: Some(SocketAddress {
                    address: "127.0.0.6".into(),
                    port_specifier: Some(
                        interceptor_proto::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(0),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    out
}

impl Shared {
    /// Every cluster by name.
    fn clusters(&self) -> BTreeMap<String, Any> {
        let mesh = self.mesh.lock().unwrap();
        let mut out: BTreeMap<String, Any> = ignored_clusters(mesh.inbound.as_ref())
            .into_iter()
            .map(|c| (c.name.clone(), any(type_url::CLUSTER, &c)))
            .collect();
        let by_host = crate::istiod_traffic::by_host(crate::istiod_traffic::parse(&mesh.traffic));
        for s in &mesh.services {
            let docs = by_host.get(&s.host).map(Vec::as_slice).unwrap_or_default();
            let subsets = crate::istiod_traffic::subsets_of(docs, &s.host);
            for p in &s.ports {
                // One cluster for the service, one per DestinationRule subset, on every port.
                for subset in std::iter::once("").chain(subsets.iter().map(|(n, _)| n.as_str())) {
                    let mut c = cluster(s, *p, subset);
                    let policy = crate::istiod_traffic::policy_of(docs, &s.host, subset);
                    crate::istiod_traffic::apply_policy(&mut c, &policy, s);
                    if s.auto_ports.contains(p) {
                        crate::istiod_traffic::use_downstream_protocol(&mut c);
                    }
                    out.insert(c.name.clone(), any(type_url::CLUSTER, &c));
                }
            }
        }
        out
    }

    /// Every listener: virtualOutbound and one `<VIP>_<port>` per TCP service port.
    fn listeners(&self) -> BTreeMap<String, Any> {
        let mesh = self.mesh.lock().unwrap();
        let by_host = crate::istiod_traffic::by_host(crate::istiod_traffic::parse(&mesh.traffic));
        let mut out = BTreeMap::new();
        let vo = crate::istiod_traffic::virtual_outbound(mesh.registry_only);
        out.insert(vo.name.clone(), any(type_url::LISTENER, &vo));
        if let Some(w) = &mesh.inbound {
            let docs = crate::istiod_traffic::parse(&mesh.traffic);
            let vi = crate::istiod_traffic::virtual_inbound(&docs, w);
            out.insert(vi.name.clone(), any(type_url::LISTENER, &vi));
        }
        for s in &mesh.services {
            for p in &s.http_ports {
                let l = crate::istiod_http::http_listener(*p);
                out.insert(l.name.clone(), any(type_url::LISTENER, &l));
            }
            let docs = by_host.get(&s.host).map(Vec::as_slice).unwrap_or_default();
            for vip in s.vips.iter().filter(|v| v.is_ipv4()) {
                for p in s.ports.iter().filter(|p| !s.http_ports.contains(p)) {
                    let mut l = crate::istiod_traffic::service_listener(
                        docs,
                        &s.host,
                        &vip.to_string(),
                        *p,
                        &s.ports,
                        s.tls_ports.contains(p),
                    );
                    if s.auto_ports.contains(p) {
                        l = crate::istiod_http::sniffed_listener(l, &s.host, *p);
                    }
                    out.insert(l.name.clone(), any(type_url::LISTENER, &l));
                }
            }
        }
        if let Some(name) = &mesh.corrupt_listener {
            out.insert(
                name.clone(),
                Any {
                    type_url: type_url::LISTENER.into(),
                    value: interceptor_proto::envoy::config::listener::v3::Listener {
                        name: name.clone(),
                        address: Some(socket("10.96.99.1", 80)),
                        filter_chains: vec![interceptor_proto::envoy::config::listener::v3::FilterChain {
                            filters: vec![interceptor_proto::envoy::config::listener::v3::Filter {
                                name: "envoy.filters.network.tcp_proxy".into(),
                                config_type: Some(interceptor_proto::envoy::config::listener::v3::filter::ConfigType::TypedConfig(Any {
                                    type_url: type_url::TCP_PROXY.into(),
                                    value: vec![0xff, 0xff, 0xff],
                                })),
                            }],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }
                    .encode_to_vec(),
                },
            );
        }
        out
    }

    /// RDS: per HTTP port, a route configuration over every service with the port, and one
    /// per sniffed service port (`"<fqdn>:<port>"`), for a proxy in `proxy_ns`.
    fn routes(&self, proxy_ns: &str) -> BTreeMap<String, Any> {
        let mesh = self.mesh.lock().unwrap();
        let by_host = crate::istiod_traffic::by_host(crate::istiod_traffic::parse(&mesh.traffic));
        let ports: BTreeSet<u16> = mesh
            .services
            .iter()
            .flat_map(|s| s.http_ports.iter().copied())
            .collect();
        fn http_service<'a>(
            s: &'a Service,
            by_host: &'a HashMap<String, Vec<crate::istiod_traffic::Doc>>,
        ) -> crate::istiod_http::HttpService<'a> {
            crate::istiod_http::HttpService {
                host: &s.host,
                namespace: &s.namespace,
                vips: s.vips.iter().map(|v| v.to_string()).collect(),
                ports: &s.ports,
                docs: by_host.get(&s.host).map(Vec::as_slice).unwrap_or_default(),
            }
        }
        let service = |s| http_service(s, &by_host);
        let sniffed: Vec<(String, Any)> = mesh
            .services
            .iter()
            .flat_map(|s| s.auto_ports.iter().map(move |p| (s, *p)))
            .map(|(s, port)| {
                (
                    format!("{}:{port}", s.host),
                    crate::istiod_http::sniffed_route_configuration(&service(s), port, proxy_ns),
                )
            })
            .collect();
        ports
            .into_iter()
            .map(|port| {
                let services: Vec<crate::istiod_http::HttpService<'_>> = mesh
                    .services
                    .iter()
                    .filter(|s| s.http_ports.contains(&port))
                    .map(service)
                    .collect();
                (
                    port.to_string(),
                    crate::istiod_http::route_configuration(port, &services, proxy_ns),
                )
            })
            .chain(sniffed)
            .collect()
    }

    /// Every EDS cluster's load assignment for a client in `network`.
    fn assignments(&self, network: &Client) -> BTreeMap<String, Any> {
        let mesh = self.mesh.lock().unwrap();
        let mut out = BTreeMap::new();
        let by_host = crate::istiod_traffic::by_host(crate::istiod_traffic::parse(&mesh.traffic));
        for s in mesh
            .services
            .iter()
            .filter(|s| s.discovery == Discovery::Eds)
        {
            let docs = by_host.get(&s.host).map(Vec::as_slice).unwrap_or_default();
            let subsets = crate::istiod_traffic::subsets_of(docs, &s.host);
            // istiod prioritises by locality only where outlier detection is set.
            let failover = |subset: &str| {
                crate::istiod_traffic::policy_of(docs, &s.host, subset)
                    .outlier_detection
                    .is_some()
            };
            for p in &s.ports {
                let cla = load_assignment(&mesh, s, *p, network, None, failover(""));
                out.insert(cla.cluster_name.clone(), any(type_url::ENDPOINT, &cla));
                for subset in &subsets {
                    let cla =
                        load_assignment(&mesh, s, *p, network, Some(subset), failover(&subset.0));
                    out.insert(cla.cluster_name.clone(), any(type_url::ENDPOINT, &cla));
                }
            }
        }
        out
    }

    fn name_table(&self) -> Any {
        let mesh = self.mesh.lock().unwrap();
        let table = mesh
            .services
            .iter()
            .map(|s| {
                let short = s.host.split('.').next().unwrap_or_default().to_string();
                (
                    s.host.clone(),
                    NameInfo {
                        ips: s.vips.iter().map(ToString::to_string).collect(),
                        registry: if s.kubernetes {
                            "Kubernetes".into()
                        } else {
                            "External".into()
                        },
                        shortname: if s.kubernetes { short } else { String::new() },
                        namespace: if s.kubernetes {
                            s.namespace.clone()
                        } else {
                            String::new()
                        },
                        alt_hosts: vec![],
                    },
                )
            })
            .collect();
        any(
            type_url::NAME_TABLE,
            &NameTable {
                table,
                name_info: None,
            },
        )
    }

    pub(crate) fn secrets(&self) -> Option<crate::istiod_sds::Secrets> {
        self.secrets.lock().unwrap().clone()
    }

    fn version(&self) -> String {
        self.version.lock().unwrap().to_string()
    }

    /// Does the call carry our bearer token?
    pub(crate) fn token_matches<T>(&self, req: &Request<T>) -> bool {
        self.token_identity(req).is_some()
    }

    /// Whom the request's bearer token stands for: the control plane's token's identity, or
    /// one of `CaState::more_tokens`.
    pub(crate) fn token_identity<T>(&self, req: &Request<T>) -> Option<String> {
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))?;
        if bearer == self.token.lock().unwrap().as_str() {
            return Some(self.ca_state.token_identity.lock().unwrap().clone());
        }
        self.ca_state
            .more_tokens
            .lock()
            .unwrap()
            .get(bearer)
            .cloned()
    }

    /// The bearer token, or a client certificate from our root, as istiod accepts either.
    fn authenticate<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.token_matches(req) {
            return Ok(());
        }
        if req
            .extensions()
            .get::<Peer>()
            .is_some_and(|p| !p.identities.is_empty())
        {
            return Ok(());
        }
        Err(Status::unauthenticated(
            "authentication failure: no valid token or client certificate",
        ))
    }

    fn record(&self, seen: Seen) {
        self.seen.lock().unwrap().push(seen);
    }
}

fn metadata_of(
    node: Option<&interceptor_proto::envoy::config::core::v3::Node>,
) -> (String, BTreeMap<String, String>) {
    let Some(node) = node else {
        return (String::new(), BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    if let Some(md) = &node.metadata {
        for (k, v) in &md.fields {
            let text = match &v.kind {
                Some(Kind::StringValue(s)) => s.clone(),
                Some(Kind::BoolValue(b)) => format!("bool:{b}"),
                Some(Kind::StructValue(s)) => {
                    let mut fields: Vec<String> = s
                        .fields
                        .iter()
                        .map(|(k, v)| match &v.kind {
                            Some(Kind::StringValue(s)) => format!("{k}={s}"),
                            _ => format!("{k}=?"),
                        })
                        .collect();
                    fields.sort();
                    format!("{{{}}}", fields.join(","))
                }
                _ => "?".into(),
            };
            out.insert(k.clone(), text);
        }
    }
    (node.id.clone(), out)
}

/// Who connected, from the TLS handshake.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub identities: Vec<String>,
}

struct Ads(Arc<Shared>);

type DeltaStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        self.0.authenticate(&request)?;
        let shared = self.0.clone();
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut pushes = shared.pushes.subscribe();
            let mut recycle = shared.recycle.subscribe();
            let (mut node_id, mut md) = (String::new(), BTreeMap::new());
            let mut network = Client::default();
            // What this client has, by type: name -> encoded resource.
            let mut sent: HashMap<&'static str, BTreeMap<String, Vec<u8>>> = HashMap::new();
            let mut eds: BTreeSet<String> = BTreeSet::new();
            let mut rds: BTreeSet<String> = BTreeSet::new();
            let mut wants: BTreeSet<&'static str> = BTreeSet::new();
            let mut nonce = 0u64;
            let send = |ty: &'static str,
                        now: BTreeMap<String, Any>,
                        only: Option<&BTreeSet<String>>,
                        sent: &mut HashMap<&'static str, BTreeMap<String, Vec<u8>>>,
                        nonce: &mut u64,
                        version: String,
                        force: bool| {
                let had = sent.entry(ty).or_default();
                let mut resources = Vec::new();
                let mut removed = Vec::new();
                for (name, a) in &now {
                    if only.is_some_and(|o| !o.contains(name)) {
                        continue;
                    }
                    if force
                        || !had
                            .get(name)
                            .is_some_and(|h| same_resource(ty, h, &a.value))
                    {
                        resources.push(Resource {
                            name: if ty == type_url::NAME_TABLE {
                                String::new()
                            } else {
                                name.clone()
                            },
                            version: version.clone(),
                            resource: Some(a.clone()),
                            ..Default::default()
                        });
                        had.insert(name.clone(), a.value.clone());
                    }
                }
                let gone: Vec<String> = had
                    .keys()
                    .filter(|n| !now.contains_key(*n) || only.is_some_and(|o| !o.contains(*n)))
                    .cloned()
                    .collect();
                for n in gone {
                    had.remove(&n);
                    removed.push(n);
                }
                if resources.is_empty() && removed.is_empty() && !force {
                    return None;
                }
                *nonce += 1;
                Some(DeltaDiscoveryResponse {
                    type_url: ty.to_string(),
                    system_version_info: version,
                    resources,
                    removed_resources: removed,
                    nonce: nonce.to_string(),
                    ..Default::default()
                })
            };
            loop {
                tokio::select! {
                    req = incoming.next() => {
                        let Some(Ok(req)) = req else {
                            // The client closed its stream (or the connection went).
                            shared.ended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        };
                        if req.node.is_some() {
                            (node_id, md) = metadata_of(req.node.as_ref());
                            network = Client::of(req.node.as_ref(), &md);
                        }
                        shared.record(Seen {
                            type_url: req.type_url.clone(),
                            nonce: req.response_nonce.clone(),
                            names: req.resource_names_subscribe.clone(),
                            error: req.error_detail.as_ref().map(|e| e.message.clone()),
                            delta: true,
                            metadata: md.clone(),
                            node_id: node_id.clone(),
                            at: std::time::SystemTime::now(),
                        });
                        if !req.response_nonce.is_empty() {
                            continue; // an ACK or NACK: istiod only logs a NACK
                        }
                        let v = shared.version();
                        let out = match req.type_url.as_str() {
                            type_url::CLUSTER => {
                                wants.insert(type_url::CLUSTER);
                                let c = send(type_url::CLUSTER, shared.clusters(), None, &mut sent, &mut nonce, v.clone(), true);
                                // A CDS request always triggers an EDS push.
                                let e = (!eds.is_empty()).then(|| send(type_url::ENDPOINT, shared.assignments(&network), Some(&eds), &mut sent, &mut nonce, v, true)).flatten();
                                vec![c, e]
                            }
                            type_url::ENDPOINT => {
                                wants.insert(type_url::ENDPOINT);
                                eds.extend(req.resource_names_subscribe.iter().cloned());
                                for n in &req.resource_names_unsubscribe {
                                    eds.remove(n);
                                }
                                vec![send(type_url::ENDPOINT, shared.assignments(&network), Some(&eds), &mut sent, &mut nonce, v, false)]
                            }
                            type_url::LISTENER => {
                                wants.insert(type_url::LISTENER);
                                vec![send(type_url::LISTENER, shared.listeners(), None, &mut sent, &mut nonce, v, true)]
                            }
                            crate::istiod_http::ROUTE => {
                                wants.insert(crate::istiod_http::ROUTE);
                                rds.extend(req.resource_names_subscribe.iter().cloned());
                                for n in &req.resource_names_unsubscribe {
                                    rds.remove(n);
                                }
                                vec![send(crate::istiod_http::ROUTE, shared.routes(&proxy_namespace(&node_id)), Some(&rds), &mut sent, &mut nonce, v, false)]
                            }
                            type_url::NAME_TABLE => {
                                wants.insert(type_url::NAME_TABLE);
                                let t: BTreeMap<String, Any> = [(String::new(), shared.name_table())].into();
                                vec![send(type_url::NAME_TABLE, t, None, &mut sent, &mut nonce, v, true)]
                            }
                            _ => vec![],
                        };
                        for r in out.into_iter().flatten() {
                            if tx.send(Ok(r)).is_err() { return; }
                        }
                    }
                    changed = pushes.changed() => {
                        if changed.is_err() { return; }
                        let v = shared.version();
                        let mut out = Vec::new();
                        let mut clusters_changed = false;
                        if wants.contains(type_url::CLUSTER) {
                            let c = send(type_url::CLUSTER, shared.clusters(), None, &mut sent, &mut nonce, v.clone(), false);
                            clusters_changed = c.is_some();
                            out.push(c);
                        }
                        // A changed cluster warms in Envoy until its EDS arrives again (else it
                        // waits out initial_fetch_timeout, 15 s): istiod's full push sends CDS
                        // then every watched EDS resource, changed or not.
                        if wants.contains(type_url::ENDPOINT) {
                            out.push(send(type_url::ENDPOINT, shared.assignments(&network), Some(&eds), &mut sent, &mut nonce, v.clone(), clusters_changed));
                        }
                        if wants.contains(type_url::LISTENER) {
                            out.push(send(type_url::LISTENER, shared.listeners(), None, &mut sent, &mut nonce, v.clone(), false));
                        }
                        if wants.contains(crate::istiod_http::ROUTE) {
                            out.push(send(crate::istiod_http::ROUTE, shared.routes(&proxy_namespace(&node_id)), Some(&rds), &mut sent, &mut nonce, v.clone(), false));
                        }
                        if wants.contains(type_url::NAME_TABLE) {
                            let t: BTreeMap<String, Any> = [(String::new(), shared.name_table())].into();
                            out.push(send(type_url::NAME_TABLE, t, None, &mut sent, &mut nonce, v, false));
                        }
                        for r in out.into_iter().flatten() {
                            if tx.send(Ok(r)).is_err() { return; }
                        }
                    }
                    _ = recycle.changed() => return, // the stream ends: the client reconnects
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        self.0.authenticate(&request)?;
        let shared = self.0.clone();
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut pushes = shared.pushes.subscribe();
            let mut recycle = shared.recycle.subscribe();
            let (mut node_id, mut md) = (String::new(), BTreeMap::new());
            let mut network = Client::default();
            let mut wants: BTreeMap<String, Vec<String>> = BTreeMap::new();
            // EDS sent so far, to send only what changed (SotW EDS may be partial).
            let mut eds_sent: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            // The clusters last sent, to tell a push that changed them.
            let mut cds_sent: Option<Vec<u8>> = None;
            let mut nonce = 0u64;
            let mut respond = |ty: &str,
                               names: &[String],
                               network: &Client,
                               proxy_ns: &str,
                               all: bool|
             -> Option<DiscoveryResponse> {
                let resources: Vec<Any> = match ty {
                    type_url::CLUSTER => shared.clusters().into_values().collect(),
                    type_url::LISTENER => shared.listeners().into_values().collect(),
                    crate::istiod_http::ROUTE => shared
                        .routes(proxy_ns)
                        .into_iter()
                        .filter(|(n, _)| names.contains(n))
                        .map(|(_, a)| a)
                        .collect(),
                    type_url::NAME_TABLE => vec![shared.name_table()],
                    type_url::ENDPOINT => shared
                        .assignments(network)
                        .into_iter()
                        .filter(|(n, _)| names.contains(n))
                        .filter(|(n, a)| {
                            let fresh = all
                                || !eds_sent
                                    .get(n)
                                    .is_some_and(|h| same_resource(ty, h, &a.value));
                            eds_sent.insert(n.clone(), a.value.clone());
                            fresh
                        })
                        .map(|(_, a)| a)
                        .collect(),
                    _ => return None,
                };
                if ty == type_url::ENDPOINT && resources.is_empty() && !all {
                    return None;
                }
                nonce += 1;
                Some(DiscoveryResponse {
                    type_url: ty.to_string(),
                    version_info: shared.version(),
                    resources,
                    nonce: nonce.to_string(),
                    ..Default::default()
                })
            };
            loop {
                tokio::select! {
                    req = incoming.next() => {
                        let Some(Ok(req)) = req else {
                            // The client closed its stream (or the connection went).
                            shared.ended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        };
                        if req.node.is_some() {
                            (node_id, md) = metadata_of(req.node.as_ref());
                            network = Client::of(req.node.as_ref(), &md);
                        }
                        shared.record(Seen {
                            type_url: req.type_url.clone(),
                            nonce: req.response_nonce.clone(),
                            names: req.resource_names.clone(),
                            error: req.error_detail.as_ref().map(|e| e.message.clone()),
                            delta: false,
                            metadata: md.clone(),
                            node_id: node_id.clone(),
                            at: std::time::SystemTime::now(),
                        });
                        let changed_names = wants.get(&req.type_url) != Some(&req.resource_names);
                        wants.insert(req.type_url.clone(), req.resource_names.clone());
                        // A request with a nonce and the same names is an ACK/NACK.
                        if !req.response_nonce.is_empty() && !changed_names {
                            continue;
                        }
                        let mut out = vec![respond(&req.type_url, &req.resource_names, &network, &proxy_namespace(&node_id), true)];
                        if req.type_url == type_url::CLUSTER {
                            cds_sent = Some(encoded(&out[0]));
                            if let Some(names) = wants.get(type_url::ENDPOINT).cloned() {
                                out.push(respond(type_url::ENDPOINT, &names, &network, &proxy_namespace(&node_id), true));
                            }
                        }
                        for r in out.into_iter().flatten() {
                            if tx.send(Ok(r)).is_err() { return; }
                        }
                    }
                    changed = pushes.changed() => {
                        if changed.is_err() { return; }
                        // Types in push order (CDS, EDS, LDS, RDS sort so); a changed cluster
                        // gets its EDS again, as istiod's full push (see the Delta stream).
                        let mut out = Vec::new();
                        let mut clusters_changed = false;
                        for (ty, names) in wants.clone() {
                            let r = respond(&ty, &names, &network, &proxy_namespace(&node_id), clusters_changed);
                            if ty == type_url::CLUSTER {
                                let now = encoded(&r);
                                clusters_changed = cds_sent.as_ref() != Some(&now);
                                cds_sent = Some(now);
                            }
                            out.push(r);
                        }
                        for r in out.into_iter().flatten() {
                            if tx.send(Ok(r)).is_err() { return; }
                        }
                    }
                    _ = recycle.changed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// The namespace a proxy is in: its node id's DNS domain's first label
/// (`sidecar~IP~POD.NS~NS.svc.cluster.local`), as istiod reads it.
fn proxy_namespace(node_id: &str) -> String {
    node_id
        .split('~')
        .nth(3)
        .and_then(|d| d.split('.').next())
        .unwrap_or("default")
        .to_string()
}

/// A SotW response's resources, encoded end to end: to tell whether a push changed them.
fn encoded(r: &Option<DiscoveryResponse>) -> Vec<u8> {
    r.iter()
        .flat_map(|r| r.resources.iter())
        .flat_map(|a| a.value.iter().copied())
        .collect()
}

/// The responses a first Delta sync of `mesh` is made of (clusters, their endpoints, the name
/// table), encoded: for measuring what decoding them costs.
pub fn encoded_sync(mesh: Mesh) -> Vec<(String, Vec<u8>)> {
    let (pushes, _) = watch::channel(0);
    let (recycle, _) = watch::channel(0);
    let shared = Shared {
        ca_state: Default::default(),
        version: Mutex::new(1),
        mesh: Mutex::new(mesh),
        pushes,
        recycle,
        seen: Mutex::new(Vec::new()),
        ended: Default::default(),
        token: Mutex::new(String::new()),
        ca: Ca::new("unused"),
        secrets: Mutex::new(None),
    };
    let response = |ty: &str, all: BTreeMap<String, Any>| DeltaDiscoveryResponse {
        type_url: ty.to_string(),
        resources: all
            .into_iter()
            .map(|(name, a)| Resource {
                name,
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    vec![
        (
            "clusters".into(),
            response(type_url::CLUSTER, shared.clusters()).encode_to_vec(),
        ),
        (
            "endpoints".into(),
            response(type_url::ENDPOINT, shared.assignments(&Client::default())).encode_to_vec(),
        ),
        (
            "names".into(),
            response(
                type_url::NAME_TABLE,
                [(String::new(), shared.name_table())].into(),
            )
            .encode_to_vec(),
        ),
    ]
}

/// Seconds `bytes` (an encoded DeltaDiscoveryResponse) take to decode, best of `rounds`.
pub fn decode_seconds(bytes: &[u8], rounds: usize) -> f64 {
    (0..rounds.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            let r = DeltaDiscoveryResponse::decode(bytes).expect("decodes");
            std::hint::black_box(&r);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// A TLS connection that tells tonic who the peer is.
struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        let ids = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| crate::certs::uri_sans(leaf))
            .unwrap_or_default();
        Peer { identities: ids }
    }
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The name istiod's certificate carries and the VM checks.
pub const ISTIOD_NAME: &str = "istiod.istio-system.svc";

/// A running test control plane. Dropping it stops it (its connections die with it, as when
/// istiod is killed).
pub struct ControlPlane {
    shared: Arc<Shared>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl ControlPlane {
    /// Serves on `addr` inside `ns`, with a certificate for `ISTIOD_NAME` from `ca` (which
    /// also signs workload certificates), accepting `token`.
    pub fn start(ns: &NetnsRef, addr: SocketAddr, ca: &Ca, token: &str, mesh: Mesh) -> Self {
        Self::start_with_name(ns, addr, ca, token, mesh, ISTIOD_NAME)
    }

    /// As `start`, with a certificate for another name (to see a client refuse it).
    pub fn start_with_name(
        ns: &NetnsRef,
        addr: SocketAddr,
        ca: &Ca,
        token: &str,
        mesh: Mesh,
        name: &str,
    ) -> Self {
        let netns = Some(format!("/run/netns/{}", ns.name()));
        Self::start_in(netns, addr, ca, token, mesh, name)
    }

    /// Serves on `addr` in the caller's own network namespace: on the host's loopback, for
    /// QEMU guests that reach it through a forwarded address (`cargo xtask vm-test`).
    pub fn start_here(addr: SocketAddr, ca: &Ca, token: &str, mesh: Mesh) -> Self {
        Self::start_in(None, addr, ca, token, mesh, ISTIOD_NAME)
    }

    fn start_in(
        netns: Option<String>,
        addr: SocketAddr,
        ca: &Ca,
        token: &str,
        mesh: Mesh,
        name: &str,
    ) -> Self {
        let ca = ca.clone_ca();
        let (pushes, _) = watch::channel(0);
        let (recycle, _) = watch::channel(0);
        let server_cert = ca.server_cert(name);
        let roots = ca.roots();
        let shared = Arc::new(Shared {
            ca_state: Default::default(),
            version: Mutex::new(mesh.first_version.max(1)),
            mesh: Mutex::new(mesh),
            pushes,
            recycle,
            seen: Mutex::new(Vec::new()),
            ended: Default::default(),
            token: Mutex::new(token.to_string()),
            ca,
            secrets: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let s2 = shared.clone();
        let thread = std::thread::spawn(move || {
            if let Some(path) = netns {
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // SAFETY: setns on a descriptor we own; it moves only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let _ = ready_tx.send(Err(std::io::Error::last_os_error().to_string()));
                    return;
                }
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let listener = match rt.block_on(tokio::net::TcpListener::bind(addr)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("bind {addr}: {e}")));
                    return;
                }
            };
            let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(rustls::crypto::ring::default_provider()),
                )
                .allow_unauthenticated()
                .build()
                .expect("client verifier"),
            )
            .with_single_cert(server_cert.0, server_cert.1)
            .expect("server certificate");
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            let (conn_tx, conn_rx) = mpsc::unbounded_channel::<Result<TlsIo, std::io::Error>>();
            rt.spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, conn_tx) = (acceptor.clone(), conn_tx.clone());
                    tokio::spawn(async move {
                        // A client that refuses our certificate just goes away.
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = conn_tx.send(Ok(TlsIo(tls)));
                        }
                    });
                }
            });
            let ads = AggregatedDiscoveryServiceServer::new(Ads(s2.clone()))
                .max_decoding_message_size(256 * 1024 * 1024)
                .max_encoding_message_size(256 * 1024 * 1024);
            let sds = crate::istiod_sds::service(s2.clone());
            let ca_service = crate::istiod_ca::service(s2);
            rt.spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(ads)
                    .add_service(ca_service)
                    .add_service(sds)
                    .serve_with_incoming(UnboundedReceiverStream::new(conn_rx))
                    .await;
            });
            let _ = ready_tx.send(Ok(()));
            // Runs until told to stop; then everything it holds goes at once, like a kill.
            rt.block_on(async {
                loop {
                    if stop_rx.try_recv().is_ok() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            });
            rt.shutdown_background();
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("test control plane did not start: {e}"),
            Err(_) => panic!("test control plane thread died"),
        }
        Self {
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            addr,
        }
    }

    /// Serves `default` and `ROOTCA` over SDS (as istio-agent does for its Envoy), for an
    /// Envoy peer whose clusters are ours.
    pub fn serve_secrets(&self, secrets: crate::istiod_sds::Secrets) {
        *self.shared.secrets.lock().unwrap() = Some(secrets);
    }

    /// Replaces the mesh and pushes it to every client (a new version).
    pub fn push(&self, mesh: Mesh) {
        *self.shared.mesh.lock().unwrap() = mesh;
        let v = {
            let mut v = self.shared.version.lock().unwrap();
            *v += 1;
            *v
        };
        self.shared.pushes.send_replace(v);
    }

    /// Changes the mesh in place and pushes it.
    pub fn update(&self, f: impl FnOnce(&mut Mesh)) {
        let mut mesh = self.shared.mesh.lock().unwrap().clone();
        f(&mut mesh);
        self.push(mesh);
    }

    /// Sets the version the next pushes start from (a restarted istiod with a new version).
    pub fn set_version(&self, v: u64) {
        *self.shared.version.lock().unwrap() = v;
    }

    /// Ends every stream, as istiod does every ~30 minutes.
    pub fn recycle(&self) {
        self.shared.recycle.send_modify(|v| *v += 1);
    }

    pub fn set_token(&self, token: &str) {
        *self.shared.token.lock().unwrap() = token.to_string();
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Waits until a request matches `f`.
    pub fn wait_seen(&self, secs: f64, f: impl Fn(&Seen) -> bool) -> Option<Seen> {
        wait_for(secs, || self.seen().into_iter().find(|s| f(s)))
    }

    /// ACKs (requests with a nonce and no error) of a type.
    pub fn acks(&self, type_url: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.type_url == type_url && !s.nonce.is_empty() && s.error.is_none())
            .count()
    }

    /// ADS streams that ended from the client's side (a clean shutdown closes its stream).
    pub fn streams_ended(&self) -> u64 {
        self.shared.ended.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Health reports (HealthInformation requests) so far: (healthy, message, when).
    pub fn health_reports(&self) -> Vec<(bool, String, std::time::SystemTime)> {
        self.seen()
            .into_iter()
            .filter(|s| s.type_url == type_url::HEALTH)
            .map(|s| (s.error.is_none(), s.error.unwrap_or_default(), s.at))
            .collect()
    }

    pub fn ca(&self) -> &Ca {
        &self.shared.ca
    }

    /// The CA: who the token stands for, forced lifetimes, faults, what it issued.
    pub fn ca_state(&self) -> &crate::istiod_ca::CaState {
        &self.shared.ca_state
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
