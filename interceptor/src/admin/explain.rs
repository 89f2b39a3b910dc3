//! `interceptor explain`: what the daemon would do with a name or an address, from the same
//! table snapshot and endpoint choice the data paths use.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::State;
use crate::mesh::{self, Table};
use crate::route::{self, traffic, Scope, Skipped, Transport};
use crate::spiffe::DEFAULT_TRUST_DOMAIN;

#[derive(Debug, Serialize, Deserialize)]
pub struct Verdict {
    pub query: String,
    pub dns: Option<DnsVerdict>,
    pub connections: Vec<ConnectionVerdict>,
}

/// Where a name's answer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnsweredFrom {
    MeshTable,
    Upstream,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DnsVerdict {
    pub name: String,
    pub answered_from: AnsweredFrom,
    pub service: Option<String>,
    pub addresses: Vec<IpAddr>,
    /// Where a name outside the mesh is forwarded.
    pub upstream: Vec<SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectionVerdict {
    pub address: SocketAddr,
    pub captured: bool,
    pub why: String,
    pub service: Option<String>,
    /// What decided where it goes: the service itself, a VirtualService rule, istiod's
    /// listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The route's clusters and their share of connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterShare>,
    pub routes: Vec<Route>,
    pub skipped: Vec<Skipped>,
    /// Where requests are routed one by one: the VirtualService's `http` rules that apply to
    /// this VM, in order (each cluster's share above is within its rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<serde_json::Value>,
    /// How its connections are told apart: http, tcp, or auto (sniffed: those whose first
    /// bytes are HTTP take the `http` rules, the rest the TCP route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<mesh::ListenerProtocol>,
}

/// One destination of a route.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterShare {
    /// Istio's name, `outbound|PORT|SUBSET|HOST`.
    pub cluster: String,
    /// Of the connections, 0 to 1.
    pub share: f64,
    /// Why connections sent here are refused (no such cluster, BlackHoleCluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Its traffic policy (load balancer, pool, outlier detection); unset parts are defaults.
    #[serde(default)]
    pub policy: mesh::traffic::TrafficPolicy,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Route {
    /// What the connection is made to: the endpoint, or a gateway.
    pub connect_to: String,
    /// `direct`, or `gateway of network N`.
    pub via: String,
    pub endpoints: Vec<String>,
    pub weight: f64,
    /// The cluster (of the route's) this target is in.
    #[serde(default)]
    pub cluster: String,
    /// 0 is tried first; higher only when no lower one answers.
    #[serde(default)]
    pub priority: u32,
    pub mtls: bool,
    /// `plaintext`, `sidecar_mtls` (Istio's sidecar wire) or `hbone`.
    #[serde(default)]
    pub transport: String,
    pub sni: Option<String>,
    /// HBONE: the CONNECT stream's `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Double HBONE: the identities the gateway must present (the outer tunnel's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_identities: Vec<String>,
    /// Identities the server certificate must carry.
    pub identities: Vec<String>,
}

/// What inbound does with a client on a port of this VM: the mTLS mode and who set it, and
/// whether the client gets in, by which policy. The data path calls the same two functions.
#[derive(Debug, Serialize, Deserialize)]
pub struct InboundVerdict {
    pub port: u16,
    /// None: a plaintext client (or TLS we do not terminate).
    pub identity: Option<String>,
    pub source: IpAddr,
    pub mtls: route::policy::ModeDecision,
    /// Plaintext in STRICT never reaches authorization.
    pub refused_as_plaintext: bool,
    /// The request judged (`METHOD PATH`), when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// An HTTP port: served request by request (with `--inbound-http connections`, only where
    /// a policy needs it).
    #[serde(default)]
    pub http_port: bool,
    /// How its connections are told apart: http, tcp, or auto (sniffed: plaintext by its first
    /// bytes, mTLS by its ALPN; those that speak HTTP are served as on an HTTP port).
    pub protocol: mesh::ListenerProtocol,
    pub decision: route::policy::Decision,
}

/// `explain/inbound`'s question, as the query gives it.
#[derive(Default)]
pub struct InboundQuery<'a> {
    pub port: Option<&'a str>,
    pub identity: Option<&'a str>,
    pub source: Option<&'a str>,
    /// With `path`: judge this request (on an HTTP port).
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub host: Option<&'a str>,
}

