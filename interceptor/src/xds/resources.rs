//! What istiod sends, in the few fields the mesh model needs (SPEC section 10), and how it
//! becomes `mesh::Resources`. Decoding checks every resource: one that cannot be used fails its
//! whole response (which is then NACKed) and the state in force stays.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use interceptor_proto::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use interceptor_proto::envoy::config::cluster::v3::Cluster;
use interceptor_proto::envoy::config::core::v3::address::Address as EnvoyAddress;
use interceptor_proto::envoy::config::core::v3::socket_address::PortSpecifier;
use interceptor_proto::envoy::config::core::v3::transport_socket::ConfigType;
use interceptor_proto::envoy::config::core::v3::Metadata;
use interceptor_proto::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use interceptor_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use interceptor_proto::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use interceptor_proto::google::protobuf::{value::Kind, Any, Struct, UInt32Value};
use interceptor_proto::nds::NameTable as NdsTable;
use interceptor_proto::type_url;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::mesh::traffic::{
    LoadBalancer, OutlierDetection, Pool, TlsMode, TrafficPolicy, UpstreamTls,
    DEFAULT_MAX_EJECTION_PERCENT,
};
use crate::mesh::{
    self, Address, Health, Host, Location, NameTable, Resolution, ServiceDecl, ServicePort,
    Workload, TLS_MODE_LABEL, TUNNEL_LABEL,
};

/// A resource that cannot be applied: the NACK's message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{resource}: {message}")]
pub struct Invalid {
    pub resource: String,
    pub message: String,
}

fn invalid(resource: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        resource: resource.to_string(),
        message: message.into(),
    }
}

/// How a cluster's endpoints are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterKind {
    /// EDS: endpoints come in ClusterLoadAssignments.
    Eds,
    /// STRICT_DNS / LOGICAL_DNS: host names inline in the cluster, resolved by us.
    Dns,
    /// Inline addresses (STATIC).
    Static,
    /// ORIGINAL_DST: to where the application was connecting.
    OriginalDst,
}

/// An outbound cluster `outbound|PORT|SUBSET|HOST`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub namespace: String,
    pub kind: ClusterKind,
    /// A DestinationRule subset's cluster (`outbound|PORT|SUBSET|HOST`); empty: the service's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    /// Identities the server must present (the `tlsMode-istio` match's SANs).
    pub sans: Vec<String>,
    /// Endpoints carried inline (DNS, STATIC).
    pub inline: Vec<EndpointInfo>,
    /// What istiod made of the DestinationRule's traffic policy for this cluster.
    #[serde(default, skip_serializing_if = "is_default_policy")]
    pub policy: TrafficPolicy,
}

fn is_default_policy(p: &TrafficPolicy) -> bool {
    *p == TrafficPolicy::default()
}

/// Envoy's "no limit" circuit breaker value, which istiod sets by default (sheet 3.3).
const NO_LIMIT: u32 = u32::MAX;

fn millis(d: &interceptor_proto::google::protobuf::Duration) -> u64 {
    u64::try_from(d.seconds).unwrap_or(0) * 1000 + u64::try_from(d.nanos).unwrap_or(0) / 1_000_000
}

/// The cluster's `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`, where istiod put the
/// HTTP idle timeout and requests per connection (`clusterWrapper.build`) and the upstream
/// protocol (`setUpstreamProtocol`).
fn http_protocol_options(
    c: &Cluster,
) -> Result<
    Option<interceptor_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions>,
    Invalid,
> {
    use interceptor_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let Some(any) = c
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    else {
        return Ok(None);
    };
    HttpProtocolOptions::decode(any.value.as_slice())
        .map(Some)
        .map_err(|e| invalid(&c.name, format!("unreadable HttpProtocolOptions: {e}")))
}

/// HTTP/2 to every endpoint (explicit HTTP/2: HTTP2 and gRPC ports, or `h2UpgradePolicy:
/// UPGRADE`; older istiods set the cluster's own field), or as the client came
/// (`use_downstream_protocol_config`: `useClientProtocol`, sniffed ports).
#[allow(deprecated)]
fn upstream_protocol(
    c: &Cluster,
    options: Option<
        &interceptor_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions,
    >,
) -> Option<mesh::traffic::UpstreamProtocol> {
    use interceptor_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
    };
    use mesh::traffic::UpstreamProtocol;
    match options.and_then(|o| o.upstream_protocol_options.as_ref()) {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
            Some(ProtocolConfig::Http2ProtocolOptions(_)) => Some(UpstreamProtocol::Http2),
            _ => None,
        },
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
            Some(UpstreamProtocol::AsClient)
        }
        _ => c
            .http2_protocol_options
            .is_some()
            .then_some(UpstreamProtocol::Http2),
    }
}

