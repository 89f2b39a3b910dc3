//! Inbound HTTP: where an AuthorizationPolicy for this VM names what only a request carries
//! (paths, methods, hosts, request headers) and the port is HTTP, the connection (its mTLS
//! terminated, or plaintext where PERMISSIVE lets it in) is served as HTTP/1.1 or HTTP/2 and
//! each request is authorized on its own, as Envoy's HTTP RBAC filter on istiod's inbound HTTP
//! chains: a refused one gets 403 `RBAC: access denied`, the others go to the app over kept
//! connections. Each request is counted and logged (reporter destination).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::http::request::Parts;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{audit, connect_app, Inbound};
use crate::metrics::{self, RequestLabels};
use crate::proxy::http::{
    follow_upgrade, handshake, local_response, request_protocol, serve, set_upgrade,
    strip_hop_by_hop, upgrade_protocol, upstream_request, Counted,
};
use crate::proxy::pool::{Body, ConnLimits, Key, Pooled};
use crate::route::http::authority;
use crate::route::policy::{self, HttpAttrs};
use crate::spiffe::SpiffeId;

/// Envoy's HTTP RBAC answer to a refused request.
const ACCESS_DENIED: &[u8] = b"RBAC: access denied";

/// Who is asking, for every request of one connection.
#[derive(Clone)]
pub(super) struct Client {
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    pub identity: Option<SpiffeId>,
    /// The connection's mTLS was ours to terminate.
    pub mtls: bool,
    /// Requests go to the app as HTTP/2 (its port is HTTP2 or gRPC), else HTTP/1.1.
    pub app_h2: bool,
    /// The port is sniffed: requests go to the app as they came (HTTP/2 or HTTP/1.1), as
    /// istiod's `use_downstream_protocol_config` for such ports.
    pub app_as_client: bool,
    /// The service served here (its host), else the address: `destination_service`.
    pub service: String,
    pub service_namespace: String,
    /// The client's workload as its HBONE stream's `baggage` named it.
    pub baggage: Option<metrics::Peer>,
}

impl Client {
    fn app_h2(&self, version: hyper::Version) -> bool {
        self.app_h2 || (self.app_as_client && version == hyper::Version::HTTP_2)
    }
}