pub fn explain_inbound(state: &State, q: &InboundQuery) -> Result<InboundVerdict, String> {
    let InboundQuery {
        port,
        identity,
        source,
        ..
    } = *q;
    let policy = state
        .inbound
        .as_ref()
        .ok_or("this process takes no inbound connections")?;
    let port: u16 = port
        .ok_or("explain/inbound?port=P[&identity=spiffe://...][&source=IP]")?
        .parse()
        .map_err(|_| "port: not a number".to_string())?;
    let identity = identity
        .filter(|i| !i.is_empty())
        .map(|i| crate::spiffe::SpiffeId::parse(i).ok_or(format!("{i:?}: not a spiffe:// id")))
        .transpose()?;
    let source: IpAddr = match source.filter(|s| !s.is_empty()) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("source: {s:?} is not an IP"))?,
        None => IpAddr::from([0, 0, 0, 0]),
    };
    let table = state.store.load();
    let mtls = route::policy::mtls_mode(&table, policy, port);
    let headers = hyper::HeaderMap::new();
    let target = q.path.filter(|p| !p.is_empty());
    let method = q.method.filter(|m| !m.is_empty()).unwrap_or("GET");
    let attrs = target.map(|target| route::policy::HttpAttrs {
        method,
        path: target.split(['?', '#']).next().unwrap_or(target),
        target,
        host: q.host.unwrap_or(""),
        headers: &headers,
    });
    let decision = route::policy::authorize(
        &table,
        policy,
        &route::policy::Request {
            port,
            identity: identity.as_ref(),
            mtls: identity.is_some(),
            source,
            destination: IpAddr::from([0, 0, 0, 0]),
            http: attrs.as_ref(),
        },
    );
    let protocol = table.traffic.inbound.as_ref().map_or_else(
        || {
            table
                .services
                .iter()
                .flat_map(|s| &s.ports)
                .find(|p| p.number == port)
                .map_or(mesh::ListenerProtocol::Tcp, |p| p.listener_protocol())
        },
        |i| {
            i.port(port)
                .map_or(mesh::ListenerProtocol::Tcp, |p| p.protocol())
        },
    );
    Ok(InboundVerdict {
        port,
        refused_as_plaintext: identity.is_none() && mtls.mode == route::MtlsMode::Strict,
        identity: identity.map(|i| i.to_string()),
        source,
        mtls,
        request: target.map(|t| format!("{method} {t}")),
        http_port: protocol == mesh::ListenerProtocol::Http,
        protocol,
        decision,
    })
}

/// Parses `HOST[:PORT]`, `IP`, `IP:PORT` or `[IPv6]:PORT`.
fn parse(target: &str) -> Result<(String, Option<u16>), String> {
    if let Ok(sa) = target.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), Some(sa.port())));
    }
    if target.parse::<IpAddr>().is_ok() {
        return Ok((target.to_string(), None));
    }
    match target.rsplit_once(':') {
        Some((host, port)) => port
            .parse()
            .map(|p| (host.to_string(), Some(p)))
            .map_err(|_| format!("{target:?}: port {port:?} is not a number")),
        None => Ok((target.to_string(), None)),
    }
}

/// What happens to a connection to `target` (whose TLS hello names `sni`, if given).
pub fn explain(state: &State, target: &str, sni: Option<&str>) -> Result<Verdict, String> {
    let (host, port) = parse(target.trim())?;
    if host.is_empty() {
        return Err("empty target".into());
    }
    let table = state.store.load();
    let (dns, addresses) = match host.parse::<IpAddr>() {
        Ok(ip) => (None, vec![ip]),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            let v = match table.names.lookup(&name) {
                Some(e) => DnsVerdict {
                    name,
                    answered_from: AnsweredFrom::MeshTable,
                    service: Some(e.host.to_string()),
                    addresses: e
                        .v4
                        .iter()
                        .map(|a| IpAddr::V4(*a))
                        .chain(e.v6.iter().map(|a| IpAddr::V6(*a)))
                        .collect(),
                    upstream: vec![],
                },
                None => DnsVerdict {
                    name,
                    answered_from: AnsweredFrom::Upstream,
                    service: None,
                    addresses: vec![],
                    upstream: state.nameservers.clone(),
                },
            };
            let addrs = v.addresses.clone();
            (Some(v), addrs)
        }
    };
    let connections = match port {
        Some(p) => addresses
            .iter()
            .map(|ip| connection(state, &table, SocketAddr::new(*ip, p), sni))
            .collect(),
        None => vec![],
    };
    Ok(Verdict {
        query: target.to_string(),
        dns,
        connections,
    })
}

