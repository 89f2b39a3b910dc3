//! TLS we originate for a DestinationRule's SIMPLE or MUTUAL mode: the server checked against
//! the rule's CA bundle (or the system's) and names, our client certificate from the rule's
//! files. One config per distinct setting, rebuilt when one of its files changes (a rotated
//! certificate is picked up on the next connection, as istio-agent's file SDS does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use rustls::{OtherError, SignatureScheme};

use crate::mesh::traffic::UpstreamTls;

/// Where istio-agent looks for the system bundle when a rule says `system` (or nothing),
/// first found wins (I: security/pkg/nodeagent/cache/secretcache.go).
const SYSTEM_BUNDLES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("no system CA bundle (looked in {})", SYSTEM_BUNDLES.join(", "))]
    NoSystemBundle,
    #[error("{0}")]
    Config(rustls::Error),
}

struct Built {
    config: Arc<ClientConfig>,
    /// Each file's modification time when read.
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
}

/// The configs of the rules in use, keyed by the rule's settings.
#[derive(Default)]
pub struct OriginConfigs {
    built: Mutex<HashMap<Arc<UpstreamTls>, Arc<Built>>>,
}

impl OriginConfigs {
    pub fn get(
        &self,
        tls: &Arc<UpstreamTls>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<ClientConfig>, OriginError> {
        let cached = self.built.lock().ok().and_then(|m| m.get(tls).cloned());
        if let Some(b) = cached.filter(|b| unchanged(&b.stamps)) {
            return Ok(b.config.clone());
        }
        let built = Arc::new(build(tls, provider)?);
        if let Ok(mut m) = self.built.lock() {
            // Settings no rule uses any more go with the next change.
            if m.len() > 256 {
                m.clear();
            }
            m.insert(tls.clone(), built.clone());
        }
        Ok(built.config.clone())
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn unchanged(stamps: &[(PathBuf, Option<SystemTime>)]) -> bool {
    stamps.iter().all(|(p, t)| mtime(p) == *t)
}

fn read(
    path: &Path,
    stamps: &mut Vec<(PathBuf, Option<SystemTime>)>,
) -> Result<Vec<u8>, OriginError> {
    stamps.push((path.to_path_buf(), mtime(path)));
    std::fs::read(path).map_err(|source| OriginError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, OriginError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| OriginError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(OriginError::Pem {
            path: path.to_path_buf(),
            what: "no PEM certificate".into(),
        });
    }
    Ok(certs)
}

fn build(tls: &UpstreamTls, provider: &Arc<CryptoProvider>) -> Result<Built, OriginError> {
    let mut stamps = Vec::new();
    let ca_path = match &tls.ca_certificates {
        Some(p) => p.clone(),
        None => SYSTEM_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or(OriginError::NoSystemBundle)?,
    };
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
        Arc::new(Unverified(provider.clone()))
    } else {
        let mut roots = RootCertStore::empty();
        let pem = read(&ca_path, &mut stamps)?;
        let (added, _ignored) = roots.add_parsable_certificates(certs(&ca_path, &pem)?);
        if added == 0 {
            return Err(OriginError::Pem {
                path: ca_path,
                what: "no usable CA certificate".into(),
            });
        }
        let roots = Arc::new(roots);
        if tls.subject_alt_names.is_empty() {
            // The SNI (a host name or an IP) is what the certificate must be for.
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| OriginError::Config(rustls::Error::General(e.to_string())))?
        } else {
            Arc::new(SanVerifier {
                roots,
                names: tls.subject_alt_names.clone(),
                provider: provider.clone(),
            })
        }
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(OriginError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&tls.client_certificate, &tls.private_key) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert, &read(cert, &mut stamps)?)?;
            let key_pem = read(key, &mut stamps)?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| OriginError::Pem {
                    path: key.clone(),
                    what: e.to_string(),
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(OriginError::Config)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Built {
        config: Arc::new(config),
        stamps,
    })
}

/// The chain must lead to the bundle and the leaf carry one of the rule's names (Envoy's
/// `match_subject_alt_names` exact: any DNS, URI or IP SAN).
#[derive(Debug)]
struct SanVerifier {
    roots: Arc<RootCertStore>,
    names: Vec<String>,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug)]
struct WrongName(String);

impl std::fmt::Display for WrongName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WrongName {}

fn sans(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) | GeneralName::URI(s) => Some(s.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = sans(end_entity);
        if presented.iter().any(|n| self.names.contains(n)) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(WrongName(format!(
                "server names {presented:?} are not one of {:?}",
                self.names
            )))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `insecureSkipVerify`: any certificate (the handshake's signatures are still checked).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
