//! The outbound HTTP path: where a VirtualService has `http` rules for a service's HTTP port,
//! the captured connection is served as HTTP/1.1 or h2c (hyper) and each request is routed on
//! its own: the rule (`route::http`), its fault, a destination by weight, an endpoint by the
//! cluster's load balancer, a pooled upstream connection, retries on another endpoint and the
//! route's timeout, as Envoy does with the routes istiod builds.
//!
//! Answers a client sees are Envoy's: 404 when no route matches (`NR`), 503 `no healthy
//! upstream` (`UH`), 503 on connect failure (`UF`) or reset (`UC`), 504 `upstream request
//! timeout` (`UT`), the fault's abort (`FI`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Outbound;
use crate::mesh::http_route::{
    Abort, DestinationHeaders, HeaderOps, HttpAction, HttpMatch, HttpRule, Retries, RetryOn,
    Rewrite,
};
use crate::mesh::Table;
use crate::metrics::Metrics;
use crate::metrics::{self, RequestLabels};
use crate::proxy::breaker::{Breaker, Overflow, Slot};
use crate::proxy::http::{
    follow_upgrade, handshake, local_response, request_protocol, serve, set_upgrade,
    strip_hop_by_hop, upgrade_protocol, upstream_request, Counted,
};
use crate::proxy::pool::{Body, ConnLimits, Key, Pooled};
use crate::route::http::{authority, http_routes, redirect_location, rewritten_path, upstream_h2};
use crate::route::traffic::{self, NoRoute};
use crate::route::{EndpointAddr, Target};
use crate::transport::Upstream;

/// Bodies up to this size are kept so that a failed try can be retried (Envoy buffers for
/// retries up to its connection buffer limit).
const RETRY_BODY_LIMIT: u64 = 64 * 1024;
/// Mirrored copies in flight at most; beyond, copies are dropped (a mirror never costs the
/// primary traffic).
const MAX_MIRRORING: usize = 256;
/// Envoy's default retry back-off base (25 ms, doubling, jittered).
const BACKOFF_BASE_MS: u64 = 25;

/// How a request ended, for the access log and the metrics.
struct Outcome {
    response: Response<Body>,
    /// Envoy's response flags (`-`: none).
    flags: &'static str,
    cluster: String,
    endpoint: Option<EndpointAddr>,
    version: String,
    attempts: u32,
    /// The cluster's circuit breakers, where its DestinationRule sets limits.
    limited: Option<Limited>,
    /// The request counted in flight until its response ends.
    held: Option<Slot>,
    /// The workload that answered, as Istio's telemetry names it.
    destination: Option<metrics::Peer>,
    /// Its identity, as its certificate proved (None: plaintext, or no answer).
    principal: Option<Arc<str>>,
}

impl Outcome {
    fn local(status: u16, body: impl Into<Bytes>, flags: &'static str) -> Self {
        Outcome {
            response: local_response(status, body.into()),
            flags,
            cluster: "-".into(),
            endpoint: None,
            version: metrics::UNKNOWN.into(),
            attempts: 0,
            limited: None,
            held: None,
            destination: None,
            principal: None,
        }
    }

    /// Envoy's answer to a circuit breaker's overflow.
    fn overflow(cluster: String) -> Self {
        let mut o = Outcome::local(503, OVERFLOW, "UO");
        o.cluster = cluster;
        o
    }
}

const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// A cluster's limits (its DestinationRule's `connectionPool`) and its breaker.
#[derive(Clone)]
struct Limited {
    breaker: Arc<Breaker>,
    pool: crate::mesh::traffic::Pool,
}

impl Limited {
    fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            max_requests: self.pool.max_requests_per_connection,
            idle_timeout: self.pool.idle_timeout_ms.map(Duration::from_millis),
        }
    }
}

/// Why no request went upstream on a try.
enum NotSent {
    /// No endpoint could be connected to (Envoy's `UF`).
    Unreachable,
    /// The cluster's pending-request breaker is full (`UO`).
    Overflow(Overflow),
}

/// A request body: kept (it can be sent again) or streamed once.
enum RequestBody {
    Kept(Bytes),
    Once(Option<Incoming>),
}

impl RequestBody {
    async fn read(body: Incoming, parts: &Parts) -> Result<Self, hyper::Error> {
        use hyper::body::Body as _;
        if body.is_end_stream() {
            return Ok(RequestBody::Kept(Bytes::new()));
        }
        let small = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= RETRY_BODY_LIMIT);
        if small {
            return Ok(RequestBody::Kept(body.collect().await?.to_bytes()));
        }
        Ok(RequestBody::Once(Some(body)))
    }

    fn is_spent(&self) -> bool {
        matches!(self, RequestBody::Once(None))
    }

    /// The body for the next try; None once a streamed body went.
    fn next(&mut self) -> Option<Body> {
        match self {
            RequestBody::Kept(b) => Some(Full::new(b.clone()).map_err(|n| match n {}).boxed()),
            RequestBody::Once(b) => b.take().map(BodyExt::boxed),
        }
    }
}

/// Any upstream stream, for hyper's client.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

fn boxed_io(up: Upstream) -> Box<dyn Io> {
    match up {
        Upstream::Tcp(s) => Box::new(s) as Box<dyn Io>,
        Upstream::Tls(s) | Upstream::Originated(s) => s as Box<dyn Io>,
        Upstream::Hbone(s) => s as Box<dyn Io>,
    }
}

