//! identity::CaProvider: this VM's certificate from the Istio CA (SPEC section 10), as
//! istio-agent gets it. A fresh key and a CSR for `spiffe://<td>/ns/<ns>/sa/<sa>` go to
//! `IstioCertificateService/CreateCertificate` over istiod's TLS channel, authenticated by the
//! bootstrap token and, once we hold one, by the current certificate (so renewal outlives the
//! one-hour token). The answer is checked (at least leaf and root, our key, our identity,
//! chaining to root-cert.pem) before it becomes current; then it is written in Istio's VM
//! layout for other tools. Renewal at half the lifetime (±1 %), retried with backoff while the
//! current certificate serves.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use interceptor_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use interceptor_proto::ca::IstioCertificateRequest;
use rand::Rng;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::Serialize;

use super::{Identity, PemError, Store, CERT_CHAIN, KEY, ROOT_CERT};
use crate::bundle::Bundle;
use crate::channel;

/// The key the CSR is made for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// ECDSA P-256: istiod signs it, and every handshake is cheaper than with RSA.
    #[default]
    Ecdsa,
    /// RSA 2048 (istio-agent's default).
    Rsa,
}

impl KeyKind {
    fn label(self) -> &'static str {
        match self {
            KeyKind::Ecdsa => "ECDSA P-256",
            KeyKind::Rsa => "RSA 2048",
        }
    }
}

/// Istio's SECRET_GRACE_PERIOD_RATIO: renew when this share of the lifetime is left.
const GRACE_RATIO: f64 = 0.5;
/// Istio's SECRET_GRACE_PERIOD_RATIO_JITTER.
const GRACE_JITTER: f64 = 0.01;
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Settings {
    pub key: KeyKind,
    /// Asked of the CA (`SECRET_TTL`); the CA may give less.
    pub ttl: Duration,
    /// Where cert-chain.pem, key.pem and root-cert.pem are written (`OUTPUT_CERTS`).
    pub out_dir: PathBuf,
}

/// What is wrong with the CA's answer.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("a chain of {0} certificate(s): the CA sends the leaf and at least the root")]
    TooShort(usize),
    #[error("{0}")]
    Pem(PemError),
    #[error("issued for {got}, not {asked}")]
    WrongIdentity { asked: String, got: String },
    #[error("does not chain to root-cert.pem: {0}")]
    Untrusted(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Channel(#[from] channel::Error),
    #[error("the CA refused: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("the CA's answer was refused: {0}")]
    Answer(#[from] AnswerError),
    #[error("key: {0}")]
    Key(String),
    #[error("CSR: {0}")]
    Csr(String),
    #[error("{}: {message}", file.display())]
    Root { file: PathBuf, message: String },
    #[error("the new certificate was refused for TLS: {0}")]
    Refused(String),
}

impl Error {
    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Channel(_) => "unreachable",
            Error::Rpc(_) => "refused",
            Error::Answer(_) => "bad_answer",
            Error::Key(_) | Error::Csr(_) => "key",
            Error::Root { .. } => "root_cert",
            Error::Refused(_) => "tls",
        }
    }
}

/// What `status` and metrics show of the provider.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct CaState {
    pub key: String,
    pub renewals: u64,
    pub failures: u64,
    /// By reason label.
    pub failures_by_reason: std::collections::BTreeMap<String, u64>,
    pub last_renewal_unix: Option<u64>,
    /// CSR sent to certificate in force.
    pub last_renewal_ms: Option<f64>,
    pub next_renewal_unix: Option<u64>,
    pub last_error: Option<String>,
    /// The certificate expired and the CA has not renewed it: outbound mTLS is refused.
    pub expired: bool,
    /// Writing the files failed (the certificate is in force in memory all the same).
    pub write_error: Option<String>,
}

#[derive(Default)]
pub struct CaStatus(Mutex<CaState>);

impl CaStatus {
    pub fn get(&self) -> CaState {
        self.with(|s| s.clone())
    }
    fn with<T>(&self, f: impl FnOnce(&mut CaState) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When to renew a certificate valid from `not_before` to `not_after`: with `GRACE_RATIO` of
/// its lifetime left, jittered by ±`GRACE_JITTER` of the lifetime.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or_default()
        .as_secs_f64();
    let share = (1.0 - GRACE_RATIO + jitter.clamp(-GRACE_JITTER, GRACE_JITTER)).max(0.0);
    not_before + Duration::from_secs_f64(lifetime * share)
}

pub struct CaProvider {
    bundle: Arc<Bundle>,
    settings: Settings,
    status: Arc<CaStatus>,
    identity: String,
}

impl CaProvider {
    pub fn new(bundle: Arc<Bundle>, settings: Settings, status: Arc<CaStatus>) -> Self {
        let identity = format!(
            "spiffe://{}/ns/{}/sa/{}",
            bundle.trust_domain, bundle.namespace, bundle.service_account
        );
        status.with(|s| s.key = settings.key.label().into());
        Self {
            bundle,
            settings,
            status,
            identity,
        }
    }

