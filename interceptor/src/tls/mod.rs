//! TLS as Istio's sidecars speak it: SPIFFE identities in URI SANs, no DNS-name checks, the
//! `istio` ALPN. Configs are built once per identity; only the verifier varies per connection.

mod hello;
mod verify;

pub use hello::{parse_client_hello, peek_client_hello, ClientHello, Peeked};
pub use verify::SpiffeServerVerifier;

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello as RustlsHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::identity::SpiffeId;

/// ALPN the outbound side offers (SPEC section 5: not `istio-peer-exchange`).
pub const ALPN_ISTIO: &[u8] = b"istio";
/// ALPNs that mark a TLS connection as Istio mTLS on the inbound side (SPEC section 6).
pub const ISTIO_ALPNS: [&[u8]; 5] = [
    b"istio",
    b"istio-peer-exchange",
    b"istio-http/1.0",
    b"istio-http/1.1",
    b"istio-h2",
];

pub fn is_istio_alpn(alpn: &[u8]) -> bool {
    ISTIO_ALPNS.contains(&alpn)
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Presents one certificate whatever is asked: a workload has exactly one identity.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _: RustlsHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for OneCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

pub fn client_base(
    cert: &Arc<CertifiedKey>,
    roots: &Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    // A verifier that accepts no identity until a connection sets the ones it expects.
    let verifier = Arc::new(SpiffeServerVerifier::new(
        roots.clone(),
        vec![],
        provider.clone(),
    ));
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(OneCert(cert.clone())));
    cfg.alpn_protocols = vec![ALPN_ISTIO.to_vec()];
    // Resumption would skip the identity check of the endpoint actually reached.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The client config for one connection: the base with a verifier for `expected` identities.
pub fn client_for(
    base: &ClientConfig,
    roots: &Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
) -> Arc<ClientConfig> {
    let mut cfg = base.clone();
    let provider = cfg.crypto_provider().clone();
    cfg.dangerous()
        .set_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            roots.clone(),
            expected,
            provider,
        )));
    Arc::new(cfg)
}

pub fn server_config(
    cert: &Arc<CertifiedKey>,
    roots: &Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(OneCert(cert.clone())));
    // Never istio-peer-exchange: negotiating it would oblige the metadata-exchange header.
    cfg.alpn_protocols = [
        b"istio".as_slice(),
        b"istio-http/1.1",
        b"istio-http/1.0",
        b"istio-h2",
    ]
    .iter()
    .map(|a| a.to_vec())
    .collect();
    Ok(Arc::new(cfg))
}

/// The Istio SNI for a service port (I: pilot/pkg/model/service.go BuildDNSSrvSubsetKey).
pub fn sni(port: u16, subset: &str, host: &str) -> String {
    format!(
        "outbound_.{port}_.{}_.{host}",
        if subset.is_empty() { "" } else { subset }
    )
}

/// Splits an Istio SNI `outbound_.P_.S_.H` into (port, subset, host).
pub fn parse_sni(sni: &str) -> Option<(u16, &str, &str)> {
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    let (subset, host) = rest.split_once("_.")?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((port, subset, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trip() {
        let s = sni(8080, "", "product.default.svc.cluster.local");
        assert_eq!(s, "outbound_.8080_._.product.default.svc.cluster.local");
        assert_eq!(
            parse_sni(&s),
            Some((8080, "", "product.default.svc.cluster.local"))
        );
        assert_eq!(parse_sni("outbound_.80_.v1_.a.b"), Some((80, "v1", "a.b")));
        assert_eq!(parse_sni("inbound_.80_._.a"), None);
        assert_eq!(parse_sni("outbound_.x_._.a"), None);
        assert!(
            rustls::pki_types::ServerName::try_from(s).is_ok(),
            "rustls accepts the underscore SNI"
        );
    }
}
