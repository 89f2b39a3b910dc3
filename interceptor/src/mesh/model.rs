//! What the mesh is made of, independent of where it came from (files now, xDS later).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A service host: an exact FQDN or a wildcard `*.suffix`. Always lower case, no trailing dot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Host(String);

impl Host {
    pub fn new(name: &str) -> Self {
        Self(name.trim_end_matches('.').to_ascii_lowercase())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.") || self.0 == "*"
    }
    /// `name.ns.svc.<domain>` hosts are served like Kubernetes services (name variants in DNS),
    /// the way istiod's name table reports them: (name, namespace).
    pub fn kubernetes_name<'a>(&'a self, cluster_domain: &str) -> Option<(&'a str, &'a str)> {
        let rest = self.0.strip_suffix(cluster_domain)?.strip_suffix('.')?;
        let rest = rest.strip_suffix(".svc")?;
        let (name, ns) = rest.split_once('.')?;
        (!name.is_empty() && !ns.is_empty() && !ns.contains('.') && !self.is_wildcard())
            .then_some((name, ns))
    }

    /// Does `name` (lower case, no trailing dot) fall under this host?
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_prefix('*') {
            Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
            None => self.0 == name,
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    #[default]
    MeshInternal,
}

/// What a proxy's listener for a port expects (istiod's `ListenerProtocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// Requests, one by one.
    Http,
    /// Bytes.
    Tcp,
    /// Either: the first bytes tell (an HTTP/1.x request line or the HTTP/2 preface).
    Auto,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub number: u16,
    pub name: String,
    pub protocol: String,
    /// Port on the endpoints when a workload does not name one.
    pub target_port: Option<u16>,
}

impl ServicePort {
    /// Istio's `Protocol.IsTLS()`: TLS or HTTPS, declared or by the port name's prefix
    /// (pkg/config/protocol `Parse`, kube `ConvertProtocol`).
    pub fn is_tls(&self) -> bool {
        self.protocol_is(&["TLS", "HTTPS"])
    }

    /// Istio's `Protocol.IsHTTP()`: HTTP, HTTP2, gRPC, gRPC-Web (declared or by name prefix).
    pub fn is_http(&self) -> bool {
        self.protocol_is(&["HTTP", "HTTP2", "GRPC", "GRPC-Web", "HTTP_PROXY"])
    }

    /// Whether its requests go upstream as HTTP/2 (Istio: HTTP2 and gRPC ports).
    pub fn is_http2(&self) -> bool {
        self.protocol_is(&["HTTP2", "GRPC", "GRPC-Web"])
    }

    /// How a proxy tells its connections apart, as istiod's `ModelProtocolToListenerProtocol`:
    /// HTTP ports are HTTP, ports of a protocol Istio knows are TCP, and the rest (no protocol,
    /// or one Istio does not know) are sniffed. As kube's `ConvertProtocol`, an unnamed
    /// SMTP, DNS, MySQL or MongoDB port is TCP: sniffing would break those server-first
    /// protocols.
    pub fn listener_protocol(&self) -> ListenerProtocol {
        if self.is_http() {
            return ListenerProtocol::Http;
        }
        const KNOWN: [&str; 7] = ["TCP", "UDP", "HTTPS", "TLS", "Mongo", "Redis", "MySQL"];
        if self.protocol_is(&KNOWN) {
            return ListenerProtocol::Tcp;
        }
        const WELL_KNOWN_PORTS: [u16; 4] = [25, 53, 3306, 27017];
        if self.protocol.is_empty() && WELL_KNOWN_PORTS.contains(&self.number) {
            return ListenerProtocol::Tcp;
        }
        ListenerProtocol::Auto
    }

