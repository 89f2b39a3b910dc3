//! Which VirtualService `http[]` rule a request takes, as Envoy runs the routes istiod builds
//! from them: the parts of a match istiod evaluates for the proxy (port, sourceLabels,
//! sourceNamespace, gateways) once per connection, the rest per request, rules and matches in
//! order, the first that matches wins; none: 404 (Envoy's `NR`).
//!
//! I: pilot/pkg/networking/core/route/route.go `BuildHTTPRoutesForVirtualService`,
//! `TranslateRoute`, `sourceMatchHTTP`, `TranslateRouteMatch`, `translateHeaderMatch`
//! (withoutHeaders: `invert_match` with `treat_missing_header_as_empty`);
//! httproute.go (several VirtualServices for one host are not merged: the first wins).

use std::net::SocketAddr;

use hyper::http::request::Parts;
use serde::Serialize;

use super::policy::Subject;
use super::traffic::{applies_here, unmapped, ForProxy};
use crate::mesh::http_route::{HttpMatch, HttpRule, Redirect, Rewrite, ValueMatch};
use crate::mesh::inbound::StringMatch;
use crate::mesh::traffic::VirtualService;
use crate::mesh::{ListenerProtocol, Service, Table};

/// The `http[]` rules that apply to this VM's connections to one service port.
#[derive(Clone, Debug, Serialize)]
pub struct HttpRoutes<'t> {
    /// `namespace/name`.
    pub virtual_service: &'t str,
    pub rules: Vec<Applicable<'t>>,
}

/// A rule and those of its matches istiod would keep for this proxy (empty: the rule has no
/// match block and takes every request).
#[derive(Clone, Debug, Serialize)]
pub struct Applicable<'t> {
    pub index: usize,
    #[serde(skip)]
    pub rule: &'t HttpRule,
    #[serde(skip)]
    pub matches: Vec<&'t HttpMatch>,
}

/// The HTTP routes for connections to `dst` (a VIP and port of `svc`): istiod's (RDS, already
/// evaluated for this proxy), else, where the port is HTTP, the `http` rules of the files'
/// first VirtualService for the service that has some for this VM.
pub fn http_routes<'t>(
    table: &'t Table,
    subject: &Subject,
    svc: &'t Service,
    dst: SocketAddr,
) -> Option<HttpRoutes<'t>> {
    let dst = SocketAddr::new(unmapped(dst.ip()), dst.port());
    if let Some(h) = table.traffic.http_host(&svc.host, dst.port()) {
        return Some(HttpRoutes {
            virtual_service: h.config.as_deref().unwrap_or(&h.name),
            rules: h
                .rules
                .iter()
                .enumerate()
                .map(|(index, rule)| Applicable {
                    index,
                    rule,
                    matches: rule.matches.iter().collect(),
                })
                .collect(),
        });
    }
    if table.traffic.listener_route(dst).is_some() || !table.traffic.may_route(&svc.host) {
        return None;
    }
    if outbound_protocol(table, svc, dst.port()) == ListenerProtocol::Tcp {
        return None;
    }
    let vs = table
        .traffic
        .virtual_services_for(&svc.host)
        .find(|vs| applies_here(vs, subject) && !vs.http.is_empty())?;
    Some(HttpRoutes {
        virtual_service: &vs.name,
        rules: applicable(vs, subject, dst.port()),
    })
}

/// Whether connections to `dst` are served per request with no VirtualService routing them:
/// the port is HTTP and the service's DestinationRule sets `connectionPool.http` limits, which
/// only a per-request path can keep (Envoy keeps them on every HTTP port; ours stays L4 where
/// nothing needs more).
pub fn pool_needs_http(
    table: &Table,
    subject: &Subject,
    svc: &std::sync::Arc<Service>,
    dst: SocketAddr,
) -> bool {
    if outbound_protocol(table, svc, dst.port()) == ListenerProtocol::Tcp {
        return false;
    }
    let Some(port) = svc.port(dst.port()) else {
        return false;
    };
    super::traffic::service_cluster(table, subject, svc, port)
        .policy
        .pool
        .is_some_and(|p| p.limits_requests())
}

/// How connections to `svc`'s `port` are told apart: as istiod's listeners and routes say
/// (an RDS virtual host: HTTP, or sniffed where its route configuration is the port's own),
/// else as the port's declared protocol or name says.
pub fn outbound_protocol(table: &Table, svc: &Service, port: u16) -> ListenerProtocol {
    if let Some(p) = table.traffic.http_protocol(&svc.host, port) {
        return p;
    }
    svc.port(port)
        .map_or(ListenerProtocol::Tcp, |p| p.listener_protocol())
}