/// The cluster's traffic policy (sheet 3.3, in reverse): lb_policy, the first circuit breaker
/// threshold (UINT32_MAX: no limit), connect_timeout, the HTTP protocol options' idle timeout
/// and requests per connection, outlier_detection's consecutive_5xx and base_ejection_time
/// (Envoy's defaults where unset: 5, 30 s).
fn traffic_policy(c: &Cluster) -> Result<TrafficPolicy, Invalid> {
    use interceptor_proto::envoy::config::cluster::v3::cluster::LbPolicy;
    let load_balancer = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin) => Some(LoadBalancer::RoundRobin),
        Ok(LbPolicy::LeastRequest) => Some(LoadBalancer::LeastRequest),
        Ok(LbPolicy::Random) => Some(LoadBalancer::Random),
        // A TCP proxy's only hash key from istiod is the source IP.
        Ok(LbPolicy::RingHash | LbPolicy::Maglev) => Some(LoadBalancer::SourceIpHash),
        _ => None,
    };
    let threshold = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.first());
    let limit = |v: Option<&UInt32Value>| v.map(|v| v.value).filter(|v| *v != NO_LIMIT);
    let options = http_protocol_options(c)?;
    let common = options
        .as_ref()
        .and_then(|o| o.common_http_protocol_options.as_ref());
    let pool = Pool {
        max_connections: limit(threshold.and_then(|t| t.max_connections.as_ref())),
        connect_timeout_ms: c.connect_timeout.as_ref().map(millis),
        max_pending_requests: limit(threshold.and_then(|t| t.max_pending_requests.as_ref())),
        max_requests: limit(threshold.and_then(|t| t.max_requests.as_ref())),
        max_retries: limit(threshold.and_then(|t| t.max_retries.as_ref())),
        // istiod writes it into the protocol options; older ones on the cluster itself.
        #[allow(deprecated)]
        max_requests_per_connection: limit(
            common
                .and_then(|o| o.max_requests_per_connection.as_ref())
                .or(c.max_requests_per_connection.as_ref()),
        ),
        idle_timeout_ms: common
            .and_then(|o| o.idle_timeout.as_ref())
            .map(millis)
            .filter(|ms| *ms > 0),
        upstream: upstream_protocol(c, options.as_ref()),
    };
    let pool = pool.is_set().then_some(pool);
    let outlier = c.outlier_detection.as_ref().map(|o| {
        let enforced = o
            .enforcing_consecutive_5xx
            .as_ref()
            .is_none_or(|v| v.value > 0);
        OutlierDetection {
            consecutive_errors: if enforced {
                o.consecutive_5xx.as_ref().map_or(5, |v| v.value)
            } else {
                0
            },
            base_ejection_ms: o.base_ejection_time.as_ref().map_or(30_000, millis),
            max_ejection_percent: o
                .max_ejection_percent
                .as_ref()
                .map_or(DEFAULT_MAX_EJECTION_PERCENT, |v| v.value.min(100)),
        }
    });
    Ok(TrafficPolicy {
        load_balancer,
        pool,
        outlier,
        tls: None,
        // istiod already prioritised the endpoints by locality for us (EDS priorities).
        locality: None,
    })
}

/// One endpoint of a ClusterLoadAssignment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub address: Address,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
    /// `tlsMode: istio` metadata: the endpoint speaks mTLS.
    pub mtls: bool,
    /// Given as an `envoy_internal_address` `connect_originate`: the endpoint takes HBONE.
    pub hbone: bool,
    pub locality: String,
    pub priority: u32,
    /// `name;ns;svc;rev;cluster` of istio's workload metadata: (name, namespace).
    pub workload: Option<(String, String)>,
    /// The same metadata's canonical service, canonical revision and cluster (empty: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical: Option<(String, String, String)>,
}

/// Which clusters are ours to use (a service's, a subset's); the rest (inbound, BlackHole,
/// Passthrough) are ignored, never errors.
pub fn outbound_name(name: &str) -> Option<(u16, &str, &str)> {
    let mut parts = name.splitn(4, '|');
    let (dir, port, subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if dir != "outbound" || host.is_empty() {
        return None;
    }
    Some((port.parse().ok()?, subset, host))
}

fn struct_str<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v),
        _ => None,
    }
}

fn filter<'a>(m: Option<&'a Metadata>, name: &str) -> Option<&'a Struct> {
    m?.filter_metadata.get(name)
}

