//! Identity from files in Istio's VM layout: cert-chain.pem (leaf first), key.pem,
//! root-cert.pem. Checked on load; reloaded when the files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{Error, Identity, Part, Provider, Store};
use crate::watch::FileWatch;

pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

/// Rotation writes three files: how long to let the burst settle.
const SETTLE: Duration = Duration::from_millis(200);

pub struct FileProvider {
    dir: PathBuf,
    current: Mutex<Option<Arc<Identity>>>,
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

impl FileProvider {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            current: Mutex::new(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and checks the three files; errors name the file at fault.
    pub fn load(&self) -> Result<Identity, Error> {
        let file = |part: Part| {
            self.dir.join(match part {
                Part::Chain => CERT_CHAIN,
                Part::Key => KEY,
                Part::Roots => ROOT_CERT,
            })
        };
        let (chain, key, roots) = (
            read(&file(Part::Chain))?,
            read(&file(Part::Key))?,
            read(&file(Part::Roots))?,
        );
        Identity::from_pem(&chain, &key, &roots).map_err(|source| Error::Pem {
            file: file(source.part()),
            source,
        })
    }

    /// Loads into `store` now.
    pub fn load_into(&self, store: &Store) -> Result<Arc<Identity>, Error> {
        let id = store.set(self.load()?)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.clone());
        Ok(id)
    }

    /// Starts watching the directory now; the returned future reloads into `store` whenever a
    /// file in it changes, until dropped. A bad set of files is reported and the identity in
    /// force stays; existing connections are never touched.
    pub fn watch(
        self: Arc<Self>,
        store: Arc<Store>,
    ) -> notify::Result<impl std::future::Future<Output = ()> + Send> {
        let dir = self.dir.clone();
        let mut changes = FileWatch::new(
            std::slice::from_ref(&self.dir),
            move |p| p.starts_with(&dir),
            SETTLE,
        )?;
        Ok(async move {
            while changes.changed().await.is_some() {
                match self.load_into(&store) {
                    Ok(id) => {
                        tracing::info!(spiffe = %id.spiffe, serial = %id.serial, expires_in_s = id.expires_in().as_secs(), "identity reloaded")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "identity reload rejected; keeping the current certificate")
                    }
                }
            }
        })
    }
}

impl Provider for FileProvider {
    fn name(&self) -> &'static str {
        "files"
    }

    fn current(&self) -> Option<Arc<Identity>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whoever writes the files renews them; we follow.
    fn renew_at(&self) -> Option<SystemTime> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::pem;
    use super::super::PemError;
    use super::*;

    fn write(dir: &Path, san: Option<&str>, expired: bool) {
        let (c, k, r) = pem(san, expired);
        std::fs::write(dir.join(CERT_CHAIN), c).unwrap();
        std::fs::write(dir.join(KEY), k).unwrap();
        std::fs::write(dir.join(ROOT_CERT), r).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = FileProvider::new(dir.path().into());
        assert!(matches!(p.load(), Err(Error::Missing(f)) if f.ends_with(CERT_CHAIN)));

        write(dir.path(), Some("spiffe://example.org/ns/a/sa/b"), false);
        assert_eq!(p.load().unwrap().trust_domain(), "example.org");
        std::fs::write(
            dir.path().join(KEY),
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        match p.load() {
            Err(Error::Pem { file, source }) => {
                assert!(file.ends_with(KEY));
                assert_eq!(source, PemError::KeyMismatch);
            }
            other => panic!("{other:?}"),
        }

        write(dir.path(), Some("spiffe://example.org/ns/a/sa/b"), true);
        let e = p.load().err().unwrap().to_string();
        assert!(e.contains("cert-chain.pem") && e.contains("expired"), "{e}");

        write(dir.path(), None, false);
        assert!(matches!(
            p.load(),
            Err(Error::Pem {
                source: PemError::NoSpiffe,
                ..
            })
        ));

        std::fs::write(dir.path().join(KEY), "not a key").unwrap();
        assert!(p.load().err().unwrap().to_string().contains("key.pem"));
    }
}