/// Whether a request goes upstream as HTTP/2, as istiod's `setUpstreamProtocol` decides for
/// the cluster (sheet 7.2): always to HTTP2 and gRPC ports; else as the DestinationRule says
/// (`useClientProtocol`: as it came; `h2UpgradePolicy: UPGRADE`: HTTP/2); else, on a sniffed
/// port, as it came (`use_downstream_protocol_config`); else HTTP/1.1.
pub fn upstream_h2(
    table: &Table,
    cluster: &super::traffic::Cluster<'_>,
    version: hyper::http::Version,
) -> bool {
    use crate::mesh::traffic::UpstreamProtocol;
    if cluster.port.is_http2() {
        return true;
    }
    let h2 = version == hyper::http::Version::HTTP_2;
    match cluster.policy.pool.and_then(|p| p.upstream) {
        Some(UpstreamProtocol::AsClient) => h2,
        Some(UpstreamProtocol::Http2) => true,
        None => {
            h2 && outbound_protocol(table, cluster.service, cluster.port.number)
                == ListenerProtocol::Auto
        }
    }
}

/// The rules in order, each with the matches this VM keeps; a rule all of whose matches are
/// for other proxies is dropped, and nothing follows a catch-all (istiod stops there).
fn applicable<'t>(vs: &'t VirtualService, subject: &Subject, port: u16) -> Vec<Applicable<'t>> {
    let mut out = Vec::new();
    for (index, rule) in vs.http.iter().enumerate() {
        let matches: Vec<&HttpMatch> = rule
            .matches
            .iter()
            .filter(|m| for_this_proxy(m, vs, subject, port))
            .collect();
        if !rule.matches.is_empty() && matches.is_empty() {
            continue;
        }
        let catch_all = matches.is_empty() || matches.iter().any(|m| is_catch_all(m));
        out.push(Applicable {
            index,
            rule,
            matches,
        });
        if catch_all {
            break;
        }
    }
    out
}

fn for_this_proxy(m: &HttpMatch, vs: &VirtualService, subject: &Subject, port: u16) -> bool {
    ForProxy {
        gateways: &m.gateways,
        port: m.port,
        source_labels: &m.source_labels,
        source_namespace: m.source_namespace.as_deref(),
    }
    .applies(vs, subject, port)
}

/// istiod's `IsCatchAllRoute`: prefix `/` or regex `.*`, nothing else to match.
fn is_catch_all(m: &HttpMatch) -> bool {
    let uri_any = match &m.uri {
        None => true,
        Some(StringMatch::Prefix(p)) => p == "/",
        Some(StringMatch::Regex(r)) => r.as_str() == "^(?:.*)$",
        Some(_) => false,
    };
    uri_any
        && m.headers.is_empty()
        && m.without_headers.is_empty()
        && m.query_params.is_empty()
        && m.method.is_none()
        && m.authority.is_none()
        && m.scheme.is_none()
}

impl<'t> HttpRoutes<'t> {
    /// The first rule one of whose matches the request meets.
    pub fn select(&self, req: &Parts) -> Option<&Applicable<'t>> {
        self.rules
            .iter()
            .find(|a| a.matches.is_empty() || a.matches.iter().any(|m| request_matches(m, req)))
    }
}

impl<'t> Applicable<'t> {
    /// Which of the rule's matches the request met (None: the rule has none).
    pub fn matched(&self, req: &Parts) -> Option<&'t HttpMatch> {
        self.matches
            .iter()
            .copied()
            .find(|m| request_matches(m, req))
    }
}

/// The path (and query) after a `rewrite`, as Envoy's prefix_rewrite and regex_rewrite: the
/// matched prefix swapped (the whole path for an exact or regex match, `/` with no uri match),
/// or every match of the pattern substituted; the query is kept.
pub fn rewritten_path(req: &Parts, matched: Option<&HttpMatch>, rw: &Rewrite) -> Option<String> {
    let path = req.uri.path();
    let new_path = if let Some(new) = &rw.uri {
        match matched.and_then(|m| m.uri.as_ref()) {
            Some(StringMatch::Prefix(p)) if path.len() >= p.len() => {
                format!("{new}{}", &path[p.len()..])
            }
            Some(StringMatch::Exact(_) | StringMatch::Regex(_)) => new.clone(),
            _ => format!("{new}{}", path.strip_prefix('/').unwrap_or(path)),
        }
    } else if let Some((StringMatch::Regex(re), with)) = &rw.uri_regex {
        re.replace_all(path, with.as_str()).into_owned()
    } else {
        return None;
    };
    Some(match req.uri.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    })
}

