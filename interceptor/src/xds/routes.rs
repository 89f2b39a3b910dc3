//! RDS: istiod's HTTP route configurations, read into the same HTTP rules the mesh files give
//! (`mesh::http_route`). Only virtual hosts a VirtualService made keep their rules (a route
//! carries `istio.config` metadata): a service with istiod's default route alone is kept with
//! none, which says the port is HTTP for it and leaves it on the L4 path unless its
//! DestinationRule needs requests, as a service without `http` rules does from files. What we cannot honour NACKs the resource
//! naming the virtual host and route; fields we do not need are ignored.
//!
//! I: pilot/pkg/networking/core/route/route.go (`TranslateRoute`, `TranslateRouteMatch`,
//! `translateHeaderMatch`, `TranslateFault`, `TranslateHeadersOperations`), retry/retry.go;
//! Envoy route_components.proto.

use interceptor_proto::envoy::config::core::v3::{
    data_source::Specifier, header_value_option::HeaderAppendAction, HeaderValueOption,
};
use interceptor_proto::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, HeaderMatcher,
    RetryPolicy, Route, RouteConfiguration, VirtualHost,
};
use interceptor_proto::envoy::extensions::filters::http::fault::v3::{
    fault_abort::ErrorType, HttpFault,
};
use interceptor_proto::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use interceptor_proto::envoy::r#type::v3::{
    fractional_percent::DenominatorType, FractionalPercent,
};
use interceptor_proto::google::protobuf::{Any, Duration};
use prost::Message;

use super::listeners::destination;
use super::resources::Invalid;
use crate::mesh::http_route::{
    Abort, Cors, DestinationHeaders, Fault, HeaderOps, HttpAction, HttpMatch, HttpRule, Mirror,
    Redirect, Retries, RetryOn, Rewrite, ValueMatch, VirtualHostRoutes,
};
use crate::mesh::inbound::StringMatch;
use crate::mesh::Host;
use regex as regex_crate;

pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const FAULT_FILTER: &str = "envoy.filters.http.fault";
const CORS_FILTER: &str = "envoy.filters.http.cors";

fn invalid(resource: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        resource: resource.to_string(),
        message: message.into(),
    }
}

/// A RouteConfiguration: its name and the virtual hosts a VirtualService made.
pub fn route_configuration(any: &Any) -> Result<(String, Vec<VirtualHostRoutes>), Invalid> {
    let rc = RouteConfiguration::decode(any.value.as_slice()).map_err(|e| {
        invalid(
            "(route configuration)",
            format!("not a RouteConfiguration: {e}"),
        )
    })?;
    let mut hosts = Vec::new();
    for vh in &rc.virtual_hosts {
        if let Some(h) = virtual_host(&rc.name, vh)? {
            hosts.push(h);
        }
    }
    Ok((rc.name, hosts))
}

fn virtual_host(rc: &str, vh: &VirtualHost) -> Result<Option<VirtualHostRoutes>, Invalid> {
    // `host:port`; allow_any / block_all have no port and are not a service's.
    let Some((host, port)) = vh
        .name
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
    else {
        return Ok(None);
    };
    let config = vh.routes.iter().find_map(route_config);
    let mut rules = Vec::new();
    for (i, r) in vh.routes.iter().enumerate().filter(|_| config.is_some()) {
        let at = format!("virtual_hosts[{}].routes[{i}] ({})", vh.name, r.name);
        rules.push(rule(r).map_err(|m| invalid(rc, format!("{at}: {m}")))?);
    }
    Ok(Some(VirtualHostRoutes {
        route_config: rc.to_string(),
        name: vh.name.clone(),
        host: Host::new(host),
        port,
        config,
        rules,
    }))
}

