//! A DestinationRule's `tls` laid over the plan auto mTLS made: DISABLE takes mTLS away,
//! ISTIO_MUTUAL gives it to every endpoint (with the rule's SNI and names), SIMPLE and MUTUAL
//! originate TLS to each endpoint (I: pilot/pkg/networking/core/cluster_tls.go
//! `buildUpstreamClusterTLSContext`, `constructUpstreamTLS`, `applyHBONETransportSocketMatches`;
//! cluster_builder.go `buildAutoMtlsSettings`).

use std::sync::Arc;

use super::traffic::Cluster;
use super::wire::{expected_identities, sni};
use super::{EndpointAddr, Plan, SkipReason, Skipped, Transport, Via};
use crate::mesh::traffic::{TlsMode, UpstreamTls};
use crate::mesh::Address;
use crate::spiffe::SpiffeId;

pub(super) fn apply(plan: &mut Plan, tls: &UpstreamTls, c: &Cluster<'_>, trust_domain: &str) {
    let originate = tls.originates().then(|| originated(tls, c));
    let mut kept = Vec::with_capacity(plan.targets.len());
    for mut w in std::mem::take(&mut plan.targets) {
        let t = &mut w.target;
        if let Via::Gateway { behind, network } = &t.via {
            // The gateway routes by Istio's SNI: only Istio's mTLS crosses it.
            if tls.mode != TlsMode::IstioMutual {
                plan.skipped.extend(behind.iter().map(|b| Skipped {
                    endpoint: b.name.clone(),
                    network: network.clone(),
                    reason: SkipReason::RemoteNeedsIstioMtls,
                }));
                continue;
            }
        }
        t.transport = match (
            tls.mode,
            std::mem::replace(&mut t.transport, Transport::Plain),
        ) {
            // HBONE stays HBONE whatever the mode (Istio keeps the hbone match in front).
            (TlsMode::Disable | TlsMode::IstioMutual, h @ Transport::Hbone { .. })
            | (_, h @ Transport::DoubleHbone { .. }) => h,
            (TlsMode::Disable, _) => Transport::Plain,
            (TlsMode::IstioMutual, _) => Transport::Tls {
                sni: Arc::from(
                    tls.sni
                        .clone()
                        .unwrap_or_else(|| sni(c.port.number, &c.subset, c.service.host.as_str())),
                ),
                identities: istio_identities(tls, c, t.workloads(), trust_domain),
            },
            (TlsMode::Simple | TlsMode::Mutual, was) => {
                if let Transport::Hbone { authority, .. } = was {
                    // TLS to the workload itself, not through its HBONE port.
                    t.endpoint = EndpointAddr {
                        address: Address::Ip(authority.ip()),
                        port: authority.port(),
                    };
                }
                match &originate {
                    Some((sni, tls)) => Transport::Originate {
                        sni: sni.clone(),
                        tls: tls.clone(),
                    },
                    None => Transport::Plain,
                }
            }
        };
        kept.push(w);
    }
    plan.targets = kept;
}

/// ISTIO_MUTUAL's names: the rule's subjectAltNames, else the service accounts (Istio).
fn istio_identities(
    tls: &UpstreamTls,
    c: &Cluster<'_>,
    workloads: &[Arc<crate::mesh::Workload>],
    trust_domain: &str,
) -> Vec<SpiffeId> {
    let given: Vec<SpiffeId> = tls
        .subject_alt_names
        .iter()
        .filter_map(|s| SpiffeId::parse(s))
        .collect();
    if given.is_empty() {
        expected_identities(c.service, workloads, trust_domain)
    } else {
        given
    }
}

/// SIMPLE/MUTUAL: the SNI (the rule's, else the service's host name) and the names the server
/// must present (the rule's, else — for a ServiceEntry of the files — its subjectAltNames, as
/// istiod fills them in for registry-external services; istiod's clusters carry their own).
fn originated(tls: &UpstreamTls, c: &Cluster<'_>) -> (Option<Arc<str>>, Arc<UpstreamTls>) {
    let host = c.service.host.as_str();
    let sni = tls
        .sni
        .clone()
        .or_else(|| {
            (!host.starts_with('*') && host.parse::<std::net::IpAddr>().is_err())
                .then(|| host.to_string())
        })
        .map(Arc::from);
    let mut tls = tls.clone();
    if tls.subject_alt_names.is_empty() && c.service.policies.is_none() {
        tls.subject_alt_names = c.service.subject_alt_names.clone();
    }
    (sni, Arc::new(tls))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::super::tests::{sidecar, svc, two_networks};
    use super::super::{plan_cluster, Transport};
    use super::*;
    use crate::mesh::traffic::TrafficPolicy;

    fn transports(tls: Option<UpstreamTls>) -> (Vec<Transport>, Vec<SkipReason>) {
        // A plaintext and an mTLS endpoint here (network a), an mTLS one behind b's gateway.
        let (s, p) = svc(&[(1, "a", false), (1, "a", true), (1, "b", true)]);
        let s = Arc::new(s);
        let c = Cluster {
            service: &s,
            port: &p,
            subset: String::new(),
            endpoints: Cow::Owned(s.endpoints.clone()),
            policy: TrafficPolicy {
                tls,
                ..Default::default()
            },
        };
        let n = two_networks();
        let plan = plan_cluster(&c, sidecar("a", &n));
        (
            plan.targets
                .into_iter()
                .map(|w| w.target.transport)
                .collect(),
            plan.skipped.into_iter().map(|s| s.reason).collect(),
        )
    }

    #[test]
    fn the_rules_mode_replaces_auto_mtls() {
        let (auto, _) = transports(None);
        assert_eq!(auto[0], Transport::Plain);
        assert!(matches!(auto[1], Transport::Tls { .. }));
        assert_eq!(auto.len(), 3, "the remote one through its gateway");

        let (off, skipped) = transports(Some(UpstreamTls::mode(TlsMode::Disable)));
        assert_eq!(off, vec![Transport::Plain, Transport::Plain]);
        assert_eq!(skipped, vec![SkipReason::RemoteNeedsIstioMtls]);

        let mut istio = UpstreamTls::mode(TlsMode::IstioMutual);
        istio.subject_alt_names = vec!["spiffe://td/ns/db/sa/pg".into()];
        let (all, _) = transports(Some(istio));
        assert_eq!(all.len(), 3);
        for t in &all {
            let Transport::Tls { sni, identities } = t else {
                panic!("ISTIO_MUTUAL to every endpoint: {t:?}");
            };
            assert_eq!(&**sni, "outbound_.80_._.a.default.svc.cluster.local");
            assert_eq!(identities[0].as_str(), "spiffe://td/ns/db/sa/pg");
        }

        let mut simple = UpstreamTls::mode(TlsMode::Simple);
        simple.ca_certificates = Some("/ca.pem".into());
        let (orig, skipped) = transports(Some(simple));
        assert_eq!(orig.len(), 2);
        for t in &orig {
            let Transport::Originate { sni, tls } = t else {
                panic!("SIMPLE originates: {t:?}");
            };
            assert_eq!(sni.as_deref(), Some("a.default.svc.cluster.local"));
            assert_eq!(tls.ca_certificates, Some("/ca.pem".into()));
            assert!(!t.is_mtls());
        }
        assert_eq!(skipped, vec![SkipReason::RemoteNeedsIstioMtls]);
    }
}