impl Outbound {
    /// Serves one captured connection as HTTP, request by request.
    pub(super) async fn serve_http(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let this = self.clone();
        let answer = move |req| {
            let this = this.clone();
            async move { this.request(req, peer, dst).await }
        };
        if let Err(e) = serve(client, answer).await {
            tracing::debug!(%peer, original = %dst, error = %e, "outbound HTTP connection ended with an error");
        }
    }

    async fn request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let upgrade = upgrade_protocol(&parts);
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        // Each request sees the table as it is now: a route changed mid-connection applies to
        // the next request.
        let table = self.store.load();
        let (mut outcome, route) = self
            .route_request(&table, &mut parts, body, upgrade.as_ref(), peer, dst)
            .await;
        follow_upgrade(&mut outcome.response, upgrade.as_ref(), client_upgrade);
        let status = outcome.response.status().as_u16();
        let (service, service_namespace) = table.service_for(dst).map_or_else(
            || (dst.to_string(), String::new()),
            |(s, _)| (s.host.to_string(), s.namespace.clone()),
        );
        let destination_version = labels_version(&outcome);
        let labels = RequestLabels {
            reporter: metrics::SOURCE,
            // As Envoy's source reporter: both principals from the upstream connection's
            // mTLS; a plaintext one (or none) names neither.
            source_principal: match &outcome.principal {
                Some(_) => self.tls.current().map_or_else(
                    || metrics::UNKNOWN.to_string(),
                    |id| id.spiffe.as_str().to_string(),
                ),
                None => metrics::UNKNOWN.to_string(),
            },
            destination_principal: outcome
                .principal
                .as_deref()
                .unwrap_or(metrics::UNKNOWN)
                .into(),
            workloads: metrics::Workloads::new(
                &self.local.peer,
                &outcome.destination.take().unwrap_or_default(),
                &service,
                &service_namespace,
            ),
            destination_service: service.clone(),
            destination_version,
            request_protocol: request_protocol(&parts.headers),
            response_code: status,
            grpc_response_status: "",
            response_flags: outcome.flags,
            connection_security_policy: metrics::UNKNOWN,
        };
        tracing::info!(
            %peer, original = %dst, service, method = %parts.method, authority = authority(&parts),
            path = parts.uri.path(), status, flags = outcome.flags, route,
            cluster = outcome.cluster, endpoint = outcome.endpoint.as_ref().map(|e| e.to_string()).as_deref().unwrap_or("-"),
            attempts = outcome.attempts, duration_ms = started.elapsed().as_millis() as u64,
            "outbound request"
        );
        Counted::wrap(
            outcome.response,
            self.metrics.clone(),
            labels,
            started,
            outcome.held,
        )
    }

    /// The rule for the request, its fault, then its forwarding; the route's name comes back for
    /// the access log.
    async fn route_request(
        self: &Arc<Self>,
        table: &Arc<Table>,
        parts: &mut Parts,
        body: Incoming,
        upgrade: Option<&HeaderValue>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> (Outcome, String) {
        let Some((svc, _)) = table.service_for(dst) else {
            return (Outcome::local(503, "no healthy upstream", "NC"), "-".into());
        };
        let routes = http_routes(table, &self.subject, svc, dst);
        let (rule, by, matched) = match &routes {
            None => (None, "service".to_string(), None),
            Some(r) => match r.select(parts) {
                Some(a) => (
                    Some(a.rule),
                    format!("VirtualService {} http[{}]", r.virtual_service, a.index),
                    a.matched(parts),
                ),
                // Envoy: no route for the request.
                None => return (Outcome::local(404, "", "NR"), r.virtual_service.into()),
            },
        };
        if let Some(outcome) = fault(rule).await {
            return (outcome, by);
        }
        // Envoy's filter order: fault, then CORS, then the route's action.
        let cors = rule.and_then(|r| r.cors.as_deref());
        let allowed = match cors.map(|c| crate::route::cors::step(c, parts)) {
            Some(crate::route::cors::Step::Answer(headers)) => {
                let mut o = Outcome::local(200, "", "-");
                o.response.headers_mut().extend(headers);
                return (o, by);
            }
            Some(crate::route::cors::Step::Allowed(origin)) => cors.zip(Some(origin)),
            _ => None,
        };
        let (mut outcome, by) = self
            .act(table, parts, body, (rule, by, matched), upgrade, peer, dst)
            .await;
        if let Some((c, origin)) = allowed {
            crate::route::cors::allow(c, origin, outcome.response.headers_mut());
        }
        (outcome, by)
    }

    /// The rule's action for the request: an answer, a redirect, or its forwarding.
    #[allow(clippy::too_many_arguments)]
    async fn act(
        self: &Arc<Self>,
        table: &Arc<Table>,
        parts: &mut Parts,
        body: Incoming,
        (rule, by, matched): (Option<&HttpRule>, String, Option<&HttpMatch>),
        upgrade: Option<&HeaderValue>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> (Outcome, String) {
        let Some((svc, _)) = table.service_for(dst) else {
            return (Outcome::local(503, "no healthy upstream", "NC"), by);
        };
        if let Some(HttpRule {
            action: HttpAction::Respond { status, body },
            ..
        }) = rule
        {
            return (Outcome::local(*status, body.clone(), "-"), by);
        }
        if let Some(HttpRule {
            action: HttpAction::Redirect(r),
            ..
        }) = rule
        {
            let mut o = Outcome::local(r.code, "", "-");
            if let Ok(v) = HeaderValue::from_str(&redirect_location(parts, r)) {
                o.response.headers_mut().insert(hyper::header::LOCATION, v);
            }
            return (o, by);
        }
        if let Some(rw) = rule.and_then(|r| r.rewrite.as_ref()) {
            rewrite(parts, matched, rw);
        }
        let mut body = match RequestBody::read(body, parts).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "outbound HTTP: the request body failed");
                return (Outcome::local(400, "bad request body", "DPE"), by);
            }
        };
        prepare_headers(&mut parts.headers, rule.map(|r| &r.request_headers));
        // Our Istio metadata headers, to mesh services (not to external ones, as Istio's
        // skip_external_clusters).
        let internal = svc.location == crate::mesh::Location::MeshInternal;
        if let Some(ours) = self.local.headers.as_ref().filter(|_| internal) {
            ours.add(&mut parts.headers);
        }
        if let Some(p) = upgrade {
            set_upgrade(&mut parts.headers, p);
        }
        if let Some(r) = rule.filter(|r| !r.mirrors.is_empty() && upgrade.is_none()) {
            self.mirror(table, parts, &body, r, peer, dst);
        }
        let forward = self.forward(table, parts, &mut body, rule, peer, dst);
        // istiod sets max_grpc_timeout to the route's timeout: a gRPC client's own deadline
        // (grpc-timeout) applies, capped by the route's where it has one.
        let route_timeout = rule.and_then(|r| r.timeout_ms);
        let timeout = match (grpc_timeout_ms(&parts.headers), route_timeout) {
            (Some(g), Some(r)) => Some(g.min(r)),
            (g, r) => g.or(r),
        };
        let mut outcome = match timeout {
            None => forward.await,
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), forward)
                .await
                .unwrap_or_else(|_| Outcome::local(504, "upstream request timeout", "UT")),
        };
        strip_hop_by_hop(outcome.response.headers_mut());
        if let Some(r) = rule {
            apply_ops(outcome.response.headers_mut(), &r.response_headers);
        }
        (outcome, by)
    }

    /// Tries the request, and retries it as the rule's (or istiod's default) policy says, each
    /// try on an endpoint not tried yet where there is one.
    async fn forward(
        &self,
        table: &Table,
        parts: &Parts,
        body: &mut RequestBody,
        rule: Option<&HttpRule>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Outcome {
        let retries = rule
            .and_then(|r| r.retries.clone())
            .unwrap_or_else(Retries::istio_default);
        let mut tried: Vec<EndpointAddr> = Vec::new();
        let mut last = Outcome::local(503, "no healthy upstream", "UH");
        for n in 0..=retries.attempts {
            // Envoy's max_retries breaker: a retry beyond it is not made.
            let _retry = match last.limited.as_ref().filter(|_| n > 0) {
                Some(l) => match l.breaker.retry(l.pool.max_retries) {
                    Some(slot) => Some(slot),
                    None => {
                        self.metrics.outbound_refused("retry_overflow");
                        break;
                    }
                },
                None => None,
            };
            if n > 0 {
                backoff(n).await;
            }
            if body.is_spent() {
                break; // a streamed body cannot be sent again
            }
            let (outcome, retry) = self
                .try_once(table, parts, body, rule, &retries, &mut tried, peer, dst)
                .await;
            last = outcome;
            last.attempts = n + 1;
            if !retry {
                break;
            }
        }
        last
    }

    /// One try: a cluster, an endpoint, a connection, the request. Says whether the policy
    /// retries what happened.
    #[allow(clippy::too_many_arguments)]
    async fn try_once(
        &self,
        table: &Table,
        parts: &Parts,
        body: &mut RequestBody,
        rule: Option<&HttpRule>,
        retries: &Retries,
        tried: &mut Vec<EndpointAddr>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> (Outcome, bool) {
        let (cluster, dial, dest_headers) = match self.cluster_dial(table, rule, tried, peer, dst) {
            Ok(ok) => ok,
            Err(o) => return (*o, false),
        };
        let name = cluster.name();
        let limited = self.limited(&dial, &name);
        let held = match &limited {
            Some(l) => match l.breaker.request(l.pool.max_requests) {
                Ok(slot) => Some(slot),
                Err(o) => return (self.overflowed(o, name), false),
            },
            None => None,
        };
        let h2 = upstream_h2(table, &cluster, parts.version);
        let per_try = retries.per_try_timeout_ms.map(Duration::from_millis);
        let host = &cluster.service.host;
        let request = |b: Body| {
            let mut req = upstream_request(parts, b, h2);
            if let Some(d) = &dest_headers {
                apply_destination_ops(
                    req.headers_mut(),
                    &d.request,
                    rule.map(|r| &r.request_headers),
                );
            }
            req
        };
        let exchanged = self
            .exchange(
                &dial,
                &name,
                (h2, &request),
                host,
                body,
                per_try,
                peer,
                limited.as_ref(),
            )
            .await;
        let (target, sender, key, mut sent) = match exchanged {
            Ok(ok) => ok,
            Err(NotSent::Overflow(o)) => return (self.overflowed(o, name), false),
            Err(NotSent::Unreachable) => {
                let mut o = Outcome::local(503, "upstream connect error or disconnect/reset before headers. reset reason: connection failure", "UF");
                o.cluster = name;
                o.limited = limited;
                let retry = retries.retry_on.iter().any(|r| {
                    matches!(
                        r,
                        RetryOn::ConnectFailure | RetryOn::FiveXx | RetryOn::GatewayError
                    )
                });
                return (o, retry);
            }
        };
        tried.push(target.endpoint.clone());
        let _open = self.load.open(dial.count_key(), &target.endpoint);
        // The server's Istio metadata headers name it best; else its endpoint's metadata.
        let answered = match &mut sent {
            Ok(Ok(r)) => crate::metadata_exchange::take(r.headers_mut()),
            _ => None,
        };
        let destination = answered.or_else(|| match &target.via {
            crate::route::Via::Direct(w) => Some(self.peers.of(table, w)),
            _ => None,
        });
        let breaker = limited.as_ref().map(|l| l.breaker.clone());
        let principal = sender.peer().cloned();
        let (mut response, flags, retry) =
            self.judge(sent, retries, &dial, &target, (key, sender, breaker));
        // A destination's response operations go before its rule's (applied at the end).
        if let Some(d) = &dest_headers {
            apply_ops(response.headers_mut(), &d.response);
        }
        let version = match &target.via {
            crate::route::Via::Direct(w) => metrics::canonical_revision(&w.labels),
            _ => metrics::UNKNOWN.into(),
        };
        let outcome = Outcome {
            response,
            flags,
            cluster: name,
            endpoint: Some(target.endpoint),
            version,
            attempts: 0,
            limited,
            held,
            destination,
            principal,
        };
        (outcome, retry)
    }

    /// The cluster a try goes to (the rule's weighted pick, else the service's) and its
    /// endpoints in order, those not tried yet first (Envoy's previous_hosts predicate); or the
    /// answer when there is none.
    #[allow(clippy::type_complexity)]
    fn cluster_dial<'t, 'r>(
        &self,
        table: &'t Table,
        rule: Option<&'r HttpRule>,
        tried: &[EndpointAddr],
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<
        (
            traffic::Cluster<'t>,
            super::Dial,
            Option<&'r DestinationHeaders>,
        ),
        Box<Outcome>,
    > {
        let Some((svc, port)) = table.service_for(dst) else {
            return Err(Box::new(Outcome::local(503, "no healthy upstream", "NC")));
        };
        let mut headers = None;
        let cluster = match rule.map(|r| &r.action) {
            Some(HttpAction::Forward(ds)) => traffic::pick(ds)
                .ok_or_else(|| NoRoute::NoCluster {
                    cluster: "(a route without destinations)".into(),
                })
                .and_then(|d| {
                    headers = d.headers.as_deref();
                    traffic::cluster(table, &self.subject, d, dst.port())
                }),
            _ => Ok(traffic::service_cluster(table, &self.subject, svc, port)),
        };
        let cluster = cluster.map_err(|e| {
            self.metrics.outbound_refused(e.label());
            Box::new(Outcome::local(503, e.to_string(), "NC"))
        })?;
        let tls = self.tls.current();
        let named = |mut o: Outcome| {
            o.cluster = cluster.name();
            Box::new(o)
        };
        let mut dial = self
            .prepare(table, &cluster, peer, dst, tls.as_deref(), super::Served::PerRequest)
            .map_err(|e| {
                self.metrics.outbound_refused(e.label());
                named(Outcome::local(503, "upstream connect error or disconnect/reset before headers. reset reason: overflow", "UO"))
            })?;
        if dial.targets.iter().any(|t| !tried.contains(&t.endpoint)) {
            dial.targets.retain(|t| !tried.contains(&t.endpoint));
        }
        if dial.targets.is_empty() {
            return Err(named(Outcome::local(503, "no healthy upstream", "UH")));
        }
        Ok((cluster, dial, headers))
    }

    /// A connection and the request sent on it. A kept connection the endpoint had already
    /// closed never carried the request, so it goes again on a new one (not a retry).
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        dial: &super::Dial,
        name: &str,
        (h2, request): (bool, &(dyn Fn(Body) -> Request<Body> + Sync)),
        host: &crate::mesh::Host,
        body: &mut RequestBody,
        per_try: Option<Duration>,
        peer: SocketAddr,
        limited: Option<&Limited>,
    ) -> Result<(Target, Pooled, Key, Sent), NotSent> {
        let (mut target, mut sender, mut key, reused) = self
            .upstream(dial, name, h2, peer, host, true, limited)
            .await?;
        let first = body.next().ok_or(NotSent::Unreachable)?;
        let mut sent = send(&mut sender, request(first), per_try).await;
        if let Ok(Err(e)) = &sent {
            if reused && (e.is_canceled() || e.is_incomplete_message() || e.is_closed()) {
                let fresh = self
                    .upstream(dial, name, h2, peer, host, false, limited)
                    .await;
                if let (Ok(f), Some(b)) = (fresh, body.next()) {
                    (target, sender, key, _) = f;
                    sent = send(&mut sender, request(b), per_try).await;
                }
            }
        }
        Ok((target, sender, key, sent))
    }

    /// What the client gets for a try's result, its response flags, and whether the policy
    /// retries it; the connection goes back to the pool when it can carry another request.
    fn judge(
        &self,
        sent: Sent,
        retries: &Retries,
        dial: &super::Dial,
        target: &Target,
        (key, conn, breaker): (Key, Pooled, Option<Arc<Breaker>>),
    ) -> (Response<Body>, &'static str, bool) {
        match sent {
            Ok(Ok(resp)) => {
                // The DestinationRule's outlier detection counts 5xx answers (consecutive5xx
                // errors); without one, only failed connects count, as at L4.
                if let Some(od) = dial.policy.outlier {
                    if resp.status().is_server_error() {
                        self.outliers.failed_under(&target.endpoint, Some(od));
                    } else {
                        self.outliers.succeeded(&target.endpoint);
                    }
                }
                let retry = retriable_response(retries, &resp);
                let (head, body) = resp.into_parts();
                // A response dropped for a retry leaves its connection unusable; a switched
                // one belongs to its upgrade.
                let body = if retry || head.status == hyper::StatusCode::SWITCHING_PROTOCOLS {
                    body.boxed()
                } else {
                    self.pool.return_with(key, conn, body, breaker)
                };
                (Response::from_parts(head, body), "-", retry)
            }
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %target.endpoint, error = %e, "outbound HTTP: the upstream reset before answering");
                let refused = e.source_is_refused_stream();
                let retry = retries.retry_on.iter().any(|r| match r {
                    RetryOn::Reset | RetryOn::FiveXx | RetryOn::GatewayError => true,
                    RetryOn::RefusedStream => refused,
                    _ => false,
                });
                let body = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
                (
                    local_response(503, Bytes::from_static(body.as_bytes())),
                    "UC",
                    retry,
                )
            }
            Err(_) => {
                let retry = retries
                    .retry_on
                    .iter()
                    .any(|r| matches!(r, RetryOn::FiveXx | RetryOn::GatewayError));
                let body = Bytes::from_static(b"upstream request timeout");
                (local_response(504, body), "UT", retry)
            }
        }
    }

    /// Sends a copy of the request to each of the rule's mirrors its percentage picks, in the
    /// background: the copy's answer is dropped and never delays the request. A body streamed
    /// (larger than the retry buffer) is not mirrored.
    fn mirror(
        self: &Arc<Self>,
        table: &Arc<Table>,
        parts: &Parts,
        body: &RequestBody,
        rule: &HttpRule,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let RequestBody::Kept(bytes) = body else {
            return;
        };
        use std::sync::atomic::Ordering::Relaxed;
        for m in rule.mirrors.iter().filter(|m| chance(m.percent)) {
            if self.mirroring.fetch_add(1, Relaxed) >= MAX_MIRRORING {
                self.mirroring.fetch_sub(1, Relaxed);
                tracing::debug!(
                    "outbound HTTP: too many mirrored copies in flight; this one is dropped"
                );
                continue;
            }
            let (mut copy, ()) = Request::builder()
                .method(parts.method.clone())
                .uri(parts.uri.clone())
                .version(parts.version)
                .body(())
                .unwrap_or_default()
                .into_parts();
            copy.headers = parts.headers.clone();
            let (this, table, dest, bytes) = (
                self.clone(),
                table.clone(),
                m.destination.clone(),
                bytes.clone(),
            );
            tokio::spawn(async move {
                this.mirror_once(&table, copy, bytes, &dest, peer, dst)
                    .await;
                this.mirroring.fetch_sub(1, Relaxed);
            });
        }
    }

    async fn mirror_once(
        &self,
        table: &Table,
        parts: Parts,
        body: Bytes,
        dest: &crate::mesh::traffic::Destination,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let Ok(cluster) = traffic::cluster(table, &self.subject, dest, dst.port()) else {
            tracing::debug!(cluster = %traffic::cluster_name(dest.port.unwrap_or(dst.port()), &dest.subset, &dest.host), "outbound HTTP: no mirror cluster");
            return;
        };
        let tls = self.tls.current();
        let name = cluster.name();
        let Ok(dial) = self.prepare(
            table,
            &cluster,
            peer,
            dst,
            tls.as_deref(),
            super::Served::PerRequest,
        ) else {
            return;
        };
        if dial.targets.is_empty() {
            return;
        }
        let h2 = upstream_h2(table, &cluster, parts.version);
        let host = &cluster.service.host;
        let limited = self.limited(&dial, &name);
        let Ok((target, mut sender, key, _)) = self
            .upstream(&dial, &name, h2, peer, host, true, limited.as_ref())
            .await
        else {
            return;
        };
        let body = Full::new(body).map_err(|n| match n {}).boxed();
        match sender.send(upstream_request(&parts, body, h2)).await {
            Ok(resp) => {
                // Read to its end so that the connection can carry the next request.
                let breaker = limited.map(|l| l.breaker);
                let body = self
                    .pool
                    .return_with(key, sender, resp.into_body(), breaker);
                let _ = body.collect().await;
            }
            Err(e) => {
                tracing::debug!(endpoint = %target.endpoint, error = %e, "outbound HTTP: the mirror failed");
            }
        }
    }

    /// A connection to the first endpoint kept from an earlier request, else a new one to the
    /// first of the cluster's endpoints that answers; where the cluster's breakers leave no
    /// room for another connection, the request waits as pending for one (Envoy's pool).
    #[allow(clippy::too_many_arguments)]
    async fn upstream(
        &self,
        dial: &super::Dial,
        cluster: &str,
        h2: bool,
        peer: SocketAddr,
        service: &crate::mesh::Host,
        mut pooled: bool,
        limited: Option<&Limited>,
    ) -> Result<(Target, Pooled, Key, bool), NotSent> {
        let first = &dial.targets[0];
        let key = Key {
            cluster: cluster.to_string(),
            endpoint: first.endpoint.to_string(),
            transport: first.transport.label(),
            h2,
        };
        let Some(l) = limited else {
            if let Some(c) = pooled.then(|| self.pool.take(&key)).flatten() {
                return Ok((first.clone(), c, key, true));
            }
            return self
                .connect_new(
                    dial,
                    cluster,
                    h2,
                    peer,
                    service,
                    None,
                    ConnLimits::default(),
                )
                .await;
        };
        let mut pending: Option<(Slot, PendingGauge)> = None;
        loop {
            let freed = l.breaker.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(c) = pooled.then(|| self.pool.take(&key)).flatten() {
                return Ok((first.clone(), c, key, true));
            }
            // Envoy counts a request pending from here until a connection carries it,
            // connecting included.
            if pending.is_none() {
                let slot = l
                    .breaker
                    .pending(l.pool.max_pending_requests)
                    .map_err(NotSent::Overflow)?;
                pending = Some((slot, PendingGauge::new(&self.metrics)));
            }
            if let Some(held) = l.breaker.connection(&key.endpoint, l.pool.max_connections) {
                return self
                    .connect_new(
                        dial,
                        cluster,
                        h2,
                        peer,
                        service,
                        Some(held),
                        l.conn_limits(),
                    )
                    .await;
            }
            freed.await;
            pooled = true;
        }
    }

    /// A new connection to the first of the cluster's endpoints that answers.
    #[allow(clippy::too_many_arguments)]
    async fn connect_new(
        &self,
        dial: &super::Dial,
        cluster: &str,
        h2: bool,
        peer: SocketAddr,
        service: &crate::mesh::Host,
        held: Option<Slot>,
        limits: ConnLimits,
    ) -> Result<(Target, Pooled, Key, bool), NotSent> {
        let (i, up) = self
            .connect(&dial.targets, &dial.policy, (peer, service), alpn(h2))
            .await
            .map_err(|e| {
                tracing::debug!(%service, tried = e.tried, "outbound HTTP: no endpoint reachable");
                NotSent::Unreachable
            })?;
        let target = &dial.targets[i];
        let peer = up
            .peer_identity(target.transport.identities())
            .map(|id| Arc::<str>::from(id.as_str()));
        let sender = handshake(boxed_io(up), h2, held).await.map_err(|e| {
            tracing::debug!(endpoint = %target.endpoint, h2, error = %e, "outbound HTTP handshake failed");
            NotSent::Unreachable
        })?;
        let key = Key {
            cluster: cluster.to_string(),
            endpoint: target.endpoint.to_string(),
            transport: target.transport.label(),
            h2,
        };
        Ok((
            target.clone(),
            Pooled::new(sender, limits).with_peer(peer),
            key,
            false,
        ))
    }

    /// The cluster's breakers, where its DestinationRule sets a limit.
    fn limited(&self, dial: &super::Dial, cluster: &str) -> Option<Limited> {
        let pool = dial.policy.pool?;
        (pool.limits_requests() || pool.max_connections.is_some()).then(|| Limited {
            breaker: self.breakers.get(cluster),
            pool,
        })
    }

    /// A breaker's overflow, counted, as Envoy answers it.
    fn overflowed(&self, o: Overflow, cluster: String) -> Outcome {
        self.metrics.outbound_refused(o.label());
        tracing::debug!(%cluster, reason = o.label(), "outbound HTTP: circuit breaker overflow");
        Outcome::overflow(cluster)
    }
}