/// The `istio.config` metadata istiod puts on routes a VirtualService made.
fn route_config(r: &Route) -> Option<String> {
    use interceptor_proto::google::protobuf::value::Kind;
    let fields = &r.metadata.as_ref()?.filter_metadata.get("istio")?.fields;
    match fields.get("config")?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn rule(r: &Route) -> Result<HttpRule, String> {
    let m = r.r#match.as_ref().ok_or("no match")?;
    let mut rewrite = None;
    let mut mirrors = Vec::new();
    let (action, timeout_ms, retries) = match r.action.as_ref().ok_or("no action")? {
        Action::Route(a) => {
            rewrite = route_rewrite(a)?;
            for m in &a.request_mirror_policies {
                let percent = m
                    .runtime_fraction
                    .as_ref()
                    .map_or(100.0, |f| percent(f.default_value.as_ref()));
                mirrors.push(Mirror {
                    destination: destination(&m.cluster, 100)?,
                    percent,
                });
            }
            let ds = match a.cluster_specifier.as_ref().ok_or("no cluster")? {
                ClusterSpecifier::Cluster(c) => vec![destination(c, 100)?],
                ClusterSpecifier::WeightedClusters(w) => w
                    .clusters
                    .iter()
                    .filter(|c| c.weight.as_ref().is_some_and(|v| v.value > 0))
                    .map(weighted_destination)
                    .collect::<Result<_, _>>()?,
                _ => return Err("a cluster header or plugin is not supported".into()),
            };
            if ds.is_empty() {
                return Err("weighted_clusters: the weights add up to 0".into());
            }
            let timeout = a.timeout.as_ref().map(ms).filter(|t| *t > 0);
            // No retry_policy: no retries (istiod's `retries.attempts: 0`).
            let retries = Some(a.retry_policy.as_ref().map_or(
                Retries {
                    attempts: 0,
                    per_try_timeout_ms: None,
                    retry_on: vec![],
                    status_codes: vec![],
                },
                retries,
            ));
            (HttpAction::Forward(ds), timeout, retries)
        }
        Action::DirectResponse(d) => {
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => String::new(),
                Some(Specifier::InlineString(s)) => s.clone(),
                Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(_) => return Err("a direct response body from a file or env".into()),
            };
            let status = u16::try_from(d.status).map_err(|_| "direct_response status")?;
            (HttpAction::Respond { status, body }, None, None)
        }
        Action::Redirect(rd) => (HttpAction::Redirect(redirect(rd)?), None, None),
        _ => return Err("a route action other than route or direct_response".into()),
    };
    Ok(HttpRule {
        name: r.name.clone(),
        matches: vec![route_match(m)?],
        action,
        timeout_ms,
        retries,
        fault: r
            .typed_per_filter_config
            .get(FAULT_FILTER)
            .map(fault)
            .transpose()?,
        request_headers: header_ops(&r.request_headers_to_add, &r.request_headers_to_remove),
        response_headers: header_ops(&r.response_headers_to_add, &r.response_headers_to_remove),
        rewrite,
        mirrors,
        cors: r
            .typed_per_filter_config
            .get(CORS_FILTER)
            .map(cors)
            .transpose()?
            .flatten()
            .map(Box::new),
    })
}

/// The route's `CorsPolicy` (istiod's `TranslateCORSPolicy`); None where it is switched off.
fn cors(any: &Any) -> Result<Option<Cors>, String> {
    use interceptor_proto::envoy::extensions::filters::http::cors::v3::CorsPolicy;
    let c = CorsPolicy::decode(any.value.as_slice()).map_err(|e| format!("CorsPolicy: {e}"))?;
    let off = c
        .filter_enabled
        .as_ref()
        .and_then(|f| f.default_value.as_ref())
        .is_some_and(|p| p.numerator == 0);
    if off {
        return Ok(None);
    }
    Ok(Some(Cors {
        allow_origins: c
            .allow_origin_string_match
            .iter()
            .map(string_match)
            .collect::<Result<_, _>>()?,
        allow_methods: c.allow_methods,
        allow_headers: c.allow_headers,
        expose_headers: c.expose_headers,
        max_age: c.max_age,
        allow_credentials: c.allow_credentials.is_some_and(|b| b.value),
        forward_unmatched_preflights: c.forward_not_matching_preflights.is_none_or(|b| b.value),
    }))
}

/// `prefix_rewrite`, `regex_rewrite`, `host_rewrite_literal` (istiod's `rewrite`).
fn route_rewrite(
    a: &interceptor_proto::envoy::config::route::v3::RouteAction,
) -> Result<Option<Rewrite>, String> {
    use interceptor_proto::envoy::config::route::v3::route_action::HostRewriteSpecifier;
    let mut rw = Rewrite::default();
    if !a.prefix_rewrite.is_empty() {
        rw.uri = Some(a.prefix_rewrite.clone());
    }
    if let Some(x) = &a.regex_rewrite {
        let pattern = x
            .pattern
            .as_ref()
            .ok_or("regex_rewrite without a pattern")?;
        let re = regex_crate::Regex::new(&pattern.regex)
            .map_err(|e| format!("regex_rewrite {:?}: {e}", pattern.regex))?;
        rw.uri_regex = Some((
            StringMatch::Regex(re),
            crate::mesh::http_route::re2_substitution(&x.substitution),
        ));
    }
    match &a.host_rewrite_specifier {
        None => {}
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => rw.authority = Some(h.clone()),
        Some(_) => return Err("a host rewrite other than a literal".into()),
    }
    Ok((rw != Rewrite::default()).then_some(rw))
}