fn connection(
    state: &State,
    table: &Table,
    dst: SocketAddr,
    sni: Option<&str>,
) -> ConnectionVerdict {
    let attached = state.capture.info().is_some_and(|c| !c.programs.is_empty());
    let mut v = ConnectionVerdict {
        address: dst,
        captured: false,
        why: String::new(),
        service: None,
        route: None,
        clusters: vec![],
        routes: vec![],
        skipped: vec![],
        http: None,
        protocol: None,
    };
    if dst.port() == 53 {
        v.captured = attached;
        v.why = if attached {
            "port 53: every DNS query from the cgroup goes to dns::Server".into()
        } else {
            "no eBPF capture in this daemon".into()
        };
        return v;
    }
    let Some((svc, _)) = table.service_for(dst) else {
        let exempt = dst.ip().is_loopback() || dst.port() == interceptor_ebpf::abi::SSH_PORT;
        v.why = if attached && table.registry_only() && !exempt {
            "not a mesh service address, and REGISTRY_ONLY is in force: connect() is refused \
             (EPERM) unless the address is in --exclude-outbound-cidrs"
                .into()
        } else {
            "not a mesh service address: the connection goes where it was aimed".into()
        };
        return v;
    };
    v.service = Some(svc.host.to_string());
    v.protocol = Some(route::http::outbound_protocol(table, svc, dst.port()));
    v.captured = attached;
    v.why = if attached {
        format!(
            "mesh service {} port {}: redirected to proxy::Outbound",
            svc.host,
            dst.port()
        )
    } else {
        "a mesh service, but this daemon attaches no eBPF (only iptables REDIRECT reaches it)"
            .into()
    };
    let trust_domain = state
        .identity
        .current()
        .map(|id| id.trust_domain().to_string())
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
    let subject = state
        .inbound
        .as_ref()
        .map(|p| p.subject.clone())
        .unwrap_or_default();
    // The very functions proxy::Outbound calls for a connection.
    if let Some(h) = route::http::http_routes(table, &subject, svc, dst) {
        v.route = Some(format!(
            "VirtualService {} http rules (per request)",
            h.virtual_service
        ));
        v.http = Some(http_rules(&h));
        let weighted = h
            .rules
            .iter()
            .filter_map(|a| match &a.rule.action {
                mesh::http_route::HttpAction::Forward(ds) => Some(ds),
                mesh::http_route::HttpAction::Respond { .. }
                | mesh::http_route::HttpAction::Redirect(_) => None,
            })
            .flat_map(|ds| {
                let total: f64 = ds.iter().map(|d| f64::from(d.weight)).sum();
                ds.iter()
                    .map(move |d| (d.clone(), f64::from(d.weight) / total.max(1.0)))
            })
            .collect();
        return clusters(state, table, &subject, dst, &trust_domain, weighted, v);
    }
    let r = traffic::route(table, &subject, svc, dst, sni);
    v.route = Some(r.by.to_string());
    if route::http::pool_needs_http(table, &subject, svc, dst) {
        v.route = Some(format!(
            "{} (per request: the DestinationRule's connectionPool.http limits)",
            r.by
        ));
    }
    let destinations = match r.target.as_ref() {
        mesh::traffic::Target::Service => vec![mesh::traffic::Destination {
            host: svc.host.clone(),
            subset: String::new(),
            port: Some(dst.port()),
            weight: 1,
            headers: None,
        }],
        mesh::traffic::Target::Clusters(ds) => ds.clone(),
        mesh::traffic::Target::BlackHole | mesh::traffic::Target::Passthrough => {
            v.clusters.push(ClusterShare {
                cluster: "BlackHoleCluster".into(),
                share: 1.0,
                refused: Some(traffic::NoRoute::BlackHole { by: r.by }.to_string()),
                policy: Default::default(),
            });
            return v;
        }
    };
    let total: f64 = destinations.iter().map(|d| f64::from(d.weight)).sum();
    let weighted = destinations
        .into_iter()
        .map(|d| {
            let share = if total > 0.0 {
                f64::from(d.weight) / total
            } else {
                0.0
            };
            (d, share)
        })
        .collect();
    clusters(state, table, &subject, dst, &trust_domain, weighted, v)
}