/// A request counted in `interceptor_upstream_pending_requests` while it waits.
struct PendingGauge(Arc<Metrics>);

impl PendingGauge {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.pending_request(1);
        PendingGauge(metrics.clone())
    }
}

impl Drop for PendingGauge {
    fn drop(&mut self) {
        self.0.pending_request(-1);
    }
}

/// `destination_version`: the answering workload's, as it said (its metadata headers) or as
/// its endpoint's metadata says.
fn labels_version(outcome: &Outcome) -> String {
    outcome
        .destination
        .as_ref()
        .map_or_else(|| outcome.version.clone(), |p| p.version.to_string())
}

/// The ALPN an HTTP connection to a sidecar offers, by the protocol it will carry.
fn alpn(h2: bool) -> crate::tls::Alpn {
    match h2 {
        true => crate::tls::Alpn::Http2,
        false => crate::tls::Alpn::Http1,
    }
}

/// A request's result: the upstream's answer or error, or the per-try timeout.
type Sent = Result<Result<Response<Incoming>, hyper::Error>, tokio::time::error::Elapsed>;

/// Sends `req` on `sender`, within the per-try timeout if there is one.
async fn send(sender: &mut Pooled, req: Request<Body>, per_try: Option<Duration>) -> Sent {
    match per_try {
        None => Ok(sender.send(req).await),
        Some(t) => tokio::time::timeout(t, sender.send(req)).await,
    }
}

