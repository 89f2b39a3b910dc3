//! VirtualService `http[]` rules as the mesh files give them, checked as Istio's validation
//! checks them and reduced to what the HTTP data path does per request. Which rule a request
//! takes is `route::http`'s.
//!
//! I: istio/api networking/v1alpha3 virtual_service.proto (HTTPRoute, HTTPMatchRequest,
//! HTTPRetry, HTTPFaultInjection, Headers, HTTPDirectResponse); pilot/pkg/networking/core/
//! route/route.go `TranslateRoute`, `TranslateRouteMatch`, `translateHeaderMatch`,
//! `TranslateFault`, `TranslateHeadersOperations`; route/retry/retry.go `ConvertPolicy`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use super::inbound::StringMatch;
use super::traffic::{destinations, duration, invalid, port, Destination, Invalid};

/// A header (or query parameter) condition: None matches any value of a present one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueMatch {
    /// Lower case for headers (HTTP/2 and hyper's names are).
    pub name: String,
    pub value: Option<StringMatch>,
}

/// One `http[].match[]` entry. The parts istiod evaluates for the proxy (port, sourceLabels,
/// sourceNamespace, gateways) are checked against this VM once; the rest per request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpMatch {
    pub name: String,
    pub uri: Option<StringMatch>,
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Vec<ValueMatch>,
    pub without_headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

/// Which failures a retry policy retries (Envoy's `retry_on`, the ones a sidecar sees).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    FiveXx,
    GatewayError,
    Reset,
    ConnectFailure,
    RefusedStream,
    Retriable4xx,
    RetriableStatusCodes,
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "5xx" => Self::FiveXx,
            "gateway-error" => Self::GatewayError,
            "reset" | "reset-before-request" => Self::Reset,
            "connect-failure" => Self::ConnectFailure,
            "refused-stream" => Self::RefusedStream,
            "retriable-4xx" => Self::Retriable4xx,
            "retriable-status-codes" => Self::RetriableStatusCodes,
            "cancelled" => Self::Cancelled,
            "deadline-exceeded" => Self::DeadlineExceeded,
            "resource-exhausted" => Self::ResourceExhausted,
            "unavailable" => Self::Unavailable,
            _ => return None,
        })
    }
}

/// A route's retry policy, as Envoy's `retry_policy` (attempts are retries after the first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout_ms: Option<u64>,
    pub retry_on: Vec<RetryOn>,
    pub status_codes: Vec<u16>,
}

impl Retries {
    /// istiod's policy when a route sets none (retry.go `DefaultPolicy`, Istio >= 1.24: no 503).
    pub fn istio_default() -> Self {
        Retries {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            status_codes: vec![],
        }
    }
}

/// `fault`: a delay and/or an abort, each for a share of requests (0..=100).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    pub delay: Option<(u64, f64)>,
    pub abort: Option<(Abort, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Abort {
    Http(u16),
    /// A gRPC status code, answered as a trailers-only gRPC response.
    Grpc(u8),
}

/// Header operations of one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A route destination's own header operations (`route[].headers`; Envoy's weighted cluster
/// ones), applied when a request goes to it, before its rule's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationHeaders {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

impl DestinationHeaders {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

/// What a rule does with the request: forward it, or answer it itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAction {
    Forward(Vec<Destination>),
    Respond { status: u16, body: String },
    Redirect(Redirect),
}

/// `redirect` (Envoy's RedirectAction): None keeps the request's part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<u16>,
    /// 301 (the default), 302, 303, 307, 308.
    pub code: u16,
}

/// A copy of each request (some share of them) for another cluster: its answer is dropped,
/// and it never delays or fails the request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mirror {
    pub destination: Destination,
    pub percent: f64,
}

/// `rewrite` (Envoy's prefix_rewrite, regex_rewrite, host_rewrite_literal).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rewrite {
    /// Replaces the part of the path the rule's uri match matched (all of it for an exact or
    /// regex match).
    pub uri: Option<String>,
    /// Every match of the pattern in the path replaced (`\1` groups).
    pub uri_regex: Option<(StringMatch, String)>,
    pub authority: Option<String>,
}

