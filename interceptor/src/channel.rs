//! The gRPC channel to istiod (xDS and the CA): TLS to the discovery address, istiod's
//! certificate verified against root-cert.pem with the discovery host as its name
//! (`istiod.istio-system.svc`), ALPN h2, our mesh certificate as the client certificate once we
//! hold one. Per-RPC metadata: the bearer token, re-read on every call (it is rotated and
//! expires in an hour), and ClusterID. Never plaintext.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::bundle::{Bundle, Discovery};
use crate::identity;

/// Why a channel could not be made or a call could not be authorised.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {message}", file.display())]
    Roots {
        message: String,
        file: std::path::PathBuf,
    },
    #[error("{0:?} is not a valid TLS server name")]
    Name(String),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("connecting to {addr}: {message}")]
    Connect {
        addr: std::net::SocketAddr,
        /// The whole chain: tonic says "transport error", the cause (TLS refusing istiod's
        /// certificate, a refused connection) is underneath.
        message: String,
    },
    #[error("{0}")]
    Token(crate::bundle::Error),
    #[error("the istio-token is empty")]
    EmptyToken,
    #[error("the token or cluster id is not a valid header value")]
    Header,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// istiod sends big pushes (10k services); Istio's own limit.
pub const MAX_MESSAGE: usize = 200 * 1024 * 1024;

/// The TLS client config for `to`: root-cert.pem, h2, and our certificate when we have one.
fn client_config(
    b: &Bundle,
    identity: &identity::Store,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let roots_err = |message: String| Error::Roots {
        message,
        file: b.paths.root_cert.clone(),
    };
    let pem = std::fs::read(&b.paths.root_cert).map_err(|e| roots_err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| roots_err(e.to_string()))?;
        roots.add(cert).map_err(|e| roots_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(roots_err("no PEM certificate".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_root_certificates(roots);
    let mut cfg = match usable_certificate(identity) {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(Error::Tls)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Our certificate if it can authenticate us: an expired one would only fail the handshake,
/// and the token speaks instead.
fn usable_certificate(identity: &identity::Store) -> Option<Arc<identity::Identity>> {
    identity
        .current()
        .filter(|id| id.not_after > std::time::SystemTime::now())
}

/// Whether calls on a channel made now present a certificate (for `authorize`).
pub fn presents_certificate(identity: &identity::Store) -> bool {
    usable_certificate(identity).is_some()
}

/// A channel to `to` (istiod, or the CA), over TLS, connected now.
pub async fn connect(
    b: &Bundle,
    to: &Discovery,
    identity: &identity::Store,
) -> Result<Channel, Error> {
    let config = client_config(b, identity)?;
    let name = ServerName::try_from(to.host.clone()).map_err(|_| Error::Name(to.host.clone()))?;
    let addr = to.addr;
    let connector = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        let (config, name) = (config.clone(), name.clone());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    // The URI is only a label: the connector decides where the bytes go.
    Endpoint::from_static("http://istiod.interceptor.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        // A first push of a large mesh is tens of MB: grow the HTTP/2 window with the
        // bandwidth-delay product instead of one 64 KiB window per round trip.
        .http2_adaptive_window(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| Error::Connect {
            addr,
            message: chain(&e),
        })
}

/// An error and its causes, innermost last.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Sets the bearer token (read now) and ClusterID on a call. With a mesh certificate to
/// present (`has_certificate`), a missing, empty or unusable token is left out: the certificate
/// authenticates (the token expires within the hour; the certificate is renewed).
pub fn authorize<T>(
    b: &Bundle,
    req: &mut tonic::Request<T>,
    has_certificate: bool,
) -> Result<(), Error> {
    let token = match b.token() {
        Ok(t) if !t.is_empty() => Some(t),
        Ok(_) if !has_certificate => return Err(Error::EmptyToken),
        Err(e) if !has_certificate => return Err(Error::Token(e)),
        _ => None,
    };
    let m = req.metadata_mut();
    if let Some(token) = token {
        match format!("Bearer {token}").parse() {
            Ok(v) => {
                m.insert("authorization", v);
            }
            Err(_) if has_certificate => {}
            Err(_) => return Err(Error::Header),
        }
    }
    m.insert(
        "clusterid",
        b.cluster_id.parse().map_err(|_| Error::Header)?,
    );
    Ok(())
}