/// Envoy's RedirectAction (istiod's `redirect`).
fn redirect(
    r: &interceptor_proto::envoy::config::route::v3::RedirectAction,
) -> Result<Redirect, String> {
    use interceptor_proto::envoy::config::route::v3::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
    };
    let code = match RedirectResponseCode::try_from(r.response_code) {
        Ok(RedirectResponseCode::Found) => 302,
        Ok(RedirectResponseCode::SeeOther) => 303,
        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(RedirectResponseCode::PermanentRedirect) => 308,
        _ => 301,
    };
    let uri = match &r.path_rewrite_specifier {
        None => None,
        Some(PathRewriteSpecifier::PathRedirect(p)) => Some(p.clone()),
        Some(_) => return Err("a redirect by prefix or regex rewrite".into()),
    };
    let scheme = match &r.scheme_rewrite_specifier {
        None => None,
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
        Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
    };
    Ok(Redirect {
        uri,
        authority: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        scheme,
        port: u16::try_from(r.port_redirect).ok().filter(|p| *p > 0),
        code,
    })
}

fn ms(d: &Duration) -> u64 {
    u64::try_from(d.seconds).unwrap_or(0) * 1000 + u64::try_from(d.nanos).unwrap_or(0) / 1_000_000
}

pub(super) fn string_match(m: &StringMatcher) -> Result<StringMatch, String> {
    // Envoy: ignore_case has no effect on safe_regex.
    let fold = |s: &String| match m.ignore_case {
        true => s.to_ascii_lowercase(),
        false => s.clone(),
    };
    let inner = match m.match_pattern.as_ref().ok_or("an empty string matcher")? {
        MatchPattern::Exact(s) => StringMatch::Exact(fold(s)),
        MatchPattern::Prefix(s) => StringMatch::Prefix(fold(s)),
        MatchPattern::Suffix(s) => StringMatch::Suffix(fold(s)),
        MatchPattern::Contains(s) => StringMatch::Contains(fold(s)),
        MatchPattern::SafeRegex(r) => return regex(&r.regex),
        _ => return Err("a custom string matcher".into()),
    };
    Ok(match m.ignore_case {
        true => StringMatch::IgnoreCase(Box::new(inner)),
        false => inner,
    })
}

fn regex(r: &str) -> Result<StringMatch, String> {
    StringMatch::regex(r).map_err(|e| format!("regex {r:?}: {e}"))
}

#[allow(deprecated)] // istiod may still write exact_match / safe_regex_match
pub(super) fn header(h: &HeaderMatcher) -> Result<ValueMatch, String> {
    let value = match h.header_match_specifier.as_ref() {
        None | Some(HeaderMatchSpecifier::PresentMatch(true)) => None,
        Some(HeaderMatchSpecifier::StringMatch(m)) => Some(string_match(m)?),
        Some(HeaderMatchSpecifier::ExactMatch(s)) => Some(StringMatch::Exact(s.clone())),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => Some(StringMatch::Prefix(s.clone())),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => Some(StringMatch::Suffix(s.clone())),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => Some(regex(&r.regex)?),
        Some(_) => return Err(format!("header {}: an unsupported matcher", h.name)),
    };
    Ok(ValueMatch {
        name: h.name.to_ascii_lowercase(),
        value,
    })
}

fn route_match(
    m: &interceptor_proto::envoy::config::route::v3::RouteMatch,
) -> Result<HttpMatch, String> {
    let mut out = HttpMatch {
        uri: match m.path_specifier.as_ref().ok_or("no path matcher")? {
            PathSpecifier::Prefix(p) if p == "/" => None,
            PathSpecifier::Prefix(p) => Some(StringMatch::Prefix(p.clone())),
            PathSpecifier::Path(p) => Some(StringMatch::Exact(p.clone())),
            PathSpecifier::SafeRegex(r) => Some(regex(&r.regex)?),
            _ => return Err("a path matcher other than prefix, path, safe_regex".into()),
        },
        ignore_uri_case: m.case_sensitive.as_ref().is_some_and(|c| !c.value),
        ..Default::default()
    };
    for h in &m.headers {
        let v = header(h)?;
        match (h.name.as_str(), h.invert_match) {
            (":method", false) => out.method = v.value,
            (":authority", false) => out.authority = v.value,
            (":scheme", false) => out.scheme = v.value,
            (_, true) => out.without_headers.push(v),
            (_, false) => out.headers.push(v),
        }
    }
    for q in &m.query_parameters {
        let value = match q.query_parameter_match_specifier.as_ref() {
            None | Some(QueryParameterMatchSpecifier::PresentMatch(true)) => None,
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => Some(string_match(s)?),
            Some(_) => {
                return Err(format!(
                    "query parameter {}: an unsupported matcher",
                    q.name
                ))
            }
        };
        out.query_params.push(ValueMatch {
            name: q.name.clone(),
            value,
        });
    }
    Ok(out)
}