/// `corsPolicy`, as Envoy's CORS filter runs it on the route (istiod's `TranslateCORSPolicy`):
/// the lists comma-joined and the age in seconds, as Envoy's `CorsPolicy` carries them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cors {
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    /// Seconds.
    pub max_age: String,
    pub allow_credentials: bool,
    /// A preflight from an origin not allowed goes upstream (`unmatchedPreflights: FORWARD`,
    /// the default); else it is answered 200 with no CORS headers.
    pub forward_unmatched_preflights: bool,
}

/// One `http[]` rule (from istiod: one Envoy route, its one match).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpRule {
    pub name: String,
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    /// None: no timeout (istiod's `0s`).
    pub timeout_ms: Option<u64>,
    /// None: istiod's default policy; attempts 0: none.
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Box<Cors>>,
}

/// istiod's routes for one service port: an RDS virtual host, already evaluated for this
/// proxy by istiod. One with istiod's default route alone (no VirtualService) keeps no rules:
/// it only says the port is HTTP for that service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtualHostRoutes {
    /// The route configuration it came in (`"9080"`).
    pub route_config: String,
    /// `host:port`, as istiod names it.
    pub name: String,
    pub host: super::Host,
    pub port: u16,
    /// The VirtualService istiod made the routes from (`/apis/.../virtual-service/<name>`).
    pub config: Option<String>,
    pub rules: Vec<HttpRule>,
}

