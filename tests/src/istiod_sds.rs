//! The SDS half of what a sidecar's bootstrap points at. On a real node istio-agent serves it
//! (over a Unix socket, the cluster `sds-grpc`) with the certificate it got from the CA; for an
//! Envoy peer taking the test control plane's clusters, the control plane serves it: `default`
//! (the workload's certificate and key) and `ROOTCA` (the mesh root), the two names istiod's
//! clusters ask for.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use interceptor_proto::envoy::config::core::v3::data_source::Specifier;
use interceptor_proto::envoy::config::core::v3::DataSource;
use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::secret::Type as SecretType;
use interceptor_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate,
};
use interceptor_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use interceptor_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use interceptor_proto::google::protobuf::Any;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::istiod::Shared;

pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What the SDS server hands out (PEM).
#[derive(Clone)]
pub struct Secrets {
    pub chain: Vec<u8>,
    pub key: Vec<u8>,
    pub root: Vec<u8>,
}

impl Secrets {
    /// cert-chain.pem, key.pem and root-cert.pem of `dir`.
    pub fn from_dir(dir: &Path) -> Self {
        let read = |f: &str| std::fs::read(dir.join(f)).expect("secret file");
        Self {
            chain: read("cert-chain.pem"),
            key: read("key.pem"),
            root: read("root-cert.pem"),
        }
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        let inline = |b: &[u8]| DataSource {
            specifier: Some(Specifier::InlineBytes(b.to_vec())),
            ..Default::default()
        };
        let r#type = match name {
            "default" => SecretType::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(&self.chain)),
                private_key: Some(inline(&self.key)),
                ..Default::default()
            }),
            "ROOTCA" => SecretType::ValidationContext(CertificateValidationContext {
                trusted_ca: Some(inline(&self.root)),
                ..Default::default()
            }),
            _ => return None,
        };
        Some(Secret {
            name: name.to_string(),
            r#type: Some(r#type),
        })
    }
}

pub(crate) struct Sds(pub(crate) Arc<Shared>);

type SotwStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = SotwStream;
    type DeltaSecretsStream = DeltaStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        let Some(secrets) = self.0.secrets() else {
            return Err(Status::unavailable("no secrets to serve"));
        };
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut nonce = 0u64;
            let mut asked: Vec<String> = Vec::new();
            while let Some(Ok(req)) = incoming.next().await {
                // An ACK (a nonce, the same names) needs no answer.
                if !req.response_nonce.is_empty() && req.resource_names == asked {
                    continue;
                }
                asked = req.resource_names.clone();
                nonce += 1;
                let resources = asked
                    .iter()
                    .filter_map(|n| secrets.secret(n))
                    .map(|s| Any {
                        type_url: SECRET_TYPE.into(),
                        value: s.encode_to_vec(),
                    })
                    .collect();
                let resp = DiscoveryResponse {
                    version_info: "1".into(),
                    resources,
                    type_url: SECRET_TYPE.into(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "SDS here is state of the world, as istio-agent's",
        ))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("SDS here is streamed"))
    }
}

pub(crate) fn service(shared: Arc<Shared>) -> SecretDiscoveryServiceServer<Sds> {
    SecretDiscoveryServiceServer::new(Sds(shared))
}