/// The cluster's own TLS (sheet 3.5, in reverse): none at all is plaintext to every endpoint
/// (DR DISABLE, mesh-external, auto mTLS off); transport socket matches are auto mTLS (None);
/// a `transport_socket` is the DR's mode, told by its secrets: `default` is Istio's certificate
/// (ISTIO_MUTUAL), `file-cert:CERT~KEY` a client certificate from files (MUTUAL), neither
/// SIMPLE; `file-root:PATH` the CA bundle (`system`: the system's), an empty validation
/// context insecureSkipVerify.
fn upstream_tls(c: &Cluster) -> Result<Option<UpstreamTls>, Invalid> {
    let Some(socket) = &c.transport_socket else {
        return Ok(c
            .transport_socket_matches
            .is_empty()
            .then(|| UpstreamTls::mode(TlsMode::Disable)));
    };
    let Some(ConfigType::TypedConfig(any)) = &socket.config_type else {
        return Ok(Some(UpstreamTls::mode(TlsMode::Disable)));
    };
    if any.type_url != type_url::UPSTREAM_TLS {
        // raw_buffer and the like: plaintext.
        return Ok(Some(UpstreamTls::mode(TlsMode::Disable)));
    }
    let ctx = UpstreamTlsContext::decode(any.value.as_slice())
        .map_err(|e| invalid(&c.name, format!("transport socket: {e}")))?;
    let common = ctx.common_tls_context.unwrap_or_default();
    let mut out = UpstreamTls::mode(TlsMode::Simple);
    out.sni = Some(ctx.sni).filter(|s| !s.is_empty());
    for secret in &common.tls_certificate_sds_secret_configs {
        if secret.name == "default" {
            out.mode = TlsMode::IstioMutual;
        } else if let Some(files) = secret.name.strip_prefix("file-cert:") {
            let (cert, key) = files.split_once('~').ok_or_else(|| {
                invalid(
                    &c.name,
                    format!(
                        "client certificate secret {:?} is not file-cert:CERT~KEY",
                        secret.name
                    ),
                )
            })?;
            out.mode = TlsMode::Mutual;
            out.client_certificate = Some(cert.into());
            out.private_key = Some(key.into());
        } else {
            return Err(invalid(
                &c.name,
                format!("client certificate secret {:?}: a VM reads only Istio's own and file-cert: secrets (credentialName needs a gateway)", secret.name),
            ));
        }
    }
    let (validation, root) = match common.validation_context_type {
        Some(ValidationContextType::CombinedValidationContext(v)) => (
            v.default_validation_context,
            v.validation_context_sds_secret_config.map(|s| s.name),
        ),
        Some(ValidationContextType::ValidationContext(v)) => (Some(v), None),
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => (None, Some(s.name)),
        _ => (None, None),
    };
    match root.as_deref() {
        Some("ROOTCA") | None if out.mode == TlsMode::IstioMutual => {}
        None => out.insecure_skip_verify = true,
        Some(r) => match r.strip_prefix("file-root:") {
            Some("system") => {}
            Some(path) => out.ca_certificates = Some(path.into()),
            None => {
                return Err(invalid(
                    &c.name,
                    format!(
                        "validation secret {r:?}: a VM reads only ROOTCA and file-root: secrets"
                    ),
                ))
            }
        },
    }
    if let Some(v) = validation {
        #[allow(deprecated)]
        let plain = v.match_subject_alt_names.into_iter();
        let typed = v
            .match_typed_subject_alt_names
            .into_iter()
            .filter_map(|m| m.matcher);
        out.subject_alt_names = plain
            .chain(typed)
            .filter_map(|m| match m.match_pattern {
                Some(MatchPattern::Exact(s)) => Some(s),
                _ => None,
            })
            .collect();
    }
    Ok(Some(out))
}

