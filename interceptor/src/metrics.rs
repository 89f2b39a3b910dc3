//! Connection counters the TCP data paths bump; the admin endpoint exposes them with whatever it
//! reads at scrape time. Istio's standard TCP metric names and labels (I: istio.io docs,
//! "Istio Standard Metrics"), so existing dashboards and alerts apply to VMs too. Every typed
//! "no" of a data path (a dial that failed, a connection refused) is counted by its reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Who reports a connection, in Istio's terms.
pub const SOURCE: &str = "source";
pub const DESTINATION: &str = "destination";
/// Not an Istio reporter: the east-west gateway, which sees neither end's identity.
pub const GATEWAY: &str = "gateway";
/// A principal nobody proved (plaintext, or the gateway's view).
pub const UNKNOWN: &str = "unknown";

/// One end of a request or connection, as Istio's telemetry names it (istio_stats.cc
/// `populatePeerInfo`): a part nobody knows is `unknown`, a missing canonical revision
/// `latest`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub cluster: Arc<str>,
}

impl Default for Peer {
    fn default() -> Self {
        static NOBODY: std::sync::LazyLock<Peer> = std::sync::LazyLock::new(|| {
            let unknown: Arc<str> = UNKNOWN.into();
            Peer {
                workload: unknown.clone(),
                namespace: unknown.clone(),
                app: unknown.clone(),
                version: unknown.clone(),
                canonical_service: unknown.clone(),
                canonical_revision: "latest".into(),
                cluster: unknown,
            }
        });
        NOBODY.clone()
    }
}

impl Peer {
    /// From a workload's name, namespace, labels and cluster (the canonical service and
    /// revision as istiod derives them, `crate::baggage`).
    pub fn new(
        workload: Option<&str>,
        namespace: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
        cluster: Option<&str>,
    ) -> Self {
        let known =
            |s: Option<&str>| -> Arc<str> { s.filter(|s| !s.is_empty()).unwrap_or(UNKNOWN).into() };
        let label = |k: &str| known(labels.get(k).map(String::as_str));
        let canonical =
            crate::baggage::Workload::new(namespace.unwrap_or_default(), labels, cluster, workload);
        Peer {
            workload: known(workload),
            namespace: known(namespace),
            app: label("app"),
            version: label("version"),
            canonical_service: known(canonical.service.as_deref()),
            canonical_revision: canonical.revision.as_deref().unwrap_or("latest").into(),
            cluster: known(
                cluster.or_else(|| labels.get("topology.istio.io/cluster").map(String::as_str)),
            ),
        }
    }

    /// A mesh endpoint: its workload's name (a WorkloadEntry's or istiod's `istio.workload`;
    /// an inline endpoint's ServiceEntry), namespace and labels. As Envoy reads istiod's
    /// endpoint metadata, its app and version are its canonical service and revision.
    pub fn of_workload(w: &crate::mesh::Workload) -> Self {
        let name = w.name.rsplit('/').next().unwrap_or_default();
        let name = name.split_once('#').map_or(name, |(n, _)| n);
        let mut p = Peer::new(Some(name), Some(&w.namespace), &w.labels, None);
        p.app = p.canonical_service.clone();
        p.version = p.canonical_revision.clone();
        p
    }

    /// An HBONE peer as its `baggage` names it (ztunnel's telemetry: the canonical service and
    /// revision are also its app and version).
    pub fn of_baggage(w: &crate::baggage::Workload) -> Self {
        let known = |s: &Option<String>| -> Arc<str> { s.as_deref().unwrap_or(UNKNOWN).into() };
        Peer {
            workload: known(&w.name),
            namespace: known(&w.namespace),
            app: known(&w.service),
            version: known(&w.revision),
            canonical_service: known(&w.service),
            canonical_revision: w.revision.as_deref().unwrap_or("latest").into(),
            cluster: known(&w.cluster),
        }
    }

    /// The peer its metadata headers describe (if it sent them), its namespace taken from its
    /// proved identity first, as Istio does.
    pub fn of_peer(exchanged: Option<Peer>, spiffe: Option<&str>) -> Self {
        let by_id = Peer::of_principal(spiffe);
        match exchanged {
            None => by_id,
            Some(mut p) => {
                if &*by_id.namespace != UNKNOWN {
                    p.namespace = by_id.namespace;
                }
                p
            }
        }
    }