    /// The declared protocol is one of `names`, or (none declared) the port's name is one of
    /// them or starts with one and a dash.
    fn protocol_is(&self, names: &[&str]) -> bool {
        if !self.protocol.is_empty() {
            return names.iter().any(|n| self.protocol.eq_ignore_ascii_case(n));
        }
        let p = self.name.as_str();
        names.iter().any(|t| {
            p.len() >= t.len()
                && p[..t.len()].eq_ignore_ascii_case(t)
                && matches!(p.as_bytes().get(t.len()), None | Some(b'-'))
        })
    }
}

/// Where an endpoint can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Address {
    Ip(IpAddr),
    /// resolution: DNS endpoints, resolved when a connection needs them.
    Hostname(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Ip(ip) => ip.fmt(f),
            Address::Hostname(h) => f.write_str(h),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
pub enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

/// The namespace of a workload or document that names none (Kubernetes' default).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Kubernetes' cluster DNS domain unless configured otherwise.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Label Istio's auto-mTLS reads to decide that an endpoint speaks mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Istio's marker of a workload that takes HBONE on 15008 (SPEC 11; istiod adds it to
/// auto-registered entries of proxies that send `ENABLE_HBONE`).
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";
/// The annotation that marks a WorkloadEntry as captured by ambient (the other HBONE marker).
pub const AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";

/// A WorkloadEntry or an inline ServiceEntry endpoint: a pod or a VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    /// `namespace/name` for WorkloadEntries; `ServiceEntry/ns/name#i` for inline endpoints.
    pub name: String,
    pub namespace: String,
    pub address: Address,
    /// Shared: a source with many workloads of the same labels keeps one map.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Port name -> port number on this workload.
    pub ports: BTreeMap<String, u16>,
    /// The port this workload serves the service on, when the source says so per endpoint
    /// (EDS); wins over `ports`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Empty: the network of this VM (single network mesh).
    pub network: String,
    pub locality: String,
    pub weight: u32,
    pub service_account: String,
    pub health: Health,
    /// EDS priority: 0 is tried first, higher ones only when no lower one is reachable.
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Workload {
    /// Istio's auto-mTLS rule (SPEC section 5).
    pub fn speaks_istio_mtls(&self) -> bool {
        self.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio")
    }

    /// Whether it takes HBONE (SPEC 11): the tunnel label, which the file source also sets for
    /// the ambient annotation and the xDS source for `connect_originate` endpoints. Only an IP
    /// can be tunnelled to (`:authority` is `IP:port`).
    pub fn speaks_hbone(&self) -> bool {
        matches!(self.address, Address::Ip(_))
            && self.labels.get(TUNNEL_LABEL).map(String::as_str) == Some("http")
    }

    /// The port this workload serves `port` of a service on.
    pub fn target_port(&self, port: &ServicePort) -> u16 {
        self.port
            .or_else(|| self.ports.get(&port.name).copied())
            .or(port.target_port)
            .unwrap_or(port.number)
    }
}

/// One host of a ServiceEntry (Istio turns a multi-host ServiceEntry into one service per host).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub host: Host,
    /// The ServiceEntry this came from, `namespace/name`.
    pub origin: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    /// True when the VIPs were allocated by us (the ServiceEntry had no addresses).
    pub auto_allocated: bool,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub location: Location,
    pub subject_alt_names: Vec<String>,
    pub endpoints: Vec<Arc<Workload>>,
    /// Endpoints of one port when the source gives them per port (EDS); others use
    /// `endpoints`.
    #[serde(skip_serializing_if = "PortEndpoints::is_empty")]
    pub port_endpoints: PortEndpoints,
    /// The source already chose how each endpoint is reached (istiod's split horizon put
    /// gateways in place of remote endpoints): reach every endpoint as given.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub endpoints_as_given: bool,
    /// DestinationRule subsets whose endpoints the source gave (istiod's subset clusters);
    /// the file source's subsets are selected by labels when a connection needs them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<SubsetEndpoints>,
    /// The traffic policy of each of its clusters when the source gives them (istiod's CDS;
    /// a cluster not listed has the defaults); None: from the mesh's DestinationRules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<ClusterPolicy>>,
}