fn retries(p: &RetryPolicy) -> Retries {
    let mut retry_on = Vec::new();
    for part in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match RetryOn::parse(part) {
            Some(r) => retry_on.push(r),
            None => tracing::debug!(condition = part, "istiod retry condition not honoured"),
        }
    }
    Retries {
        // Envoy: an unset num_retries is 1.
        attempts: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout_ms: p.per_try_timeout.as_ref().map(ms).filter(|t| *t > 0),
        retry_on,
        status_codes: p
            .retriable_status_codes
            .iter()
            .filter_map(|c| u16::try_from(*c).ok())
            .collect(),
    }
}

fn percent(p: Option<&FractionalPercent>) -> f64 {
    let Some(p) = p else {
        return 100.0;
    };
    let denominator = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::TenThousand) => 10_000.0,
        Ok(DenominatorType::Million) => 1_000_000.0,
        _ => 100.0,
    };
    f64::from(p.numerator) / denominator * 100.0
}

fn fault(any: &Any) -> Result<Fault, String> {
    use interceptor_proto::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    let f = HttpFault::decode(any.value.as_slice()).map_err(|e| format!("HTTPFault: {e}"))?;
    let delay = match f.delay {
        None => None,
        Some(d) => match d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(t)) => {
                Some((ms(&t), percent(d.percentage.as_ref())))
            }
            _ => return Err("a fault delay other than fixed".into()),
        },
    };
    let abort = match f.abort {
        None => None,
        Some(a) => {
            let kind = match a.error_type {
                Some(ErrorType::HttpStatus(s)) => {
                    Abort::Http(u16::try_from(s).map_err(|_| "abort http_status")?)
                }
                Some(ErrorType::GrpcStatus(s)) => {
                    Abort::Grpc(u8::try_from(s).map_err(|_| "abort grpc_status")?)
                }
                _ => return Err("a fault abort other than an HTTP or gRPC status".into()),
            };
            Some((kind, percent(a.percentage.as_ref())))
        }
    };
    Ok(Fault { delay, abort })
}

/// A weighted cluster, with the header operations istiod puts on it from its route
/// destination's `headers`.
fn weighted_destination(
    c: &interceptor_proto::envoy::config::route::v3::weighted_cluster::ClusterWeight,
) -> Result<crate::mesh::traffic::Destination, String> {
    let mut d = destination(&c.name, c.weight.as_ref().map_or(0, |v| v.value))?;
    let headers = DestinationHeaders {
        request: header_ops(&c.request_headers_to_add, &c.request_headers_to_remove),
        response: header_ops(&c.response_headers_to_add, &c.response_headers_to_remove),
    };
    d.headers = (!headers.is_empty()).then(|| Box::new(headers));
    Ok(d)
}

