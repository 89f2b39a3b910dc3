//! LDS: the TCP routes istiod computed for this proxy, from its outbound listeners (sheet 1.1-
//! 1.3): a `<VIP>_<port>` listener's TCP proxy (`cluster` or `weighted_clusters`, chains with
//! `prefix_ranges` first), and `virtualOutbound`'s catch-all (PassthroughCluster for ALLOW_ANY,
//! BlackHoleCluster for REGISTRY_ONLY). HTTP chains (an HCM, `application_protocols`) belong to
//! the HTTP data path and are skipped here; filters and fields we do not need are ignored, as
//! istiod adds many for Envoy. A TCP proxy we cannot read refuses the push.

use std::net::{IpAddr, SocketAddr};

use interceptor_proto::envoy::config::core::v3::address::Address as EnvoyAddress;
use interceptor_proto::envoy::config::core::v3::socket_address::PortSpecifier;
use interceptor_proto::envoy::config::listener::v3::filter::ConfigType;
use interceptor_proto::envoy::config::listener::v3::{FilterChain, Listener};
use interceptor_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
use interceptor_proto::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use interceptor_proto::google::protobuf::{value::Kind, Any};
use interceptor_proto::type_url;
use prost::Message;

use super::resources::{outbound_name, Invalid};
use crate::mesh::traffic::{Destination, ListenerRoute, ListenerRule, Target};
use crate::mesh::{Cidr, Host};

/// istiod's name for the outbound catch-all listener.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
const BLACK_HOLE: &str = "BlackHoleCluster";
const PASSTHROUGH: &str = "PassthroughCluster";

fn invalid(resource: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        resource: resource.to_string(),
        message: message.into(),
    }
}

/// What one Listener resource says to us.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub name: String,
    /// None for listeners that carry no TCP route of ours (wildcard-address HTTP listeners)
    /// or only the route a service has anyway (its own default cluster, no VirtualService):
    /// 10 000 services need not keep 10 000 of those.
    pub route: Option<ListenerRoute>,
    /// `virtualInbound`: this VM's inbound mTLS modes and authorization.
    pub inbound: Option<crate::mesh::inbound::InboundIntent>,
    /// The route configuration (RDS) its HTTP chains take, if any.
    pub rds: Option<String>,
}

/// A Listener resource.
pub fn listener(any: &Any) -> Result<Decoded, Invalid> {
    let l = Listener::decode(any.value.as_slice())
        .map_err(|e| invalid("(listener)", format!("not a Listener: {e}")))?;
    let inbound = if l.name == super::inbound::VIRTUAL_INBOUND {
        Some(super::inbound::inbound(&l)?)
    } else {
        None
    };
    let route = if inbound.is_some() { None } else { route(&l)? };
    let rds = if inbound.is_some() { None } else { rds(&l) };
    Ok(Decoded {
        name: l.name,
        route,
        inbound,
        rds,
    })
}

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// The RDS name an outbound HTTP chain's connection manager takes (an unreadable one is
/// Envoy's business, not ours: no HTTP routes from it).
fn rds(l: &Listener) -> Option<String> {
    use interceptor_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager::RouteSpecifier, HttpConnectionManager,
    };
    l.filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .find_map(|f| {
            let Some(ConfigType::TypedConfig(a)) = &f.config_type else {
                return None;
            };
            if a.type_url != HCM {
                return None;
            }
            match HttpConnectionManager::decode(a.value.as_slice())
                .ok()?
                .route_specifier?
            {
                RouteSpecifier::Rds(r) => Some(r.route_config_name),
                _ => None,
            }
        })
}

