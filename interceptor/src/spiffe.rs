//! SPIFFE ids as Istio uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! A leaf: identity (which certificate we hold), tls (what a peer must present) and route (who
//! may answer for a service) all speak in these ids and none of them imports another for it.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId(String);

/// Istio's trust domain when a mesh names none (and before this VM holds a certificate).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self(format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        (!td.is_empty() && !path.is_empty()).then(|| Self(s.to_string()))
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map(|(td, _)| td).unwrap_or(rest)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SPIFFE URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<SpiffeId> {
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
            GeneralName::URI(u) => SpiffeId::parse(u),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_trust_domain() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/product").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "product"));
        assert!(SpiffeId::parse("https://x/y").is_none());
        assert!(SpiffeId::parse("spiffe:///x").is_none());
    }
}
