//! The TLS configs in force, built once per certificate and published on a watch channel: each
//! new connection takes the current ones, existing connections keep theirs.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;

use super::{client_base, hbone_client_base, hbone_server_config, provider, server_config, Error};
use crate::spiffe::SpiffeId;

/// Everything a data path needs to speak mTLS as this workload.
pub struct Configs {
    pub spiffe: SpiffeId,
    pub not_after: SystemTime,
    pub roots: Arc<RootCertStore>,
    /// Outbound base config (client cert, ALPN); the per-endpoint verifier is set on a clone.
    pub client: Arc<ClientConfig>,
    /// Inbound mTLS termination (client certs required and verified against the roots).
    pub server: Arc<ServerConfig>,
    /// HBONE (TLS 1.3, h2): the client base (verifier set per destination) and the 15008 server.
    pub hbone_client: Arc<ClientConfig>,
    pub hbone_server: Arc<ServerConfig>,
}

impl Configs {
    pub fn trust_domain(&self) -> &str {
        self.spiffe.trust_domain()
    }
}

#[derive(Default)]
pub struct Store {
    current: watch::Sender<Option<Arc<Configs>>>,
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Builds configs for a certificate; on error the current ones stay.
    pub fn install(
        &self,
        spiffe: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'_>,
        roots: &[CertificateDer<'static>],
        not_after: SystemTime,
    ) -> Result<(), Error> {
        let signer = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(Error::Key)?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|_| Error::KeyMismatch)?;
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).map_err(Error::Root)?;
        }
        let (certified, roots) = (Arc::new(certified), Arc::new(store));
        let configs = Configs {
            spiffe,
            not_after,
            client: client_base(&certified, &roots)?,
            server: server_config(&certified, &roots)?,
            hbone_client: hbone_client_base(&certified, &roots)?,
            hbone_server: hbone_server_config(&certified, &roots)?,
            roots,
        };
        self.current.send_replace(Some(Arc::new(configs)));
        Ok(())
    }

    pub fn current(&self) -> Option<Arc<Configs>> {
        self.current.borrow().clone()
    }
}
