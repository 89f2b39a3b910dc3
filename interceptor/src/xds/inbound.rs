//! LDS `virtualInbound` (sheet 4.2): per port, the mTLS mode the chain set says, and the RBAC
//! filters of its chains (network RBAC on TCP chains, HTTP RBAC inside an HTTP chain's
//! connection manager), into `mesh::inbound`. Dry-run rules (`shadow_rules`) are not enforced,
//! as in Envoy. An RBAC filter we cannot read refuses the push.

use std::collections::BTreeMap;
use std::sync::Arc;

use interceptor_proto::envoy::config::core::v3::CidrRange;
use interceptor_proto::envoy::config::listener::v3::filter::ConfigType;
use interceptor_proto::envoy::config::listener::v3::{FilterChain, Listener};
use interceptor_proto::envoy::config::rbac::v3::permission::Rule;
use interceptor_proto::envoy::config::rbac::v3::principal::Identifier;
use interceptor_proto::envoy::config::rbac::v3::rbac::Action;
use interceptor_proto::envoy::config::rbac::v3::{
    Permission as EnvoyPermission, Principal as EnvoyPrincipal, Rbac,
};
use interceptor_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpConnectionManager,
};
use interceptor_proto::envoy::r#type::matcher::v3::path_matcher::Rule as PathRule;
use interceptor_proto::google::protobuf::Any;
use prost::Message;

use super::resources::Invalid;
use super::routes::string_match;
use crate::mesh::inbound::{
    HeaderMatch, InboundIntent, InboundPort, Permission, Principal, RbacAction, RbacFilter,
    RbacPolicy,
};
use crate::mesh::{Cidr, PeerMode};

pub const VIRTUAL_INBOUND: &str = "virtualInbound";
const NETWORK_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// virtualInbound's own port: the chain that stops loops.
const INBOUND_LISTENER_PORT: u32 = 15006;

fn err(at: &str, m: impl std::fmt::Display) -> Invalid {
    Invalid {
        resource: VIRTUAL_INBOUND.into(),
        message: format!("{at}: {m}"),
    }
}

/// What the chains of one port (or of every other port) hold.
#[derive(Default)]
struct Chains {
    mtls: bool,
    plaintext: bool,
    /// A chain is an HTTP connection manager's.
    http: bool,
    /// A chain is not (a TCP proxy's).
    tcp: bool,
    filters: Option<Vec<RbacFilter>>,
}

pub fn inbound(l: &Listener) -> Result<InboundIntent, Invalid> {
    let mut by_port: BTreeMap<Option<u16>, Chains> = BTreeMap::new();
    for (i, chain) in l.filter_chains.iter().enumerate() {
        let at = format!("filter_chains[{i}]");
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        let port = match m.destination_port.map(|p| p.value) {
            Some(INBOUND_LISTENER_PORT) => continue,
            Some(p) => Some(u16::try_from(p).map_err(|_| err(&at, "destination_port"))?),
            None => None,
        };
        let c = by_port.entry(port).or_default();
        // A TLS chain that terminates (has a transport socket) is mTLS; a TLS chain that does
        // not passes the client's TLS through (PERMISSIVE without an istio ALPN): as plaintext.
        match (
            m.transport_protocol.as_str(),
            chain.transport_socket.is_some(),
        ) {
            ("tls", true) => c.mtls = true,
            _ => c.plaintext = true,
        }
        let hcm = chain.filters.iter().any(
            |f| matches!(&f.config_type, Some(ConfigType::TypedConfig(any)) if any.type_url == HCM),
        );
        // The first HTTP chain's filters judge a sniffed port: requests by all their
        // attributes, bytes by those they have (an ALLOW needing a path fails closed, a DENY
        // naming one denies: what istiod writes into the TCP chains).
        if c.filters.is_none() || (hcm && !c.http) {
            c.filters = Some(rbac_filters(&at, chain)?);
        }
        c.http |= hcm;
        c.tcp |= !hcm;
    }
    let port_of = |c: Chains| InboundPort {
        mode: match (c.mtls, c.plaintext) {
            (true, false) => PeerMode::Strict,
            (true, true) => PeerMode::Permissive,
            _ => PeerMode::Disable,
        },
        http: c.http,
        tcp: c.tcp,
        filters: Arc::new(c.filters.unwrap_or_default()),
    };
    let mut out = InboundIntent::default();
    for (port, chains) in by_port {
        match port {
            Some(p) => {
                out.ports.insert(p, port_of(chains));
            }
            None => out.other = Some(port_of(chains)),
        }
    }
    Ok(out)
}