/// The SANs of the cluster's `tlsMode-istio` transport socket.
fn istio_sans(c: &Cluster) -> Result<Vec<String>, Invalid> {
    for m in &c.transport_socket_matches {
        let is_istio = m
            .r#match
            .as_ref()
            .and_then(|s| struct_str(s, "tlsMode"))
            .is_some_and(|v| v == "istio");
        if !is_istio {
            continue;
        }
        let Some(ConfigType::TypedConfig(any)) = m
            .transport_socket
            .as_ref()
            .and_then(|t| t.config_type.as_ref())
        else {
            continue;
        };
        if any.type_url != type_url::UPSTREAM_TLS {
            continue;
        }
        let tls = UpstreamTlsContext::decode(any.value.as_slice())
            .map_err(|e| invalid(&c.name, format!("tlsMode-istio transport socket: {e}")))?;
        let validation = tls
            .common_tls_context
            .and_then(|ctx| ctx.validation_context_type)
            .and_then(|v| match v {
                ValidationContextType::ValidationContext(v) => Some(v),
                ValidationContextType::CombinedValidationContext(c) => c.default_validation_context,
                _ => None,
            });
        let Some(v) = validation else {
            return Ok(vec![]);
        };
        #[allow(deprecated)]
        let plain = v.match_subject_alt_names.into_iter();
        let typed = v
            .match_typed_subject_alt_names
            .into_iter()
            .filter_map(|m| m.matcher);
        let sans = plain
            .chain(typed)
            .filter_map(|m| match m.match_pattern {
                Some(MatchPattern::Exact(s)) => Some(s),
                _ => None,
            })
            .collect();
        return Ok(sans);
    }
    Ok(vec![])
}

/// An endpoint's address and port, and whether it is an HBONE endpoint.
fn socket_addr(
    name: &str,
    a: Option<&interceptor_proto::envoy::config::core::v3::Address>,
) -> Result<(Address, u16, bool), Invalid> {
    match a.and_then(|a| a.address.as_ref()) {
        Some(EnvoyAddress::SocketAddress(sa)) => {
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => {
                    u16::try_from(p).map_err(|_| invalid(name, format!("port {p} out of range")))?
                }
                _ => return Err(invalid(name, "endpoint without a port number")),
            };
            let address = match sa.address.parse::<IpAddr>() {
                Ok(ip) => Address::Ip(ip),
                Err(_) if !sa.address.is_empty() => Address::Hostname(sa.address.clone()),
                Err(_) => return Err(invalid(name, "endpoint without an address")),
            };
            Ok((address, port, false))
        }
        // SPEC 10: a tunnelling endpoint is `connect_originate` with `endpoint_id: "IP:port"`,
        // the workload's address and target port; the tunnel itself goes to IP:15008.
        Some(EnvoyAddress::EnvoyInternalAddress(ia)) => {
            use interceptor_proto::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
            let Some(AddressNameSpecifier::ServerListenerName(listener)) =
                &ia.address_name_specifier
            else {
                return Err(invalid(name, "internal address without a listener name"));
            };
            if listener != "connect_originate" {
                return Err(invalid(
                    name,
                    format!("internal address of listener {listener:?}: only connect_originate (HBONE) is known"),
                ));
            }
            let at: std::net::SocketAddr = ia.endpoint_id.parse().map_err(|_| {
                invalid(
                    name,
                    format!("HBONE endpoint id {:?} is not IP:port", ia.endpoint_id),
                )
            })?;
            Ok((Address::Ip(at.ip()), at.port(), true))
        }
        _ => Err(invalid(name, "endpoint address is not a socket address")),
    }
}

/// The endpoints of a load assignment.
pub fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointInfo>, Invalid> {
    let name = cla.cluster_name.as_str();
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        let loc = locality
            .locality
            .as_ref()
            .map(|l| {
                [l.region.as_str(), l.zone.as_str(), l.sub_zone.as_str()]
                    .join("/")
                    .trim_end_matches('/')
                    .to_string()
            })
            .unwrap_or_default();
        for lb in &locality.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(invalid(name, "endpoint without an address"));
            };
            let (address, port, hbone) = socket_addr(name, ep.address.as_ref())?;
            let md = lb.metadata.as_ref();
            let mtls = filter(md, "envoy.transport_socket_match")
                .and_then(|s| struct_str(s, "tlsMode"))
                .is_some_and(|m| m == "istio");
            let meta = filter(md, "istio").and_then(|s| struct_str(s, "workload"));
            let workload = meta.and_then(|w| {
                let mut f = w.split(';');
                Some((f.next()?.to_string(), f.next()?.to_string()))
            });
            let canonical = meta.and_then(|w| {
                let mut f = w.split(';').skip(2).map(str::to_string);
                Some((f.next()?, f.next()?, f.next().unwrap_or_default()))
            });
            // HEALTHY (1), UNKNOWN (0) and DEGRADED (5) take traffic, as in Envoy; UNHEALTHY,
            // DRAINING, TIMEOUT do not.
            let healthy = matches!(lb.health_status, 0 | 1 | 5);
            out.push(EndpointInfo {
                address,
                port,
                weight: lb
                    .load_balancing_weight
                    .map(|w| w.value)
                    .filter(|w| *w > 0)
                    .unwrap_or(1),
                healthy,
                mtls,
                hbone,
                locality: loc.clone(),
                priority: locality.priority,
                workload,
                canonical,
            });
        }
    }
    Ok(out)
}

