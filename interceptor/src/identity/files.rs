//! Identity from files in Istio's VM layout: cert-chain.pem (leaf first), key.pem,
//! root-cert.pem. Checked on load; reloaded when the files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::uri_sans;
use super::{Error, Identity, Store};

pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

pub struct FileProvider {
    dir: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    if !path.exists() {
        return Err(Error::Missing(path.to_path_buf()));
    }
    std::fs::read(path).map_err(|source| Error::Unreadable {
        file: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Invalid {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Invalid {
            file: path.to_path_buf(),
            message: "no PEM certificate".into(),
        });
    }
    Ok(certs)
}

impl FileProvider {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn load(&self) -> Result<Identity, Error> {
        let (chain_file, key_file, root_file) = (
            self.dir.join(CERT_CHAIN),
            self.dir.join(KEY),
            self.dir.join(ROOT_CERT),
        );
        let chain = certs(&chain_file)?;
        let roots = certs(&root_file)?;
        let key_pem = read(&key_file)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::Invalid {
            file: key_file.clone(),
            message: format!("no usable private key: {e}"),
        })?;

        let leaf = &chain[0];
        let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| Error::Invalid {
            file: chain_file.clone(),
            message: format!("leaf certificate: {e}"),
        })?;
        let validity = parsed.validity();
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(validity.not_after.timestamp().max(0) as u64);
        let not_before = SystemTime::UNIX_EPOCH
            + Duration::from_secs(validity.not_before.timestamp().max(0) as u64);
        let now = SystemTime::now();
        if now > not_after {
            return Err(Error::Expired {
                file: chain_file,
                not_after: validity.not_after.to_string(),
            });
        }
        if now < not_before {
            return Err(Error::NotYetValid {
                file: chain_file,
                not_before: validity.not_before.to_string(),
            });
        }
        let spiffe = uri_sans(leaf)
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoSpiffe(chain_file.clone()))?;

        let provider = crate::tls::provider();
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| Error::Invalid {
                file: key_file.clone(),
                message: e.to_string(),
            })?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|_| Error::KeyMismatch {
            key: key_file,
            cert: chain_file.clone(),
        })?;

        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r).map_err(|e| Error::Invalid {
                file: root_file.clone(),
                message: e.to_string(),
            })?;
        }
        Identity::new(spiffe, Arc::new(certified), Arc::new(store), not_after)
    }

    /// Reloads into `store` whenever a file in the directory changes. A bad set of files is
    /// reported and the identity in force stays; existing connections are never touched.
    pub fn watch(self, store: Arc<Store>) -> notify::Result<tokio::task::JoinHandle<()>> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if matches!(ev, Ok(ref e) if !e.kind.is_access()) {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                // Rotation writes three files: wait for the burst to end.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                match self.load() {
                    Ok(id) => {
                        tracing::info!(spiffe = %id.spiffe, expires_in_s = id.expires_in().as_secs(), "identity reloaded");
                        store.set(id);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "identity reload rejected; keeping the current certificate")
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    /// Writes a self-signed leaf (it is its own root) with the given SAN and validity.
    fn write(dir: &Path, san: Option<&str>, expired: bool) -> KeyPair {
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
        std::fs::write(dir.join(CERT_CHAIN), cert.pem()).unwrap();
        std::fs::write(dir.join(KEY), key.serialize_pem()).unwrap();
        std::fs::write(dir.join(ROOT_CERT), cert.pem()).unwrap();
        key
    }

    #[test]
    fn loads_and_names_the_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), Some("spiffe://example.org/ns/a/sa/b"), false);
        let id = FileProvider::new(dir.path().into()).load().unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert!(id.expires_in() > Duration::from_secs(3600));
    }

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = FileProvider::new(dir.path().into());
        assert!(matches!(p.load(), Err(Error::Missing(f)) if f.ends_with(CERT_CHAIN)));

        write(dir.path(), Some("spiffe://example.org/ns/a/sa/b"), false);
        std::fs::write(
            dir.path().join(KEY),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        assert!(
            matches!(p.load(), Err(Error::KeyMismatch { .. })),
            "{:?}",
            p.load().err()
        );

        write(dir.path(), Some("spiffe://example.org/ns/a/sa/b"), true);
        let e = p.load().err().unwrap().to_string();
        assert!(e.contains("expired"), "{e}");

        write(dir.path(), None, false);
        assert!(matches!(p.load(), Err(Error::NoSpiffe(_))));

        std::fs::write(dir.path().join(KEY), "not a key").unwrap();
        assert!(p.load().err().unwrap().to_string().contains("key.pem"));
    }
}