    /// The identity asked for.
    pub fn spiffe(&self) -> &str {
        &self.identity
    }

    fn root_pem(&self) -> Result<Vec<u8>, Error> {
        let file = &self.bundle.paths.root_cert;
        std::fs::read(file).map_err(|e| Error::Root {
            file: file.clone(),
            message: e.to_string(),
        })
    }

    /// A certificate an earlier run wrote, if it is still ours and good: the VM serves mTLS
    /// at once after a restart, even with the CA unreachable.
    pub fn restore(&self, store: &Store) -> Option<Arc<Identity>> {
        let dir = &self.settings.out_dir;
        let chain = std::fs::read(dir.join(CERT_CHAIN)).ok()?;
        let key = std::fs::read(dir.join(KEY)).ok()?;
        let root = self.root_pem().ok()?;
        let checked = self.check(&chain, &key, &root);
        match checked.and_then(|id| store.set(id).map_err(|e| Error::Refused(e.to_string()))) {
            Ok(id) => {
                tracing::info!(spiffe = %id.spiffe, serial = %id.serial, expires_in_s = id.expires_in().as_secs(), dir = %dir.display(), "certificate from an earlier run");
                Some(id)
            }
            Err(e) => {
                tracing::info!(error = %e, dir = %dir.display(), "no usable certificate from an earlier run; asking the CA");
                None
            }
        }
    }

    /// Checks a chain (leaf first) and key as the CA's answer must be: valid now, our key, our
    /// identity, chaining to root-cert.pem.
    fn check(&self, chain: &[u8], key: &[u8], root: &[u8]) -> Result<Identity, Error> {
        let id = Identity::from_pem(chain, key, root).map_err(AnswerError::Pem)?;
        if id.spiffe.to_string() != self.identity {
            return Err(AnswerError::WrongIdentity {
                asked: self.identity.clone(),
                got: id.spiffe.to_string(),
            }
            .into());
        }
        verify_chain(&id.chain, &id.roots).map_err(AnswerError::Untrusted)?;
        Ok(id)
    }

