//! The test control plane's HTTP intent, from VirtualService `http[]` rules as istiod builds it
//! for a sidecar (`../shared/istio-traffic-policy.md` 1.2, 2.1-2.4): for each HTTP service port
//! one `0.0.0.0_<port>` listener whose HCM takes RDS `"<port>"`, and that route configuration
//! with one virtual host per service (its domains: FQDN, short names, VIPs) whose routes come
//! from the first VirtualService for the host (one route per match, in order, none after a
//! catch-all; istiod's default route and retry policy where there is no VirtualService), plus
//! the `allow_any` catch-all.
//!
//! Only upstream Envoy's filters are named (fault, router): istio-proxy's own (`istio.stats`,
//! `istio.alpn`, metadata exchange) do not exist in the Envoy the tests run.

use std::collections::{BTreeMap, HashMap};

use interceptor_proto::envoy::config::core::v3::{
    config_source::ConfigSourceSpecifier, data_source::Specifier,
    header_value_option::HeaderAppendAction, AggregatedConfigSource, ApiVersion, ConfigSource,
    DataSource, HeaderValue, HeaderValueOption, TrafficDirection,
};
use interceptor_proto::envoy::config::listener::v3::{
    filter::ConfigType, Filter, FilterChain, Listener,
};
use interceptor_proto::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    retry_policy::RetryHostPredicate, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier, weighted_cluster::ClusterWeight, DirectResponseAction,
    HeaderMatcher, QueryParameterMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration,
    RouteMatch, VirtualHost, WeightedCluster,
};
use interceptor_proto::envoy::extensions::filters::common::fault::v3::{
    fault_delay::FaultDelaySecifier, FaultDelay,
};
use interceptor_proto::envoy::extensions::filters::http::fault::v3::{
    fault_abort::ErrorType, FaultAbort, HttpFault,
};
use interceptor_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter::ConfigType as HttpFilterConfig,
    HttpConnectionManager, HttpFilter, Rds,
};
use interceptor_proto::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use interceptor_proto::envoy::r#type::v3::{
    fractional_percent::DenominatorType, FractionalPercent,
};
use interceptor_proto::google::protobuf::{Any, BoolValue, Duration, UInt32Value};
use prost::Message;
use serde::Deserialize;

use crate::istiod_traffic::{fqdn, Doc};

pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const CORS: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";
const CORS_POLICY: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";
const PREVIOUS_HOSTS: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// A VirtualService `http[]` rule, the fields istiod turns into a route.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<crate::istiod_traffic::RouteDestination>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<Fault>,
    pub headers: Option<Headers>,
    pub direct_response: Option<DirectResponse>,
    pub redirect: Option<RedirectSpec>,
    pub rewrite: Option<RewriteSpec>,
    pub mirror: Option<crate::istiod_traffic::Destination>,
    pub mirror_percentage: Option<Percent>,
    pub cors_policy: Option<CorsSpec>,
}