/// Where a `redirect` sends the client (Envoy's RedirectAction): each part the rule gives
/// replaces the request's; the query stays unless the new uri has one.
pub fn redirect_location(req: &Parts, r: &Redirect) -> String {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    // Envoy: a new host drops the request's port; otherwise the request's host and port stay.
    let original = authority(req);
    let (host, port) = match (&r.authority, original.rsplit_once(':')) {
        (Some(a), _) => (a.as_str(), None),
        (None, Some((h, p))) if p.parse::<u16>().is_ok() => (h, Some(p)),
        (None, _) => (original, None),
    };
    let port = r.port.map(|p| p.to_string()).or(port.map(str::to_string));
    let default_port = matches!(
        (scheme, port.as_deref()),
        ("http", Some("80")) | ("https", Some("443"))
    );
    let hostport = match port {
        Some(p) if !default_port && !host.contains(':') => format!("{host}:{p}"),
        _ => host.to_string(),
    };
    let path = match &r.uri {
        Some(u) if u.contains('?') => u.clone(),
        Some(u) => match req.uri.query() {
            Some(q) => format!("{u}?{q}"),
            None => u.clone(),
        },
        None => req
            .uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
    };
    format!("{scheme}://{hostport}{path}")
}

fn request_matches(m: &HttpMatch, req: &Parts) -> bool {
    let path = req.uri.path();
    let uri_ok = match &m.uri {
        None => true,
        Some(StringMatch::Exact(p)) if m.ignore_uri_case => path.eq_ignore_ascii_case(p),
        Some(StringMatch::Prefix(p)) if m.ignore_uri_case => {
            path.len() >= p.len() && path[..p.len()].eq_ignore_ascii_case(p)
        }
        Some(s) => s.matches(path),
    };
    let authority = authority(req);
    let scheme = req.uri.scheme_str().unwrap_or("http");
    uri_ok
        && m.method
            .as_ref()
            .is_none_or(|s| s.matches(req.method.as_str()))
        && m.authority.as_ref().is_none_or(|s| s.matches(authority))
        && m.scheme.as_ref().is_none_or(|s| s.matches(scheme))
        && m.headers.iter().all(|h| header_matches(h, req))
        && m.without_headers
            .iter()
            .all(|h| !header_matches_or_empty(h, req))
        && m.query_params.iter().all(|q| query_matches(q, req))
}

/// The request's authority: HTTP/2's `:authority`, else the Host header.
pub fn authority(req: &Parts) -> &str {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// A header's values as Envoy matches them: several joined with commas.
fn header_value(name: &str, req: &Parts) -> Option<String> {
    let mut values = req.headers.get_all(name).iter().peekable();
    values.peek()?;
    let joined: Vec<&str> = values.filter_map(|v| v.to_str().ok()).collect();
    Some(joined.join(","))
}

fn header_matches(h: &ValueMatch, req: &Parts) -> bool {
    match (header_value(&h.name, req), &h.value) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(v), Some(s)) => s.matches(&v),
    }
}

/// `withoutHeaders`: Envoy's inverted matcher treats a missing header as empty (a presence
/// match stays a presence match).
fn header_matches_or_empty(h: &ValueMatch, req: &Parts) -> bool {
    match (header_value(&h.name, req), &h.value) {
        (None, None) => false,
        (None, Some(s)) => s.matches(""),
        (Some(_), None) => true,
        (Some(v), Some(s)) => s.matches(&v),
    }
}

