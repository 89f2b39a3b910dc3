//! This VM's workload identity. Providers (files now, the Istio CA next) turn PEM into an
//! `Identity` with `Identity::from_pem` and set it in the `Store`; the store hands every new
//! identity to the `Credentials` it was made with (TLS, which builds its configs from it) before
//! anyone sees it, so a certificate TLS cannot use never becomes current. Identity knows nothing
//! of TLS configs and TLS nothing of providers: the daemon joins the two.

mod ca;
mod files;

pub use ca::{
    renew_at, AnswerError, CaProvider, CaState, CaStatus, KeyKind, Settings as CaSettings,
};
pub use files::{FileProvider, CERT_CHAIN, KEY, ROOT_CERT};

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{uri_sans, SpiffeId};

/// The readiness condition of a provider that must fetch a certificate (the Istio CA): met while
/// one is in force and not expired.
pub const READY: &str = "certificate";

/// Which of the three PEM inputs a problem is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Chain,
    Key,
    Roots,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Chain => "certificate chain",
            Part::Key => "private key",
            Part::Roots => "root certificates",
        })
    }
}

/// Why PEM input is not a usable identity.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PemError {
    #[error("{0}: no PEM certificate")]
    NoCertificate(Part),
    #[error("{part}: {message}")]
    Invalid { part: Part, message: String },
    #[error("no usable private key: {0}")]
    Key(String),
    #[error("the private key does not match the leaf certificate")]
    KeyMismatch,
    #[error("certificate expired at {0}")]
    Expired(String),
    #[error("certificate not valid before {0}")]
    NotYetValid(String),
    #[error("the leaf certificate has no spiffe:// URI SAN")]
    NoSpiffe,
}

impl PemError {
    /// The input the problem is in (for naming the file it came from).
    pub fn part(&self) -> Part {
        match self {
            PemError::NoCertificate(p) | PemError::Invalid { part: p, .. } => *p,
            PemError::Key(_) | PemError::KeyMismatch => Part::Key,
            _ => Part::Chain,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: missing")]
    Missing(PathBuf),
    #[error("{file}: cannot read: {source}")]
    Unreadable {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Pem { file: PathBuf, source: PemError },
    #[error("the certificate was refused for TLS: {0}")]
    Refused(String),
}

/// A certificate, its key and the roots it chains to, checked.
pub struct Identity {
    pub spiffe: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number, hex: what a peer sees, for logs and status.
    pub serial: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("spiffe", &self.spiffe)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn certs(pem: &[u8], part: Part) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Invalid {
            part,
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate(part));
    }
    Ok(certs)
}

fn unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

impl Identity {
    /// Checks PEM input the way every provider needs it checked: a chain (leaf first) whose
    /// leaf is valid now, carries a SPIFFE URI SAN and matches the key; roots that are
    /// certificates.
    pub fn from_pem(chain: &[u8], key: &[u8], roots: &[u8]) -> Result<Self, PemError> {
        let chain = certs(chain, Part::Chain)?;
        let roots = certs(roots, Part::Roots)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| PemError::Key(e.to_string()))?;
        let leaf = &chain[0];
        let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| PemError::Invalid {
            part: Part::Chain,
            message: format!("leaf certificate: {e}"),
        })?;
        let validity = parsed.validity();
        let (not_before, not_after) = (
            unix(validity.not_before.timestamp()),
            unix(validity.not_after.timestamp()),
        );
        let now = SystemTime::now();
        if now > not_after {
            return Err(PemError::Expired(validity.not_after.to_string()));
        }
        if now < not_before {
            return Err(PemError::NotYetValid(validity.not_before.to_string()));
        }
        let spiffe = uri_sans(leaf)
            .into_iter()
            .next()
            .ok_or(PemError::NoSpiffe)?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| PemError::Key(e.to_string()))?;
        let spki = signer
            .public_key()
            .ok_or_else(|| PemError::Key("no public key".into()))?;
        if spki.as_ref() != parsed.tbs_certificate.subject_pki.raw {
            return Err(PemError::KeyMismatch);
        }
        let mut anchors = rustls::RootCertStore::empty();
        for r in &roots {
            anchors.add(r.clone()).map_err(|e| PemError::Invalid {
                part: Part::Roots,
                message: e.to_string(),
            })?;
        }
        let serial = parsed.tbs_certificate.raw_serial_as_string();
        Ok(Self {
            spiffe,
            chain,
            key,
            roots,
            not_before,
            not_after,
            serial,
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

    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }
}

/// Whoever uses certificates (TLS): takes a new identity for new connections, or refuses it
/// and the current one stays.
pub trait Credentials: Send + Sync {
    fn install(&self, id: &Identity) -> Result<(), String>;
}

/// Where identities come from. `renew_at` is when the provider will next replace the current
/// certificate on its own (None: it follows its source, as files do).
pub trait Provider: Send + Sync {
    fn name(&self) -> &'static str;
    fn current(&self) -> Option<Arc<Identity>>;
    fn renew_at(&self) -> Option<SystemTime>;
}

/// The identity in force. Empty when the VM runs without certificates (plaintext only).
pub struct Store {
    current: watch::Sender<Option<Arc<Identity>>>,
    credentials: Arc<dyn Credentials>,
}

impl Store {
    pub fn new(credentials: Arc<dyn Credentials>) -> Arc<Self> {
        Arc::new(Self {
            current: watch::Sender::new(None),
            credentials,
        })
    }