fn header_ops(add: &[HeaderValueOption], remove: &[String]) -> HeaderOps {
    let mut ops = HeaderOps {
        remove: remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        ..Default::default()
    };
    for o in add {
        let Some(h) = &o.header else { continue };
        let pair = (h.key.to_ascii_lowercase(), h.value.clone());
        match HeaderAppendAction::try_from(o.append_action) {
            Ok(HeaderAppendAction::AppendIfExistsOrAdd) => ops.add.push(pair),
            _ => ops.set.push(pair),
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_proto::envoy::config::core::v3::{HeaderValue, Metadata};
    use interceptor_proto::envoy::config::route::v3::{
        weighted_cluster::ClusterWeight, RedirectAction, RouteAction, RouteMatch, WeightedCluster,
    };
    use interceptor_proto::google::protobuf::{value::Kind, Struct, UInt32Value, Value};

    fn made_by_vs() -> Option<Metadata> {
        let config = Value {
            kind: Some(Kind::StringValue(
                "/apis/networking.istio.io/v1/namespaces/shop/virtual-service/reviews".into(),
            )),
        };
        Some(Metadata {
            filter_metadata: [(
                "istio".to_string(),
                Struct {
                    fields: [("config".to_string(), config)].into(),
                },
            )]
            .into(),
            ..Default::default()
        })
    }

    fn config(routes: Vec<Route>) -> Any {
        let rc = RouteConfiguration {
            name: "9080".into(),
            virtual_hosts: vec![
                VirtualHost {
                    name: "reviews.shop.svc.cluster.local:9080".into(),
                    domains: vec!["reviews.shop.svc.cluster.local".into()],
                    routes,
                    ..Default::default()
                },
                VirtualHost {
                    name: "allow_any".into(),
                    domains: vec!["*".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        Any {
            type_url: ROUTE.into(),
            value: rc.encode_to_vec(),
        }
    }

    fn header(name: &str, exact: &str, invert: bool) -> HeaderMatcher {
        HeaderMatcher {
            name: name.into(),
            invert_match: invert,
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(exact.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn routes_istiod_made_from_a_virtual_service_read_as_the_files_would_give_them() {
        let weighted = Route {
            name: "split".into(),
            metadata: made_by_vs(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/api".into())),
                headers: vec![
                    header("end-user", "jason", false),
                    header("x-canary", "no", true),
                    header(":method", "GET", false),
                ],
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters: vec![
                        ClusterWeight {
                            name: "outbound|9080|v1|reviews.shop.svc.cluster.local".into(),
                            weight: Some(UInt32Value { value: 90 }),
                            ..Default::default()
                        },
                        ClusterWeight {
                            name: "outbound|9080|v2|reviews.shop.svc.cluster.local".into(),
                            weight: Some(UInt32Value { value: 10 }),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                })),
                timeout: Some(Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            })),
            request_headers_to_add: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "x-routed".into(),
                    value: "yes".into(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let (name, hosts) = route_configuration(&config(vec![weighted])).expect("valid");
        assert_eq!(name, "9080");
        assert_eq!(hosts.len(), 1, "allow_any is not a service's");
        let h = &hosts[0];
        assert_eq!(
            (h.host.as_str(), h.port),
            ("reviews.shop.svc.cluster.local", 9080)
        );
        let r = &h.rules[0];
        let m = &r.matches[0];
        assert_eq!(m.uri, Some(StringMatch::Prefix("/api".into())));
        assert_eq!(m.method, Some(StringMatch::Exact("GET".into())));
        assert_eq!(m.headers[0].name, "end-user");
        assert_eq!(m.without_headers[0].name, "x-canary");
        let HttpAction::Forward(ds) = &r.action else {
            panic!("a forwarding rule")
        };
        assert_eq!((ds[0].subset.as_str(), ds[0].weight), ("v1", 90));
        assert_eq!(r.timeout_ms, Some(1500));
        assert_eq!(
            r.retries.as_ref().map(|r| r.attempts),
            Some(0),
            "no retry_policy: no retries"
        );
        assert_eq!(
            r.request_headers.set,
            vec![("x-routed".into(), "yes".into())]
        );
    }

    #[test]
    fn default_routes_stay_l4_and_an_unreadable_route_is_refused_naming_it() {
        let default = Route {
            name: "default".into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(
                    "outbound|9080||reviews.shop.svc.cluster.local".into(),
                )),
                ..Default::default()
            })),
            ..Default::default()
        };
        let (_, hosts) = route_configuration(&config(vec![default])).expect("valid");
        assert!(
            hosts.len() == 1 && hosts[0].rules.is_empty() && hosts[0].config.is_none(),
            "no VirtualService: an HTTP service with no rules: {hosts:?}"
        );
        let redirect = Route {
            name: "old".into(),
            metadata: made_by_vs(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/old".into())),
                ..Default::default()
            }),
            action: Some(Action::Redirect(RedirectAction {
                path_rewrite_specifier: Some(
                    interceptor_proto::envoy::config::route::v3::redirect_action::PathRewriteSpecifier::PrefixRewrite("/new".into()),
                ),
                ..Default::default()
            })),
            ..Default::default()
        };
        let e = route_configuration(&config(vec![redirect])).expect_err("prefix redirect");
        assert_eq!(e.resource, "9080");
        assert!(
            e.message.contains("(old)") && e.message.contains("redirect"),
            "{}",
            e.message
        );
    }
}