    /// A peer known only by its proved identity: its namespace (Istio reads it from the SAN).
    pub fn of_principal(spiffe: Option<&str>) -> Self {
        let namespace = spiffe.and_then(|id| id.split("/ns/").nth(1)?.split('/').next());
        Peer {
            namespace: namespace.unwrap_or(UNKNOWN).into(),
            ..Peer::default()
        }
    }
}

/// Istio's workload labels of both ends and the destination service's name and namespace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Workloads {
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub source_cluster: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub destination_cluster: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
}

impl Default for Workloads {
    fn default() -> Self {
        Workloads::new(&Peer::default(), &Peer::default(), UNKNOWN, UNKNOWN)
    }
}

impl Workloads {
    /// `service` is the destination service's host: a Kubernetes one (`NAME.NS.svc...`) is
    /// named by its first label (and its namespace by the second where none is given), another
    /// by the whole host, as istiod names the cluster's `istio.services` entry.
    pub fn new(source: &Peer, destination: &Peer, service: &str, service_namespace: &str) -> Self {
        let kube = service
            .split_once(".svc.")
            .and_then(|(head, _)| head.split_once('.'));
        let name = kube.map_or(service, |(n, _)| n);
        let service_namespace = match (service_namespace, kube) {
            ("" | UNKNOWN, Some((_, ns))) => ns,
            (given, _) => given,
        };
        Workloads {
            source_workload: source.workload.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            source_canonical_service: source.canonical_service.clone(),
            source_canonical_revision: source.canonical_revision.clone(),
            source_cluster: source.cluster.clone(),
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_app: destination.app.clone(),
            destination_canonical_service: destination.canonical_service.clone(),
            destination_canonical_revision: destination.canonical_revision.clone(),
            destination_cluster: destination.cluster.clone(),
            destination_service_name: name.into(),
            destination_service_namespace: if service_namespace.is_empty() {
                UNKNOWN.into()
            } else {
                service_namespace.into()
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    /// The client's SPIFFE id as proved by its certificate (inbound), or ours (outbound).
    pub source_principal: String,
    /// The server's SPIFFE id as proved by its certificate (outbound), or ours (inbound).
    pub destination_principal: String,
    /// The service host (outbound, gateway) or the local address:port served (inbound).
    pub destination_service: String,
    /// `mutual_tls` or `none`, as Istio labels it.
    pub connection_security_policy: &'static str,
    /// The answering workload's canonical revision (outbound), as Istio's telemetry names
    /// it; `unknown` where no single workload is known (a gateway, a host name, inbound).
    pub destination_version: String,
    #[prometheus(flatten)]
    pub workloads: Workloads,
}

/// Istio's canonical revision of a workload (pkg/config/labels: the
/// `service.istio.io/canonical-revision` label, else `app.kubernetes.io/version`, else
/// `version`, else `latest`).
pub fn canonical_revision(labels: &std::collections::BTreeMap<String, String>) -> String {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| "latest".into())
}

impl TcpLabels {
    pub fn new(reporter: &'static str, destination_service: String, mtls: bool) -> Self {
        let unknown = Peer::default();
        Self {
            workloads: Workloads::new(&unknown, &unknown, &destination_service, UNKNOWN),
            reporter,
            source_principal: UNKNOWN.into(),
            destination_principal: UNKNOWN.into(),
            destination_service,
            connection_security_policy: if mtls { "mutual_tls" } else { "none" },
            destination_version: UNKNOWN.into(),
        }
    }

    pub fn workloads(mut self, workloads: Workloads) -> Self {
        self.workloads = workloads;
        self
    }

    pub fn version(mut self, version: String) -> Self {
        self.destination_version = version;
        self
    }

    pub fn principals(mut self, source: Option<&str>, destination: Option<&str>) -> Self {
        self.source_principal = source.unwrap_or(UNKNOWN).to_string();
        self.destination_principal = destination.unwrap_or(UNKNOWN).to_string();
        self
    }
}

/// Istio's request metric labels, all 25 (sheet 6.2).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    /// The client's SPIFFE id (ours outbound; the proved one inbound, else `unknown`).
    pub source_principal: String,
    /// The server's SPIFFE id (ours inbound; outbound, the one the endpoint is expected to
    /// prove, else `unknown`).
    pub destination_principal: String,
    #[prometheus(flatten)]
    pub workloads: Workloads,
    pub destination_service: String,
    pub destination_version: String,
    /// `http` or `grpc`, as Istio labels them.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The gRPC status number from the response's trailers (or its trailers-only headers);
    /// empty for other requests.
    pub grpc_response_status: &'static str,
    /// Envoy's response flags (`-`: none), as Istio labels them.
    pub response_flags: &'static str,
    /// `mutual_tls` or `none` (reporter destination); `unknown` at the source, as Istio.
    pub connection_security_policy: &'static str,
}

/// Istio's buckets for `istio_request_duration_milliseconds` (istio_stats.cc).
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// Which side of HBONE counted it.
pub const OUTBOUND: &str = "outbound";
pub const INBOUND: &str = "inbound";
/// The inner stream of double HBONE (outbound).
pub const DOUBLE: &str = "double";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

/// A sniffed connection: which way, and what its first bytes said.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Detected {
    pub direction: &'static str,
    pub protocol: &'static str,
}