/// The chain's RBAC filters in order: network ones, and an HTTP connection manager's.
fn rbac_filters(at: &str, chain: &FilterChain) -> Result<Vec<RbacFilter>, Invalid> {
    let mut out = Vec::new();
    for (j, f) in chain.filters.iter().enumerate() {
        let Some(ConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        let at = format!("{at}.filters[{j}]");
        match any.type_url.as_str() {
            NETWORK_RBAC => {
                use interceptor_proto::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
                let r = NetRbac::decode(any.value.as_slice()).map_err(|e| err(&at, e))?;
                if let Some(rules) = r.rules {
                    out.push(filter(&at, &rules, false)?);
                }
            }
            HCM => out.extend(http_rbac(&at, any)?),
            _ => {}
        }
    }
    Ok(out)
}

fn http_rbac(at: &str, any: &Any) -> Result<Vec<RbacFilter>, Invalid> {
    use interceptor_proto::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).map_err(|e| err(at, e))?;
    let mut out = Vec::new();
    for (k, f) in hcm.http_filters.iter().enumerate() {
        let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        if any.type_url != HTTP_RBAC {
            continue;
        }
        let at = format!("{at}.http_filters[{k}]");
        let r = HttpRbac::decode(any.value.as_slice()).map_err(|e| err(&at, e))?;
        if let Some(rules) = r.rules {
            out.push(filter(&at, &rules, true)?);
        }
    }
    Ok(out)
}

fn filter(at: &str, rules: &Rbac, http: bool) -> Result<RbacFilter, Invalid> {
    let action = match Action::try_from(rules.action) {
        Ok(Action::Allow) => RbacAction::Allow,
        Ok(Action::Deny) => RbacAction::Deny,
        Ok(Action::Log) => RbacAction::Log,
        Err(_) => return Err(err(at, format!("unknown RBAC action {}", rules.action))),
    };
    let mut policies = Vec::new();
    for (name, p) in &rules.policies {
        let at = format!("{at}.policies[{name}]");
        policies.push((
            name.clone(),
            RbacPolicy {
                permissions: p
                    .permissions
                    .iter()
                    .map(|x| permission(x).map_err(|m| err(&at, m)))
                    .collect::<Result<_, _>>()?,
                principals: p
                    .principals
                    .iter()
                    .map(|x| principal(x).map_err(|m| err(&at, m)))
                    .collect::<Result<_, _>>()?,
            },
        ));
    }
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(RbacFilter {
        action,
        http,
        policies,
    })
}

fn cidr(c: &CidrRange) -> Result<Cidr, String> {
    let len = c.prefix_len.as_ref().map_or(0, |v| v.value);
    Cidr::parse(&format!("{}/{len}", c.address_prefix)).map_err(|e| e.to_string())
}

/// A HeaderMatcher as the route reader reads it, kept with its inversion.
fn header(
    h: &interceptor_proto::envoy::config::route::v3::HeaderMatcher,
) -> Result<HeaderMatch, String> {
    let v = super::routes::header(h)?;
    Ok(HeaderMatch {
        name: v.name,
        value: v.value,
        invert: h.invert_match,
    })
}