    /// Makes `id` current, once the credentials took it.
    pub fn set(&self, id: Identity) -> Result<Arc<Identity>, Error> {
        self.credentials.install(&id).map_err(Error::Refused)?;
        let id = Arc::new(id);
        self.current.send_replace(Some(id.clone()));
        Ok(id)
    }

    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.borrow().clone()
    }

    /// Wakes on every new identity.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Identity>>> {
        self.current.subscribe()
    }
}

/// Credentials that take anything: for a process that holds no TLS (the gateway) and tests.
pub struct NoCredentials;

impl Credentials for NoCredentials {
    fn install(&self, _: &Identity) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    /// A self-signed leaf (its own root): (chain, key, roots) PEM.
    pub fn pem(san: Option<&str>, expired: bool) -> (String, String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        if let Some(s) = san {
            p.subject_alt_names = vec![SanType::URI(s.try_into().unwrap())];
        }
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.pem())
    }

    #[test]
    fn from_pem_checks_each_part() {
        let (c, k, r) = pem(Some("spiffe://example.org/ns/a/sa/b"), false);
        let id = Identity::from_pem(c.as_bytes(), k.as_bytes(), r.as_bytes()).unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert!(id.expires_in() > Duration::from_secs(3600));
        assert!(!id.serial.is_empty());

        let other = KeyPair::generate().unwrap().serialize_pem();
        let e = Identity::from_pem(c.as_bytes(), other.as_bytes(), r.as_bytes()).unwrap_err();
        assert_eq!((e.clone(), e.part()), (PemError::KeyMismatch, Part::Key));

        let (c2, k2, r2) = pem(Some("spiffe://example.org/ns/a/sa/b"), true);
        let e = Identity::from_pem(c2.as_bytes(), k2.as_bytes(), r2.as_bytes()).unwrap_err();
        assert!(matches!(e, PemError::Expired(_)), "{e}");

        let (c3, k3, r3) = pem(None, false);
        let e = Identity::from_pem(c3.as_bytes(), k3.as_bytes(), r3.as_bytes()).unwrap_err();
        assert_eq!(e, PemError::NoSpiffe);

        let e = Identity::from_pem(c.as_bytes(), b"not a key", r.as_bytes()).unwrap_err();
        assert_eq!(e.part(), Part::Key);
        let e = Identity::from_pem(c.as_bytes(), k.as_bytes(), b"").unwrap_err();
        assert_eq!(e, PemError::NoCertificate(Part::Roots));
    }

    struct Refuse;
    impl Credentials for Refuse {
        fn install(&self, _: &Identity) -> Result<(), String> {
            Err("no".into())
        }
    }

    #[test]
    fn refused_credentials_keep_the_current_identity() {
        let (c, k, r) = pem(Some("spiffe://example.org/ns/a/sa/b"), false);
        let store = Store::new(Arc::new(Refuse));
        let id = Identity::from_pem(c.as_bytes(), k.as_bytes(), r.as_bytes()).unwrap();
        assert!(matches!(store.set(id), Err(Error::Refused(_))));
        assert!(store.current().is_none());
    }
}
