//! Certificates made at test time (rcgen), in Istio's VM file layout.

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::sh;

pub enum Key {
    Ecdsa,
    Rsa,
}

/// A test root CA.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The root as first made: what root-cert.pem holds, byte for byte.
    pem: String,
}

impl Ca {
    /// The same CA again: same key, same subject, the same root PEM.
    pub fn clone_ca(&self) -> Ca {
        let key = KeyPair::from_pem(&self.key.serialize_pem()).expect("CA key");
        let params = CertificateParams::from_ca_cert_pem(&self.pem).expect("CA certificate");
        // rcgen signs with an issuer it made itself; one re-made from the same key and
        // subject issues certificates the original root verifies.
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            cert,
            key,
            pem: self.pem.clone(),
        }
    }
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA cert");
        let pem = cert.pem();
        Self { cert, key, pem }
    }

    pub fn pem(&self) -> String {
        self.pem.clone()
    }

    /// The root as a rustls trust store.
    pub fn roots(&self) -> rustls::RootCertStore {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(self.pem.as_bytes())
            .expect("root PEM");
        roots.add(der).expect("root");
        roots
    }

    /// A server certificate for DNS name `name` (istiod's), with its key.
    pub fn server_cert(
        &self,
        name: &str,
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let key = KeyPair::generate().expect("server key");
        let mut p = CertificateParams::new(vec![name.to_string()]).expect("server params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("server cert");
        (
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// Writes `<stem>.pem` and `<stem>-key.pem` into `dir`: a certificate for DNS name `name`
    /// (also the CN) for a server, or with `client` for a client. (cert, key) paths.
    pub fn write_leaf(
        &self,
        dir: &Path,
        stem: &str,
        name: &str,
        client: bool,
    ) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("cert dir");
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(vec![name.to_string()]).expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand_serial()));
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("leaf cert");
        let (c, k) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}-key.pem")),
        );
        write_atomically(&c, &cert.pem());
        write_atomically(&k, &key.serialize_pem());
        (c, k)
    }

    /// Signs `csr` (PEM) as the Istio CA does: the SAN is `identity` whatever the CSR says,
    /// valid from now for `lifetime`. The leaf's PEM.
    pub fn sign_csr(
        &self,
        csr: &str,
        identity: &str,
        lifetime: std::time::Duration,
    ) -> Result<String, String> {
        let mut req =
            rcgen::CertificateSigningRequestParams::from_pem(csr).map_err(|e| e.to_string())?;
        let now = time::OffsetDateTime::now_utc();
        req.params.subject_alt_names = vec![SanType::URI(
            identity.try_into().map_err(|e| format!("{e:?}"))?,
        )];
        req.params.not_before = now - time::Duration::seconds(1);
        req.params.not_after = now + lifetime;
        req.params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand_serial()));
        req.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        req.params.is_ca = IsCa::ExplicitNoCa;
        let cert = req
            .signed_by(&self.cert, &self.key)
            .map_err(|e| e.to_string())?;
        Ok(cert.pem())
    }

    /// Writes cert-chain.pem, key.pem and root-cert.pem for `spiffe` into `dir`.
    pub fn issue(&self, dir: &Path, spiffe: &str, key: Key) -> PathBuf {
        self.issue_with(dir, spiffe, key, false)
    }

    pub fn issue_with(&self, dir: &Path, spiffe: &str, key: Key, expired: bool) -> PathBuf {
        let validity = expired.then_some((2020, 2021));
        self.issue_for(dir, spiffe, key, validity)
    }

    /// A certificate valid only from 2100: not valid yet.
    pub fn issue_not_yet_valid(&self, dir: &Path, spiffe: &str, key: Key) -> PathBuf {
        self.issue_for(dir, spiffe, key, Some((2100, 2101)))
    }

    fn issue_for(
        &self,
        dir: &Path,
        spiffe: &str,
        key: Key,
        // Valid from January 1st of one year to January 1st of another.
        validity: Option<(i32, i32)>,
    ) -> PathBuf {
        std::fs::create_dir_all(dir).expect("cert dir");
        let key = match key {
            Key::Ecdsa => KeyPair::generate().expect("leaf key"),
            Key::Rsa => {
                // ring cannot generate RSA keys; openssl can, rcgen signs with it.
                let pem = sh(Command::new("openssl").args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ]));
                KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).expect("RSA key")
            }
        };
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::OrganizationName, "interceptor tests");
        p.subject_alt_names = vec![SanType::URI(spiffe.try_into().expect("URI SAN"))];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand_serial()));
        if let Some((from, to)) = validity {
            p.not_before = rcgen::date_time_ymd(from, 1, 1);
            p.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("leaf cert");
        write_atomically(&dir.join("cert-chain.pem"), &cert.pem());
        write_atomically(&dir.join("key.pem"), &key.serialize_pem());
        write_atomically(&dir.join("root-cert.pem"), &self.pem);
        dir.to_path_buf()
    }
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return vec![];
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

fn rand_serial() -> [u8; 8] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    // Positive (top bit clear) and never the same twice in one process.
    ((t ^ u64::from(std::process::id()) << 32).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
        & 0x7fff_ffff_ffff_ffff)
        .to_be_bytes()
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write cert");
    std::fs::rename(&tmp, path).expect("rename cert");
}