    /// One round: key, CSR, the CA's answer checked, in force, written out.
    pub async fn renew(&self, store: &Store) -> Result<Arc<Identity>, Error> {
        let started = Instant::now();
        let root = self.root_pem()?;
        let kind = self.settings.key;
        let identity = self.identity.clone();
        // RSA key generation takes a while: off the runtime's threads.
        let (csr, key_pem) = tokio::task::spawn_blocking(move || csr(kind, &identity))
            .await
            .map_err(|e| Error::Key(e.to_string()))??;
        let channel = channel::connect(&self.bundle, &self.bundle.ca, store).await?;
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.settings.ttl.as_secs() as i64,
            metadata: None,
        });
        channel::authorize(&self.bundle, &mut req, channel::presents_certificate(store))?;
        let resp = IstioCertificateServiceClient::new(channel)
            .create_certificate(req)
            .await?
            .into_inner();
        let n = resp.cert_chain.len();
        if n < 2 {
            return Err(AnswerError::TooShort(n).into());
        }
        // Leaf and intermediates are what we present; the root is the trust anchor's business.
        let presented = resp.cert_chain[..n - 1].concat();
        let id = self.check(presented.as_bytes(), key_pem.as_bytes(), &root)?;
        let id = store.set(id).map_err(|e| Error::Refused(e.to_string()))?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        // Istio writes the whole chain, root last, to cert-chain.pem.
        let write = write_files(
            &self.settings.out_dir,
            resp.cert_chain.concat().as_bytes(),
            key_pem.as_bytes(),
            &root,
        );
        self.status.with(|s| {
            s.renewals += 1;
            s.last_renewal_unix = Some(unix(SystemTime::now()));
            s.last_renewal_ms = Some(ms);
            s.last_error = None;
            s.expired = false;
            s.write_error = write.as_ref().err().map(|e| e.to_string());
        });
        if let Err(e) = write {
            tracing::warn!(error = %e, dir = %self.settings.out_dir.display(), "certificate in force, but not written out");
        }
        tracing::info!(spiffe = %id.spiffe, serial = %id.serial, lifetime_s = id.lifetime().as_secs(), ms, "certificate from the Istio CA in force");
        Ok(id)
    }

    /// Renews for ever: at half-life, retrying with backoff on failure; the current certificate
    /// serves until it expires (then outbound mTLS says so and is refused).
    pub async fn run(self, store: Arc<Store>) {
        let mut retry = RETRY_FIRST;
        loop {
            let due = store.current().map(|id| {
                let jitter = rand::rng().random_range(-GRACE_JITTER..=GRACE_JITTER);
                renew_at(id.not_before, id.not_after, jitter)
            });
            if let Some(due) = due {
                self.status.with(|s| s.next_renewal_unix = Some(unix(due)));
                if let Ok(wait) = due.duration_since(SystemTime::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            match self.renew(&store).await {
                Ok(_) => retry = RETRY_FIRST,
                Err(e) => {
                    let expired = store
                        .current()
                        .is_none_or(|id| SystemTime::now() >= id.not_after);
                    let newly_expired = self.status.with(|s| {
                        s.failures += 1;
                        *s.failures_by_reason.entry(e.label().into()).or_default() += 1;
                        s.last_error = Some(e.to_string());
                        let was =
                            std::mem::replace(&mut s.expired, expired && store.current().is_some());
                        s.expired && !was
                    });
                    if newly_expired {
                        tracing::error!(error = %e, "the certificate expired and the CA has not renewed it: outbound mTLS is refused until it does (DNS and plaintext go on)");
                    } else {
                        tracing::warn!(error = %e, retry_in_s = retry.as_secs(), "certificate renewal failed; the current certificate stays");
                    }
                    // Never sleep past the expiry of what serves now: try again just after it.
                    let left = store
                        .current()
                        .and_then(|id| id.not_after.duration_since(SystemTime::now()).ok())
                        .filter(|d| !d.is_zero());
                    let wait = left.map_or(retry, |l| retry.min(l + Duration::from_millis(50)));
                    tokio::time::sleep(wait).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// A key of `kind` and a CSR for `identity` (PEM both).
fn csr(kind: KeyKind, identity: &str) -> Result<(String, String), Error> {
    let key = match kind {
        KeyKind::Ecdsa => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Key(e.to_string()))?,
        KeyKind::Rsa => {
            use rsa::pkcs8::EncodePrivateKey;
            // ring signs with RSA keys but cannot make them: the rsa crate does.
            let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| Error::Key(e.to_string()))?;
            let der = rsa.to_pkcs8_der().map_err(|e| Error::Key(e.to_string()))?;
            let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| Error::Key(e.to_string()))?
        }
    };
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::Ia5String::try_from(identity).map_err(|e| Error::Csr(e.to_string()))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| Error::Csr(e.to_string()))?;
    Ok((csr, key.serialize_pem()))
}

/// The leaf (with the intermediates after it) chains to one of `roots`, for client and server
/// use alike (an Istio workload certificate is both).
fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("root: {e}"))?;
    let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("leaf: {e}"))?;
    let now = UnixTime::now();
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    cert.verify_for_usage(
        algs.all,
        &anchors,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes the three files, each atomically (write, then rename over): a reader sees the old file
/// or the new one, never half of one. The key is written first and is 0600.
fn write_files(dir: &Path, chain: &[u8], key: &[u8], root: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomically(&dir.join(KEY), key, 0o600)?;
    write_atomically(&dir.join(CERT_CHAIN), chain, 0o644)?;
    let root_file = dir.join(ROOT_CERT);
    // Often the bundle's own root-cert.pem: rewrite only when it differs.
    if std::fs::read(&root_file).ok().as_deref() != Some(root) {
        write_atomically(&root_file, root, 0o644)?;
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    // The mode of a file that was already there is not changed by open.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_within_one_percent() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(100);
        assert_eq!(renew_at(nb, na, 0.0), nb + Duration::from_secs(50));
        assert_eq!(renew_at(nb, na, 0.01), nb + Duration::from_secs(51));
        assert_eq!(renew_at(nb, na, -0.01), nb + Duration::from_secs(49));
        // Jitter is bounded whatever is asked.
        assert_eq!(renew_at(nb, na, 0.5), nb + Duration::from_secs(51));
    }

    #[test]
    fn csr_asks_for_the_identity_with_either_key() {
        for kind in [KeyKind::Ecdsa, KeyKind::Rsa] {
            let (csr, key) = csr(kind, "spiffe://cluster.local/ns/vm/sa/app").unwrap();
            let req = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
            assert_eq!(
                req.params.subject_alt_names,
                vec![rcgen::SanType::URI(
                    rcgen::Ia5String::try_from("spiffe://cluster.local/ns/vm/sa/app").unwrap()
                )]
            );
            assert!(key.contains("PRIVATE KEY"), "{kind:?}");
        }
    }

    #[test]
    fn files_are_written_atomically_and_the_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), b"chain", b"key", b"root").unwrap();
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY), 0o600);
        assert_eq!(mode(CERT_CHAIN), 0o644);
        assert_eq!(std::fs::read(dir.path().join(ROOT_CERT)).unwrap(), b"root");
        // A second round replaces the files; no temporary file is left behind.
        write_files(dir.path(), b"chain2", b"key2", b"root").unwrap();
        assert_eq!(std::fs::read(dir.path().join(KEY)).unwrap(), b"key2");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}
