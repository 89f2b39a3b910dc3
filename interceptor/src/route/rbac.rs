//! What istiod's RBAC filters decide for an inbound connection, as Envoy's RBAC would at the
//! connection (E: rbac.proto; sheet 4.3): a DENY filter refuses on any match, an ALLOW filter
//! on none (an empty one refuses everything), a LOG (AUDIT) filter only notes. Headers and
//! paths are judged on the request where there is one; without (at L4), and for what we never
//! see (JWT metadata), they fail closed, as Istio fails them on TCP chains: an ALLOW policy
//! that needs one does not match, a DENY policy matches without it.

use std::net::IpAddr;

use super::policy::{Decision, Reason, Request};
use crate::mesh::inbound::{InboundPort, Permission, Principal, RbacAction, RbacPolicy};

/// Three-valued: Some(bool) decided, None needs what L4 cannot see.
type Tri = Option<bool>;

fn all(items: impl Iterator<Item = Tri>) -> Tri {
    let mut unknown = false;
    for t in items {
        match t {
            Some(false) => return Some(false),
            None => unknown = true,
            Some(true) => {}
        }
    }
    (!unknown).then_some(true)
}

fn any(items: impl Iterator<Item = Tri>) -> Tri {
    let mut unknown = false;
    for t in items {
        match t {
            Some(true) => return Some(true),
            None => unknown = true,
            Some(false) => {}
        }
    }
    (!unknown).then_some(false)
}

fn permission(p: &Permission, req: &Request) -> Tri {
    match p {
        Permission::Any => Some(true),
        Permission::DestinationPort(port) => Some(req.port == *port),
        Permission::DestinationPortRange(lo, hi) => Some((*lo..*hi).contains(&req.port)),
        Permission::DestinationIp(c) => Some(c.contains(unmapped(req.destination))),
        Permission::And(ps) => all(ps.iter().map(|p| permission(p, req))),
        Permission::Or(ps) => any(ps.iter().map(|p| permission(p, req))),
        Permission::Not(p) => permission(p, req).map(|b| !b),
        Permission::Header(h) => req.http.map(|r| h.matches(r.header(&h.name).as_deref())),
        Permission::UrlPath(m) => req.http.map(|r| m.matches(r.path)),
        Permission::L7(_) => None,
    }
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn principal(p: &Principal, req: &Request) -> Tri {
    let source = unmapped(req.source);
    match p {
        Principal::Any => Some(true),
        Principal::Authenticated(m) => Some(match (req.identity, m) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(id), Some(m)) => m.matches(id.as_str()),
        }),
        Principal::DirectRemoteIp(c) | Principal::SourceIp(c) | Principal::RemoteIp(c) => {
            Some(c.contains(source))
        }
        Principal::And(ps) => all(ps.iter().map(|p| principal(p, req))),
        Principal::Or(ps) => any(ps.iter().map(|p| principal(p, req))),
        Principal::Not(p) => principal(p, req).map(|b| !b),
        Principal::Header(h) => req.http.map(|r| h.matches(r.header(&h.name).as_deref())),
        Principal::L7(_) => None,
    }
}

fn policy(p: &RbacPolicy, req: &Request) -> Tri {
    all([
        any(p.permissions.iter().map(|x| permission(x, req))),
        any(p.principals.iter().map(|x| principal(x, req))),
    ]
    .into_iter())
}

