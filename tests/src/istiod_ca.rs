//! The test control plane's Istio CA (`istio.v1.auth.IstioCertificateService`), behaving as
//! SPEC section 10 says: the caller proves itself with the bearer token or a client certificate
//! from the root; the issued SAN is the caller's identity whatever the CSR asks; the chain is
//! leaf first, root last. Faults can be switched on to see the client refuse bad answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use interceptor_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use interceptor_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use crate::certs::Ca;
use crate::istiod::{Peer, Shared};

/// How the CA answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CaFault {
    #[default]
    None,
    /// Unavailable: the CA is down.
    Down,
    /// A certificate for another identity.
    WrongIdentity,
    /// Only the leaf.
    OneElement,
    /// A chain to another root.
    OtherRoot,
}

/// What the CA was asked and gave.
#[derive(Clone, Debug)]
pub struct Issued {
    pub identity: String,
    pub lifetime: Duration,
    /// How the caller proved itself: "token" or "certificate".
    pub auth: &'static str,
    pub leaf_pem: String,
    pub at: std::time::SystemTime,
}

/// CA state shared with the control plane.
#[derive(Default)]
pub struct CaState {
    /// Who the bearer token stands for.
    pub token_identity: Mutex<String>,
    /// More bearer tokens, each standing for its own identity (several VMs joining one
    /// control plane, as Kubernetes service account tokens do).
    pub more_tokens: Mutex<std::collections::BTreeMap<String, String>>,
    /// Issue for this long whatever the client asks (short lifetimes for rotation tests).
    pub lifetime: Mutex<Option<Duration>>,
    pub fault: Mutex<CaFault>,
    pub issued: Mutex<Vec<Issued>>,
}

struct CaService(Arc<Shared>);

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let shared = &self.0;
        let state = &shared.ca_state;
        let fault = state.fault.lock().unwrap().clone();
        if fault == CaFault::Down {
            return Err(Status::unavailable("CA is down"));
        }
        let token_id = shared.token_identity(&request);
        let cert_ids = request
            .extensions()
            .get::<Peer>()
            .map(|p| p.identities.clone())
            .unwrap_or_default();
        let (identity, auth) = if let Some(id) = token_id {
            (id, "token")
        } else if let Some(id) = cert_ids.first() {
            (id.clone(), "certificate")
        } else {
            return Err(Status::unauthenticated(
                "authenticate failure: no valid token or client certificate",
            ));
        };
        let req = request.into_inner();
        let lifetime = state
            .lifetime
            .lock()
            .unwrap()
            .unwrap_or(Duration::from_secs(req.validity_duration.max(1) as u64));
        let issue_as = match fault {
            CaFault::WrongIdentity => "spiffe://cluster.local/ns/other/sa/someone-else".to_string(),
            _ => identity.clone(),
        };
        let signer: Ca = match fault {
            CaFault::OtherRoot => Ca::new("another root"),
            _ => shared.ca.clone_ca(),
        };
        let leaf = signer
            .sign_csr(&req.csr, &issue_as, lifetime)
            .map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        state.issued.lock().unwrap().push(Issued {
            identity: issue_as,
            lifetime,
            auth,
            leaf_pem: leaf.clone(),
            at: std::time::SystemTime::now(),
        });
        let cert_chain = match fault {
            CaFault::OneElement => vec![leaf],
            _ => vec![leaf, signer.pem()],
        };
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

pub(crate) fn service(
    shared: Arc<Shared>,
) -> IstioCertificateServiceServer<impl IstioCertificateService> {
    IstioCertificateServiceServer::new(CaService(shared))
}