/// Applies a rule's `rewrite` to the request: its path (and query), its authority.
fn rewrite(parts: &mut Parts, matched: Option<&HttpMatch>, rw: &Rewrite) {
    let host = rw
        .authority
        .clone()
        .unwrap_or_else(|| authority(parts).to_string());
    let path = rewritten_path(parts, matched, rw).or_else(|| {
        parts
            .uri
            .authority()
            .and(parts.uri.path_and_query().map(|p| p.as_str().to_string()))
    });
    if let Some(uri) = path.and_then(|p| p.parse::<hyper::Uri>().ok()) {
        parts.uri = uri;
    }
    if let Ok(v) = HeaderValue::from_str(&host) {
        parts.headers.insert(hyper::header::HOST, v);
    }
}

/// The rule's fault, if it strikes this request: its delay is waited, its abort answered.
async fn fault(rule: Option<&HttpRule>) -> Option<Outcome> {
    let f = rule?.fault.as_ref()?;
    if let Some((ms, pct)) = f.delay {
        if chance(pct) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    let (abort, pct) = f.abort?;
    if !chance(pct) {
        return None;
    }
    Some(match abort {
        Abort::Http(status) => Outcome::local(status, "fault filter abort", "FI"),
        Abort::Grpc(code) => {
            // A trailers-only gRPC answer: HTTP 200 with the status in the headers.
            let mut o = Outcome::local(200, "", "FI");
            let h = o.response.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(u16::from(code)));
            h.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            o
        }
    })
}