/// A Cluster resource: Ok(None) for clusters that are not ours to use.
pub fn cluster(any: &Any) -> Result<Option<ClusterInfo>, Invalid> {
    let c = Cluster::decode(any.value.as_slice())
        .map_err(|e| invalid("(cluster)", format!("not a Cluster: {e}")))?;
    let Some((port, subset, host)) = outbound_name(&c.name) else {
        return Ok(None);
    };
    let kind = match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => match DiscoveryType::try_from(t) {
            Ok(DiscoveryType::Eds) => ClusterKind::Eds,
            Ok(DiscoveryType::StrictDns | DiscoveryType::LogicalDns) => ClusterKind::Dns,
            Ok(DiscoveryType::Static) => ClusterKind::Static,
            Ok(DiscoveryType::OriginalDst) => ClusterKind::OriginalDst,
            Err(_) => return Err(invalid(&c.name, format!("unknown cluster type {t}"))),
        },
        // Envoy's default is STATIC.
        None => ClusterKind::Static,
        Some(ClusterDiscoveryType::ClusterType(_)) => return Ok(None),
    };
    let namespace = filter(c.metadata.as_ref(), "istio")
        .and_then(|s| match s.fields.get("services")?.kind.as_ref()? {
            Kind::ListValue(l) => match l.values.first()?.kind.as_ref()? {
                Kind::StructValue(svc) => struct_str(svc, "namespace").map(str::to_string),
                _ => None,
            },
            _ => None,
        })
        .or_else(|| {
            Host::new(host)
                .kubernetes_name(mesh::DEFAULT_CLUSTER_DOMAIN)
                .map(|(_, ns)| ns.to_string())
        })
        .unwrap_or_default();
    let inline = match (&kind, &c.load_assignment) {
        (ClusterKind::Dns | ClusterKind::Static, Some(cla)) => endpoints(cla)?,
        _ => vec![],
    };
    Ok(Some(ClusterInfo {
        sans: istio_sans(&c)?,
        name: c.name.clone(),
        host: host.to_string(),
        port,
        subset: subset.to_string(),
        namespace,
        kind,
        inline,
        policy: TrafficPolicy {
            tls: upstream_tls(&c)?,
            ..traffic_policy(&c)?
        },
    }))
}

/// A ClusterLoadAssignment resource: (cluster name, endpoints).
pub fn load_assignment(any: &Any) -> Result<(String, Vec<EndpointInfo>), Invalid> {
    let cla = ClusterLoadAssignment::decode(any.value.as_slice())
        .map_err(|e| invalid("(endpoints)", format!("not a ClusterLoadAssignment: {e}")))?;
    Ok((cla.cluster_name.clone(), endpoints(&cla)?))
}

/// One name of istiod's name table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NameInfo {
    pub ips: Vec<IpAddr>,
    /// Kubernetes services also answer their short forms: (short name, namespace).
    pub kubernetes: Option<(String, String)>,
    pub alt_hosts: Vec<String>,
}

/// A NameTable resource (NDS: one resource, the whole table).
pub fn name_table(any: &Any) -> Result<BTreeMap<String, NameInfo>, Invalid> {
    let t = NdsTable::decode(any.value.as_slice())
        .map_err(|e| invalid("(name table)", format!("not a NameTable: {e}")))?;
    let mut out = BTreeMap::new();
    for (host, info) in t.table {
        let mut ips = Vec::new();
        for ip in &info.ips {
            ips.push(
                ip.parse::<IpAddr>()
                    .map_err(|_| invalid(&host, format!("{ip:?} is not an IP address")))?,
            );
        }
        let kubernetes = (info.registry == "Kubernetes"
            && !info.shortname.is_empty()
            && !info.namespace.is_empty())
        .then(|| (info.shortname.clone(), info.namespace.clone()));
        out.insert(
            host.trim_end_matches('.').to_ascii_lowercase(),
            NameInfo {
                ips,
                kubernetes,
                alt_hosts: info.alt_hosts,
            },
        );
    }
    Ok(out)
}

