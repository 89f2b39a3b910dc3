//! The admin endpoint (Istio's port 15020): readiness, Prometheus metrics, a config dump, and
//! the daemon's side of `interceptor explain` and `interceptor status`. It only reads: the mesh
//! table, the identity, counters, readiness and capture's status, all handed in when it is made.

mod client;
mod explain;

pub use client::{get_json, print_explain, print_inbound, print_status};
pub use explain::{explain, explain_inbound, AnsweredFrom, InboundQuery, InboundVerdict, Verdict};

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::capture;
use crate::dns;
use crate::health;
use crate::identity;
use crate::mesh::{SourceId, SourceStatus, Store};
use crate::metrics::Metrics;
use crate::readiness::{Readiness, ReadinessState};
use crate::xds;

/// Everything the admin endpoint reads. The daemon's parts own the values and share them.
pub struct State {
    pub store: Arc<Store>,
    pub identity: Arc<identity::Store>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// None in a process without a DNS server (the gateway).
    pub dns: Option<Arc<dns::Stats>>,
    pub capture: Arc<capture::Status>,
    pub xds: Option<Arc<xds::Status>>,
    pub ca: Option<Arc<identity::CaStatus>>,
    pub health: Option<Arc<health::Health>>,
    pub network: String,
    /// `--gateway-identity`: what east-west gateways must present for double HBONE.
    pub gateway_identity: Option<crate::spiffe::SpiffeId>,
    pub limits: Arc<crate::net::Limits>,
    pub nameservers: Vec<SocketAddr>,
    /// The daemon's inbound flags and policy subject; None in the gateway.
    pub inbound: Option<crate::route::InboundPolicy>,
    pub started: SystemTime,
    pub restart: crate::fdstore::Restart,
}

