//! How Istio names a service port on the wire: the SNI of the sidecar's mTLS (I:
//! pilot/pkg/model/service.go BuildDNSSrvSubsetKey) and the identities a server must present.

use std::sync::Arc;

use crate::mesh::{Service, Workload};
use crate::spiffe::SpiffeId;

/// The Istio SNI for a service port: `outbound_.<port>_.<subset>_.<host>`.
pub fn sni(port: u16, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// Splits an Istio SNI `outbound_.P_.S_.H` into (port, subset, host).
pub fn parse_sni(sni: &str) -> Option<(u16, &str, &str)> {
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    let (subset, host) = rest.split_once("_.")?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((port, subset, host))
}

/// Whether the table says `dst` (this host's address and port) serves the service an Istio
/// SNI names: Some(false) is a connection meant for another service (a misrouted or forged
/// hello); None when there is nothing to check against (not Istio's SNI, or a host this table
/// does not know: the client's mesh view may be wider than ours).
pub fn sni_served(
    table: &crate::mesh::Table,
    sni: &str,
    dst: std::net::SocketAddr,
) -> Option<bool> {
    let (port, _, host) = parse_sni(sni)?;
    let svc = table.service_by_host(host)?;
    let Some(sp) = svc.port(port) else {
        return Some(false);
    };
    let ours = crate::mesh::Address::Ip(dst.ip());
    Some(
        svc.endpoints_for(sp)
            .iter()
            .any(|w| w.address == ours && w.target_port(sp) == dst.port()),
    )
}

/// How connections to `dst` (this host's address and port) are told apart, as Istio decides
/// it: from istiod, by its `virtualInbound` chains for the port (HTTP ones, TCP ones, or both:
/// sniffed); from the files, by the port a service whose endpoint is this address and port
/// declares (HTTP, HTTP2, gRPC or by its name: HTTP; none: sniffed).
pub fn inbound_protocol(
    table: &crate::mesh::Table,
    dst: std::net::SocketAddr,
) -> crate::mesh::ListenerProtocol {
    use crate::mesh::ListenerProtocol;
    if let Some(intent) = &table.traffic.inbound {
        return intent
            .port(dst.port())
            .map_or(ListenerProtocol::Tcp, |p| p.protocol());
    }
    // A port no service of ours declares stays bytes (istiod's passthrough chains would sniff
    // it; with the files nothing routes its requests).
    inbound_service(table, dst).map_or(ListenerProtocol::Tcp, |(_, sp)| sp.listener_protocol())
}

/// The service (and its port) this host serves on `dst`: one whose endpoint is this address
/// and port (an HTTP port first, where several services share it). Requests to the app go as
/// HTTP/2 where that port is HTTP2 or gRPC (istiod's inbound cluster gets HTTP/2 options then),
/// and are counted under its host.
pub fn inbound_service(
    table: &crate::mesh::Table,
    dst: std::net::SocketAddr,
) -> Option<(&Arc<Service>, &crate::mesh::ServicePort)> {
    let ours = &crate::mesh::Address::Ip(dst.ip().to_canonical());
    let mut found = table.services.iter().flat_map(|svc| {
        svc.ports
            .iter()
            .filter(move |sp| {
                svc.endpoints_for(sp)
                    .iter()
                    .any(|w| &w.address == ours && w.target_port(sp) == dst.port())
            })
            .map(move |sp| (svc, sp))
    });
    let first = found.next()?;
    match first.1.is_http() {
        true => Some(first),
        false => found.find(|(_, sp)| sp.is_http()).or(Some(first)),
    }
}

/// Who may answer for `svc` on these workloads: the service's subjectAltNames when given (a
/// ServiceEntry's, or CDS's SAN matchers), else each workload's service account in our trust
/// domain.
pub fn expected_identities(
    svc: &Service,
    workloads: &[Arc<Workload>],
    trust_domain: &str,
) -> Vec<SpiffeId> {
    let from_service: Vec<SpiffeId> = svc
        .subject_alt_names
        .iter()
        .filter_map(|s| SpiffeId::parse(s))
        .collect();
    if !from_service.is_empty() {
        return from_service;
    }
    let mut ids: Vec<SpiffeId> = Vec::new();
    for w in workloads {
        let id = SpiffeId::new(trust_domain, &w.namespace, &w.service_account);
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trip() {
        let s = sni(8080, "", "product.default.svc.cluster.local");
        assert_eq!(s, "outbound_.8080_._.product.default.svc.cluster.local");
        assert_eq!(
            parse_sni(&s),
            Some((8080, "", "product.default.svc.cluster.local"))
        );
        assert_eq!(parse_sni("outbound_.80_.v1_.a.b"), Some((80, "v1", "a.b")));
        assert_eq!(parse_sni("inbound_.80_._.a"), None);
        assert_eq!(parse_sni("outbound_.x_._.a"), None);
        assert!(
            rustls::pki_types::ServerName::try_from(s).is_ok(),
            "rustls accepts the underscore SNI"
        );
    }

    #[test]
    fn service_sans_win_over_service_accounts() {
        let (mut s, _) = super::super::tests::svc(&[(1, "", true), (1, "", true)]);
        let ids = expected_identities(&s, &s.endpoints, "td");
        assert_eq!(ids.len(), 2);
        s.subject_alt_names = vec!["spiffe://td/ns/x/sa/y".into(), "not-spiffe".into()];
        let ids = expected_identities(&s, &s.endpoints, "td");
        assert_eq!(ids, vec![SpiffeId::parse("spiffe://td/ns/x/sa/y").unwrap()]);
    }
}
