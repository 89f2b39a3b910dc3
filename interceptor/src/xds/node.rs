//! The node istiod sees: id and metadata exactly as istio-agent sends them (SPEC section 10;
//! I: pkg/model/proxy.go NodeMetadata, pkg/istio-agent). Booleans are StringBool: the string
//! "true", never a JSON bool.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use interceptor_proto::envoy::config::core::v3::Node;
use interceptor_proto::google::protobuf::{value::Kind, ListValue, Struct, Value};

use crate::bundle::Bundle;

fn string(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// A JSON value as a protobuf Value (PROXY_CONFIG).
pub fn json_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// What the node says beyond the bundle.
#[derive(Clone, Debug, Default)]
pub struct Extra {
    /// This VM's addresses, the first one primary (the WorkloadEntry's address).
    pub instance_ips: Vec<IpAddr>,
    /// Ports of this VM's services (POD_PORTS).
    pub ports: Vec<u16>,
    /// Whether we take HBONE inbound (15008 with a certificate): istiod then labels our
    /// auto-registered WorkloadEntry for ztunnel clients. We always send HBONE (outbound), so
    /// `DISABLE_HBONE_SEND` is never set and tunnel endpoints come as they are.
    pub hbone: bool,
    /// `region/zone/subzone`: istiod orders endpoints by closeness to it.
    pub locality: String,
}

/// The node id: `sidecar~<ip>~<pod name>.<ns>~<ns>.svc.cluster.local`.
pub fn node_id(b: &Bundle, ip: Option<IpAddr>) -> String {
    format!(
        "sidecar~{}~{}.{ns}~{ns}.svc.cluster.local",
        ip.map(|i| i.to_string()).unwrap_or_default(),
        b.pod_name,
        ns = b.namespace
    )
}

/// The metadata keys, as strings.
pub fn metadata(b: &Bundle, extra: &Extra) -> BTreeMap<String, Value> {
    let mut m: BTreeMap<String, Value> = BTreeMap::new();
    // Every ISTIO_META_X of the bundle, as X.
    for (k, v) in &b.meta {
        m.insert(k.clone(), string(v.clone()));
    }
    let labels = Struct {
        fields: b
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), string(v.clone())))
            .collect(),
    };
    m.insert(
        "LABELS".into(),
        Value {
            kind: Some(Kind::StructValue(labels)),
        },
    );
    let ips: Vec<String> = extra.instance_ips.iter().map(ToString::to_string).collect();
    let pod_ports: Vec<serde_json::Value> = extra
        .ports
        .iter()
        .map(|p| serde_json::json!({"containerPort": p, "protocol": "TCP"}))
        .collect();
    for (k, v) in [
        ("NAMESPACE", b.namespace.clone()),
        ("SERVICE_ACCOUNT", b.service_account.clone()),
        ("CLUSTER_ID", b.cluster_id.clone()),
        ("MESH_ID", b.mesh_id.clone()),
        ("NETWORK", b.network.clone()),
        ("WORKLOAD_NAME", b.workload_name.clone()),
        ("INTERCEPTION_MODE", "REDIRECT".into()),
        ("INSTANCE_IPS", ips.join(",")),
        ("ISTIO_VERSION", b.istio_version.clone()),
        ("DNS_CAPTURE", "true".into()),
        ("DNS_AUTO_ALLOCATE", "true".into()),
        ("POD_PORTS", serde_json::Value::Array(pod_ports).to_string()),
    ] {
        m.insert(k.into(), string(v));
    }
    if let Some(g) = &b.auto_register_group {
        m.insert("AUTO_REGISTER_GROUP".into(), string(g.clone()));
    }
    if extra.hbone {
        m.insert("ENABLE_HBONE".into(), string("true"));
    }
    m.insert("PROXY_CONFIG".into(), json_value(&b.proxy_config));
    m
}

pub fn node(b: &Bundle, extra: &Extra) -> Node {
    let fields: HashMap<String, Value> = metadata(b, extra).into_iter().collect();
    Node {
        id: node_id(b, extra.instance_ips.first().copied()),
        // istio-agent sets the cluster to the service cluster: "<app>.<ns>".
        cluster: format!(
            "{}.{}",
            if b.workload_name.is_empty() {
                "istio-proxy"
            } else {
                &b.workload_name
            },
            b.namespace
        ),
        metadata: Some(Struct { fields }),
        locality: locality(&extra.locality),
        user_agent_name: "interceptor".into(),
        ..Default::default()
    }
}

/// istio-agent's `model.ConvertLocality`: `region/zone/subzone`, any part may be missing.
fn locality(l: &str) -> Option<interceptor_proto::envoy::config::core::v3::Locality> {
    if l.is_empty() {
        return None;
    }
    let mut parts = l.splitn(3, '/').map(str::to_string);
    Some(interceptor_proto::envoy::config::core::v3::Locality {
        region: parts.next().unwrap_or_default(),
        zone: parts.next().unwrap_or_default(),
        sub_zone: parts.next().unwrap_or_default(),
    })
}

/// INSTANCE_IPS as the mesh should know this VM: the first is the node id's and the
/// auto-registered WorkloadEntry's address, so it must be one the mesh can route back to. The
/// bundle's `INSTANCE_IP` when given (as istio-agent), else the address this host reaches
/// istiod from (on a VM with several interfaces the first one listed may face elsewhere), then
/// the host's other addresses.
pub fn instance_ips_for(b: &Bundle) -> Vec<IpAddr> {
    let primary = b.instance_ip.or_else(|| source_towards(b.discovery.addr));
    let mut ips = instance_ips();
    if let Some(p) = primary {
        ips.retain(|ip| *ip != p);
        ips.insert(0, p);
    }
    ips
}

/// The source address the kernel picks for `dst`: a connected UDP socket sends nothing.
fn source_towards(dst: std::net::SocketAddr) -> Option<IpAddr> {
    let any: std::net::SocketAddr = match dst {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(dst).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}

/// This host's addresses (IPv4 first, loopback and link-local left out), as INSTANCE_IPS.
pub fn instance_ips() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read sockaddrs it owns.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out.retain(|ip| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    });
    out.sort_by_key(|ip| ip.is_ipv6());
    out.dedup();
    out
}