/// Istio's DNS client's names for a table entry (I: pkg/dns/client/dns.go generateAltHosts):
/// the host; for Kubernetes services in our cluster domain also name.ns, name.ns.svc and, in
/// our namespace, name; plus any alt_hosts.
pub fn build_names(
    table: &BTreeMap<String, NameInfo>,
    namespace: &str,
    cluster_domain: &str,
) -> NameTable {
    let domain = format!("svc.{cluster_domain}");
    let mut out = NameTable::default();
    for (host, info) in table {
        if info.ips.is_empty() {
            continue;
        }
        let mut names = vec![host.clone()];
        if let Some((short, ns)) = &info.kubernetes {
            if host.ends_with(&domain) {
                names.push(format!("{short}.{ns}"));
                if ns == namespace {
                    names.push(short.clone());
                }
                names.push(format!("{short}.{ns}.svc"));
            }
        }
        names.extend(info.alt_hosts.iter().map(|h| h.to_ascii_lowercase()));
        out.insert(&Host::new(host), &info.ips, names);
    }
    out
}

/// The labels of every xDS workload: only auto-mTLS's and HBONE's, shared.
fn labels(mtls: bool, hbone: bool) -> Arc<BTreeMap<String, String>> {
    type Labels = std::sync::OnceLock<Arc<BTreeMap<String, String>>>;
    static SHARED: [Labels; 4] = [const { Labels::new() }; 4];
    SHARED[usize::from(mtls) | usize::from(hbone) << 1]
        .get_or_init(|| {
            let mut l = BTreeMap::new();
            if mtls {
                l.insert(TLS_MODE_LABEL.to_string(), "istio".to_string());
            }
            if hbone {
                l.insert(TUNNEL_LABEL.to_string(), "http".to_string());
            }
            Arc::new(l)
        })
        .clone()
}

/// The endpoint's labels: its transport's, and the canonical service, revision and cluster of
/// its `istio.workload` metadata (shared among a cluster's endpoints that have the same).
fn endpoint_labels(
    e: &EndpointInfo,
    seen: &mut Vec<Arc<BTreeMap<String, String>>>,
) -> Arc<BTreeMap<String, String>> {
    let base = labels(e.mtls, e.hbone);
    let Some((svc, rev, cluster)) = &e.canonical else {
        return base;
    };
    let mut l = BTreeMap::clone(&base);
    for (k, v) in [
        ("service.istio.io/canonical-name", svc),
        ("service.istio.io/canonical-revision", rev),
        ("topology.istio.io/cluster", cluster),
    ] {
        if !v.is_empty() {
            l.insert(k.to_string(), v.clone());
        }
    }
    if let Some(same) = seen.iter().find(|s| ***s == l) {
        return same.clone();
    }
    let l = Arc::new(l);
    if seen.len() < 16 {
        seen.push(l.clone());
    }
    l
}

fn workload(
    cluster: &ClusterInfo,
    e: &EndpointInfo,
    seen: &mut Vec<Arc<BTreeMap<String, String>>>,
) -> Workload {
    let (name, namespace) = match &e.workload {
        Some((n, ns)) => (format!("{ns}/{n}"), ns.clone()),
        None => (
            format!("{}:{}", e.address, e.port),
            cluster.namespace.clone(),
        ),
    };
    Workload {
        name,
        namespace,
        address: e.address.clone(),
        labels: endpoint_labels(e, seen),
        ports: BTreeMap::new(),
        port: Some(e.port),
        network: String::new(),
        locality: e.locality.clone(),
        weight: e.weight,
        service_account: String::new(),
        health: if e.healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        },
        priority: e.priority,
    }
}

/// The workloads of one cluster: its inline endpoints, or its load assignment's.
pub fn cluster_workloads(
    cluster: &ClusterInfo,
    assigned: Option<&[EndpointInfo]>,
) -> Vec<Arc<Workload>> {
    let eps = match cluster.kind {
        ClusterKind::Eds => assigned.unwrap_or(&[]),
        _ => &cluster.inline,
    };
    let mut seen = Vec::new();
    eps.iter()
        .map(|e| Arc::new(workload(cluster, e, &mut seen)))
        .collect()
}