// istiod still writes `metadata` (requestPrincipals) and reads `source_ip` as Envoy's older
// names: they are read as it writes them.
#[allow(deprecated)]
fn permission(p: &EnvoyPermission) -> Result<Permission, String> {
    let set =
        |rules: &[EnvoyPermission]| rules.iter().map(permission).collect::<Result<Vec<_>, _>>();
    Ok(match &p.rule {
        Some(Rule::Any(_)) => Permission::Any,
        Some(Rule::AndRules(s)) => Permission::And(set(&s.rules)?),
        Some(Rule::OrRules(s)) => Permission::Or(set(&s.rules)?),
        Some(Rule::NotRule(r)) => Permission::Not(Box::new(permission(r)?)),
        Some(Rule::DestinationPort(n)) => Permission::DestinationPort(
            u16::try_from(*n).map_err(|_| format!("destination_port {n}"))?,
        ),
        Some(Rule::DestinationPortRange(r)) => Permission::DestinationPortRange(
            u16::try_from(r.start).map_err(|_| "destination_port_range".to_string())?,
            u16::try_from(r.end).unwrap_or(u16::MAX),
        ),
        Some(Rule::DestinationIp(c)) => Permission::DestinationIp(cidr(c)?),
        Some(Rule::Header(h)) => Permission::Header(header(h)?),
        Some(Rule::UrlPath(p)) => match &p.rule {
            Some(PathRule::Path(m)) => Permission::UrlPath(string_match(m)?),
            None => return Err("url_path without a path".into()),
        },
        Some(Rule::UriTemplate(_)) => Permission::L7("uri_template".into()),
        Some(Rule::Metadata(_)) => Permission::L7("metadata".into()),
        Some(Rule::RequestedServerName(_)) => Permission::L7("requested_server_name".into()),
        Some(_) => Permission::L7("other".into()),
        None => return Err("a permission with no rule".into()),
    })
}