fn route(l: &Listener) -> Result<Option<ListenerRoute>, Invalid> {
    if l.name == VIRTUAL_OUTBOUND {
        return catch_all(l).map(Some);
    }
    let Some(address) = specific_address(l) else {
        return Ok(None);
    };
    let mut rules = Vec::new();
    let chains = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c));
    let default = l
        .default_filter_chain
        .iter()
        .map(|c| ("default_filter_chain".to_string(), c));
    for (at, chain) in chains.chain(default) {
        let m = chain.filter_chain_match.as_ref();
        // HTTP chains (sniffed or declared) are not for the TCP path; TLS chains (by SNI) are.
        if m.is_some_and(|m| {
            !m.application_protocols.is_empty()
                || !(m.transport_protocol.is_empty() || m.transport_protocol == "tls")
        }) {
            continue;
        }
        let Some(target) = tcp_proxy(&l.name, &at, chain)? else {
            continue;
        };
        let mut subnets = Vec::new();
        for r in m.map(|m| m.prefix_ranges.as_slice()).unwrap_or_default() {
            let len = r.prefix_len.as_ref().map_or(0, |v| v.value);
            let cidr = Cidr::parse(&format!("{}/{len}", r.address_prefix)).map_err(|e| {
                invalid(
                    &l.name,
                    format!("{at}.filter_chain_match.prefix_ranges: {e}"),
                )
            })?;
            subnets.push(cidr);
        }
        rules.push(ListenerRule {
            subnets,
            server_names: m.map(|m| m.server_names.clone()).unwrap_or_default(),
            target,
            config: chain_config(chain),
        });
    }
    let plain_default = match rules.as_slice() {
        [ListenerRule {
            subnets,
            server_names,
            target: Target::Clusters(ds),
            config: None,
        }] => {
            subnets.is_empty()
                && server_names.is_empty()
                && matches!(ds.as_slice(), [d] if d.subset.is_empty() && d.port == Some(address.port()))
        }
        _ => false,
    };
    if rules.is_empty() || plain_default {
        return Ok(None);
    }
    Ok(Some(ListenerRoute {
        listener: l.name.clone(),
        address: Some(address),
        rules,
    }))
}

/// The listener's own IP and port, unless it is a wildcard one (`0.0.0.0_<port>`).
fn specific_address(l: &Listener) -> Option<SocketAddr> {
    let Some(EnvoyAddress::SocketAddress(sa)) = l.address.as_ref()?.address.as_ref() else {
        return None;
    };
    let ip: IpAddr = sa.address.parse().ok()?;
    let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return None;
    };
    let port = u16::try_from(port).ok()?;
    (!ip.is_unspecified()).then_some(SocketAddr::new(ip, port))
}

/// `virtualOutbound`: its chain without a port match (the one with `destination_port: 15001`
/// only stops loops).
fn catch_all(l: &Listener) -> Result<ListenerRoute, Invalid> {
    let mut rules = Vec::new();
    for (i, chain) in l.filter_chains.iter().enumerate() {
        let m = chain.filter_chain_match.as_ref();
        if m.is_some_and(|m| m.destination_port.is_some() || !m.application_protocols.is_empty()) {
            continue;
        }
        if let Some(target) = tcp_proxy(&l.name, &format!("filter_chains[{i}]"), chain)? {
            rules.push(ListenerRule {
                subnets: vec![],
                server_names: vec![],
                target,
                config: None,
            });
        }
    }
    if rules.is_empty() {
        return Err(invalid(&l.name, "no catch-all TCP proxy chain"));
    }
    Ok(ListenerRoute {
        listener: l.name.clone(),
        address: None,
        rules,
    })
}

/// The chain's `istio.config` metadata: the VirtualService it was made from.
fn chain_config(chain: &FilterChain) -> Option<String> {
    let istio = chain.metadata.as_ref()?.filter_metadata.get("istio")?;
    match istio.fields.get("config")?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// The chain's TCP proxy as a target; None when it has none (an HTTP connection manager).
fn tcp_proxy(listener: &str, at: &str, chain: &FilterChain) -> Result<Option<Target>, Invalid> {
    let Some(any) = chain.filters.iter().find_map(|f| match &f.config_type {
        Some(ConfigType::TypedConfig(a)) if a.type_url == type_url::TCP_PROXY => Some(a),
        _ => None,
    }) else {
        return Ok(None);
    };
    let tp = TcpProxy::decode(any.value.as_slice())
        .map_err(|e| invalid(listener, format!("{at}: tcp_proxy: {e}")))?;
    let err = |m: String| invalid(listener, format!("{at}: tcp_proxy: {m}"));
    let target = match tp.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => match name.as_str() {
            BLACK_HOLE => Target::BlackHole,
            PASSTHROUGH => Target::Passthrough,
            _ => Target::Clusters(vec![destination(&name, 1).map_err(err)?]),
        },
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let mut ds = Vec::new();
            for c in w.clusters.iter().filter(|c| c.weight > 0) {
                ds.push(destination(&c.name, c.weight).map_err(err)?);
            }
            if ds.is_empty() {
                return Err(err("weighted_clusters: the weights add up to 0".into()));
            }
            Target::Clusters(ds)
        }
        None => return Err(err("neither cluster nor weighted_clusters".into())),
    };
    Ok(Some(target))
}