impl HttpRule {
    pub fn destinations_mut(&mut self) -> impl Iterator<Item = &mut Destination> {
        match &mut self.action {
            HttpAction::Forward(ds) => ds.iter_mut(),
            HttpAction::Respond { .. } | HttpAction::Redirect(_) => [].iter_mut(),
        }
        .chain(self.mirrors.iter_mut().map(|m| &mut m.destination))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct HttpRouteSpec {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "match")]
    matches: Vec<HttpMatchSpec>,
    #[serde(default)]
    route: Vec<HttpRouteDestinationSpec>,
    direct_response: Option<DirectResponseSpec>,
    timeout: Option<String>,
    retries: Option<RetriesSpec>,
    fault: Option<FaultSpec>,
    headers: Option<HeadersSpec>,
    redirect: Option<RedirectSpec>,
    rewrite: Option<RewriteSpec>,
    // Read so that the refusal names the field (not honoured yet).
    delegate: Option<Value>,
    mirror: Option<super::traffic::DestinationSpec>,
    #[serde(default)]
    mirrors: Vec<MirrorSpec>,
    mirror_percentage: Option<PercentSpec>,
    mirror_percent: Option<i64>,
    cors_policy: Option<CorsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CorsSpec {
    #[serde(default)]
    allow_origins: Vec<StringMatchSpec>,
    /// Deprecated in istio/api: exact origins.
    #[serde(default)]
    allow_origin: Vec<String>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    max_age: Option<String>,
    allow_credentials: Option<bool>,
    unmatched_preflights: Option<String>,
}

/// `HTTPRouteDestination`: a route destination with its own header operations.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRouteDestinationSpec {
    destination: super::traffic::DestinationSpec,
    weight: Option<i64>,
    headers: Option<HeadersSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorSpec {
    destination: super::traffic::DestinationSpec,
    percentage: Option<PercentSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectSpec {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u32>,
    derive_port: Option<String>,
    scheme: Option<String>,
    redirect_code: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RewriteSpec {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Option<RegexRewriteSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegexRewriteSpec {
    #[serde(rename = "match")]
    pattern: String,
    rewrite: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpMatchSpec {
    #[serde(default)]
    name: String,
    uri: Option<StringMatchSpec>,
    scheme: Option<StringMatchSpec>,
    method: Option<StringMatchSpec>,
    authority: Option<StringMatchSpec>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatchSpec>,
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    ignore_uri_case: bool,
    source_namespace: Option<String>,
    #[allow(dead_code)]
    stat_prefix: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StringMatchSpec {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectResponseSpec {
    status: u32,
    body: Option<BodySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodySpec {
    string: Option<String>,
    bytes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetriesSpec {
    #[serde(default)]
    attempts: i64,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
    retry_remote_localities: Option<bool>,
    retry_ignore_previous_hosts: Option<bool>,
    backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PercentSpec {
    value: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FaultSpec {
    delay: Option<DelaySpec>,
    abort: Option<AbortSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DelaySpec {
    fixed_delay: Option<String>,
    exponential_delay: Option<String>,
    percentage: Option<PercentSpec>,
    percent: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AbortSpec {
    http_status: Option<u32>,
    grpc_status: Option<String>,
    http2_error: Option<String>,
    percentage: Option<PercentSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadersSpec {
    request: Option<HeaderOpsSpec>,
    response: Option<HeaderOpsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOpsSpec {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// `http[]` rules of a VirtualService, checked; fields the VM cannot honour yet are refused
/// where ignoring them would change the answer, logged where they would not.
pub(super) fn http_rules(spec: Vec<HttpRouteSpec>) -> Result<Vec<HttpRule>, Invalid> {
    let mut out = Vec::new();
    for (i, r) in spec.into_iter().enumerate() {
        out.push(http_rule(&format!("http[{i}]"), r)?);
    }
    Ok(out)
}

fn http_rule(at: &str, r: HttpRouteSpec) -> Result<HttpRule, Invalid> {
    if r.delegate.is_some() {
        return Err(invalid(
            format!("{at}.delegate"),
            "not supported yet on the VM (the request would go elsewhere than Istio sends it)",
        ));
    }
    let mirrors = mirrors(
        at,
        r.mirror,
        r.mirror_percentage,
        r.mirror_percent,
        r.mirrors,
    )?;
    let mut matches = Vec::new();
    for (k, m) in r.matches.into_iter().enumerate() {
        matches.push(http_match(&format!("{at}.match[{k}]"), m)?);
    }
    let action = match (r.direct_response, r.redirect, r.route.is_empty()) {
        (Some(d), None, true) => direct_response(at, d)?,
        (None, Some(rd), true) => HttpAction::Redirect(redirect(at, rd)?),
        (None, None, _) => HttpAction::Forward(http_destinations(at, r.route)?),
        _ => {
            return Err(invalid(
                at,
                "a rule routes, redirects or answers directly: one of them",
            ))
        }
    };
    let rewrite = r.rewrite.map(|rw| rewrite(at, rw)).transpose()?;
    let headers = r.headers.unwrap_or(HeadersSpec {
        request: None,
        response: None,
    });
    Ok(HttpRule {
        name: r.name,
        matches,
        action,
        timeout_ms: r
            .timeout
            .map(|t| duration(format!("{at}.timeout"), &t))
            .transpose()?
            .filter(|ms| *ms > 0),
        retries: r.retries.map(|s| retries(at, s)).transpose()?,
        fault: r.fault.map(|f| fault(at, f)).transpose()?,
        request_headers: header_ops(&format!("{at}.headers.request"), headers.request)?,
        response_headers: header_ops(&format!("{at}.headers.response"), headers.response)?,
        rewrite,
        mirrors,
        cors: r
            .cors_policy
            .map(|c| cors(at, c))
            .transpose()?
            .map(Box::new),
    })
}

/// istiod's `TranslateCORSPolicy`.
fn cors(at: &str, c: CorsSpec) -> Result<Cors, Invalid> {
    let field = format!("{at}.corsPolicy");
    let mut allow_origins: Vec<StringMatch> =
        c.allow_origin.into_iter().map(StringMatch::Exact).collect();
    for (i, o) in c.allow_origins.into_iter().enumerate() {
        let at = format!("{field}.allowOrigins[{i}]");
        allow_origins
            .push(string_match(&at, o)?.ok_or_else(|| invalid(at, "one of exact, prefix, regex"))?);
    }
    let max_age = c
        .max_age
        .map(|a| duration(format!("{field}.maxAge"), &a))
        .transpose()?
        .map(|ms| (ms / 1000).to_string())
        .unwrap_or_default();
    let forward_unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("UNSPECIFIED" | "FORWARD") => true,
        Some("IGNORE") => false,
        Some(other) => {
            return Err(invalid(
                format!("{field}.unmatchedPreflights"),
                format!("unknown value {other:?} (FORWARD, IGNORE)"),
            ))
        }
    };
    Ok(Cors {
        allow_origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age,
        allow_credentials: c.allow_credentials.unwrap_or(false),
        forward_unmatched_preflights,
    })
}

/// `mirror` with `mirrorPercentage` (unset: 100 %; 0: none, as istiod's `MirrorPercent`), and
/// `mirrors[]`.
fn mirrors(
    at: &str,
    mirror: Option<super::traffic::DestinationSpec>,
    pct: Option<PercentSpec>,
    pct_int: Option<i64>,
    more: Vec<MirrorSpec>,
) -> Result<Vec<Mirror>, Invalid> {
    let mut out = Vec::new();
    if let Some(d) = mirror {
        let percent = match (pct, pct_int) {
            (Some(p), _) => percent(format!("{at}.mirrorPercentage"), Some(p))?,
            (None, Some(i)) => i.clamp(0, 100) as f64,
            (None, None) => 100.0,
        };
        out.push(Mirror {
            destination: super::traffic::single_destination(&format!("{at}.mirror"), d)?,
            percent,
        });
    }
    for (i, m) in more.into_iter().enumerate() {
        let field = format!("{at}.mirrors[{i}]");
        out.push(Mirror {
            percent: percent(format!("{field}.percentage"), m.percentage)?,
            destination: super::traffic::single_destination(&field, m.destination)?,
        });
    }
    out.retain(|m| m.percent > 0.0);
    Ok(out)
}

/// `redirect`, as istiod's `ApplyRedirect` (codes 301 by default, 302, 303, 307, 308;
/// derivePort FROM_REQUEST_PORT keeps the request's port).
fn redirect(at: &str, r: RedirectSpec) -> Result<Redirect, Invalid> {
    let code = match r.redirect_code.unwrap_or(0) {
        0 | 301 => 301,
        c @ (302 | 303 | 307 | 308) => c as u16,
        c => {
            return Err(invalid(
                format!("{at}.redirect.redirectCode"),
                format!("{c} is not 301, 302, 303, 307 or 308"),
            ))
        }
    };
    if r.derive_port
        .as_deref()
        .is_some_and(|d| d != "FROM_PROTOCOL_DEFAULT" && d != "FROM_REQUEST_PORT")
    {
        return Err(invalid(
            format!("{at}.redirect.derivePort"),
            "FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT",
        ));
    }
    Ok(Redirect {
        uri: r.uri,
        authority: r.authority,
        scheme: r.scheme,
        port: r
            .port
            .map(|p| port(format!("{at}.redirect.port"), p))
            .transpose()?,
        code,
    })
}

/// An RE2 substitution (`\\1` for a group, as Envoy's regex_rewrite takes it) in the regex
/// crate's syntax (`${1}`).
pub fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

fn rewrite(at: &str, r: RewriteSpec) -> Result<Rewrite, Invalid> {
    if r.uri.is_some() && r.uri_regex_rewrite.is_some() {
        return Err(invalid(
            format!("{at}.rewrite"),
            "uri and uriRegexRewrite cannot both be set",
        ));
    }
    let uri_regex = r
        .uri_regex_rewrite
        .map(|x| {
            // A pattern anywhere in the path (not anchored: Envoy's regex_rewrite substitutes
            // every match); RE2's \1 groups are regex's ${1}.
            let pattern = regex::Regex::new(&x.pattern).map_err(|e| {
                invalid(
                    format!("{at}.rewrite.uriRegexRewrite.match"),
                    format!("not RE2: {e}"),
                )
            })?;
            Ok::<_, Invalid>((StringMatch::Regex(pattern), re2_substitution(&x.rewrite)))
        })
        .transpose()?;
    Ok(Rewrite {
        uri: r.uri,
        uri_regex,
        authority: r.authority,
    })
}

fn string_match(field: &str, s: StringMatchSpec) -> Result<Option<StringMatch>, Invalid> {
    Ok(match (s.exact, s.prefix, s.regex) {
        (None, None, None) => None,
        (Some(e), None, None) => Some(StringMatch::Exact(e)),
        (None, Some(p), None) => Some(StringMatch::Prefix(p)),
        // istiod: a regex of "*" is a presence match (canBeConvertedToPresentMatch).
        (None, None, Some(r)) if r == "*" => None,
        (None, None, Some(r)) => Some(
            StringMatch::regex(&r)
                .map_err(|e| invalid(format!("{field}.regex"), format!("not RE2: {e}")))?,
        ),
        _ => return Err(invalid(field, "one of exact, prefix, regex")),
    })
}

fn value_matches(
    field: &str,
    given: BTreeMap<String, StringMatchSpec>,
    headers: bool,
) -> Result<Vec<ValueMatch>, Invalid> {
    let mut out = Vec::new();
    for (name, m) in given {
        let at = format!("{field}.{name}");
        if headers && name.starts_with("@request.auth.claims") {
            return Err(invalid(
                at,
                "JWT claim matches need RequestAuthentication, which the VM does not do",
            ));
        }
        let value = string_match(&at, m)?;
        let name = if headers {
            name.to_ascii_lowercase()
        } else {
            name
        };
        out.push(ValueMatch { name, value });
    }
    Ok(out)
}

fn http_match(field: &str, m: HttpMatchSpec) -> Result<HttpMatch, Invalid> {
    let one = |name: &str, s: Option<StringMatchSpec>| -> Result<Option<StringMatch>, Invalid> {
        s.map(|s| string_match(&format!("{field}.{name}"), s))
            .transpose()
            .map(Option::flatten)
    };
    Ok(HttpMatch {
        name: m.name,
        uri: one("uri", m.uri)?,
        ignore_uri_case: m.ignore_uri_case,
        scheme: one("scheme", m.scheme)?,
        method: one("method", m.method)?,
        authority: one("authority", m.authority)?,
        headers: value_matches(&format!("{field}.headers"), m.headers, true)?,
        without_headers: value_matches(
            &format!("{field}.withoutHeaders"),
            m.without_headers,
            true,
        )?,
        query_params: value_matches(&format!("{field}.queryParams"), m.query_params, false)?,
        port: m
            .port
            .map(|p| port(format!("{field}.port"), p))
            .transpose()?,
        source_labels: m.source_labels,
        source_namespace: m.source_namespace,
        gateways: m.gateways,
    })
}

fn direct_response(at: &str, d: DirectResponseSpec) -> Result<HttpAction, Invalid> {
    let status = u16::try_from(d.status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .ok_or_else(|| invalid(format!("{at}.directResponse.status"), "200 to 599"))?;
    let body = match d.body {
        None => String::new(),
        Some(BodySpec {
            string: Some(s),
            bytes: None,
        }) => s,
        Some(BodySpec {
            string: None,
            bytes: Some(_),
        }) => {
            return Err(invalid(
                format!("{at}.directResponse.body.bytes"),
                "not supported yet (use string)",
            ))
        }
        Some(_) => {
            return Err(invalid(
                format!("{at}.directResponse.body"),
                "one of string, bytes",
            ))
        }
    };
    Ok(HttpAction::Respond { status, body })
}

fn retries(at: &str, s: RetriesSpec) -> Result<Retries, Invalid> {
    let field = format!("{at}.retries");
    if s.retry_remote_localities.is_some() || s.backoff.is_some() {
        tracing::warn!(at = %field, "retries retryRemoteLocalities and backoff are not honoured yet (Envoy's 25 ms base backoff is used)");
    }
    if s.retry_ignore_previous_hosts == Some(false) {
        tracing::debug!(at = %field, "retryIgnorePreviousHosts false: a retry may go to the same endpoint");
    }
    let mut out = Retries {
        attempts: u32::try_from(s.attempts.max(0)).unwrap_or(0),
        per_try_timeout_ms: s
            .per_try_timeout
            .map(|t| duration(format!("{field}.perTryTimeout"), &t))
            .transpose()?,
        retry_on: vec![],
        status_codes: vec![],
    };
    // retry.go parseRetryOn: status codes go to retriable_status_codes.
    let on = s
        .retry_on
        .unwrap_or_else(|| "connect-failure,refused-stream,unavailable,cancelled".into());
    for part in on.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(code) = part.parse::<u16>() {
            if !(100..=599).contains(&code) {
                return Err(invalid(
                    format!("{field}.retryOn"),
                    format!("{code} is not an HTTP status"),
                ));
            }
            out.status_codes.push(code);
            continue;
        }
        let kind = RetryOn::parse(part).ok_or_else(|| {
            invalid(
                format!("{field}.retryOn"),
                format!("{part:?} is not a retry condition Envoy knows"),
            )
        })?;
        out.retry_on.push(kind);
    }
    if !out.status_codes.is_empty() && !out.retry_on.contains(&RetryOn::RetriableStatusCodes) {
        out.retry_on.push(RetryOn::RetriableStatusCodes);
    }
    Ok(out)
}

fn percent(field: String, p: Option<PercentSpec>) -> Result<f64, Invalid> {
    let v = p.map_or(100.0, |p| p.value);
    if !(0.0..=100.0).contains(&v) {
        return Err(invalid(field, "a percentage from 0 to 100"));
    }
    Ok(v)
}

fn fault(at: &str, f: FaultSpec) -> Result<Fault, Invalid> {
    let field = format!("{at}.fault");
    let mut out = Fault::default();
    if let Some(d) = f.delay {
        if d.exponential_delay.is_some() {
            // istiod drops it too (TranslateFault: unsupported).
            tracing::warn!(at = %field, "fault.delay.exponentialDelay is not supported by Istio: ignored");
        }
        if let Some(fixed) = d.fixed_delay {
            let ms = duration(format!("{field}.delay.fixedDelay"), &fixed)?;
            let pct = match (d.percentage, d.percent) {
                (None, Some(p)) => p.clamp(0, 100) as f64,
                (p, _) => percent(format!("{field}.delay.percentage"), p)?,
            };
            out.delay = Some((ms, pct));
        }
    }
    if let Some(a) = f.abort {
        let pct = percent(format!("{field}.abort.percentage"), a.percentage)?;
        let abort = match (a.http_status, a.grpc_status, a.http2_error) {
            (Some(s), None, None) => Abort::Http(
                u16::try_from(s)
                    .ok()
                    .filter(|s| (200..=599).contains(s))
                    .ok_or_else(|| invalid(format!("{field}.abort.httpStatus"), "200 to 599"))?,
            ),
            (None, Some(g), None) => Abort::Grpc(grpc_code(&g).ok_or_else(|| {
                invalid(
                    format!("{field}.abort.grpcStatus"),
                    format!("{g:?} is not a gRPC status"),
                )
            })?),
            (None, None, Some(_)) => {
                return Err(invalid(
                    format!("{field}.abort.http2Error"),
                    "not supported (Istio does not implement it either)",
                ))
            }
            _ => {
                return Err(invalid(
                    format!("{field}.abort"),
                    "one of httpStatus, grpcStatus",
                ))
            }
        };
        out.abort = Some((abort, pct));
    }
    Ok(out)
}

/// A gRPC status by name (`UNAVAILABLE`) or number.
fn grpc_code(s: &str) -> Option<u8> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    if let Ok(n) = s.parse::<u8>() {
        return (usize::from(n) < NAMES.len()).then_some(n);
    }
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(s))
        .and_then(|p| u8::try_from(p).ok())
}

/// The destinations as TCP routes have them, each with its own header operations.
fn http_destinations(
    at: &str,
    route: Vec<HttpRouteDestinationSpec>,
) -> Result<Vec<Destination>, Invalid> {
    let mut headers = Vec::new();
    let mut plain = Vec::new();
    for d in route {
        headers.push(d.headers);
        plain.push(super::traffic::RouteDestinationSpec {
            destination: d.destination,
            weight: d.weight,
        });
    }
    let mut out = destinations(at, plain)?;
    for (j, (d, h)) in out.iter_mut().zip(headers).enumerate() {
        let Some(h) = h else { continue };
        let field = format!("{at}.route[{j}].headers");
        let ops = DestinationHeaders {
            request: header_ops(&format!("{field}.request"), h.request)?,
            response: header_ops(&format!("{field}.response"), h.response)?,
        };
        d.headers = (!ops.is_empty()).then(|| Box::new(ops));
    }
    Ok(out)
}

fn header_ops(field: &str, spec: Option<HeaderOpsSpec>) -> Result<HeaderOps, Invalid> {
    let Some(spec) = spec else {
        return Ok(HeaderOps::default());
    };
    let check = |name: &str| -> Result<String, Invalid> {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with(':') || lower == "host" {
            return Err(invalid(
                format!("{field}.{name}"),
                "rewriting the authority is not supported yet",
            ));
        }
        hyper::header::HeaderName::from_bytes(lower.as_bytes())
            .map_err(|_| invalid(format!("{field}.{name}"), "not a header name"))?;
        Ok(lower)
    };
    let pairs = |m: BTreeMap<String, String>| -> Result<Vec<(String, String)>, Invalid> {
        m.into_iter()
            .map(|(k, v)| {
                let k = check(&k)?;
                hyper::header::HeaderValue::from_str(&v)
                    .map_err(|_| invalid(format!("{field}.{k}"), "not a header value"))?;
                Ok((k, v))
            })
            .collect()
    };
    Ok(HeaderOps {
        set: pairs(spec.set)?,
        add: pairs(spec.add)?,
        remove: spec
            .remove
            .iter()
            .map(|n| check(n))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> Result<Vec<HttpRule>, Invalid> {
        let spec: Vec<HttpRouteSpec> = serde_yaml_ng::from_str(yaml).expect("yaml");
        http_rules(spec)
    }

    #[test]
    fn a_cors_policy_is_read_as_istiod_translates_it() {
        let r = rules(
            "- corsPolicy:
    allowOrigins: [{exact: 'https://a.example'}, {prefix: 'https://b.'}]
    allowOrigin: ['https://old.example']
    allowMethods: [GET, POST]
    exposeHeaders: [x-a, x-b]
    maxAge: 24h
    unmatchedPreflights: IGNORE
  route: [{destination: {host: reviews}}]
",
        )
        .expect("valid");
        let c = r[0].cors.as_deref().expect("cors");
        assert_eq!(c.allow_origins.len(), 3);
        assert_eq!(c.allow_methods, "GET,POST");
        assert_eq!(c.expose_headers, "x-a,x-b");
        assert_eq!(c.max_age, "86400");
        assert!(!c.allow_credentials && !c.forward_unmatched_preflights);
        let e = rules(
            "- corsPolicy: {unmatchedPreflights: SOMETIMES}\n  route: [{destination: {host: r}}]\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("corsPolicy.unmatchedPreflights"),
            "{e}"
        );
    }

    #[test]
    fn each_route_destination_keeps_its_own_header_operations() {
        let r = rules(
            "- route:
  - destination: {host: reviews, subset: v1}
    weight: 50
    headers: {request: {set: {X-Dest: one}}, response: {add: {x-by: one}}}
  - {destination: {host: reviews, subset: v2}, weight: 50}
",
        )
        .expect("valid");
        let HttpAction::Forward(ds) = &r[0].action else {
            panic!("{:?}", r[0].action)
        };
        let h = ds[0].headers.as_deref().expect("v1's headers");
        assert_eq!(h.request.set, [("x-dest".to_string(), "one".to_string())]);
        assert_eq!(h.response.add, [("x-by".to_string(), "one".to_string())]);
        assert!(ds[1].headers.is_none());
        let e = rules(
            "- route: [{destination: {host: reviews}, headers: {request: {set: {':authority': x}}}}]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("route[0].headers.request"), "{e}");
    }

    #[test]
    fn matches_retries_faults_and_headers_are_read_as_istio_means_them() {
        let r = rules(
            "- name: jason
  match:
  - headers: {End-User: {exact: jason}, x-any: {regex: '*'}}
    uri: {prefix: /api}
    queryParams: {v: {regex: '[0-9]+'}}
  route: [{destination: {host: reviews, subset: v2}}]
  retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx,503'}
  fault: {abort: {httpStatus: 418, percentage: {value: 50}}, delay: {fixedDelay: 100ms}}
  headers: {request: {set: {x-a: b}, remove: [X-Gone]}}
  timeout: 10s
",
        )
        .expect("valid");
        let r = &r[0];
        let m = &r.matches[0];
        assert_eq!(m.headers[0].name, "end-user");
        assert_eq!(m.headers[1].value, None, "regex * is a presence match");
        assert_eq!(m.uri, Some(StringMatch::Prefix("/api".into())));
        assert!(m.query_params[0]
            .value
            .as_ref()
            .is_some_and(|v| v.matches("12") && !v.matches("12a")));
        let retries = r.retries.as_ref().expect("retries");
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.status_codes, vec![503]);
        assert_eq!(
            retries.retry_on,
            vec![RetryOn::FiveXx, RetryOn::RetriableStatusCodes]
        );
        assert_eq!(retries.per_try_timeout_ms, Some(2000));
        let f = r.fault.as_ref().expect("fault");
        assert_eq!(f.abort, Some((Abort::Http(418), 50.0)));
        assert_eq!(f.delay, Some((100, 100.0)));
        assert_eq!(r.request_headers.remove, vec!["x-gone".to_string()]);
        assert_eq!(r.timeout_ms, Some(10_000));
    }

    #[test]
    fn what_would_send_a_request_elsewhere_is_refused_with_its_field() {
        let e = rules("- delegate: {name: r}\n").expect_err("delegate");
        assert_eq!(e.field, "http[0].delegate");
        let e = rules("- redirect: {uri: /v2, redirectCode: 399}\n").expect_err("code");
        assert_eq!(e.field, "http[0].redirect.redirectCode");
        let e = rules(
            "- match: [{uri: {prefix: /a, exact: /b}}]\n  route: [{destination: {host: r}}]\n",
        )
        .expect_err("two kinds");
        assert_eq!(e.field, "http[0].match[0].uri");
        let e = rules(
            "- route: [{destination: {host: r}}]\n  retries: {attempts: 1, retryOn: 'sometimes'}\n",
        )
        .expect_err("retryOn");
        assert_eq!(e.field, "http[0].retries.retryOn");
        let e = rules("- directResponse: {status: 700}\n").expect_err("status");
        assert_eq!(e.field, "http[0].directResponse.status");
    }

    #[test]
    fn re2_groups_become_regex_groups() {
        assert_eq!(re2_substitution("/v2/\\1/x$"), "/v2/${1}/x$$");
    }

    #[test]
    fn grpc_status_names_and_numbers() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("14"), Some(14));
        assert_eq!(grpc_code("17"), None);
    }
}