fn query_matches(q: &ValueMatch, req: &Parts) -> bool {
    let Some(query) = req.uri.query() else {
        return false;
    };
    query.split('&').any(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        k == q.name && q.value.as_ref().is_none_or(|s| s.matches(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::http_route::HttpAction;

    fn rule(matches: Vec<HttpMatch>) -> HttpRule {
        HttpRule {
            name: String::new(),
            matches,
            action: HttpAction::Respond {
                status: 200,
                body: String::new(),
            },
            timeout_ms: None,
            retries: None,
            fault: None,
            request_headers: Default::default(),
            response_headers: Default::default(),
            rewrite: None,
            mirrors: vec![],
            cors: None,
        }
    }

    fn vs(rules: Vec<HttpRule>) -> VirtualService {
        VirtualService {
            name: "shop/reviews".into(),
            namespace: "shop".into(),
            hosts: vec![],
            export_to: vec![],
            gateways: vec![],
            tcp: vec![],
            tls: vec![],
            http: rules,
            created: None,
        }
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "reviews:9080");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn header(name: &str, value: Option<StringMatch>) -> ValueMatch {
        ValueMatch {
            name: name.into(),
            value,
        }
    }

    #[test]
    fn the_first_matching_rule_wins_and_nothing_follows_a_catch_all() {
        let v = vs(vec![
            rule(vec![HttpMatch {
                headers: vec![header("end-user", Some(StringMatch::Exact("jason".into())))],
                ..Default::default()
            }]),
            rule(vec![HttpMatch {
                uri: Some(StringMatch::Prefix("/api".into())),
                method: Some(StringMatch::Exact("POST".into())),
                ..Default::default()
            }]),
            rule(vec![]),
            rule(vec![]),
        ]);
        let routes = HttpRoutes {
            virtual_service: "shop/reviews",
            rules: applicable(&v, &Subject::default(), 9080),
        };
        assert_eq!(
            routes.rules.len(),
            3,
            "the rule after the catch-all is dropped"
        );
        let pick = |r: Parts| routes.select(&r).map(|a| a.index);
        assert_eq!(pick(req("GET", "/", &[("end-user", "jason")])), Some(0));
        assert_eq!(pick(req("POST", "/api/x?a=1", &[])), Some(1));
        assert_eq!(pick(req("GET", "/api/x", &[])), Some(2));
    }

    #[test]
    fn without_headers_treat_a_missing_header_as_empty_and_query_params_match_values() {
        let m = HttpMatch {
            without_headers: vec![header("x-canary", Some(StringMatch::Exact("yes".into())))],
            query_params: vec![header("v", Some(StringMatch::Prefix("2".into())))],
            ..Default::default()
        };
        assert!(request_matches(&m, &req("GET", "/?v=20", &[])));
        assert!(!request_matches(
            &m,
            &req("GET", "/?v=20", &[("x-canary", "yes")])
        ));
        assert!(!request_matches(&m, &req("GET", "/?v=3", &[])));
        assert!(!request_matches(&m, &req("GET", "/", &[])));
        let present = HttpMatch {
            without_headers: vec![header("x-debug", None)],
            ..Default::default()
        };
        assert!(request_matches(&present, &req("GET", "/", &[])));
        assert!(!request_matches(
            &present,
            &req("GET", "/", &[("x-debug", "")])
        ));
    }

    #[test]
    fn rewrites_swap_what_the_match_matched_and_redirects_keep_what_they_do_not_name() {
        let prefix = HttpMatch {
            uri: Some(StringMatch::Prefix("/old".into())),
            ..Default::default()
        };
        let rw = Rewrite {
            uri: Some("/new".into()),
            ..Default::default()
        };
        let r = req("GET", "/old/a?x=1", &[]);
        assert_eq!(
            rewritten_path(&r, Some(&prefix), &rw).as_deref(),
            Some("/new/a?x=1")
        );
        assert_eq!(
            rewritten_path(&r, None, &rw).as_deref(),
            Some("/newold/a?x=1")
        );
        let regex = Rewrite {
            uri_regex: Some((
                StringMatch::Regex(regex::Regex::new("^/old/(.*)$").expect("re")),
                "/v2/${1}".into(),
            )),
            ..Default::default()
        };
        assert_eq!(
            rewritten_path(&r, Some(&prefix), &regex).as_deref(),
            Some("/v2/a?x=1")
        );
        let to = Redirect {
            uri: Some("/moved".into()),
            authority: Some("new.example".into()),
            scheme: None,
            port: None,
            code: 301,
        };
        assert_eq!(redirect_location(&r, &to), "http://new.example/moved?x=1");
        let same_host = Redirect {
            uri: None,
            authority: None,
            scheme: Some("https".into()),
            port: Some(443),
            code: 308,
        };
        assert_eq!(
            redirect_location(&r, &same_host),
            "https://reviews/old/a?x=1"
        );
    }

    #[test]
    fn uri_matches_ignore_the_query_and_may_ignore_case() {
        let m = HttpMatch {
            uri: Some(StringMatch::Exact("/Login".into())),
            ignore_uri_case: true,
            ..Default::default()
        };
        assert!(request_matches(&m, &req("GET", "/login?next=/", &[])));
        let regex = HttpMatch {
            uri: Some(StringMatch::regex("/v[0-9]+/.*").expect("regex")),
            ..Default::default()
        };
        assert!(request_matches(&regex, &req("GET", "/v2/items", &[])));
        assert!(!request_matches(&regex, &req("GET", "/x/v2/items", &[])));
    }

    #[test]
    fn matches_for_other_proxies_are_dropped_as_istiod_drops_them() {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("app".to_string(), "other".to_string());
        let v = vs(vec![
            rule(vec![HttpMatch {
                source_labels: labels,
                ..Default::default()
            }]),
            rule(vec![HttpMatch {
                port: Some(8080),
                ..Default::default()
            }]),
            rule(vec![]),
        ]);
        let kept = applicable(&v, &Subject::default(), 9080);
        assert_eq!(kept.iter().map(|a| a.index).collect::<Vec<_>>(), vec![2]);
    }
}