/// One service per host of the clusters: ports from its clusters, VIPs from the name table,
/// endpoints per port.
pub fn service(
    host: &str,
    clusters: &[&ClusterInfo],
    workloads: impl Fn(&ClusterInfo) -> Vec<Arc<Workload>>,
    names: &BTreeMap<String, NameInfo>,
) -> ServiceDecl {
    let (subset_clusters, clusters): (Vec<&ClusterInfo>, Vec<&ClusterInfo>) =
        clusters.iter().copied().partition(|c| !c.subset.is_empty());
    // The caller gives at least one cluster; a host whose default cluster is not there yet
    // (only subsets) takes its kind and namespace from a subset's.
    let Some(first) = clusters.first().or(subset_clusters.first()).copied() else {
        return ServiceDecl {
            origin: format!("istiod/{host}"),
            hosts: vec![Host::new(host)],
            ..Default::default()
        };
    };
    let resolution = match first.kind {
        ClusterKind::Dns => Resolution::Dns,
        ClusterKind::OriginalDst => Resolution::None,
        _ => Resolution::Static,
    };
    let mut sans: Vec<String> = Vec::new();
    let mut ports = Vec::new();
    let mut port_endpoints = mesh::PortEndpoints::default();
    for c in &clusters {
        for s in &c.sans {
            if !sans.contains(s) {
                sans.push(s.clone());
            }
        }
        // Workloads name their port per endpoint (EDS): the port needs no name. Its protocol
        // is TCP unless istiod's listeners and routes say HTTP or sniffed (`Traffic`).
        ports.push(ServicePort {
            number: c.port,
            name: String::new(),
            protocol: "TCP".into(),
            target_port: None,
        });
        port_endpoints.insert(c.port, workloads(c));
    }
    ServiceDecl {
        origin: format!("istiod/{host}"),
        namespace: first.namespace.clone(),
        hosts: vec![Host::new(host)],
        addresses: names.get(host).map(|n| n.ips.clone()).unwrap_or_default(),
        allocate_vips: false,
        ports,
        resolution,
        location: Location::MeshInternal,
        subject_alt_names: sans,
        selector: None,
        endpoints: vec![],
        port_endpoints,
        endpoints_as_given: true,
        names_given: true,
        subsets: subsets(&subset_clusters, &workloads),
        policies: Some(
            clusters
                .iter()
                .chain(&subset_clusters)
                .filter(|c| !is_default_policy(&c.policy))
                .map(|c| mesh::ClusterPolicy {
                    port: c.port,
                    subset: c.subset.clone(),
                    policy: c.policy.clone(),
                })
                .collect(),
        ),
    }
}

