//! TLS as Istio's sidecars speak it: SPIFFE identities in URI SANs, no DNS-name checks, the
//! `istio` ALPN. Configs are built once per identity; only the verifier varies per connection.

mod hello;
mod verify;

pub use hello::{parse_client_hello, peek_client_hello, ClientHello, Peeked};
pub use verify::SpiffeServerVerifier;

use std::collections::HashMap;
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
    // The base verifier accepts nobody; resumption belongs to the per-endpoint configs
    // (ClientConfigs), never to this shared one.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The client config for connections to one endpoint: the base with a verifier for `expected`
/// identities and a resumption store of its own.
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
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(SESSIONS_PER_ENDPOINT);
    Arc::new(cfg)
}

/// TLS 1.3 sessions kept per endpoint: a few, for connections opened at once.
const SESSIONS_PER_ENDPOINT: usize = 8;
/// Endpoint configs kept before the cache starts over.
const MAX_ENDPOINT_CONFIGS: usize = 4096;

type ConfigKey = (String, Vec<SpiffeId>);
/// The base the configs were made from, and the configs.
type ConfigCache = (Arc<ClientConfig>, HashMap<ConfigKey, Arc<ClientConfig>>);

/// Client configs by (endpoint, expected identities). A resumed TLS 1.3 session skips the
/// certificate check, so a session is only ever offered where it was made: to the same address,
/// under the same identity expectation (rustls also refuses resumption across verifiers). A
/// resumed handshake saves both certificate verifications and signatures, most of the cost of a
/// new mTLS connection. A new identity (rotation) starts the cache over.
#[derive(Default)]
pub struct ClientConfigs {
    inner: std::sync::Mutex<Option<ConfigCache>>,
}

impl ClientConfigs {
    pub fn get(
        &self,
        base: &Arc<ClientConfig>,
        roots: &Arc<RootCertStore>,
        endpoint: String,
        expected: Vec<SpiffeId>,
    ) -> Arc<ClientConfig> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match &*inner {
            Some((b, map)) => !Arc::ptr_eq(b, base) || map.len() >= MAX_ENDPOINT_CONFIGS,
            None => true,
        };
        if fresh {
            *inner = Some((base.clone(), HashMap::new()));
        }
        let Some((_, map)) = inner.as_mut() else {
            return client_for(base, roots, expected);
        };
        map.entry((endpoint, expected.clone()))
            .or_insert_with(|| client_for(base, roots, expected))
            .clone()
    }
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
    fn endpoint_configs_are_kept_per_endpoint_and_identity_and_reset_on_rotation() {
        let base = || {
            Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            )
        };
        let (b1, b2) = (base(), base());
        let roots = Arc::new(RootCertStore::empty());
        let id = |s: &str| vec![SpiffeId::parse(s).unwrap()];
        let c = ClientConfigs::default();
        let a = c.get(
            &b1,
            &roots,
            "10.0.0.1:80".into(),
            id("spiffe://td/ns/a/sa/x"),
        );
        let same = c.get(
            &b1,
            &roots,
            "10.0.0.1:80".into(),
            id("spiffe://td/ns/a/sa/x"),
        );
        assert!(
            Arc::ptr_eq(&a, &same),
            "one config (one session store) per endpoint"
        );
        let other_ep = c.get(
            &b1,
            &roots,
            "10.0.0.2:80".into(),
            id("spiffe://td/ns/a/sa/x"),
        );
        let other_id = c.get(
            &b1,
            &roots,
            "10.0.0.1:80".into(),
            id("spiffe://td/ns/a/sa/y"),
        );
        assert!(!Arc::ptr_eq(&a, &other_ep) && !Arc::ptr_eq(&a, &other_id));
        let rotated = c.get(
            &b2,
            &roots,
            "10.0.0.1:80".into(),
            id("spiffe://td/ns/a/sa/x"),
        );
        assert!(!Arc::ptr_eq(&a, &rotated), "a new identity starts over");
    }

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