/// A gRPC request's `grpc-timeout` (`100m`, `5S`, units H M S m u n), in milliseconds.
fn grpc_timeout_ms(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => n.saturating_mul(3_600_000),
        "M" => n.saturating_mul(60_000),
        "S" => n.saturating_mul(1000),
        "m" => n,
        "u" => n / 1000,
        "n" => n / 1_000_000,
        _ => return None,
    })
}

/// True for `pct` percent of the calls.
fn chance(pct: f64) -> bool {
    pct >= 100.0 || rand::rng().random_range(0.0..100.0) < pct
}

/// Whether the policy retries this answer (Envoy's retry_on against the response head; gRPC's
/// conditions read a trailers-only `grpc-status`).
fn retriable_response(retries: &Retries, resp: &Response<Incoming>) -> bool {
    let status = resp.status().as_u16();
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok());
    retries.retry_on.iter().any(|r| match r {
        RetryOn::FiveXx => status >= 500,
        RetryOn::GatewayError => matches!(status, 502..=504),
        RetryOn::Retriable4xx => status == 409,
        RetryOn::RetriableStatusCodes => retries.status_codes.contains(&status),
        RetryOn::Cancelled => grpc == Some(1),
        RetryOn::DeadlineExceeded => grpc == Some(4),
        RetryOn::ResourceExhausted => grpc == Some(8),
        RetryOn::Unavailable => grpc == Some(14),
        RetryOn::Reset | RetryOn::ConnectFailure | RetryOn::RefusedStream => false,
    })
}