impl Inbound {
    /// Serves one connection as HTTP, request by request, until either side closes it.
    pub(super) async fn serve_http<I>(self: &Arc<Self>, io: I, client: Client)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (peer, dst) = (client.peer, client.dst);
        let this = self.clone();
        let client = Arc::new(client);
        let answer = move |req| {
            let (this, client) = (this.clone(), client.clone());
            async move { this.request(req, &client).await }
        };
        if let Err(e) = serve(io, answer).await {
            tracing::debug!(%peer, %dst, error = %e, "inbound HTTP connection ended with an error");
        }
    }

    async fn request(&self, req: Request<Incoming>, client: &Client) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        // The caller's Istio metadata headers: read and removed before anything sees them.
        let exchanged = crate::metadata_exchange::take(&mut parts.headers);
        let upgrade = upgrade_protocol(&parts).filter(|_| !client.app_h2(parts.version));
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        let decision = self.authorize_request(&parts, client);
        let (mut response, flags) = match decision.allowed {
            false => {
                self.metrics.inbound_refused(decision.reason.label());
                let body = Bytes::from_static(ACCESS_DENIED);
                (local_response(403, body), "-")
            }
            true => {
                self.forward(&mut parts, body, upgrade.as_ref(), client)
                    .await
            }
        };
        strip_hop_by_hop(response.headers_mut());
        follow_upgrade(&mut response, upgrade.as_ref(), client_upgrade);
        let status = response.status().as_u16();
        let source = client.identity.as_ref().map(SpiffeId::as_str);
        // Istio answers with its own headers only to a peer that sent its.
        if let (Some(_), Some(ours)) = (&exchanged, &self.local.headers) {
            ours.add(response.headers_mut());
        }
        let labels = RequestLabels {
            reporter: metrics::DESTINATION,
            source_principal: source.unwrap_or(metrics::UNKNOWN).to_string(),
            destination_principal: self.tls.current().map_or_else(
                || metrics::UNKNOWN.to_string(),
                |id| id.spiffe.as_str().to_string(),
            ),
            workloads: metrics::Workloads::new(
                &metrics::Peer::of_peer(exchanged.or_else(|| client.baggage.clone()), source),
                &self.local.peer,
                &client.service,
                &client.service_namespace,
            ),
            destination_service: client.service.clone(),
            destination_version: metrics::UNKNOWN.into(),
            request_protocol: request_protocol(&parts.headers),
            response_code: status,
            grpc_response_status: "",
            response_flags: flags,
            connection_security_policy: match client.identity.is_some() && client.mtls {
                true => "mutual_tls",
                false => "none",
            },
        };
        tracing::info!(
            peer = %client.peer, service = client.service, identity = source.unwrap_or("-"),
            method = %parts.method, authority = authority(&parts), path = parts.uri.path(),
            status, flags, decision = decision.reason.label(),
            policy = decision.policy.as_deref().unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64, "inbound request"
        );
        Counted::wrap(response, self.metrics.clone(), labels, started, None)
    }

    /// The policy's verdict on this request (AUDIT matches logged).
    fn authorize_request(&self, parts: &Parts, client: &Client) -> policy::Decision {
        let attrs = HttpAttrs {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            target: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            host: authority(parts),
            headers: &parts.headers,
        };
        let decision = policy::authorize(
            &self.store.load(),
            &self.policy,
            &policy::Request {
                port: client.dst.port(),
                identity: client.identity.as_ref(),
                mtls: client.mtls,
                source: client.peer.ip().to_canonical(),
                destination: client.dst.ip().to_canonical(),
                http: Some(&attrs),
            },
        );
        audit(&decision, client.peer, client.dst);
        decision
    }

    /// The request to the app over a kept connection (a new one when none is), and its answer
    /// with Envoy's flags: `UF` the app refused the connection, `UC` it reset before answering.
    async fn forward(
        &self,
        parts: &mut Parts,
        body: Incoming,
        upgrade: Option<&HeaderValue>,
        client: &Client,
    ) -> (Response<Body>, &'static str) {
        let h2 = client.app_h2(parts.version);
        let trailers = parts
            .headers
            .get(hyper::header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut parts.headers);
        if trailers {
            // gRPC needs `te: trailers` to reach the server.
            parts
                .headers
                .insert(hyper::header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(p) = upgrade {
            set_upgrade(&mut parts.headers, p);
        }
        add_client_cert(parts, client, self.tls.current().as_deref());
        let key = Key {
            cluster: format!("inbound|{}||", client.dst.port()),
            endpoint: client.dst.to_string(),
            transport: "app",
            h2,
        };
        let mut conn = match self.app_pool.take(&key) {
            Some(c) => c,
            None => {
                let connected = match connect_app(client.dst, self.app_source4).await {
                    Ok(stream) => handshake(stream, h2, None).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match connected {
                    Ok(s) => Pooled::new(s, ConnLimits::default()),
                    Err(e) => {
                        tracing::debug!(app = %client.dst, error = %e, "inbound HTTP: the app is unreachable");
                        self.metrics.inbound_refused("app_unreachable");
                        let body = "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
                        return (
                            local_response(503, Bytes::from_static(body.as_bytes())),
                            "UF",
                        );
                    }
                }
            }
        };
        match conn.send(upstream_request(parts, body.boxed(), h2)).await {
            Ok(resp) => {
                let (head, body) = resp.into_parts();
                let body = if head.status == hyper::StatusCode::SWITCHING_PROTOCOLS {
                    body.boxed()
                } else {
                    self.app_pool.return_with(key, conn, body, None)
                };
                (Response::from_parts(head, body), "-")
            }
            Err(e) => {
                tracing::debug!(app = %client.dst, error = %e, "inbound HTTP: the app reset before answering");
                let body = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
                (
                    local_response(503, Bytes::from_static(body.as_bytes())),
                    "UC",
                )
            }
        }
    }
}

/// `x-forwarded-client-cert` as Istio's sidecar inbound sets it (APPEND_FORWARD with the
/// URI): the proved client identity, for apps that read who called them.
fn add_client_cert(parts: &mut Parts, client: &Client, ours: Option<&crate::tls::Configs>) {
    let (Some(id), Some(ours)) = (&client.identity, ours) else {
        // Plaintext: a client-sent header would be a forgery (SANITIZE).
        parts.headers.remove("x-forwarded-client-cert");
        return;
    };
    let by = format!("By={};URI={}", ours.spiffe.as_str(), id.as_str());
    let value = match parts.headers.get("x-forwarded-client-cert") {
        Some(prev) => format!("{},{by}", String::from_utf8_lossy(prev.as_bytes())),
        None => by,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        parts.headers.insert("x-forwarded-client-cert", v);
    }
}
