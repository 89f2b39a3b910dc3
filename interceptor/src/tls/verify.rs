//! Server certificate verification for outbound mTLS: the chain must lead to root-cert.pem and
//! the leaf's SPIFFE URI SAN must be one the service is expected to run as. Istio workload
//! certificates carry no DNS names, so there is no host-name check.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, Error, OtherError, RootCertStore, SignatureScheme,
};

use crate::spiffe::{uri_sans, SpiffeId};

#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug)]
struct WrongIdentity(String);

impl std::fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WrongIdentity {}

impl SpiffeServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<SpiffeId>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = uri_sans(end_entity);
        if presented.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        let got: Vec<&str> = presented.iter().map(SpiffeId::as_str).collect();
        let want: Vec<&str> = self.expected.iter().map(SpiffeId::as_str).collect();
        Err(Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(WrongIdentity(format!(
                "server identity {got:?} is not one of {want:?}"
            )))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
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
    ) -> Result<HandshakeSignatureValid, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let key = KeyPair::generate().unwrap();
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    fn leaf(ca: &Ca, san: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(san.try_into().unwrap())];
        p.signed_by(&key, &ca.cert, &ca.key).unwrap().der().clone()
    }

    fn verifier(ca: &Ca, expected: &[&str]) -> SpiffeServerVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        SpiffeServerVerifier::new(
            Arc::new(roots),
            expected
                .iter()
                .map(|s| SpiffeId::parse(s).unwrap())
                .collect(),
            crate::tls::provider(),
        )
    }

    fn check(v: &SpiffeServerVerifier, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let name = ServerName::try_from("outbound_.80_._.a.b").unwrap();
        v.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn accepts_only_an_expected_identity_under_the_roots() {
        let ca1 = ca("one");
        let good = leaf(&ca1, "spiffe://td/ns/a/sa/product");
        assert!(check(
            &verifier(
                &ca1,
                &["spiffe://td/ns/a/sa/x", "spiffe://td/ns/a/sa/product"]
            ),
            &good
        )
        .is_ok());
        let e = check(&verifier(&ca1, &["spiffe://td/ns/a/sa/billing"]), &good).unwrap_err();
        assert!(e.to_string().contains("is not one of"), "{e}");
        // No identity expected: nobody is accepted (the base verifier of every client config).
        assert!(check(&verifier(&ca1, &[]), &good).is_err());
        // The right identity under another root.
        let other = leaf(&ca("two"), "spiffe://td/ns/a/sa/product");
        let e = check(&verifier(&ca1, &["spiffe://td/ns/a/sa/product"]), &other).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{e}"
        );
    }
}