impl State {
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    fn status(&self) -> Status {
        let table = self.store.load();
        let id = self.identity.current();
        let readiness = self.readiness.state();
        Status {
            ready: readiness.is_ready(),
            readiness,
            capture: self.capture.info(),
            captured_vips: self.capture.vips(),
            sources: self.store.sources(),
            istiod: self.xds.as_ref().map(|x| x.get()),
            ca: self.ca.as_ref().map(|c| c.get()),
            probe: self.health.as_ref().map(|h| h.state()),
            table: TableStatus {
                version: table.version,
                loaded_unix: table.loaded_unix,
                services: table.services.len(),
                workloads: table.workloads.len(),
                names: table.names.len(),
                reload_errors: self.store.reload_errors(),
            },
            identity: id.map(|id| IdentityStatus {
                spiffe: id.spiffe.to_string(),
                serial: id.serial.clone(),
                not_after_unix: unix(id.not_after),
                expires_in_s: id.expires_in().as_secs(),
            }),
            network: self.network.clone(),
            nameservers: self.nameservers.clone(),
            uptime_s: self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            restart: self.restart,
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub ready: bool,
    pub readiness: ReadinessState,
    pub capture: Option<capture::Info>,
    pub captured_vips: usize,
    #[serde(default)]
    pub sources: BTreeMap<SourceId, SourceStatus>,
    #[serde(default)]
    pub istiod: Option<xds::XdsStatus>,
    /// The Istio CA provider, when it is the identity provider.
    #[serde(default)]
    pub ca: Option<identity::CaState>,
    /// The application's readiness probe, when there is one.
    #[serde(default)]
    pub probe: Option<health::ProbeState>,
    pub table: TableStatus,
    pub identity: Option<IdentityStatus>,
    pub network: String,
    pub nameservers: Vec<SocketAddr>,
    pub uptime_s: u64,
    #[serde(default)]
    pub restart: crate::fdstore::Restart,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TableStatus {
    pub version: u64,
    pub loaded_unix: u64,
    pub services: usize,
    pub workloads: usize,
    pub names: usize,
    pub reload_errors: u64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct IdentityStatus {
    pub spiffe: String,
    #[serde(default)]
    pub serial: String,
    pub not_after_unix: u64,
    pub expires_in_s: u64,
}

/// Values read at scrape time from the table, identity, DNS counters and capture.
struct Pulled(Arc<State>);

impl std::fmt::Debug for Pulled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pulled")
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// One counter family with a single label: `(label value, count)` each.
fn counters<'a>(
    e: &mut DescriptorEncoder,
    (name, help, label): (&str, &str, &str),
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (value, n) in values {
        ConstCounter::new(n).encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

impl Collector for Pulled {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        state_gauges(s, &mut e)?;
        identity_metrics(s, &mut e)?;
        probe_metrics(s, &mut e)?;
        limit_metrics(s, &mut e)?;
        let by_reason = s.store.reload_errors_by_reason();
        counters(
            &mut e,
            (
                "interceptor_mesh_reload_errors",
                "Mesh source loads rejected (the last good table stayed), by reason",
                "reason",
            ),
            crate::mesh::Error::REASONS
                .iter()
                .map(|r| (*r, by_reason.get(r).copied().unwrap_or(0))),
        )?;
        xds_metrics(s, &mut e)?;
        if let Some(st) = &s.dns {
            counters(
                &mut e,
                (
                    "interceptor_dns_requests",
                    "DNS queries by how they were answered",
                    "result",
                ),
                [
                    ("table", &st.table),
                    ("upstream", &st.upstream),
                    ("servfail", &st.servfail),
                    ("formerr", &st.formerr),
                    ("dropped", &st.dropped),
                ]
                .map(|(result, v)| (result, v.load(Ordering::Relaxed))),
            )?;
        }
        Ok(())
    }
}

/// Readiness, the table, capture and restarts.
fn state_gauges(s: &State, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let table = s.store.load();
    for (name, help, v) in [
        (
            "interceptor_ready",
            "1 when programs are attached, the table loaded and listeners up",
            i64::from(s.is_ready()),
        ),
        (
            "interceptor_mesh_table_version",
            "Version of the mesh table in force",
            table.version as i64,
        ),
        (
            "interceptor_mesh_services",
            "Services in the mesh table",
            table.services.len() as i64,
        ),
        (
            "interceptor_mesh_workloads",
            "Workloads in the mesh table",
            table.workloads.len() as i64,
        ),
        (
            "interceptor_capture_vips",
            "(VIP, port) entries in the kernel capture map",
            s.capture.vips() as i64,
        ),
        (
            "interceptor_capture_programs",
            "BPF programs attached",
            s.capture.info().map_or(0, |c| c.programs.len()) as i64,
        ),
        (
            "interceptor_generation",
            "Restarts that took over the previous process's listeners and capture (0: fresh)",
            s.restart.generation as i64,
        ),
        (
            "interceptor_adopted_descriptors",
            "Listeners and links this process adopted from systemd's descriptor store",
            s.restart.adopted as i64,
        ),
    ] {
        gauge(e, name, help, v)?;
    }
    Ok(())
}

/// The certificate and the Istio CA's renewals.
fn identity_metrics(s: &State, e: &mut DescriptorEncoder) -> std::fmt::Result {
    if let Some(id) = s.identity.current() {
        gauge(
            e,
            "interceptor_cert_expiry_seconds",
            "Seconds until the workload certificate expires",
            id.expires_in().as_secs() as i64,
        )?;
    }
    let Some(ca) = &s.ca else {
        return Ok(());
    };
    let ca = ca.get();
    counter(
        e,
        "interceptor_cert_renewals",
        "Certificates issued by the Istio CA and put in force",
        ca.renewals,
    )?;
    counters(
        e,
        (
            "interceptor_cert_renewal_failures",
            "Failed requests to the Istio CA, by reason",
            "reason",
        ),
        ca.failures_by_reason.iter().map(|(r, n)| (r.as_str(), *n)),
    )?;
    if let Some(t) = ca.last_renewal_unix {
        gauge(
            e,
            "interceptor_cert_last_renewal_timestamp_seconds",
            "When the Istio CA last issued this VM's certificate (Unix time)",
            t as i64,
        )?;
    }
    gauge(
        e,
        "interceptor_cert_expired",
        "1 while the certificate is expired and not renewed (outbound mTLS refused)",
        i64::from(ca.expired),
    )
}

/// The application's readiness probe, when there is one.
fn probe_metrics(s: &State, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let Some(h) = &s.health else {
        return Ok(());
    };
    let p = h.state();
    gauge(
        e,
        "interceptor_probe_healthy",
        "The application's readiness probe: 1 healthy, 0 unhealthy, -1 not decided yet",
        p.healthy.map_or(-1, i64::from),
    )?;
    counters(
        e,
        (
            "interceptor_probe_runs",
            "Application probes run, by result",
            "result",
        ),
        [("success", p.probes - p.failures), ("failure", p.failures)],
    )
}

/// Each resource cap: what it refused, what it holds, how far it goes.
fn limit_metrics(s: &State, e: &mut DescriptorEncoder) -> std::fmt::Result {
    counters(
        e,
        (
            "interceptor_limit_refused",
            "New work refused at a resource cap (work in progress went on), by cap",
            "limit",
        ),
        s.limits.all().map(|l| (l.name, l.refused())),
    )?;
    for (name, help, value) in [
        (
            "interceptor_limit_in_use",
            "Work counted against each resource cap now",
            (|l: &crate::net::Limit| l.in_use()) as fn(&crate::net::Limit) -> usize,
        ),
        ("interceptor_limit_max", "Each resource cap", |l| l.max()),
    ] {
        let mut family = e.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for l in s.limits.all() {
            ConstGauge::new(value(l) as i64).encode(family.encode_family(&[("limit", l.name)])?)?;
        }
    }
    Ok(())
}

/// The stream to istiod and what it pushed.
fn xds_metrics(s: &State, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let Some(x) = &s.xds else {
        return Ok(());
    };
    let x = x.get();
    gauge(
        e,
        "interceptor_xds_connected",
        "1 while a stream to istiod is up",
        i64::from(x.connection == xds::Connection::Connected),
    )?;
    gauge(
        e,
        "interceptor_xds_synced",
        "1 once every subscribed type was accepted from istiod",
        i64::from(x.synced),
    )?;
    counter(
        e,
        "interceptor_xds_reconnects",
        "Streams to istiod started again after one ended",
        x.reconnects,
    )?;
    counters(
        e,
        (
            "interceptor_xds_accepted",
            "istiod pushes applied and ACKed, by type",
            "type",
        ),
        x.types.iter().map(|(ty, t)| (ty.as_str(), t.acks)),
    )?;
    counters(
        e,
        (
            "interceptor_xds_rejected",
            "istiod pushes refused (NACKed), by type",
            "type",
        ),
        x.types.iter().map(|(ty, t)| (ty.as_str(), t.nacks)),
    )?;
    let g = ConstGauge::new(x.last_apply_ms);
    g.encode(e.encode_descriptor(
        "interceptor_xds_apply_milliseconds",
        "Time from a decoded istiod response to its table in force, last push",
        None,
        g.metric_type(),
    )?)
}

/// The admin HTTP server.
pub struct Server {
    state: Arc<State>,
    registry: Registry,
}

/// How long an admin client may take to send its request's headers.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Server {
    pub fn new(state: Arc<State>) -> Arc<Self> {
        let mut registry = Registry::default();
        state.metrics.register(&mut registry);
        registry.register_collector(Box::new(Pulled(state.clone())));
        Arc::new(Self { state, registry })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.state.limits.admin.clone();
        crate::net::accept_loop(
            listener,
            "admin",
            Some(limit),
            crate::net::Tasks::Detached,
            move |stream, _| {
                let this = self.clone();
                async move {
                    let service = hyper::service::service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.route(req)) }
                    });
                    // A local client that opens a connection and sends nothing holds a slot
                    // for this long at most.
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(error = %e, "admin connection");
                    }
                }
            },
        )
        .await
    }

    fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
            "/healthz/ready" => {
                let r = self.state.readiness.state();
                if r.is_ready() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", r.reason()),
                    )
                }
            }
            "/stats/prometheus" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut r = text(StatusCode::OK, body);
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    }
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding failed\n".into(),
                    ),
                }
            }
            "/config_dump" => json(&self.config_dump()),
            "/status" => json(&self.state.status()),
            "/explain" => {
                let get = |key: &str| {
                    req.uri()
                        .query()
                        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(key)))
                        .map(percent_decode)
                };
                let sni = get("sni=");
                match get("target=") {
                    Some(t) => match explain(&self.state, &t, sni.as_deref()) {
                        Ok(v) => json(&v),
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    },
                    None => text(
                        StatusCode::BAD_REQUEST,
                        "explain?target=HOST[:PORT]|IP:PORT\n".into(),
                    ),
                }
            }
            "/explain/inbound" => {
                let q = req.uri().query().unwrap_or("");
                let get = |key: &str| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                        .map(percent_decode)
                };
                let (port, identity, source) = (get("port"), get("identity"), get("source"));
                let (method, path, host) = (get("method"), get("path"), get("host"));
                match explain_inbound(
                    &self.state,
                    &InboundQuery {
                        port: port.as_deref(),
                        identity: identity.as_deref(),
                        source: source.as_deref(),
                        method: method.as_deref(),
                        path: path.as_deref(),
                        host: host.as_deref(),
                    },
                ) {
                    Ok(v) => json(&v),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "/healthz/ready /stats/prometheus /config_dump /status /explain?target= \
                 /explain/inbound?port=&identity=&source=&method=&path=&host=\n"
                    .into(),
            ),
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        let s = &self.state;
        serde_json::json!({
            "status": s.status(),
            "mesh": &*s.store.load(),
        })
    }
}

/// `%xx` escapes and `+` of a query value (what curl and our client send).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn json<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
