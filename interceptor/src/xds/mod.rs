//! mesh::XdsSource: the mesh table from istiod over ADS (SPEC section 10), beside the file
//! source and writing the same model. Delta xDS (istiod's default) or state of the world;
//! subscribes to clusters (CDS, subset clusters too), their endpoints (EDS), the routes of
//! istiod's outbound listeners (LDS: VirtualService TCP routes, the catch-all) and the DNS name
//! table (NDS). Every
//! response is applied whole or not at all: one that cannot be applied is NACKed with the
//! reason and the table in force stays. The accepted state is persisted, so a VM that boots
//! while istiod is unreachable serves the last table; a dead control plane leaves it serving.

mod cache;
pub mod inbound;
pub mod listeners;
pub mod node;
pub mod resources;
mod routes;
mod state;
pub mod status;

pub use state::{Accepted, State};
pub use status::{Connection, Status, XdsStatus};

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use interceptor_proto::envoy::config::core::v3::Node;
use interceptor_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use interceptor_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use interceptor_proto::google::protobuf::Any;
use interceptor_proto::google::rpc::Status as RpcStatus;
use interceptor_proto::type_url;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::bundle::Bundle;
use crate::channel;
use crate::health;
use crate::identity;
use crate::mesh::{self, SourceId};
use crate::readiness::Readiness;
use resources::Invalid;

/// The readiness condition this source meets once a table from istiod is in force.
pub const READY: &str = "istiod table";

/// Which ADS variant to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Delta xDS (istiod's default since 1.22).
    #[default]
    Delta,
    /// State of the world.
    Sotw,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Channel(#[from] channel::Error),
    #[error("istiod: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
}

/// Short names of the types, for status and metrics.
pub fn short_type(url: &str) -> &'static str {
    match url {
        type_url::CLUSTER => "clusters",
        type_url::LISTENER => "listeners",
        type_url::ENDPOINT => "endpoints",
        type_url::NAME_TABLE => "names",
        routes::ROUTE => "routes",
        _ => "other",
    }
}

/// Reconnect delays: 10 ms doubling to 15 s, each jittered down by up to half (SPEC 10).
struct Backoff {
    next: Duration,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How long after a push the accepted state is written to disk (pushes in between coalesce).
const PERSIST_AFTER: Duration = Duration::from_secs(1);
/// Pushes of more resources than this leave decoding garbage worth handing back.
const BIG_PUSH: usize = 1000;

impl Backoff {
    fn new() -> Self {
        Self {
            next: BACKOFF_FIRST,
        }
    }
    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
    fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

pub struct XdsSource {
    bundle: Arc<Bundle>,
    store: Arc<mesh::Store>,
    identity: Arc<identity::Store>,
    status: Arc<Status>,
    readiness: Arc<Readiness>,
    node: Node,
    protocol: Protocol,
    cache: Option<PathBuf>,
    options: mesh::Options,
    /// The application's probe: every transition is reported to istiod, and again on every
    /// new stream.
    health: Option<Arc<health::Health>>,
}

/// What one stream did.
#[derive(Default)]
struct Session {
    /// At least one response arrived: the server is there, start the backoff over.
    answered: bool,
    acked: BTreeSet<&'static str>,
    eds: BTreeSet<String>,
    /// The route configurations subscribed to (the HTTP listeners').
    rds: BTreeSet<String>,
    persist_due: Option<tokio::time::Instant>,
    /// Applied to the state, not yet in force: responses that arrived back to back are put in
    /// force together (a first sync is three large ones), once nothing more is waiting.
    pending: Vec<Applied>,
}

/// A response applied to the state.
struct Applied {
    ty: &'static str,
    version: String,
    nonce: String,
    resources: usize,
    arrived: Instant,
}

impl Session {
    fn synced(&self) -> bool {
        self.acked.contains("clusters")
            && self.acked.contains("names")
            && (self.eds.is_empty() || self.acked.contains("endpoints"))
    }
}

impl XdsSource {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bundle: Arc<Bundle>,
        store: Arc<mesh::Store>,
        identity: Arc<identity::Store>,
        status: Arc<Status>,
        readiness: Arc<Readiness>,
        node: Node,
        protocol: Protocol,
        cache: Option<PathBuf>,
        options: mesh::Options,
    ) -> Self {
        Self {
            bundle,
            store,
            identity,
            status,
            readiness,
            node,
            protocol,
            cache,
            options,
            health: None,
        }
    }