/// Envoy's back-off: a random wait up to base × 2^(try-1), at most 10 × base.
async fn backoff(n: u32) {
    let cap = (BACKOFF_BASE_MS << (n - 1).min(4)).min(10 * BACKOFF_BASE_MS);
    let ms = rand::rng().random_range(0..=cap);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The request's headers as they go upstream: without hop-by-hop headers (gRPC's `te:
/// trailers` stays), with an `x-request-id`, after the rule's operations.
fn prepare_headers(headers: &mut HeaderMap, ops: Option<&HeaderOps>) {
    let trailers = headers
        .get("te")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert("te", HeaderValue::from_static("trailers"));
    }
    if !headers.contains_key("x-request-id") {
        let id = request_id();
        if let Ok(v) = HeaderValue::from_str(&id) {
            headers.insert("x-request-id", v);
        }
    }
    if let Some(ops) = ops {
        apply_ops(headers, ops);
    }
}

/// A route destination's request operations, on a request its rule's already went over: as
/// Envoy applies a weighted cluster's before its route's, a header the rule removes or sets
/// ends as the rule leaves it, and one the rule adds to keeps the rule's values after what the
/// destination's operations left (they are taken off, the destination's applied, put back).
fn apply_destination_ops(headers: &mut HeaderMap, ops: &HeaderOps, rule: Option<&HeaderOps>) {
    let ruled = |n: &String| {
        rule.is_some_and(|r| r.remove.contains(n) || r.set.iter().any(|(k, _)| k == n))
    };
    let ops = HeaderOps {
        set: ops.set.iter().filter(|(k, _)| !ruled(k)).cloned().collect(),
        add: ops.add.iter().filter(|(k, _)| !ruled(k)).cloned().collect(),
        remove: ops.remove.iter().filter(|k| !ruled(k)).cloned().collect(),
    };
    let rule_added = take_rule_added(headers, &ops, rule);
    apply_ops(headers, &ops);
    for (name, values) in rule_added {
        for v in values {
            headers.append(name.clone(), v);
        }
    }
}

