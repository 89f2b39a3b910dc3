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
        Self { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes cert-chain.pem, key.pem and root-cert.pem for `spiffe` into `dir`.
    pub fn issue(&self, dir: &Path, spiffe: &str, key: Key) -> PathBuf {
        self.issue_with(dir, spiffe, key, false)
    }

    pub fn issue_with(&self, dir: &Path, spiffe: &str, key: Key, expired: bool) -> PathBuf {
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
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("leaf cert");
        write_atomically(&dir.join("cert-chain.pem"), &cert.pem());
        write_atomically(&dir.join("key.pem"), &key.serialize_pem());
        write_atomically(&dir.join("root-cert.pem"), &self.cert.pem());
        dir.to_path_buf()
    }
}

fn rand_serial() -> [u8; 8] {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    (t ^ u64::from(std::process::id()) << 32).to_be_bytes()
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write cert");
    std::fs::rename(&tmp, path).expect("rename cert");
}
