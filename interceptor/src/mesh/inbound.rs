//! istiod's inbound intent for this VM, from its `virtualInbound` listener (sheet 4.1-4.3): per
//! port the mTLS mode its chain set says (STRICT: TLS chains only; PERMISSIVE: TLS and
//! plaintext; DISABLE: plaintext only) and the RBAC filters on those chains (the network RBAC
//! of TCP chains, the HTTP RBAC of HTTP chains), as Envoy's RBAC types: principals, permissions,
//! the policy names istiod writes (`ns[NS]-policy[NAME]-rule[I]`). What they decide for a
//! connection is `route::rbac`'s.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::networks::Cidr;
use super::policy::PeerMode;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InboundIntent {
    /// Ports with chains of their own (`destination_port`).
    pub ports: BTreeMap<u16, InboundPort>,
    /// Every other port (the passthrough chains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<InboundPort>,
}

impl InboundIntent {
    pub fn port(&self, port: u16) -> Option<&InboundPort> {
        self.ports.get(&port).or(self.other.as_ref())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboundPort {
    pub mode: PeerMode,
    /// Its chains are HTTP (an HTTP connection manager): requests can be judged one by one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http: bool,
    /// It also has TCP chains: with HTTP ones, the port is sniffed (istiod's Auto ports and
    /// passthrough chains); an HTTP chain is taken by an mTLS client offering an Istio HTTP
    /// ALPN, or by plaintext that starts as HTTP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tcp: bool,
    /// In chain order (istiod: AUDIT, DENY, ALLOW); an HTTP chain's where the port has both.
    pub filters: Arc<Vec<RbacFilter>>,
}

impl InboundPort {
    pub fn protocol(&self) -> super::ListenerProtocol {
        match (self.http, self.tcp) {
            (true, false) => super::ListenerProtocol::Http,
            (true, true) => super::ListenerProtocol::Auto,
            (false, _) => super::ListenerProtocol::Tcp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RbacAction {
    Allow,
    Deny,
    /// AUDIT: matched policies are logged, nothing is decided.
    Log,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RbacFilter {
    pub action: RbacAction,
    /// An HTTP chain's filter (its HTTP conditions are what the L4 path cannot see).
    pub http: bool,
    /// By name, sorted (Envoy's map).
    pub policies: Vec<(String, RbacPolicy)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RbacPolicy {
    /// Any of them (OR).
    pub permissions: Vec<Permission>,
    /// Any of them (OR).
    pub principals: Vec<Principal>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Any,
    DestinationPort(u16),
    DestinationPortRange(u16, u16),
    DestinationIp(Cidr),
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    /// A request header (`:method`, `:authority` as istiod writes methods and hosts).
    Header(HeaderMatch),
    /// The request's path without its query (Envoy's url_path).
    UrlPath(StringMatch),
    /// A condition we cannot evaluate even with the request (JWT metadata, SNI), by kind.
    L7(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    Any,
    /// The peer certificate's URI SAN (None: any authenticated peer).
    Authenticated(Option<StringMatch>),
    /// The TCP peer's address.
    DirectRemoteIp(Cidr),
    SourceIp(Cidr),
    /// The client address after XFF / PROXY: at L4, the TCP peer's.
    RemoteIp(Cidr),
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A request header (`when: request.headers[...]`).
    Header(HeaderMatch),
    L7(String),
}

/// Envoy's HeaderMatcher, the kinds istiod writes: a string match or presence, maybe inverted.
/// Several values of a header are matched joined by `,`, as Envoy does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Lower case; pseudo-headers (`:method`, `:authority`, `:path`) as HTTP/2 names them.
    pub name: String,
    /// None: present (any value).
    pub value: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

impl HeaderMatch {
    /// Whether the header (its value, None when absent) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let hit = match (&self.value, value) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(m), Some(v)) => m.matches(v),
        };
        hit != self.invert
    }
}

/// Envoy's StringMatcher, the kinds istiod writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(#[serde(with = "regex_text")] regex::Regex),
    /// `ignore_case` (hosts): the inner pattern is lower case and the value is lowered.
    IgnoreCase(Box<StringMatch>),
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StringMatch::Regex(a), StringMatch::Regex(b)) => a.as_str() == b.as_str(),
            (StringMatch::Exact(a), StringMatch::Exact(b))
            | (StringMatch::Prefix(a), StringMatch::Prefix(b))
            | (StringMatch::Suffix(a), StringMatch::Suffix(b))
            | (StringMatch::Contains(a), StringMatch::Contains(b)) => a == b,
            (StringMatch::IgnoreCase(a), StringMatch::IgnoreCase(b)) => a == b,
            _ => false,
        }
    }
}

impl StringMatch {
    /// A safe_regex as Envoy runs it: the whole value must match (RE2 full match).
    pub fn regex(pattern: &str) -> Result<Self, regex::Error> {
        regex::Regex::new(&format!("^(?:{pattern})$")).map(StringMatch::Regex)
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) => v.starts_with(s.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Contains(s) => v.contains(s.as_str()),
            StringMatch::Regex(r) => r.is_match(v),
            StringMatch::IgnoreCase(m) => m.matches(&v.to_ascii_lowercase()),
        }
    }
}

/// A compiled regex kept (and persisted) as its anchored text.
mod regex_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<regex::Regex, D::Error> {
        let text = String::deserialize(d)?;
        regex::Regex::new(&text).map_err(serde::de::Error::custom)
    }
}