/// A VirtualService `corsPolicy`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsSpec {
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    pub max_age: Option<String>,
    pub allow_credentials: Option<bool>,
    pub unmatched_preflights: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectSpec {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RewriteSpec {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default)]
    pub name: String,
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    pub port: Option<u16>,
    #[serde(default)]
    pub ignore_uri_case: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: i64,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    pub fixed_delay: String,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    pub http_status: Option<u32>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Percent {
    pub value: f64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Headers {
    pub request: Option<HeaderOps>,
    pub response: Option<HeaderOps>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DirectResponse {
    pub status: u32,
    pub body: Option<Body>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Body {
    pub string: Option<String>,
}

/// One service's port as RDS needs it.
pub struct HttpService<'a> {
    pub host: &'a str,
    pub namespace: &'a str,
    pub vips: Vec<String>,
    pub ports: &'a [u16],
    /// The VirtualServices and DestinationRules for the host.
    pub docs: &'a [Doc],
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn duration(s: &str) -> Duration {
    let ms = crate::istiod_traffic::duration_ms(s);
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// `0.0.0.0_<port>` with one HTTP chain (plaintext, http/1.1 or h2c) taking RDS `"<port>"`,
/// the passthrough chain as its default (sheet 1.2, 1.4).
pub fn http_listener(port: u16) -> Listener {
    let mut passthrough = crate::istiod_traffic::passthrough_chain();
    passthrough.name = "PassthroughFilterChain".into();
    Listener {
        name: format!("0.0.0.0_{port}"),
        address: crate::istiod_traffic::socket_address("0.0.0.0", port),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        continue_on_listener_filters_timeout: true,
        listener_filters: vec![crate::istiod_traffic::http_inspector()],
        filter_chains: vec![http_chain(
            &port.to_string(),
            &format!("outbound_0.0.0.0_{port}"),
        )],
        default_filter_chain: Some(passthrough),
        ..Default::default()
    }
}

/// A sniffed port's listener (sheet 1.2, "unnamed / unknown"): the service's `<VIP>_<port>`
/// TCP listener, its chain made the default one, beside an HTTP chain (plaintext, http/1.1 or
/// h2c, which the HTTP inspector tells) taking RDS `"<fqdn>:<port>"`; istiod's
/// `listener_filters_timeout` is the mesh's protocolDetectionTimeout, 0s: no timeout.
pub fn sniffed_listener(mut tcp: Listener, host: &str, port: u16) -> Listener {
    if let [only] = tcp.filter_chains.as_slice() {
        if only.filter_chain_match.is_none() {
            tcp.default_filter_chain = tcp.filter_chains.pop();
        }
    }
    let name = format!("{host}:{port}");
    tcp.filter_chains
        .insert(0, http_chain(&name, &format!("outbound_{}", tcp.name)));
    tcp.listener_filters
        .push(crate::istiod_traffic::http_inspector());
    tcp.listener_filters_timeout = Some(Duration::default());
    tcp
}

/// An outbound HTTP chain: plaintext that the HTTP inspector found to be HTTP/1.1 or h2c, into
/// a connection manager taking RDS `route_config`.
fn http_chain(route_config: &str, stat_prefix: &str) -> FilterChain {
    let hcm = HttpConnectionManager {
        stat_prefix: format!("{stat_prefix};"),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: route_config.to_string(),
            config_source: Some(ConfigSource {
                initial_fetch_timeout: Some(Duration::default()),
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
        })),
        http_filters: vec![
            HttpFilter {
                name: "envoy.filters.http.fault".into(),
                config_type: Some(HttpFilterConfig::TypedConfig(any(
                    FAULT,
                    &HttpFault::default(),
                ))),
                ..Default::default()
            },
            HttpFilter {
                name: "envoy.filters.http.cors".into(),
                config_type: Some(HttpFilterConfig::TypedConfig(Any {
                    type_url: CORS.into(),
                    value: vec![],
                })),
                ..Default::default()
            },
            HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(HttpFilterConfig::TypedConfig(Any {
                    type_url: ROUTER.into(),
                    value: vec![],
                })),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    FilterChain {
        filter_chain_match: Some(
            interceptor_proto::envoy::config::listener::v3::FilterChainMatch {
                transport_protocol: "raw_buffer".into(),
                application_protocols: vec!["http/1.1".into(), "h2c".into()],
                ..Default::default()
            },
        ),
        filters: vec![Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(ConfigType::TypedConfig(any(HCM, &hcm))),
        }],
        ..Default::default()
    }
}

/// RDS `"<fqdn>:<port>"` for a sniffed port: the service's one virtual host, its domains
/// rewritten to `*` (`getVirtualHostsForSniffedServicePort`, sheet 2.1); no catch-all.
pub fn sniffed_route_configuration(s: &HttpService<'_>, port: u16, proxy_ns: &str) -> Any {
    let mut host = virtual_host(s, port, proxy_ns);
    host.domains = vec!["*".into()];
    any(
        ROUTE,
        &RouteConfiguration {
            name: format!("{}:{port}", s.host),
            virtual_hosts: vec![host],
            validate_clusters: Some(BoolValue { value: false }),
            max_direct_response_body_size_bytes: Some(UInt32Value { value: 1_048_576 }),
            ignore_port_in_host_matching: true,
            ..Default::default()
        },
    )
}

/// RDS `"<port>"`: a virtual host per service with the port, then `allow_any`.
// istiod still writes max_grpc_timeout (deprecated in Envoy) beside timeout.
#[allow(deprecated)]
pub fn route_configuration(port: u16, services: &[HttpService<'_>], proxy_ns: &str) -> Any {
    let mut hosts: Vec<VirtualHost> = services
        .iter()
        .map(|s| virtual_host(s, port, proxy_ns))
        .collect();
    hosts.push(VirtualHost {
        name: "allow_any".into(),
        domains: vec!["*".into()],
        routes: vec![Route {
            name: "allow_any".into(),
            r#match: Some(prefix("/")),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster("PassthroughCluster".into())),
                timeout: Some(Duration::default()),
                max_grpc_timeout: Some(Duration::default()),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    });
    any(
        ROUTE,
        &RouteConfiguration {
            name: port.to_string(),
            virtual_hosts: hosts,
            validate_clusters: Some(BoolValue { value: false }),
            max_direct_response_body_size_bytes: Some(UInt32Value { value: 1_048_576 }),
            ignore_port_in_host_matching: true,
            ..Default::default()
        },
    )
}

/// istiod's `generateVirtualHostDomains`: the FQDN (and its absolute form), short names by
/// namespace, every VIP.
fn domains(s: &HttpService<'_>, proxy_ns: &str) -> Vec<String> {
    let mut d = vec![s.host.to_string(), format!("{}.", s.host)];
    if let Some(short) = s
        .host
        .strip_suffix(&format!(".{}.svc.cluster.local", s.namespace))
    {
        if s.namespace == proxy_ns {
            d.push(short.to_string());
        }
        d.push(format!("{short}.{}.svc", s.namespace));
        d.push(format!("{short}.{}", s.namespace));
    }
    d.extend(s.vips.iter().cloned());
    d
}

// istiod still writes max_grpc_timeout (deprecated in Envoy) beside timeout.
#[allow(deprecated)]
fn virtual_host(s: &HttpService<'_>, port: u16, proxy_ns: &str) -> VirtualHost {
    let vs = s.docs.iter().find(|d| {
        d.kind == "VirtualService"
            && !d.spec.http.is_empty()
            && d.spec
                .hosts
                .iter()
                .any(|h| fqdn(h, &d.metadata.namespace) == s.host)
    });
    let routes = match vs {
        Some(vs) => vs_routes(vs, s, port),
        None => vec![Route {
            name: "default".into(),
            r#match: Some(prefix("/")),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(format!(
                    "outbound|{port}||{}",
                    s.host
                ))),
                timeout: Some(Duration::default()),
                max_grpc_timeout: Some(Duration::default()),
                retry_policy: Some(default_retry()),
                ..Default::default()
            })),
            ..Default::default()
        }],
    };
    VirtualHost {
        name: format!("{}:{port}", s.host),
        domains: domains(s, proxy_ns),
        routes,
        ..Default::default()
    }
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}

/// istiod's default retry policy (Istio >= 1.24: no 503).
fn default_retry() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            .into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(
                interceptor_proto::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType::TypedConfig(Any {
                    type_url: PREVIOUS_HOSTS.into(),
                    value: vec![],
                }),
            ),
        }],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