/// A refusal or failure, by who saw it and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    /// Bytes towards the client (Istio: "sent during response").
    sent: Family<TcpLabels, Counter>,
    /// Bytes from the client (Istio: "received during request").
    received: Family<TcpLabels, Counter>,
    /// Outbound and gateway: one endpoint attempt that failed.
    dial_failures: Family<Reason, Counter>,
    /// Inbound connections refused.
    inbound_refused: Family<Reason, Counter>,
    /// Outbound connections their route sends nowhere.
    outbound_refused: Family<Reason, Counter>,
    /// Gateway connections refused.
    gateway_refused: Family<Reason, Counter>,
    /// HBONE: TLS connections made or accepted (each one handshake), and CONNECT streams.
    hbone_connections: Family<Direction, Counter>,
    hbone_streams: Family<Direction, Counter>,
    /// HBONE connections open now, by direction.
    hbone_open: Family<Direction, Gauge>,
    /// Outbound HTTP requests waiting for a connection (a DestinationRule's breakers).
    pending_requests: Gauge,
    /// Connections to sniffed ports, by what they turned out to speak.
    detected: Family<Detected, Counter>,
    /// HTTP requests routed by the outbound HTTP path.
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            dial_failures: Family::default(),
            inbound_refused: Family::default(),
            outbound_refused: Family::default(),
            gateway_refused: Family::default(),
            hbone_connections: Family::default(),
            hbone_streams: Family::default(),
            hbone_open: Family::default(),
            pending_requests: Gauge::default(),
            detected: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl Metrics {
    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// A connection ended; `from_client`/`to_client` are the bytes relayed each way.
    pub fn closed(&self, labels: &TcpLabels, from_client: u64, to_client: u64) {
        self.closed.get_or_create(labels).inc();
        self.received.get_or_create(labels).inc_by(from_client);
        self.sent.get_or_create(labels).inc_by(to_client);
    }

    /// One HTTP request answered (by the upstream or by us), and how long it took.
    pub fn request(&self, labels: &RequestLabels, took: std::time::Duration) {
        self.requests.get_or_create(labels).inc();
        self.request_duration
            .get_or_create(labels)
            .observe(took.as_secs_f64() * 1000.0);
    }

    /// A request starts (`1`) or stops (`-1`) waiting for an upstream connection.
    pub fn pending_request(&self, delta: i64) {
        self.pending_requests.inc_by(delta);
    }

    pub fn dial_failed(&self, reason: &'static str) {
        self.dial_failures.get_or_create(&Reason { reason }).inc();
    }

    pub fn inbound_refused(&self, reason: &'static str) {
        self.inbound_refused.get_or_create(&Reason { reason }).inc();
    }

    pub fn outbound_refused(&self, reason: &'static str) {
        self.outbound_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Refusals counted elsewhere (the kernel's REGISTRY_ONLY), `n` more of them.
    pub fn outbound_refused_by(&self, reason: &'static str, n: u64) {
        self.outbound_refused
            .get_or_create(&Reason { reason })
            .inc_by(n);
    }

    /// A connection to a sniffed port turned out to speak `protocol` (http1, h2c, tcp, or
    /// silent: nothing within the detection timeout).
    pub fn detected(&self, direction: &'static str, protocol: &'static str) {
        self.detected
            .get_or_create(&Detected {
                direction,
                protocol,
            })
            .inc();
    }

    pub fn gateway_refused(&self, reason: &'static str) {
        self.gateway_refused.get_or_create(&Reason { reason }).inc();
    }

    pub fn hbone_connection(&self, direction: &'static str) {
        self.hbone_connections
            .get_or_create(&Direction { direction })
            .inc();
        self.hbone_open
            .get_or_create(&Direction { direction })
            .inc();
    }

    /// A connection counted by `hbone_connection` ended.
    pub fn hbone_connection_closed(&self, direction: &'static str) {
        self.hbone_open
            .get_or_create(&Direction { direction })
            .dec();
    }

    pub fn hbone_stream(&self, direction: &'static str) {
        self.hbone_streams
            .get_or_create(&Direction { direction })
            .inc();
    }

    /// Adds the families to `registry` (they stay shared with the data paths).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client during the connection",
            self.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client during the connection",
            self.received.clone(),
        );
        registry.register("istio_requests", "HTTP requests", self.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "HTTP request duration",
            self.request_duration.clone(),
        );
        registry.register(
            "interceptor_endpoint_failures",
            "Endpoint attempts that failed (another endpoint is tried), by reason",
            self.dial_failures.clone(),
        );
        registry.register(
            "interceptor_inbound_refused",
            "Inbound connections refused, by reason",
            self.inbound_refused.clone(),
        );
        registry.register(
            "interceptor_outbound_refused",
            "Outbound connections or requests refused: by their route (no_cluster, black_hole), a circuit breaker (overflow, pending_overflow, request_overflow; retry_overflow: a retry not made) or, in the kernel, by REGISTRY_ONLY (registry_only)",
            self.outbound_refused.clone(),
        );
        registry.register(
            "interceptor_upstream_pending_requests",
            "Outbound HTTP requests waiting for an upstream connection (Envoy's upstream_rq_pending_active)",
            self.pending_requests.clone(),
        );
        registry.register(
            "interceptor_protocol_detected",
            "Connections to ports whose protocol is sniffed (no HTTP or TCP declared), by direction and what their first bytes were: http1, h2c, tcp, or silent (nothing within --protocol-detection-timeout: served as TCP)",
            self.detected.clone(),
        );
        registry.register(
            "interceptor_gateway_refused",
            "Gateway connections refused, by reason",
            self.gateway_refused.clone(),
        );
        registry.register(
            "interceptor_hbone_connections",
            "HBONE connections (one TLS handshake each) made (outbound) or accepted (inbound)",
            self.hbone_connections.clone(),
        );
        registry.register(
            "interceptor_hbone_open_connections",
            "HBONE connections open now (outbound: pooled)",
            self.hbone_open.clone(),
        );
        registry.register(
            "interceptor_hbone_streams",
            "HBONE CONNECT streams opened (outbound) or served (inbound)",
            self.hbone_streams.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels_in_the_exposition() {
        let m = Metrics::default();
        let vm = Peer::new(
            Some("billing"),
            Some("a"),
            &[("app".to_string(), "billing".to_string())].into(),
            Some("vms"),
        );
        let l = TcpLabels::new(SOURCE, "product.default.svc.cluster.local".into(), true)
            .principals(Some("spiffe://td/ns/a/sa/vm"), None)
            .version("v2".into())
            .workloads(Workloads::new(
                &vm,
                &Peer::of_principal(Some("spiffe://td/ns/default/sa/product")),
                "product.default.svc.cluster.local",
                "",
            ));
        m.opened(&l);
        m.closed(&l, 10, 20);
        m.inbound_refused("plaintext_strict");
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let labels = "reporter=\"source\",source_principal=\"spiffe://td/ns/a/sa/vm\",destination_principal=\"unknown\",destination_service=\"product.default.svc.cluster.local\",connection_security_policy=\"mutual_tls\",destination_version=\"v2\",source_workload=\"billing\",source_workload_namespace=\"a\",source_app=\"billing\",source_version=\"unknown\",source_canonical_service=\"billing\",source_canonical_revision=\"latest\",source_cluster=\"vms\",destination_workload=\"unknown\",destination_workload_namespace=\"default\",destination_app=\"unknown\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"latest\",destination_cluster=\"unknown\",destination_service_name=\"product\",destination_service_namespace=\"default\"";
        assert!(
            text.contains(&format!("istio_tcp_connections_opened_total{{{labels}}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("istio_tcp_received_bytes_total{{{labels}}} 10")),
            "{text}"
        );
        assert!(
            text.contains(&format!("istio_tcp_sent_bytes_total{{{labels}}} 20")),
            "{text}"
        );
        assert!(
            text.contains("interceptor_inbound_refused_total{reason=\"plaintext_strict\"} 1"),
            "{text}"
        );
    }
}