/// A cluster's traffic policy as the source gave it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterPolicy {
    pub port: u16,
    pub subset: String,
    pub policy: super::traffic::TrafficPolicy,
}

/// The endpoints of one subset, per port (istiod: `outbound|PORT|SUBSET|HOST`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SubsetEndpoints {
    pub name: String,
    pub port_endpoints: PortEndpoints,
}

impl Service {
    /// The endpoints of `subset` on `port` as the source gave them, if it gave them.
    pub fn given_subset(&self, port: u16, subset: &str) -> Option<&[Arc<Workload>]> {
        self.subsets
            .iter()
            .find(|s| s.name == subset)
            .and_then(|s| s.port_endpoints.get(port))
            .map(Vec::as_slice)
    }

    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// The endpoints that serve `port`.
    pub fn endpoints_for(&self, port: &ServicePort) -> &[Arc<Workload>] {
        self.port_endpoints
            .get(port.number)
            .unwrap_or(&self.endpoints)
    }
}

/// Endpoints by service port, for sources that give them per port (EDS: one cluster a port).
/// A short list sorted by port: a service has a port or a few, and a map's node costs more
/// than the list (10 000 services from istiod hold two of these each).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortEndpoints(Vec<(u16, Vec<Arc<Workload>>)>);

impl PortEndpoints {
    pub fn get(&self, port: u16) -> Option<&Vec<Arc<Workload>>> {
        self.0
            .binary_search_by_key(&port, |(p, _)| *p)
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Sets a port's endpoints (replacing what it had).
    pub fn insert(&mut self, port: u16, endpoints: Vec<Arc<Workload>>) {
        match self.0.binary_search_by_key(&port, |(p, _)| *p) {
            Ok(i) => self.0[i].1 = endpoints,
            Err(i) => self.0.insert(i, (port, endpoints)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, &Vec<Arc<Workload>>)> {
        self.0.iter().map(|(p, e)| (*p, e))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(u16, Vec<Arc<Workload>>)> for PortEndpoints {
    fn from_iter<I: IntoIterator<Item = (u16, Vec<Arc<Workload>>)>>(iter: I) -> Self {
        let mut out = PortEndpoints::default();
        for (p, e) in iter {
            out.insert(p, e);
        }
        out
    }
}

/// As a map from port to endpoints, as it reads in `/config_dump`.
impl Serialize for PortEndpoints {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (p, e) in &self.0 {
            m.serialize_entry(p, e)?;
        }
        m.end()
    }
}

/// A WorkloadGroup: kept in the table for auto-registration (a later source).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkloadGroup {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub template: Workload,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(number: u16, name: &str, protocol: &str) -> ServicePort {
        ServicePort {
            number,
            name: name.into(),
            protocol: protocol.into(),
            target_port: None,
        }
    }

    /// istiod's `ModelProtocolToListenerProtocol` over `protocol.Parse` and kube's
    /// `ConvertProtocol` (the name when no protocol is declared; well-known ports TCP).
    #[test]
    fn ports_are_http_tcp_or_sniffed_as_istio_classifies_them() {
        use ListenerProtocol::*;
        for (p, want) in [
            (port(80, "", "HTTP"), Http),
            (port(80, "", "grpc-web"), Http),
            (port(9000, "grpc-api", ""), Http),
            (port(5432, "", "TCP"), Tcp),
            (port(443, "", "HTTPS"), Tcp),
            (port(6379, "redis", ""), Tcp),
            (port(7070, "web", ""), Auto),
            (port(7070, "", ""), Auto),
            (port(7070, "", "AUTO"), Auto),
            (port(3306, "", ""), Tcp),
            (port(25, "smtp", ""), Tcp),
            // Declared but unknown to Istio: sniffed even on a well-known port.
            (port(3306, "", "QUIC"), Auto),
        ] {
            assert_eq!(p.listener_protocol(), want, "{p:?}");
        }
    }
}