/// retry.go `ConvertPolicy`: None where attempts are 0 (no retries at all).
fn retry(r: Option<&HttpRetry>) -> Option<RetryPolicy> {
    let Some(r) = r else {
        return Some(default_retry());
    };
    if r.attempts <= 0 {
        return None;
    }
    let mut p = default_retry();
    p.num_retries = Some(UInt32Value {
        value: r.attempts as u32,
    });
    if let Some(on) = &r.retry_on {
        let mut kinds = Vec::new();
        for part in on.split(',').map(str::trim) {
            match part.parse::<u32>() {
                Ok(code) => p.retriable_status_codes.push(code),
                Err(_) => kinds.push(part.to_string()),
            }
        }
        if !p.retriable_status_codes.is_empty()
            && !kinds.iter().any(|k| k == "retriable-status-codes")
        {
            kinds.push("retriable-status-codes".into());
        }
        p.retry_on = kinds.join(",");
    }
    p.per_try_timeout = r.per_try_timeout.as_deref().map(duration);
    Some(p)
}

fn string_matcher(m: &StringMatch) -> Option<MatchPattern> {
    if let Some(e) = &m.exact {
        return Some(MatchPattern::Exact(e.clone()));
    }
    if let Some(p) = &m.prefix {
        return Some(MatchPattern::Prefix(p.clone()));
    }
    m.regex.as_ref().map(|r| {
        MatchPattern::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        })
    })
}