    /// Reports the application's health on the stream (WorkloadGroup auto-registration).
    pub fn with_health(mut self, health: Arc<health::Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// What to tell istiod of the application now: None until the probe decided once, else the
    /// error detail (None: healthy).
    fn health_report(&self) -> Option<Option<RpcStatus>> {
        let state = self.health.as_ref()?.state();
        let healthy = state.healthy?;
        Some((!healthy).then(|| RpcStatus {
            // istio-agent's: codes.Internal with the probe's message.
            code: tonic::Code::Internal as i32,
            message: if state.message.is_empty() {
                "unhealthy".into()
            } else {
                state.message
            },
            details: vec![],
        }))
    }

    fn health_changes(&self) -> Option<tokio::sync::watch::Receiver<health::ProbeState>> {
        self.health.as_ref().map(|h| h.subscribe())
    }

    /// The state to start from: the persisted table, put in force now, or nothing.
    pub fn restore(&self) -> State {
        let state = State::new(&self.options.namespace, &self.options.cluster_domain);
        let Some(path) = &self.cache else {
            return state;
        };
        match cache::load(path) {
            Ok(Some(accepted)) => {
                let mut state = state.restore(accepted);
                let res = state.resources();
                let services = res.services.len();
                let version = self.store.publish(SourceId::Istiod, res);
                self.readiness.set(READY, true);
                self.status.with(|s| s.from_persisted = true);
                tracing::info!(version, services, file = %path.display(), "mesh table from the persisted istiod table (until istiod answers)");
                state
            }
            Ok(None) => state,
            Err(e) => {
                tracing::warn!(error = %e, "persisted istiod table unusable; starting without");
                state
            }
        }
    }

    /// Streams from istiod until dropped, reconnecting with backoff.
    pub async fn run(self, mut state: State) {
        let mut backoff = Backoff::new();
        loop {
            self.status.connection(Connection::Connecting, None);
            let mut session = Session {
                eds: state.eds_clusters(),
                rds: state.rds_names(),
                ..Default::default()
            };
            let result = match self.protocol {
                Protocol::Delta => self.delta(&mut state, &mut session).await,
                Protocol::Sotw => self.sotw(&mut state, &mut session).await,
            };
            self.flush(&mut state, &mut session);
            if session.persist_due.is_some() {
                self.persist(&state);
            }
            if session.answered {
                backoff.reset();
            }
            let wait = backoff.delay();
            match result {
                // istiod recycles streams (about every 30 min): normal.
                Ok(()) => {
                    tracing::info!("istiod closed the stream; reconnecting");
                    self.status.connection(Connection::Backoff, None);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "istiod unreachable; the table in force stays");
                    self.status
                        .connection(Connection::Backoff, Some(e.to_string()));
                }
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn client(
        &self,
    ) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, Error> {
        let channel =
            channel::connect(&self.bundle, &self.bundle.discovery, &self.identity).await?;
        Ok(AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(channel::MAX_MESSAGE))
    }

    /// Puts what was applied in force: one table for every response in the batch, then their
    /// status, readiness and persistence.
    fn flush(&self, state: &mut State, session: &mut Session) {
        if session.pending.is_empty() {
            return;
        }
        let res = state.resources();
        self.store.publish(SourceId::Istiod, res);
        let pushed: usize = session.pending.iter().map(|a| a.resources).sum();
        for a in std::mem::take(&mut session.pending) {
            self.accepted(session, a);
        }
        if pushed > BIG_PUSH {
            mesh::release_freed_memory();
        }
    }

    fn persist(&self, state: &State) {
        let Some(path) = &self.cache else { return };
        // Encoded here (no copy of the state), written off the runtime.
        let bytes = tokio::task::block_in_place(|| cache::encode(state.accepted()));
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let result = bytes.and_then(|b| cache::save(&path, &b));
            if let Err(e) = result {
                tracing::warn!(error = %e, file = %path.display(), "cannot persist the istiod table");
            }
            mesh::release_freed_memory();
        });
    }

    /// After a response is in force: status, readiness, persistence.
    fn accepted(&self, session: &mut Session, a: Applied) {
        let Applied {
            ty,
            version,
            nonce,
            resources,
            arrived,
        } = a;
        let ms = arrived.elapsed().as_secs_f64() * 1000.0;
        self.status.accepted(ty, &version, &nonce, resources, ms);
        session.acked.insert(ty);
        session
            .persist_due
            .get_or_insert_with(|| tokio::time::Instant::now() + PERSIST_AFTER);
        if session.synced() {
            let first = self
                .status
                .with(|s| !std::mem::replace(&mut s.synced, true));
            self.readiness.set(READY, true);
            if first {
                tracing::info!(
                    services = self.store.load().services.len(),
                    "in sync with istiod"
                );
            }
        }
        tracing::debug!(r#type = ty, version, apply_ms = ms, "istiod push in force");
    }

    fn refused(&self, ty: &'static str, nonce: &str, e: &Invalid) {
        tracing::warn!(r#type = ty, error = %e, "istiod push refused (NACK); the table in force stays");
        self.status.rejected(ty, nonce, &e.to_string());
    }

    async fn delta(&self, state: &mut State, session: &mut Session) -> Result<(), Error> {
        let mut client = self.client().await?;
        let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        let subscribe = |type_url: &str, names: Vec<String>| DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names_subscribe: names,
            ..Default::default()
        };
        // The node goes with the first request of a stream.
        let mut first = subscribe(type_url::CLUSTER, vec![]);
        first.node = Some(self.node.clone());
        let _ = tx.send(first);
        let _ = tx.send(subscribe(type_url::LISTENER, vec![]));
        let _ = tx.send(subscribe(type_url::NAME_TABLE, vec![]));
        if !session.eds.is_empty() {
            let _ = tx.send(subscribe(
                type_url::ENDPOINT,
                session.eds.iter().cloned().collect(),
            ));
        }
        if !session.rds.is_empty() {
            let _ = tx.send(subscribe(
                routes::ROUTE,
                session.rds.iter().cloned().collect(),
            ));
        }
        let health_request = |detail: Option<RpcStatus>| DeltaDiscoveryRequest {
            type_url: type_url::HEALTH.into(),
            error_detail: detail,
            ..Default::default()
        };
        // What this stream was told last: a new stream is told again.
        let mut health = self.health_changes();
        let mut reported = None;
        if let Some(detail) = self.health_report() {
            reported = Some(detail.is_none());
            let _ = tx.send(health_request(detail));
        }
        let mut req = tonic::Request::new(UnboundedReceiverStream::new(rx));
        channel::authorize(
            &self.bundle,
            &mut req,
            channel::presents_certificate(&self.identity),
        )?;
        let mut stream = client.delta_aggregated_resources(req).await?.into_inner();
        self.status.connection(Connection::Connected, None);
        tracing::info!(server = %self.bundle.discovery.addr, "connected to istiod (delta xDS)");
        loop {
            let persist_due = session.persist_due;
            let persist = async move {
                match persist_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let msg = if session.pending.is_empty() {
                tokio::select! {
                    msg = stream.message() => msg,
                    _ = persist => {
                        session.persist_due = None;
                        self.persist(state);
                        continue;
                    }
                    () = health_changed(&mut health, &mut reported) => {
                        if let Some(detail) = self.health_report() {
                            tracing::info!(healthy = detail.is_none(), "application health reported to istiod");
                            let _ = tx.send(health_request(detail));
                        }
                        continue;
                    }
                }
            } else {
                match ready_now(stream.message()) {
                    Some(msg) => msg,
                    None => {
                        self.flush(state, session);
                        continue;
                    }
                }
            };
            let Some(resp): Option<DeltaDiscoveryResponse> = msg? else {
                return Ok(());
            };
            session.answered = true;
            let arrived = Instant::now();
            let ty = short_type(&resp.type_url);
            let mut reply = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            };
            match apply_delta(state, &resp) {
                Ok(resources) => {
                    session.pending.push(Applied {
                        ty,
                        version: resp.system_version_info.clone(),
                        nonce: resp.nonce.clone(),
                        resources,
                        arrived,
                    });
                    let _ = tx.send(reply);
                    if resp.type_url == type_url::CLUSTER {
                        let now = state.eds_clusters();
                        let add: Vec<String> = now.difference(&session.eds).cloned().collect();
                        let remove: Vec<String> = session.eds.difference(&now).cloned().collect();
                        if !add.is_empty() || !remove.is_empty() {
                            let _ = tx.send(DeltaDiscoveryRequest {
                                type_url: type_url::ENDPOINT.into(),
                                resource_names_subscribe: add,
                                resource_names_unsubscribe: remove,
                                ..Default::default()
                            });
                        }
                        session.eds = now;
                    }
                    if resp.type_url == type_url::LISTENER {
                        let now = state.rds_names();
                        let add: Vec<String> = now.difference(&session.rds).cloned().collect();
                        let remove: Vec<String> = session.rds.difference(&now).cloned().collect();
                        if !add.is_empty() || !remove.is_empty() {
                            let _ = tx.send(DeltaDiscoveryRequest {
                                type_url: routes::ROUTE.into(),
                                resource_names_subscribe: add,
                                resource_names_unsubscribe: remove,
                                ..Default::default()
                            });
                        }
                        session.rds = now;
                    }
                }
                Err(e) => {
                    self.refused(ty, &resp.nonce, &e);
                    reply.error_detail = Some(nack(&e));
                    let _ = tx.send(reply);
                }
            }
        }
    }

    async fn sotw(&self, state: &mut State, session: &mut Session) -> Result<(), Error> {
        let mut client = self.client().await?;
        let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        // Per type: the last accepted version and the last nonce seen.
        let mut versions: std::collections::HashMap<String, (String, String)> = Default::default();
        let request =
            |type_url: &str, names: Vec<String>, version: &str, nonce: &str| DiscoveryRequest {
                type_url: type_url.to_string(),
                resource_names: names,
                version_info: version.to_string(),
                response_nonce: nonce.to_string(),
                ..Default::default()
            };
        let mut first = request(type_url::CLUSTER, vec![], "", "");
        first.node = Some(self.node.clone());
        let _ = tx.send(first);
        let _ = tx.send(request(type_url::LISTENER, vec![], "", ""));
        let _ = tx.send(request(type_url::NAME_TABLE, vec![], "", ""));
        if !session.eds.is_empty() {
            let _ = tx.send(request(
                type_url::ENDPOINT,
                session.eds.iter().cloned().collect(),
                "",
                "",
            ));
        }
        if !session.rds.is_empty() {
            let _ = tx.send(request(
                routes::ROUTE,
                session.rds.iter().cloned().collect(),
                "",
                "",
            ));
        }
        let health_request = |detail: Option<RpcStatus>| DiscoveryRequest {
            type_url: type_url::HEALTH.into(),
            error_detail: detail,
            ..Default::default()
        };
        // What this stream was told last: a new stream is told again.
        let mut health = self.health_changes();
        let mut reported = None;
        if let Some(detail) = self.health_report() {
            reported = Some(detail.is_none());
            let _ = tx.send(health_request(detail));
        }
        let mut req = tonic::Request::new(UnboundedReceiverStream::new(rx));
        channel::authorize(
            &self.bundle,
            &mut req,
            channel::presents_certificate(&self.identity),
        )?;
        let mut stream = client.stream_aggregated_resources(req).await?.into_inner();
        self.status.connection(Connection::Connected, None);
        tracing::info!(server = %self.bundle.discovery.addr, "connected to istiod (state-of-the-world xDS)");
        loop {
            let persist_due = session.persist_due;
            let persist = async move {
                match persist_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let msg = if session.pending.is_empty() {
                tokio::select! {
                    msg = stream.message() => msg,
                    _ = persist => {
                        session.persist_due = None;
                        self.persist(state);
                        continue;
                    }
                    () = health_changed(&mut health, &mut reported) => {
                        if let Some(detail) = self.health_report() {
                            tracing::info!(healthy = detail.is_none(), "application health reported to istiod");
                            let _ = tx.send(health_request(detail));
                        }
                        continue;
                    }
                }
            } else {
                match ready_now(stream.message()) {
                    Some(msg) => msg,
                    None => {
                        self.flush(state, session);
                        continue;
                    }
                }
            };
            let Some(resp): Option<DiscoveryResponse> = msg? else {
                return Ok(());
            };
            session.answered = true;
            let arrived = Instant::now();
            let ty = short_type(&resp.type_url);
            let names = |session: &Session| -> Vec<String> {
                match resp.type_url.as_str() {
                    type_url::ENDPOINT => session.eds.iter().cloned().collect(),
                    routes::ROUTE => session.rds.iter().cloned().collect(),
                    _ => vec![],
                }
            };
            match apply_sotw(state, &resp) {
                Ok(resources) => {
                    session.pending.push(Applied {
                        ty,
                        version: resp.version_info.clone(),
                        nonce: resp.nonce.clone(),
                        resources,
                        arrived,
                    });
                    versions.insert(
                        resp.type_url.clone(),
                        (resp.version_info.clone(), resp.nonce.clone()),
                    );
                    let _ = tx.send(request(
                        &resp.type_url,
                        names(session),
                        &resp.version_info,
                        &resp.nonce,
                    ));
                    if resp.type_url == type_url::CLUSTER {
                        let now = state.eds_clusters();
                        if now != session.eds {
                            session.eds = now;
                            let (v, n) = versions
                                .get(type_url::ENDPOINT)
                                .cloned()
                                .unwrap_or_default();
                            let _ = tx.send(request(
                                type_url::ENDPOINT,
                                session.eds.iter().cloned().collect(),
                                &v,
                                &n,
                            ));
                        }
                    }
                    if resp.type_url == type_url::LISTENER {
                        let now = state.rds_names();
                        if now != session.rds {
                            session.rds = now;
                            let (v, n) = versions.get(routes::ROUTE).cloned().unwrap_or_default();
                            let _ = tx.send(request(
                                routes::ROUTE,
                                session.rds.iter().cloned().collect(),
                                &v,
                                &n,
                            ));
                        }
                    }
                }
                Err(e) => {
                    self.refused(ty, &resp.nonce, &e);
                    let (v, _) = versions.get(&resp.type_url).cloned().unwrap_or_default();
                    let mut r = request(&resp.type_url, names(session), &v, &resp.nonce);
                    r.error_detail = Some(nack(&e));
                    let _ = tx.send(r);
                }
            }
        }
    }
}

/// Waits until the probe's verdict differs from what was last reported on this stream (never,
/// without a probe), and takes it as reported.
async fn health_changed(
    rx: &mut Option<tokio::sync::watch::Receiver<health::ProbeState>>,
    reported: &mut Option<bool>,
) {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        let now = rx.borrow_and_update().healthy;
        if now.is_some() && now != *reported {
            *reported = now;
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The future's output if it is ready without waiting. A tonic stream keeps its progress in
/// itself, so a message that is not there yet is not lost by asking.
fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// A NACK's error detail: INVALID_ARGUMENT with the reason.
fn nack(e: &Invalid) -> RpcStatus {
    RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message: e.to_string(),
        details: vec![],
    }
}

/// From this many resources on, a response is decoded on every core: a first sync of a large
/// mesh is mostly protobuf decoding, and the table is not in force until it is done.
const PARALLEL_DECODE_FROM: usize = 512;

fn decode_all<T: Send>(
    resources: &[&Any],
    decode: impl Fn(&Any) -> Result<T, Invalid> + Sync,
) -> Result<Vec<T>, Invalid> {
    let one = |part: &[&Any]| {
        part.iter()
            .map(|a| decode(a))
            .collect::<Result<Vec<T>, _>>()
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    if resources.len() < PARALLEL_DECODE_FROM || workers < 2 {
        return one(resources);
    }
    let chunk = resources.len().div_ceil(workers);
    let mut parts = resources.chunks(chunk);
    let first = parts.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let others: Vec<_> = parts.map(|p| scope.spawn(|| one(p))).collect();
        let mut out = one(first)?;
        for h in others {
            let part = h.join().unwrap_or_else(|_| {
                Err(Invalid {
                    resource: "(response)".into(),
                    message: "decoder thread panicked".into(),
                })
            })?;
            out.extend(part);
        }
        Ok(out)
    })
}

/// Applies a delta response: everything decoded first, so a bad resource changes nothing.
/// Returns how many resources it carried.
pub fn apply_delta(state: &mut State, resp: &DeltaDiscoveryResponse) -> Result<usize, Invalid> {
    let anys: Vec<&Any> = resp
        .resources
        .iter()
        .filter_map(|r| r.resource.as_ref())
        .collect();
    apply(state, &resp.type_url, &anys, Some(&resp.removed_resources))
}

/// Decodes and applies one response's resources; `removed` is None for state of the world (CDS
/// and NDS whole, EDS possibly partial).
fn apply(
    state: &mut State,
    type_url: &str,
    anys: &[&Any],
    removed: Option<&[String]>,
) -> Result<usize, Invalid> {
    match type_url {
        type_url::CLUSTER => {
            let clusters = decode_all(anys, resources::cluster)?;
            let clusters = clusters.into_iter().flatten().collect();
            match removed {
                Some(removed) => state.update_clusters(clusters, removed),
                None => state.replace_clusters(clusters),
            }
        }
        type_url::LISTENER => {
            let routes = decode_all(anys, listeners::listener)?;
            match removed {
                Some(removed) => state.update_listeners(routes, removed),
                None => state.replace_listeners(routes),
            }
        }
        routes::ROUTE => {
            let configs = decode_all(anys, routes::route_configuration)?;
            match removed {
                Some(removed) => state.update_routes(configs, removed),
                None => state.replace_routes(configs),
            }
        }
        type_url::ENDPOINT => {
            let eps = decode_all(anys, resources::load_assignment)?;
            state.update_assignments(eps, removed.unwrap_or_default());
        }
        type_url::NAME_TABLE => {
            // One resource, the whole table, named "" (SPEC 10): every resource sent counts.
            let mut names = std::collections::BTreeMap::new();
            for t in decode_all(anys, resources::name_table)? {
                names.extend(t);
            }
            state.replace_names(names);
        }
        _ => {}
    }
    Ok(anys.len())
}

/// Applies a state-of-the-world response (CDS and NDS whole, EDS possibly partial).
pub fn apply_sotw(state: &mut State, resp: &DiscoveryResponse) -> Result<usize, Invalid> {
    let anys: Vec<&Any> = resp.resources.iter().collect();
    apply(state, &resp.type_url, &anys, None)
}
