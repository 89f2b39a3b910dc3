//! Inbound policy: which connections to this VM's services must be mTLS and which client
//! identities may use them (SPEC section 6).

use std::collections::HashMap;

use serde::Deserialize;

use crate::spiffe::SpiffeId;

/// Istio's PeerAuthentication modes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// mTLS with an istio ALPN is terminated; plaintext and other TLS pass through.
    #[default]
    Permissive,
    /// Only mTLS is accepted.
    Strict,
    /// Nothing is terminated: every connection passes through to the app as it came.
    Disable,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowListError {
    #[error("{0:?}: the port before '=' is not a port number")]
    BadPort(String),
    #[error("{0:?}: not a spiffe:// id")]
    NotSpiffe(String),
}

/// Allowed client identities: for every port, and per port. Empty: every verified identity.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    pub all_ports: Vec<SpiffeId>,
    pub by_port: HashMap<u16, Vec<SpiffeId>>,
}

impl AllowList {
    /// Entries `spiffe://...` (every port) or `PORT=spiffe://...`.
    pub fn parse(entries: &[String]) -> Result<Self, AllowListError> {
        let mut out = Self::default();
        for e in entries {
            let (port, id) = match e.split_once('=') {
                Some((p, id)) => (
                    Some(
                        p.trim()
                            .parse::<u16>()
                            .map_err(|_| AllowListError::BadPort(e.clone()))?,
                    ),
                    id,
                ),
                None => (None, e.as_str()),
            };
            let id =
                SpiffeId::parse(id.trim()).ok_or_else(|| AllowListError::NotSpiffe(e.clone()))?;
            match port {
                Some(p) => out.by_port.entry(p).or_default().push(id),
                None => out.all_ports.push(id),
            }
        }
        Ok(out)
    }

    pub fn allows(&self, port: u16, id: Option<&SpiffeId>) -> bool {
        let per_port = self.by_port.get(&port);
        if self.all_ports.is_empty() && per_port.is_none() {
            return true;
        }
        id.is_some_and(|id| self.all_ports.contains(id) || per_port.is_some_and(|l| l.contains(id)))
    }
}

/// Everything inbound decides per connection: the flags, and who this VM is for the
/// PeerAuthentications and AuthorizationPolicies of the table (`route::policy`).
#[derive(Clone, Debug, Default)]
pub struct InboundPolicy {
    /// `--mtls-mode`: the mode where no PeerAuthentication says one.
    pub mode: MtlsMode,
    /// `--inbound-allow`: who may connect over mTLS where no ALLOW policy applies.
    pub allow: AllowList,
    pub subject: super::policy::Subject,
    /// `--inbound-http requests`: every connection to an HTTP port is served request by
    /// request (judged, counted and logged per request, as an Istio sidecar's HTTP chains);
    /// else only where a policy needs a request's attributes.
    pub http_requests: bool,
    /// `--protocol-detection-timeout`: how long a plaintext connection to a sniffed port may
    /// take to show whether it speaks HTTP.
    pub protocol_detection: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let a = AllowList::parse(&[
            "spiffe://td/ns/a/sa/x".into(),
            "8080=spiffe://td/ns/b/sa/y".into(),
        ])
        .unwrap();
        let x = SpiffeId::parse("spiffe://td/ns/a/sa/x").unwrap();
        let y = SpiffeId::parse("spiffe://td/ns/b/sa/y").unwrap();
        assert!(a.allows(9090, Some(&x)) && !a.allows(9090, Some(&y)));
        assert!(a.allows(8080, Some(&y)) && !a.allows(8080, None));
        assert!(AllowList::default().allows(1, None));
        assert_eq!(
            AllowList::parse(&["x=spiffe://a/b".into()]).unwrap_err(),
            AllowListError::BadPort("x=spiffe://a/b".into())
        );
        assert!(matches!(
            AllowList::parse(&["https://a/b".into()]),
            Err(AllowListError::NotSpiffe(_))
        ));
    }
}