/// `translateHeaderMatch`: regex `*` or an empty matcher is a presence match.
fn header_matcher(name: &str, m: &StringMatch, invert: bool) -> HeaderMatcher {
    let present = m.regex.as_deref() == Some("*") || string_matcher(m).is_none();
    let spec = if present {
        HeaderMatchSpecifier::PresentMatch(true)
    } else {
        HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: string_matcher(m),
            ..Default::default()
        })
    };
    HeaderMatcher {
        name: name.to_string(),
        invert_match: invert,
        treat_missing_header_as_empty: invert && !present,
        header_match_specifier: Some(spec),
    }
}

/// `TranslateRouteMatch`.
fn route_match(m: Option<&HttpMatch>) -> RouteMatch {
    let Some(m) = m else {
        return prefix("/");
    };
    let path = match &m.uri {
        Some(StringMatch { exact: Some(e), .. }) => PathSpecifier::Path(e.clone()),
        Some(StringMatch {
            prefix: Some(p), ..
        }) => PathSpecifier::Prefix(p.clone()),
        Some(StringMatch { regex: Some(r), .. }) => PathSpecifier::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        }),
        _ => PathSpecifier::Prefix("/".into()),
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(k, v)| header_matcher(k, v, false))
        .chain(
            m.without_headers
                .iter()
                .map(|(k, v)| header_matcher(k, v, true)),
        )
        .collect();
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    for (name, sm) in [(":method", &m.method), (":authority", &m.authority)] {
        if let Some(sm) = sm {
            headers.push(header_matcher(name, sm, false));
        }
    }
    RouteMatch {
        path_specifier: Some(path),
        case_sensitive: Some(BoolValue {
            value: !m.ignore_uri_case,
        }),
        headers,
        query_parameters: m
            .query_params
            .iter()
            .map(|(k, v)| QueryParameterMatcher {
                name: k.clone(),
                query_parameter_match_specifier: Some(match string_matcher(v) {
                    Some(p) => QueryParameterMatchSpecifier::StringMatch(StringMatcher {
                        match_pattern: Some(p),
                        ..Default::default()
                    }),
                    None => QueryParameterMatchSpecifier::PresentMatch(true),
                }),
            })
            .collect(),
        ..Default::default()
    }
}

/// `IsCatchAllRoute`.
fn catch_all(m: &HttpMatch) -> bool {
    let uri_any = match &m.uri {
        None => true,
        Some(u) => u.prefix.as_deref() == Some("/") || u.regex.as_deref() == Some(".*"),
    };
    uri_any
        && m.headers.is_empty()
        && m.without_headers.is_empty()
        && m.query_params.is_empty()
        && m.method.is_none()
        && m.authority.is_none()
}