/// The values the rule's `add` appended to headers the destination's `ops` touch: taken off
/// the end of each (apply_ops appends what parses, in order).
fn take_rule_added(
    headers: &mut HeaderMap,
    ops: &HeaderOps,
    rule: Option<&HeaderOps>,
) -> Vec<(HeaderName, Vec<HeaderValue>)> {
    let Some(rule) = rule else {
        return Vec::new();
    };
    let touched = |n: &str| {
        ops.remove.iter().any(|k| k == n) || ops.set.iter().chain(&ops.add).any(|(k, _)| k == n)
    };
    let mut names: Vec<HeaderName> = rule
        .add
        .iter()
        .filter(|(k, v)| touched(k) && HeaderValue::from_str(v).is_ok())
        .filter_map(|(k, _)| HeaderName::from_bytes(k.as_bytes()).ok())
        .collect();
    names.dedup();
    let mut taken = Vec::new();
    for name in names {
        let added = rule
            .add
            .iter()
            .filter(|(k, v)| name == k.as_str() && HeaderValue::from_str(v).is_ok())
            .count();
        let mut all: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        let theirs = all.split_off(all.len().saturating_sub(added));
        headers.remove(&name);
        for v in all {
            headers.append(name.clone(), v);
        }
        taken.push((name, theirs));
    }
    taken
}