/// The subset clusters' endpoints, by subset and port.
fn subsets(
    clusters: &[&ClusterInfo],
    workloads: &impl Fn(&ClusterInfo) -> Vec<Arc<Workload>>,
) -> Vec<mesh::SubsetEndpoints> {
    let mut out: Vec<mesh::SubsetEndpoints> = Vec::new();
    for c in clusters {
        let i = match out.iter().position(|s| s.name == c.subset) {
            Some(i) => i,
            None => {
                out.push(mesh::SubsetEndpoints {
                    name: c.subset.clone(),
                    port_endpoints: Default::default(),
                });
                out.len() - 1
            }
        };
        out[i].port_endpoints.insert(c.port, workloads(c));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_outbound_default_subset_clusters_are_ours() {
        assert_eq!(
            outbound_name("outbound|8080||product.default.svc.cluster.local"),
            Some((8080, "", "product.default.svc.cluster.local"))
        );
        assert_eq!(
            outbound_name("outbound|8080|v1|product.default.svc.cluster.local"),
            Some((8080, "v1", "product.default.svc.cluster.local"))
        );
        for ignored in [
            "inbound|8080||",
            "BlackHoleCluster",
            "PassthroughCluster",
            "InboundPassthroughCluster",
            "outbound|x||a",
        ] {
            assert_eq!(outbound_name(ignored), None, "{ignored}");
        }
    }

    /// A cluster whose transport socket is istiod's rendering of a DR's tls.
    fn tls_cluster(certs: &[&str], root: Option<&str>, sans: &[&str]) -> Cluster {
        use interceptor_proto::envoy::config::core::v3::TransportSocket;
        use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::common_tls_context::CombinedCertificateValidationContext;
        use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, CommonTlsContext, SdsSecretConfig,
        };
        use interceptor_proto::envoy::r#type::matcher::v3::StringMatcher;
        let secret = |n: &str| SdsSecretConfig {
            name: n.into(),
            ..Default::default()
        };
        #[allow(deprecated)]
        let validation = CertificateValidationContext {
            match_subject_alt_names: sans
                .iter()
                .map(|s| StringMatcher {
                    match_pattern: Some(MatchPattern::Exact(s.to_string())),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let ctx = UpstreamTlsContext {
            sni: "db.example.com".into(),
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: certs.iter().map(|c| secret(c)).collect(),
                validation_context_type: Some(match root {
                    Some(r) => ValidationContextType::CombinedValidationContext(
                        CombinedCertificateValidationContext {
                            default_validation_context: Some(validation),
                            validation_context_sds_secret_config: Some(secret(r)),
                            ..Default::default()
                        },
                    ),
                    None => ValidationContextType::ValidationContext(validation),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Cluster {
            name: "outbound|5432||db.example.com".into(),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(ConfigType::TypedConfig(Any {
                    type_url: type_url::UPSTREAM_TLS.into(),
                    value: ctx.encode_to_vec(),
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_clusters_transport_socket_tells_the_destination_rules_tls_mode() {
        let t = upstream_tls(&tls_cluster(
            &[],
            Some("file-root:/ca.pem"),
            &["db.example.com"],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(t.mode, TlsMode::Simple);
        assert_eq!(t.ca_certificates, Some("/ca.pem".into()));
        assert_eq!(t.sni.as_deref(), Some("db.example.com"));
        assert_eq!(t.subject_alt_names, vec!["db.example.com".to_string()]);
        assert!(!t.insecure_skip_verify);
        let t = upstream_tls(&tls_cluster(&[], Some("file-root:system"), &[]))
            .unwrap()
            .unwrap();
        assert_eq!(t.ca_certificates, None, "system: the system bundle");
        let t = upstream_tls(&tls_cluster(&["file-cert:/c.pem~/k.pem"], None, &[]))
            .unwrap()
            .unwrap();
        assert_eq!(t.mode, TlsMode::Mutual);
        assert_eq!(
            (t.client_certificate, t.private_key),
            (Some("/c.pem".into()), Some("/k.pem".into()))
        );
        assert!(t.insecure_skip_verify, "an empty validation context");
        let t = upstream_tls(&tls_cluster(&["default"], Some("ROOTCA"), &[]))
            .unwrap()
            .unwrap();
        assert_eq!(t.mode, TlsMode::IstioMutual);
        // Nothing at all: plaintext; matches: auto mTLS.
        let none = Cluster::default();
        assert_eq!(upstream_tls(&none).unwrap().unwrap().mode, TlsMode::Disable);
        let auto = Cluster {
            transport_socket_matches: vec![Default::default()],
            ..Default::default()
        };
        assert_eq!(upstream_tls(&auto).unwrap(), None);
        // A Kubernetes secret (credentialName) cannot be read on a VM: the push is refused.
        let e = upstream_tls(&tls_cluster(&["kubernetes://db-creds"], None, &[])).unwrap_err();
        assert!(e.message.contains("kubernetes://db-creds"), "{e}");
    }

    #[test]
    fn kubernetes_names_get_their_short_forms() {
        let mut t = BTreeMap::new();
        t.insert(
            "reviews.shop.svc.cluster.local".to_string(),
            NameInfo {
                ips: vec!["10.96.0.5".parse().unwrap()],
                kubernetes: Some(("reviews".into(), "shop".into())),
                alt_hosts: vec![],
            },
        );
        t.insert(
            "api.example.com".to_string(),
            NameInfo {
                ips: vec!["240.240.0.7".parse().unwrap()],
                kubernetes: None,
                alt_hosts: vec![],
            },
        );
        let names = build_names(&t, "shop", "cluster.local");
        for n in [
            "reviews.shop.svc.cluster.local",
            "reviews.shop",
            "reviews.shop.svc",
            "reviews",
            "api.example.com",
        ] {
            assert!(names.lookup(n).is_some(), "{n}");
        }
        let other_ns = build_names(&t, "default", "cluster.local");
        assert!(other_ns.lookup("reviews").is_none());
        assert!(other_ns.lookup("api").is_none());
    }

    #[test]
    fn connect_originate_endpoints_are_hbone_and_other_internal_addresses_are_refused() {
        use interceptor_proto::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
        use interceptor_proto::envoy::config::core::v3::{Address as Addr, EnvoyInternalAddress};
        let internal = |listener: &str, id: &str| Addr {
            address: Some(EnvoyAddress::EnvoyInternalAddress(EnvoyInternalAddress {
                address_name_specifier: Some(AddressNameSpecifier::ServerListenerName(
                    listener.into(),
                )),
                endpoint_id: id.into(),
            })),
        };
        let (a, port, hbone) =
            socket_addr("c", Some(&internal("connect_originate", "10.1.2.3:8080"))).unwrap();
        assert_eq!(
            (a, port, hbone),
            (Address::Ip("10.1.2.3".parse().unwrap()), 8080, true)
        );
        assert!(socket_addr("c", Some(&internal("other", "10.1.2.3:8080"))).is_err());
        assert!(socket_addr("c", Some(&internal("connect_originate", "pod-a"))).is_err());
        let l = labels(false, true);
        assert_eq!(l.get(TUNNEL_LABEL).map(String::as_str), Some("http"));
        assert!(!l.contains_key(TLS_MODE_LABEL));
    }
}
