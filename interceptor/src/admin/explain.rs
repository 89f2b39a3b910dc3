//! `interceptor explain`: what the daemon would do with a name or an address, from the same
//! table snapshot and endpoint choice the data paths use.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::State;
use crate::mesh::{Service, ServicePort, Table};
use crate::proxy::pick::{self, Scope};
use crate::tls;

#[derive(Debug, Serialize, Deserialize)]
pub struct Verdict {
    pub query: String,
    pub dns: Option<DnsVerdict>,
    pub connections: Vec<ConnectionVerdict>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DnsVerdict {
    pub name: String,
    /// "mesh table" or "upstream".
    pub answered_from: String,
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
    pub routes: Vec<Route>,
    pub skipped: Vec<pick::Skipped>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Route {
    /// What the connection is made to: the endpoint, or a gateway.
    pub connect_to: String,
    /// `direct`, or `gateway of network N`.
    pub via: String,
    pub endpoints: Vec<String>,
    pub weight: f64,
    pub mtls: bool,
    pub sni: Option<String>,
    /// Identities the server certificate must carry.
    pub identities: Vec<String>,
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

pub fn explain(state: &State, target: &str) -> Result<Verdict, String> {
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
                    answered_from: "mesh table".into(),
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
                    answered_from: "upstream".into(),
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
            .map(|ip| connection(state, &table, SocketAddr::new(*ip, p)))
            .collect(),
        None => vec![],
    };
    Ok(Verdict {
        query: target.to_string(),
        dns,
        connections,
    })
}

fn connection(state: &State, table: &Table, dst: SocketAddr) -> ConnectionVerdict {
    let attached = state.capture.get().is_some_and(|c| !c.programs.is_empty());
    let mut v = ConnectionVerdict {
        address: dst,
        captured: false,
        why: String::new(),
        service: None,
        routes: vec![],
        skipped: vec![],
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
    let Some((svc, port)) = table.service_for(dst) else {
        v.why = "not a mesh service address: the connection goes where it was aimed".into();
        return v;
    };
    v.service = Some(svc.host.to_string());
    v.captured = attached;
    v.why = if attached {
        format!(
            "mesh service {} port {}: redirected to proxy::Outbound",
            svc.host, port.number
        )
    } else {
        "a mesh service, but this daemon attaches no eBPF (only iptables REDIRECT reaches it)"
            .into()
    };
    let scope = Scope::Sidecar {
        network: &state.network,
        networks: &table.networks,
    };
    let (targets, skipped) = pick::candidates(svc, port, scope);
    v.skipped = skipped;
    let trust_domain = state
        .identity
        .current()
        .map(|id| id.trust_domain().to_string())
        .unwrap_or_else(|| "cluster.local".into());
    v.routes = targets
        .iter()
        .map(|(weight, t)| route(svc, port, t, *weight, &trust_domain))
        .collect();
    v
}

fn route(svc: &Service, port: &ServicePort, t: &pick::Target, weight: f64, td: &str) -> Route {
    let mtls = t.speaks_istio_mtls();
    Route {
        connect_to: t.label(),
        via: match t.gateway_network() {
            Some(n) => format!("gateway of network {n}"),
            None => "direct".into(),
        },
        endpoints: t
            .workloads()
            .iter()
            .map(|w| format!("{} ({})", w.name, w.address))
            .collect(),
        weight,
        mtls,
        sni: mtls.then(|| tls::sni(port.number, "", svc.host.as_str())),
        identities: if mtls {
            crate::proxy::expected_identities(svc, t.workloads(), td)
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            vec![]
        },
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