#[allow(deprecated)]
fn principal(p: &EnvoyPrincipal) -> Result<Principal, String> {
    let set = |ids: &[EnvoyPrincipal]| ids.iter().map(principal).collect::<Result<Vec<_>, _>>();
    Ok(match &p.identifier {
        Some(Identifier::Any(_)) => Principal::Any,
        Some(Identifier::AndIds(s)) => Principal::And(set(&s.ids)?),
        Some(Identifier::OrIds(s)) => Principal::Or(set(&s.ids)?),
        Some(Identifier::NotId(r)) => Principal::Not(Box::new(principal(r)?)),
        Some(Identifier::Authenticated(a)) => {
            Principal::Authenticated(a.principal_name.as_ref().map(string_match).transpose()?)
        }
        Some(Identifier::DirectRemoteIp(c)) => Principal::DirectRemoteIp(cidr(c)?),
        Some(Identifier::SourceIp(c)) => Principal::SourceIp(cidr(c)?),
        Some(Identifier::RemoteIp(c)) => Principal::RemoteIp(cidr(c)?),
        Some(Identifier::Header(h)) => Principal::Header(header(h)?),
        Some(Identifier::UrlPath(_)) => Principal::L7("url_path".into()),
        Some(Identifier::Metadata(_)) => Principal::L7("metadata".into()),
        Some(_) => Principal::L7("other".into()),
        None => return Err("a principal with no identifier".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_proto::envoy::config::core::v3::TransportSocket;
    use interceptor_proto::envoy::config::listener::v3::{Filter, FilterChainMatch};
    use interceptor_proto::google::protobuf::UInt32Value;

    fn chain(port: Option<u32>, transport: &str, tls: bool, filters: Vec<Filter>) -> FilterChain {
        FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                destination_port: port.map(|value| UInt32Value { value }),
                transport_protocol: transport.into(),
                ..Default::default()
            }),
            transport_socket: tls.then(TransportSocket::default),
            filters,
            ..Default::default()
        }
    }

    fn rbac(bytes: Vec<u8>) -> Filter {
        Filter {
            name: "envoy.filters.network.rbac".into(),
            config_type: Some(ConfigType::TypedConfig(Any {
                type_url: NETWORK_RBAC.into(),
                value: bytes,
            })),
        }
    }

    #[test]
    fn the_chain_set_says_the_mode_and_the_rbac_comes_along() {
        use interceptor_proto::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
        let deny_all = NetRbac {
            rules: Some(Rbac {
                action: Action::Deny as i32,
                policies: [(
                    "ns[a]-policy[b]-rule[0]".to_string(),
                    interceptor_proto::envoy::config::rbac::v3::Policy {
                        permissions: vec![EnvoyPermission {
                            rule: Some(Rule::Any(true)),
                        }],
                        principals: vec![EnvoyPrincipal {
                            identifier: Some(Identifier::Any(true)),
                        }],
                        ..Default::default()
                    },
                )]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = Listener {
            name: VIRTUAL_INBOUND.into(),
            filter_chains: vec![
                chain(Some(15006), "", false, vec![]),
                chain(None, "tls", true, vec![rbac(deny_all.encode_to_vec())]),
                chain(None, "raw_buffer", false, vec![]),
                chain(Some(8080), "tls", true, vec![]),
                chain(Some(9090), "raw_buffer", false, vec![]),
            ],
            ..Default::default()
        };
        let i = inbound(&l).unwrap();
        assert_eq!(i.ports[&8080].mode, PeerMode::Strict);
        assert_eq!(i.ports[&9090].mode, PeerMode::Disable);
        let other = i.other.as_ref().unwrap();
        assert_eq!(other.mode, PeerMode::Permissive);
        assert_eq!(other.filters[0].action, RbacAction::Deny);
        assert_eq!(other.filters[0].policies[0].0, "ns[a]-policy[b]-rule[0]");
        assert_eq!(i.port(7000).unwrap().mode, PeerMode::Permissive);

        let bad = Listener {
            name: VIRTUAL_INBOUND.into(),
            filter_chains: vec![chain(None, "tls", true, vec![rbac(vec![0xff, 0xff])])],
            ..Default::default()
        };
        let e = inbound(&bad).unwrap_err();
        assert!(e.message.contains("filter_chains[0].filters[0]"), "{e}");
    }

    /// istiod's Auto ports (and passthrough chains) have HTTP chains beside TCP ones: sniffed,
    /// judged by the HTTP chain's RBAC.
    #[test]
    fn http_and_tcp_chains_on_one_port_make_it_sniffed() {
        use crate::mesh::ListenerProtocol;
        let hcm = || Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(ConfigType::TypedConfig(Any {
                type_url: HCM.into(),
                value: HttpConnectionManager::default().encode_to_vec(),
            })),
        };
        let deny = || {
            use interceptor_proto::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
            rbac(
                NetRbac {
                    rules: Some(Rbac {
                        action: Action::Deny as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        };
        let l = Listener {
            name: VIRTUAL_INBOUND.into(),
            filter_chains: vec![
                chain(None, "raw_buffer", false, vec![]),
                chain(None, "raw_buffer", false, vec![hcm()]),
                chain(Some(7080), "raw_buffer", false, vec![deny()]),
                chain(Some(7080), "raw_buffer", false, vec![hcm()]),
                chain(Some(8080), "raw_buffer", false, vec![hcm()]),
                chain(Some(9090), "raw_buffer", false, vec![deny()]),
            ],
            ..Default::default()
        };
        let i = inbound(&l).unwrap();
        assert_eq!(i.ports[&7080].protocol(), ListenerProtocol::Auto);
        // The HTTP chain's filters (none here), not the TCP chain's DENY.
        assert!(i.ports[&7080].filters.is_empty());
        assert_eq!(i.ports[&8080].protocol(), ListenerProtocol::Http);
        assert_eq!(i.ports[&9090].protocol(), ListenerProtocol::Tcp);
        assert_eq!(i.port(7000).unwrap().protocol(), ListenerProtocol::Auto);
    }
}
