//! This VM's workload identity. Providers (files now, the Istio CA later) write the `Store`;
//! data paths read the identity in force for each new connection.

mod files;
mod spiffe;

pub use files::{FileProvider, CERT_CHAIN, KEY, ROOT_CERT};
pub use spiffe::{uri_sans, SpiffeId};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: missing")]
    Missing(PathBuf),
    #[error("{file}: cannot read: {source}")]
    Unreadable {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("{key} does not match the leaf certificate of {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{file}: certificate expired at {not_after}")]
    Expired { file: PathBuf, not_after: String },
    #[error("{file}: certificate not valid before {not_before}")]
    NotYetValid { file: PathBuf, not_before: String },
    #[error("{0}: the leaf certificate has no spiffe:// URI SAN")]
    NoSpiffe(PathBuf),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// A certificate with everything derived from it, built once per rotation.
pub struct Identity {
    pub spiffe: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub not_after: SystemTime,
    /// Outbound base config (client cert, ALPN); the per-connection verifier is set on a clone.
    pub client: Arc<ClientConfig>,
    /// Inbound mTLS termination (client certs required and verified against the roots).
    pub server: Arc<ServerConfig>,
}

impl Identity {
    pub fn new(
        spiffe: SpiffeId,
        certified: Arc<CertifiedKey>,
        roots: Arc<RootCertStore>,
        not_after: SystemTime,
    ) -> Result<Self, Error> {
        let client = crate::tls::client_base(&certified, &roots).map_err(Error::Tls)?;
        let server = crate::tls::server_config(&certified, &roots).map_err(Error::Tls)?;
        Ok(Self {
            spiffe,
            certified,
            roots,
            not_after,
            client,
            server,
        })
    }

    pub fn trust_domain(&self) -> &str {
        self.spiffe.trust_domain()
    }

    pub fn expires_in(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

/// The identity in force. Empty when the VM runs without certificates (plaintext only).
#[derive(Default)]
pub struct Store {
    current: ArcSwapOption<Identity>,
}

impl Store {
    pub fn new(first: Option<Identity>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::new(first.map(Arc::new)),
        })
    }

    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    pub fn set(&self, id: Identity) {
        self.current.store(Some(Arc::new(id)));
    }
}