/// VirtualService header operations: remove, then set (replace), then add (append).
fn apply_ops(headers: &mut HeaderMap, ops: &HeaderOps) {
    for n in &ops.remove {
        headers.remove(n.as_str());
    }
    let parse = |(k, v): &(String, String)| {
        Some((
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in ops.set.iter().filter_map(parse) {
        headers.insert(k, v);
    }
    for (k, v) in ops.add.iter().filter_map(parse) {
        headers.append(k, v);
    }
}

/// A random `x-request-id`: a UUID v4 (version 4, variant 10), as Envoy generates, written in
/// one go (it is made for every request that comes without one).
fn request_id() -> String {
    let r: u128 = rand::rng().random();
    let time_low = (r >> 96) as u32;
    let time_mid = (r >> 80) as u16;
    let time_hi = (r >> 68) as u16 & 0x0fff;
    let clock_seq = ((r >> 52) as u16 & 0x3fff) | 0x8000;
    let node = (r as u64) & 0xffff_ffff_ffff;
    format!("{time_low:08x}-{time_mid:04x}-4{time_hi:03x}-{clock_seq:04x}-{node:012x}")
}

/// hyper's error says whether the upstream refused the HTTP/2 stream (safe to retry).
trait RefusedStream {
    fn source_is_refused_stream(&self) -> bool;
}

impl RefusedStream for hyper::Error {
    fn source_is_refused_stream(&self) -> bool {
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            if let Some(h2) = s.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = s.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_header_the_rule_adds_to_keeps_the_rule_values_after_the_destination_ops() {
        let ops = |set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]| HeaderOps {
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            add: add
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
        };
        let rule = ops(
            &[("x-set", "rule")],
            &[("x-both", "rule"), ("x-gone", "rule")],
            &[],
        );
        let mut h = HeaderMap::new();
        h.append("x-both", HeaderValue::from_static("client"));
        h.append("x-gone", HeaderValue::from_static("client"));
        apply_ops(&mut h, &rule);
        let dest = ops(&[("x-both", "dest"), ("x-set", "dest")], &[], &["x-gone"]);
        apply_destination_ops(&mut h, &dest, Some(&rule));
        let values = |n: &str| -> Vec<&str> {
            h.get_all(n)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        // Envoy: the destination's set, then the rule's add.
        assert_eq!(values("x-both"), ["dest", "rule"]);
        // The destination's remove, then the rule's add.
        assert_eq!(values("x-gone"), ["rule"]);
        // The rule's set wins.
        assert_eq!(values("x-set"), ["rule"]);
    }
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_grpc_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-request-id", HeaderValue::from_static("given"));
        prepare_headers(&mut h, None);
        assert!(h.get("x-private").is_none() && h.get("upgrade").is_none());
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert_eq!(
            h.get("x-request-id").map(|v| v.as_bytes()),
            Some(&b"given"[..])
        );
    }

    #[test]
    fn header_operations_remove_then_set_then_add() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("old"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let ops = HeaderOps {
            set: vec![("x-a".into(), "new".into())],
            add: vec![("x-a".into(), "more".into())],
            remove: vec!["x-gone".into()],
        };
        apply_ops(&mut h, &ops);
        let values: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(values, vec!["new", "more"]);
        assert!(h.get("x-gone").is_none());
    }

    #[test]
    fn upstream_requests_are_origin_form_over_http1_and_absolute_over_http2() {
        let (parts, _) = Request::builder()
            .uri("/a?b=1")
            .header("host", "reviews:9080")
            .body(())
            .expect("request")
            .into_parts();
        let empty = || Full::new(Bytes::new()).map_err(|n| match n {}).boxed();
        let h1 = upstream_request(&parts, empty(), false);
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.headers()["host"], "reviews:9080");
        let h2 = upstream_request(&parts, empty(), true);
        assert_eq!(h2.uri(), "http://reviews:9080/a?b=1");
        assert!(h2.headers().get("host").is_none());
    }

    #[test]
    fn grpc_timeouts_in_every_unit() {
        let t = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            grpc_timeout_ms(&h)
        };
        assert_eq!(t("100m"), Some(100));
        assert_eq!(t("2S"), Some(2000));
        assert_eq!(t("1M"), Some(60_000));
        assert_eq!(t("1500000u"), Some(1500));
        assert_eq!(t("x"), None);
        assert_eq!(t("10q"), None);
    }

    #[test]
    fn request_ids_look_like_uuids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(request_id(), id);
    }
}