/// The verdict of `port`'s RBAC filters on `req`.
pub fn authorize(port: &InboundPort, req: &Request) -> Decision {
    let mut out = Decision {
        allowed: true,
        reason: Reason::NoPolicy,
        policy: None,
        rule: None,
        audited: vec![],
        applicable: vec![],
        needs_http: false,
    };
    for f in port.filters.iter() {
        out.applicable
            .extend(f.policies.iter().map(|(name, _)| name.clone()));
        // Unknown conditions: an ALLOW needs a sure match, a DENY or AUDIT takes a possible one.
        let hit = f.policies.iter().find(|(_, p)| {
            let verdict = policy(p, req);
            out.needs_http |= verdict.is_none() && req.http.is_none();
            match f.action {
                RbacAction::Allow => verdict == Some(true),
                RbacAction::Deny | RbacAction::Log => verdict != Some(false),
            }
        });
        match (f.action, hit) {
            (RbacAction::Log, Some((name, _))) => out.audited.push(name.clone()),
            (RbacAction::Log, None) => {}
            (RbacAction::Deny, Some((name, _))) => {
                return Decision {
                    allowed: false,
                    reason: Reason::PolicyDenied,
                    policy: Some(name.clone()),
                    ..out
                }
            }
            (RbacAction::Deny, None) => {}
            (RbacAction::Allow, Some((name, _))) => {
                out.reason = Reason::Allowed;
                out.policy = Some(name.clone());
            }
            (RbacAction::Allow, None) => {
                return Decision {
                    allowed: false,
                    reason: Reason::PolicyNotAllowed,
                    ..out
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::inbound::{RbacFilter, StringMatch};
    use crate::mesh::PeerMode;
    use crate::route::policy::HttpAttrs;
    use crate::spiffe::SpiffeId;
    use std::sync::Arc;

    fn req<'a>(id: Option<&'a SpiffeId>, port: u16) -> Request<'a> {
        Request {
            port,
            identity: id,
            mtls: id.is_some(),
            source: "10.0.0.9".parse().unwrap(),
            destination: "10.0.0.1".parse().unwrap(),
            http: None,
        }
    }

    fn port(filters: Vec<RbacFilter>) -> InboundPort {
        InboundPort {
            mode: PeerMode::Strict,
            http: true,
            tcp: false,
            filters: Arc::new(filters),
        }
    }

    fn ns_regex(ns: &str) -> Principal {
        Principal::Authenticated(Some(StringMatch::regex(&format!(".*/ns/{ns}/.*")).unwrap()))
    }

    #[test]
    fn deny_by_namespace_then_allow_by_principal() {
        let deny = RbacFilter {
            action: RbacAction::Deny,
            http: false,
            policies: vec![(
                "ns[vm]-policy[deny-bad]-rule[0]".into(),
                RbacPolicy {
                    permissions: vec![Permission::Any],
                    principals: vec![Principal::And(vec![Principal::Or(vec![ns_regex("bad")])])],
                },
            )],
        };
        let allow = RbacFilter {
            action: RbacAction::Allow,
            http: false,
            policies: vec![(
                "ns[vm]-policy[allow-api]-rule[0]".into(),
                RbacPolicy {
                    permissions: vec![Permission::And(vec![Permission::Or(vec![
                        Permission::DestinationPort(9080),
                    ])])],
                    principals: vec![Principal::Authenticated(Some(StringMatch::Exact(
                        "spiffe://cluster.local/ns/shop/sa/api".into(),
                    )))],
                },
            )],
        };
        let p = port(vec![deny, allow]);
        let api = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
        let bad = SpiffeId::parse("spiffe://cluster.local/ns/bad/sa/api").unwrap();
        let d = authorize(&p, &req(Some(&api), 9080));
        assert!(d.allowed, "{d:?}");
        assert_eq!(
            d.policy.as_deref(),
            Some("ns[vm]-policy[allow-api]-rule[0]")
        );
        let d = authorize(&p, &req(Some(&bad), 9080));
        assert_eq!((d.allowed, d.reason), (false, Reason::PolicyDenied));
        let d = authorize(&p, &req(Some(&api), 7070));
        assert_eq!((d.allowed, d.reason), (false, Reason::PolicyNotAllowed));
        assert!(!authorize(&p, &req(None, 9080)).allowed);
    }

    #[test]
    fn l7_conditions_fail_closed() {
        let l7 = RbacPolicy {
            permissions: vec![Permission::L7("header".into())],
            principals: vec![Principal::Any],
        };
        let allow = port(vec![RbacFilter {
            action: RbacAction::Allow,
            http: true,
            policies: vec![("a".into(), l7.clone())],
        }]);
        assert!(!authorize(&allow, &req(None, 80)).allowed);
        let deny = port(vec![RbacFilter {
            action: RbacAction::Deny,
            http: true,
            policies: vec![("d".into(), l7)],
        }]);
        assert!(!authorize(&deny, &req(None, 80)).allowed);
        // An empty ALLOW filter refuses everything (Envoy).
        let empty = port(vec![RbacFilter {
            action: RbacAction::Allow,
            http: false,
            policies: vec![],
        }]);
        assert!(!authorize(&empty, &req(None, 80)).allowed);
    }

    /// istiod's HTTP RBAC for `to: [{operation: {methods: [GET], paths: [/public*]}}]` (ALLOW)
    /// and `when: [{key: request.headers[x-evil], values: [yes]}]` (DENY), judged per request.
    #[test]
    fn methods_paths_and_headers_are_judged_on_the_request() {
        use crate::mesh::inbound::HeaderMatch;
        let and = |p: Permission| Permission::And(vec![Permission::Or(vec![p])]);
        let allow = RbacFilter {
            action: RbacAction::Allow,
            http: true,
            policies: vec![(
                "ns[vm]-policy[public]-rule[0]".into(),
                RbacPolicy {
                    permissions: vec![Permission::And(vec![
                        Permission::Or(vec![Permission::Header(HeaderMatch {
                            name: ":method".into(),
                            value: Some(StringMatch::Exact("GET".into())),
                            invert: false,
                        })]),
                        Permission::Or(vec![Permission::UrlPath(StringMatch::Prefix(
                            "/public".into(),
                        ))]),
                    ])],
                    principals: vec![Principal::Any],
                },
            )],
        };
        let deny = RbacFilter {
            action: RbacAction::Deny,
            http: true,
            policies: vec![(
                "ns[vm]-policy[evil]-rule[0]".into(),
                RbacPolicy {
                    permissions: vec![and(Permission::Any)],
                    principals: vec![Principal::And(vec![Principal::Header(HeaderMatch {
                        name: "x-evil".into(),
                        value: Some(StringMatch::Exact("yes".into())),
                        invert: false,
                    })])],
                },
            )],
        };
        let p = port(vec![deny, allow]);
        let mut headers = hyper::HeaderMap::new();
        let judge = |method: &str, target: &str, headers: &hyper::HeaderMap| {
            let http = HttpAttrs {
                method,
                path: target.split('?').next().unwrap(),
                target,
                host: "vm.example",
                headers,
            };
            authorize(
                &p,
                &Request {
                    http: Some(&http),
                    ..req(None, 8080)
                },
            )
        };
        let d = judge("GET", "/public/a?x=1", &headers);
        assert!(d.allowed && !d.needs_http, "{d:?}");
        assert_eq!(
            judge("POST", "/public/a", &headers).reason,
            Reason::PolicyNotAllowed
        );
        assert_eq!(
            judge("GET", "/admin", &headers).reason,
            Reason::PolicyNotAllowed
        );
        headers.insert("x-evil", "yes".parse().unwrap());
        assert_eq!(
            judge("GET", "/public", &headers).reason,
            Reason::PolicyDenied
        );
        // Without the request the same port fails closed, and says a request would decide.
        let d = authorize(&p, &req(None, 8080));
        assert!(!d.allowed && d.needs_http, "{d:?}");
    }
}