/// The destination an `outbound|PORT|SUBSET|HOST` cluster name stands for.
pub(super) fn destination(cluster: &str, weight: u32) -> Result<Destination, String> {
    let (port, subset, host) = outbound_name(cluster).ok_or_else(|| {
        format!("cluster {cluster:?} is not an outbound|PORT|SUBSET|HOST cluster")
    })?;
    Ok(Destination {
        host: Host::new(host),
        subset: subset.to_string(),
        port: Some(port),
        weight,
        headers: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_proto::envoy::config::core::v3::{Address, CidrRange, SocketAddress};
    use interceptor_proto::envoy::config::listener::v3::{Filter, FilterChainMatch};
    use interceptor_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::{
        weighted_cluster::ClusterWeight, WeightedCluster,
    };
    use interceptor_proto::google::protobuf::UInt32Value;

    fn proxy(spec: ClusterSpecifier) -> Filter {
        let tp = TcpProxy {
            stat_prefix: "x".into(),
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

    fn any(l: &Listener) -> Any {
        Any {
            type_url: type_url::LISTENER.into(),
            value: l.encode_to_vec(),
        }
    }

    fn at(ip: &str, port: u32) -> Option<Address> {
        Some(Address {
            address: Some(EnvoyAddress::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        })
    }

    #[test]
    fn weighted_clusters_and_subnet_chains_become_rules() {
        let weighted = ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: vec![
                ClusterWeight {
                    name: "outbound|5432|v1|pg.db.svc.cluster.local".into(),
                    weight: 90,
                    ..Default::default()
                },
                ClusterWeight {
                    name: "outbound|5432|v2|pg.db.svc.cluster.local".into(),
                    weight: 10,
                    ..Default::default()
                },
            ],
        });
        let l = Listener {
            name: "10.96.0.20_5432".into(),
            address: at("10.96.0.20", 5432),
            filter_chains: vec![
                FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        prefix_ranges: vec![CidrRange {
                            address_prefix: "10.96.0.0".into(),
                            prefix_len: Some(UInt32Value { value: 16 }),
                        }],
                        ..Default::default()
                    }),
                    filters: vec![proxy(ClusterSpecifier::Cluster(BLACK_HOLE.into()))],
                    ..Default::default()
                },
                FilterChain {
                    filters: vec![proxy(weighted)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = listener(&any(&l)).unwrap().route.unwrap();
        assert_eq!(r.address, Some("10.96.0.20:5432".parse().unwrap()));
        assert_eq!(r.rules.len(), 2);
        assert_eq!(r.rules[0].target, Target::BlackHole);
        assert_eq!(r.rules[0].subnets[0].prefix, 16);
        let Target::Clusters(ds) = &r.rules[1].target else {
            panic!()
        };
        assert_eq!((ds[0].subset.as_str(), ds[0].weight), ("v1", 90));
        assert_eq!(ds[1].port, Some(5432));
    }

    #[test]
    fn wildcard_http_listeners_are_not_ours_and_bad_tcp_proxies_are_refused() {
        let http = Listener {
            name: "0.0.0.0_9080".into(),
            address: at("0.0.0.0", 9080),
            filter_chains: vec![FilterChain::default()],
            ..Default::default()
        };
        assert_eq!(listener(&any(&http)).unwrap().route, None);
        let bad = Listener {
            name: "10.0.0.1_80".into(),
            address: at("10.0.0.1", 80),
            filter_chains: vec![FilterChain {
                filters: vec![proxy(ClusterSpecifier::Cluster("inbound|80||".into()))],
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = listener(&any(&bad)).unwrap_err();
        assert_eq!(e.resource, "10.0.0.1_80");
        assert!(e.message.contains("filter_chains[0]"), "{e}");
        let registry_only = Listener {
            name: VIRTUAL_OUTBOUND.into(),
            address: at("0.0.0.0", 15001),
            filter_chains: vec![
                FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        destination_port: Some(UInt32Value { value: 15001 }),
                        ..Default::default()
                    }),
                    filters: vec![proxy(ClusterSpecifier::Cluster(BLACK_HOLE.into()))],
                    ..Default::default()
                },
                FilterChain {
                    filters: vec![proxy(ClusterSpecifier::Cluster(BLACK_HOLE.into()))],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = listener(&any(&registry_only)).unwrap().route.unwrap();
        assert_eq!((r.address, &r.rules[0].target), (None, &Target::BlackHole));
    }
}