fn header_ops(ops: Option<&HeaderOps>) -> (Vec<HeaderValueOption>, Vec<String>) {
    let Some(ops) = ops else {
        return (vec![], vec![]);
    };
    let option = |k: &String, v: &String, action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    let mut add: Vec<HeaderValueOption> = ops
        .set
        .iter()
        .map(|(k, v)| option(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .collect();
    add.extend(
        ops.add
            .iter()
            .map(|(k, v)| option(k, v, HeaderAppendAction::AppendIfExistsOrAdd)),
    );
    (add, ops.remove.clone())
}

fn fraction(p: Option<&Percent>) -> Option<FractionalPercent> {
    Some(FractionalPercent {
        numerator: (p.map_or(100.0, |p| p.value) * 10_000.0) as u32,
        denominator: DenominatorType::Million as i32,
    })
}

fn fault(f: &Fault) -> Any {
    any(
        FAULT,
        &HttpFault {
            delay: f.delay.as_ref().map(|d| FaultDelay {
                percentage: fraction(d.percentage.as_ref()),
                fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(duration(
                    &d.fixed_delay,
                ))),
            }),
            abort: f.abort.as_ref().and_then(|a| {
                Some(FaultAbort {
                    percentage: fraction(a.percentage.as_ref()),
                    error_type: Some(ErrorType::HttpStatus(a.http_status?)),
                    ..Default::default()
                })
            }),
            ..Default::default()
        },
    )
}

/// `applyHTTPRouteDestination`'s rewrite: uri -> prefix_rewrite, uriRegexRewrite ->
/// regex_rewrite, authority -> host_rewrite_literal.
/// istiod's `TranslateCORSPolicy`: origins as string matchers, the lists comma-joined, the age
/// in seconds, always enabled, non-matching preflights forwarded unless IGNORE.
fn cors(c: &CorsSpec) -> Any {
    use interceptor_proto::envoy::config::core::v3::RuntimeFractionalPercent;
    use interceptor_proto::envoy::extensions::filters::http::cors::v3::CorsPolicy;
    any(
        CORS_POLICY,
        &CorsPolicy {
            allow_origin_string_match: c
                .allow_origins
                .iter()
                .filter_map(|m| {
                    Some(StringMatcher {
                        match_pattern: Some(string_matcher(m)?),
                        ..Default::default()
                    })
                })
                .collect(),
            allow_methods: c.allow_methods.join(","),
            allow_headers: c.allow_headers.join(","),
            expose_headers: c.expose_headers.join(","),
            max_age: c
                .max_age
                .as_deref()
                .map(|a| (crate::istiod_traffic::duration_ms(a) / 1000).to_string())
                .unwrap_or_default(),
            allow_credentials: c.allow_credentials.map(|value| BoolValue { value }),
            filter_enabled: Some(RuntimeFractionalPercent {
                default_value: Some(FractionalPercent {
                    numerator: 100,
                    denominator: DenominatorType::Hundred as i32,
                }),
                ..Default::default()
            }),
            forward_not_matching_preflights: Some(BoolValue {
                value: c.unmatched_preflights.as_deref() != Some("IGNORE"),
            }),
            ..Default::default()
        },
    )
}

fn rewrite(a: &mut RouteAction, rw: &RewriteSpec) {
    use interceptor_proto::envoy::config::route::v3::route_action::HostRewriteSpecifier;
    use interceptor_proto::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;
    if let Some(u) = &rw.uri {
        a.prefix_rewrite = u.clone();
    }
    if let Some(x) = &rw.uri_regex_rewrite {
        a.regex_rewrite = Some(RegexMatchAndSubstitute {
            pattern: Some(RegexMatcher {
                regex: x.pattern.clone(),
                ..Default::default()
            }),
            substitution: x.rewrite.clone(),
        });
    }
    if let Some(h) = &rw.authority {
        a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(h.clone()));
    }
}

/// `ApplyRedirect`.
fn redirect(r: &RedirectSpec) -> interceptor_proto::envoy::config::route::v3::RedirectAction {
    use interceptor_proto::envoy::config::route::v3::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
    };
    let code = match r.redirect_code.unwrap_or(301) {
        302 => RedirectResponseCode::Found,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::MovedPermanently,
    };
    interceptor_proto::envoy::config::route::v3::RedirectAction {
        host_redirect: r.authority.clone().unwrap_or_default(),
        port_redirect: r.port.unwrap_or(0),
        response_code: code as i32,
        scheme_rewrite_specifier: r.scheme.clone().map(SchemeRewriteSpecifier::SchemeRedirect),
        path_rewrite_specifier: r.uri.clone().map(PathRewriteSpecifier::PathRedirect),
        ..Default::default()
    }
}

/// `BuildHTTPRoutesForVirtualService` for one service port: a route per match of each rule
/// (the rule's own without matches), none after a catch-all.
fn vs_routes(vs: &Doc, s: &HttpService<'_>, port: u16) -> Vec<Route> {
    let mut out = Vec::new();
    for rule in &vs.spec.http {
        let matches: Vec<Option<&HttpMatch>> = if rule.matches.is_empty() {
            vec![None]
        } else {
            rule.matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == port))
                .map(Some)
                .collect()
        };
        let mut stop = false;
        for m in matches {
            out.push(route(vs, rule, m, s, port));
            if m.is_none_or(catch_all) {
                stop = true;
                break;
            }
        }
        if stop {
            break;
        }
    }
    out
}