/// The `http` rules as explain prints them: index, name, the matches kept for this VM, the
/// action and its timeout, retries and fault.
fn http_rules(h: &route::http::HttpRoutes<'_>) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = h
        .rules
        .iter()
        .map(|a| {
            serde_json::json!({
                "index": a.index,
                "name": a.rule.name,
                "matches": a.matches,
                "action": a.rule.action,
                "timeout_ms": a.rule.timeout_ms,
                "retries": a.rule.retries,
                "fault": a.rule.fault,
            })
        })
        .collect();
    serde_json::json!({ "virtual_service": h.virtual_service, "rules": rules })
}

/// Each destination's cluster, share, policy and endpoints.
fn clusters(
    state: &State,
    table: &Table,
    subject: &route::policy::Subject,
    dst: SocketAddr,
    trust_domain: &str,
    weighted: Vec<(mesh::traffic::Destination, f64)>,
    mut v: ConnectionVerdict,
) -> ConnectionVerdict {
    let scope = Scope::Sidecar {
        network: &state.network,
        networks: &table.networks,
        trust_domain,
        original: Some(dst),
        gateway_identity: state.gateway_identity.as_ref(),
        locality: &subject.locality,
    };
    for (d, share) in &weighted {
        let share = *share;
        let c = match traffic::cluster(table, subject, d, dst.port()) {
            Ok(c) => c,
            Err(e) => {
                v.clusters.push(ClusterShare {
                    cluster: traffic::cluster_name(
                        d.port.unwrap_or(dst.port()),
                        &d.subset,
                        &d.host,
                    ),
                    share,
                    refused: Some(e.to_string()),
                    policy: Default::default(),
                });
                continue;
            }
        };
        let name = c.name();
        v.clusters.push(ClusterShare {
            cluster: name.clone(),
            share,
            refused: None,
            policy: c.policy.clone(),
        });
        let plan = route::plan_cluster(&c, scope);
        v.skipped.extend(plan.skipped);
        v.routes
            .extend(plan.targets.iter().map(|w| target_route(w, &name)));
    }
    v
}

fn target_route(w: &route::Weighted, cluster: &str) -> Route {
    let t = &w.target;
    Route {
        connect_to: t.endpoint.to_string(),
        via: match (&t.via, t.gateway_network()) {
            (_, Some(n)) => format!("gateway of network {n}"),
            (route::Via::ServiceHost, _) => "the service's host name".into(),
            (route::Via::OriginalDestination, _) => "the original destination".into(),
            _ => "direct".into(),
        },
        priority: w.priority,
        endpoints: t
            .workloads()
            .iter()
            .map(|w| format!("{} ({})", w.name, w.address))
            .collect(),
        weight: w.weight,
        cluster: cluster.to_string(),
        mtls: t.transport.is_mtls(),
        transport: t.transport.label().into(),
        sni: match &t.transport {
            Transport::Tls { sni, .. } => Some(sni.to_string()),
            Transport::Originate { sni, .. } => sni.as_deref().map(str::to_string),
            _ => None,
        },
        authority: match &t.transport {
            Transport::Hbone { authority, .. } => Some(authority.to_string()),
            Transport::DoubleHbone { authority, .. } => Some(authority.to_string()),
            _ => None,
        },
        gateway_identities: match &t.transport {
            Transport::DoubleHbone {
                gateway_identities, ..
            } => gateway_identities.iter().map(ToString::to_string).collect(),
            _ => vec![],
        },
        identities: t
            .transport
            .identities()
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse("10.0.0.1:80"), Ok(("10.0.0.1".into(), Some(80))));
        assert_eq!(parse("[fd00::1]:80"), Ok(("fd00::1".into(), Some(80))));
        assert_eq!(parse("fd00::1"), Ok(("fd00::1".into(), None)));
        assert_eq!(parse("product:8080"), Ok(("product".into(), Some(8080))));
        assert_eq!(parse("product"), Ok(("product".into(), None)));
        assert!(parse("product:http").is_err());
    }
}
