//! TLS as Istio's sidecars speak it: SPIFFE identities in URI SANs, no DNS-name checks, the
//! `istio` ALPN. Configs are built once per identity; only the verifier varies per connection.

mod hello;
mod origin;
mod store;
mod verify;

pub use hello::{parse_client_hello, peek_client_hello, ClientHello, Peeked};
pub use origin::{OriginConfigs, OriginError};
pub use store::{Configs, Store};
pub use verify::SpiffeServerVerifier;

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello as RustlsHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the private key cannot sign: {0}")]
    Key(rustls::Error),
    #[error("the private key does not match the leaf certificate")]
    KeyMismatch,
    #[error("root certificate: {0}")]
    Root(rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// ALPN the outbound side offers (SPEC section 5: not `istio-peer-exchange`).
pub const ALPN_ISTIO: &[u8] = b"istio";

/// What an outbound mTLS connection will carry, and so the ALPN it offers: `istio` for bytes;
/// for HTTP, as Envoy's `istio.alpn` filter overrides it per upstream protocol, the `istio-*`
/// protocol (which steers an Istio sidecar to its HTTP filter chain), then `istio`, then the
/// plain protocol (sheet 7.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Alpn {
    #[default]
    Istio,
    Http1,
    Http2,
}

impl Alpn {
    pub fn protocols(self) -> Vec<Vec<u8>> {
        let list: &[&[u8]] = match self {
            Alpn::Istio => &[ALPN_ISTIO],
            Alpn::Http1 => &[b"istio-http/1.1", ALPN_ISTIO, b"http/1.1"],
            Alpn::Http2 => &[b"istio-h2", ALPN_ISTIO, b"h2"],
        };
        list.iter().map(|a| a.to_vec()).collect()
    }
}
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

/// The ALPNs by which an Istio client says its mTLS carries HTTP: on a sniffed port they
/// take the HTTP chains (istiod's `mtlsHTTPALPNs`, sheet 4.2).
pub fn is_istio_http_alpn(alpn: &[u8]) -> bool {
    ISTIO_ALPNS[2..].contains(&alpn)
}

pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM-SHA256 first, as BoringSSL (Envoy) prefers on AES-NI hardware: faster bulk
    // encryption, and a SHA-256 key schedule (hardware SHA-NI) instead of SHA-384 (software in
    // ring): measured ~5 % of CPU per new connection.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
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
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    // A verifier that accepts no identity until a connection sets the ones it expects.
    let verifier = Arc::new(SpiffeServerVerifier::new(
        roots.clone(),
        vec![],
        provider.clone(),
    ));
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(OneCert(cert.clone())));
    cfg.alpn_protocols = vec![ALPN_ISTIO.to_vec()];
    // The base verifier accepts nobody; resumption belongs to the per-endpoint configs
    // (transport::ClientConfigs), never to this shared one.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The client config for connections to one endpoint: the base with a verifier for `expected`
/// identities and a resumption store of its own.
pub fn client_for(
    base: &ClientConfig,
    roots: &Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
    alpn: Alpn,
) -> Arc<ClientConfig> {
    let mut cfg = expecting(base, roots, expected);
    if alpn != Alpn::Istio {
        cfg.alpn_protocols = alpn.protocols();
    }
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(SESSIONS_PER_ENDPOINT);
    Arc::new(cfg)
}

/// `base` with a verifier that accepts only `expected` identities.
fn expecting(
    base: &ClientConfig,
    roots: &Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
) -> ClientConfig {
    let mut cfg = base.clone();
    let provider = cfg.crypto_provider().clone();
    cfg.dangerous()
        .set_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            roots.clone(),
            expected,
            provider,
        )));
    cfg
}

/// TLS 1.3 sessions kept per endpoint: a few, for connections opened at once.
const SESSIONS_PER_ENDPOINT: usize = 8;

pub fn server_config(
    cert: &Arc<CertifiedKey>,
    roots: &Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(OneCert(cert.clone())));
    // Stateful TLS 1.3 resumption for the mesh clients that reconnect: the session keeps the
    // client's verified chain, so identity checks after a resumed handshake still see it. One
    // ticket per handshake (a client uses each once) keeps the cache from filling with unused
    // ones: rustls searches it linearly on every resumption.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SERVER_SESSIONS);
    cfg.send_tls13_tickets = 1;
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

/// Resumable sessions the inbound side keeps. Small on purpose: rustls scans it linearly.
const SERVER_SESSIONS: usize = 256;

/// HBONE's ALPN (SPEC 11; I: ztunnel src/tls/workload.rs).
pub const ALPN_H2: &[u8] = b"h2";

/// The HBONE client base: TLS 1.3 only, ALPN h2, no SNI, no resumption (ztunnel's client). The
/// verifier is set per destination (`hbone_client_for`).
pub fn hbone_client_base(
    cert: &Arc<CertifiedKey>,
    roots: &Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        roots.clone(),
        vec![],
        provider.clone(),
    ));
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(OneCert(cert.clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The HBONE client config for one destination: the base with a verifier for `expected`.
/// Connections are pooled, so a config is made per new pooled connection only.
pub fn hbone_client_for(
    base: &ClientConfig,
    roots: &Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
) -> Arc<ClientConfig> {
    Arc::new(expecting(base, roots, expected))
}

/// The HBONE server (15008): TLS 1.3 only, ALPN h2, a client certificate from the mesh roots
/// required.
pub fn hbone_server_config(
    cert: &Arc<CertifiedKey>,
    roots: &Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(OneCert(cert.clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}