// istiod still writes max_grpc_timeout (deprecated in Envoy) beside timeout.
#[allow(deprecated)]
fn route(
    vs: &Doc,
    rule: &HttpRoute,
    m: Option<&HttpMatch>,
    s: &HttpService<'_>,
    port: u16,
) -> Route {
    let name = match m.map(|m| m.name.as_str()).filter(|n| !n.is_empty()) {
        Some(n) => format!("{}.{n}", rule.name),
        None => rule.name.clone(),
    };
    let headers = rule.headers.clone().unwrap_or_default();
    let (mut req_add, mut req_remove) = header_ops(headers.request.as_ref());
    let (mut resp_add, mut resp_remove) = header_ops(headers.response.as_ref());
    // A lone destination's own operations are appended to the route's
    // (`applyHTTPRouteDestination`); several destinations carry theirs on their clusters.
    if let [only] = rule.route.as_slice() {
        let own = only.headers.clone().unwrap_or_default();
        let (add, remove) = header_ops(own.request.as_ref());
        req_add.extend(add);
        req_remove.extend(remove);
        let (add, remove) = header_ops(own.response.as_ref());
        resp_add.extend(add);
        resp_remove.extend(remove);
    }
    let action = route_action(vs, rule, s, port);
    let mut per_filter: HashMap<String, Any> = HashMap::new();
    if let Some(f) = &rule.fault {
        per_filter.insert("envoy.filters.http.fault".into(), fault(f));
    }
    if let Some(c) = &rule.cors_policy {
        per_filter.insert("envoy.filters.http.cors".into(), cors(c));
    }
    let config = format!(
        "/apis/networking.istio.io/v1/namespaces/{}/virtual-service/{}",
        vs.metadata.namespace, vs.metadata.name
    );
    Route {
        name,
        metadata: Some(interceptor_proto::envoy::config::core::v3::Metadata {
            filter_metadata: [(
                "istio".to_string(),
                interceptor_proto::google::protobuf::Struct {
                    fields: [(
                        "config".to_string(),
                        interceptor_proto::google::protobuf::Value {
                            kind: Some(
                                interceptor_proto::google::protobuf::value::Kind::StringValue(
                                    config,
                                ),
                            ),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        }),
        r#match: Some(route_match(m)),
        action: Some(action),
        request_headers_to_add: req_add,
        request_headers_to_remove: req_remove,
        response_headers_to_add: resp_add,
        response_headers_to_remove: resp_remove,
        typed_per_filter_config: per_filter,
        ..Default::default()
    }
}

/// The route's action: a redirect, a direct response, or the route to its clusters with the
/// timeout, retry policy, rewrite and mirror policies (`applyHTTPRouteDestination`).
#[allow(deprecated)] // istiod still writes max_grpc_timeout beside timeout.
fn route_action(vs: &Doc, rule: &HttpRoute, s: &HttpService<'_>, port: u16) -> Action {
    match &rule.direct_response {
        None if rule.redirect.is_some() => {
            let r = rule.redirect.as_ref().expect("checked");
            Action::Redirect(redirect(r))
        }
        Some(d) => Action::DirectResponse(DirectResponseAction {
            status: d.status,
            body: d
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .map(|s| DataSource {
                    specifier: Some(Specifier::InlineString(s)),
                    ..Default::default()
                }),
            body_format: None,
        }),
        None => {
            let cluster = |d: &crate::istiod_traffic::RouteDestination| {
                let p = d
                    .destination
                    .port
                    .as_ref()
                    .map(|p| p.number)
                    .unwrap_or(if s.ports.len() == 1 { s.ports[0] } else { port });
                format!(
                    "outbound|{p}|{}|{}",
                    d.destination.subset,
                    fqdn(&d.destination.host, &vs.metadata.namespace)
                )
            };
            let spec = if rule.route.len() == 1 {
                ClusterSpecifier::Cluster(cluster(&rule.route[0]))
            } else {
                ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters: rule
                        .route
                        .iter()
                        .filter(|d| d.weight.unwrap_or(0) > 0)
                        .map(|d| {
                            let own = d.headers.clone().unwrap_or_default();
                            let (request_headers_to_add, request_headers_to_remove) =
                                header_ops(own.request.as_ref());
                            let (response_headers_to_add, response_headers_to_remove) =
                                header_ops(own.response.as_ref());
                            ClusterWeight {
                                name: cluster(d),
                                weight: Some(UInt32Value {
                                    value: d.weight.unwrap_or(0),
                                }),
                                request_headers_to_add,
                                request_headers_to_remove,
                                response_headers_to_add,
                                response_headers_to_remove,
                                ..Default::default()
                            }
                        })
                        .collect(),
                    ..Default::default()
                })
            };
            let timeout = rule.timeout.as_deref().map(duration).unwrap_or_default();
            let mut action = RouteAction {
                cluster_specifier: Some(spec),
                timeout: Some(timeout),
                max_grpc_timeout: Some(timeout),
                retry_policy: retry(rule.retries.as_ref()),
                ..Default::default()
            };
            if let Some(rw) = &rule.rewrite {
                rewrite(&mut action, rw);
            }
            // TranslateRequestMirrorPolicy: unset percentage 100 %, explicit 0 none.
            if let Some(m) = &rule.mirror {
                let pct = rule.mirror_percentage.as_ref().map_or(100.0, |p| p.value);
                if pct > 0.0 {
                    let port = m
                        .port
                        .as_ref()
                        .map(|p| p.number)
                        .unwrap_or(if s.ports.len() == 1 { s.ports[0] } else { port });
                    action.request_mirror_policies.push(
                        interceptor_proto::envoy::config::route::v3::route_action::RequestMirrorPolicy {
                            cluster: format!(
                                "outbound|{port}|{}|{}",
                                m.subset,
                                fqdn(&m.host, &vs.metadata.namespace)
                            ),
                            runtime_fraction: Some(
                                interceptor_proto::envoy::config::core::v3::RuntimeFractionalPercent {
                                    default_value: fraction(rule.mirror_percentage.as_ref()),
                                    ..Default::default()
                                },
                            ),
                            trace_sampled: Some(BoolValue { value: false }),
                            disable_shadow_host_suffix_append: true,
                            ..Default::default()
                        },
                    );
                }
            }
            Action::Route(action)
        }
    }
}

/// istiod's HTTP RBAC filters for an inbound HTTP chain, one per action in order.
pub fn http_rbac_filters(
    policies: Vec<(
        i32,
        Vec<(String, interceptor_proto::envoy::config::rbac::v3::Policy)>,
    )>,
) -> Vec<HttpFilter> {
    use interceptor_proto::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    policies
        .into_iter()
        .map(|(action, ps)| {
            let (rules, shadow_rules_stat_prefix) = crate::istiod_traffic::rbac_rules(action, ps);
            let f = HttpRbac {
                rules: Some(rules),
                shadow_rules_stat_prefix,
                ..Default::default()
            };
            HttpFilter {
                name: "envoy.filters.http.rbac".into(),
                config_type: Some(HttpFilterConfig::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                    &f,
                ))),
                ..Default::default()
            }
        })
        .collect()
}

/// An inbound HTTP chain's connection manager (sheet 4.2): the HTTP RBAC filters, then the
/// router to `inbound|<port>||` by an inline route configuration, as istiod builds it.
pub fn inbound_hcm(port: u16, rbac: Vec<HttpFilter>) -> Filter {
    use interceptor_proto::envoy::config::route::v3::{
        route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route,
        RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    };
    let cluster = format!("inbound|{port}||");
    let mut filters = rbac;
    filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(HttpFilterConfig::TypedConfig(Any {
            type_url: ROUTER.into(),
            value: vec![],
        })),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        stat_prefix: format!("inbound_0.0.0.0_{port}"),
        route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name: cluster.clone(),
            virtual_hosts: vec![VirtualHost {
                name: format!("inbound|http|{port}"),
                domains: vec!["*".into()],
                routes: vec![Route {
                    name: "default".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(Action::Route(RouteAction {
                        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.clone())),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            // istiod's inbound route configuration does not validate clusters (its
            // `inbound|P||` clusters may come after the listener).
            validate_clusters: Some(BoolValue { value: false }),
            ..Default::default()
        })),
        http_filters: filters,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(ConfigType::TypedConfig(any(HCM, &hcm))),
    }
}
