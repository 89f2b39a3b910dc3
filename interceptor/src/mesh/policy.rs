//! Istio's security kinds (`security.istio.io` v1, v1beta1): PeerAuthentication and the L4
//! part of AuthorizationPolicy, as the mesh files give them. Which of them apply to this VM
//! and what they decide is `route::policy`'s; this module only reads and checks them.
//!
//! I: istio/api security/v1beta1 (field names, decoding), pilot/pkg/security/authz/builder
//! (what is L4), ztunnel's rbac.rs (what a proxy without HTTP enforces).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use super::networks::Cidr;

/// PeerAuthentication's `mtls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerMode {
    /// Inherit from the level above (workload -> namespace -> mesh -> `--mtls-mode`).
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerAuthentication {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    /// Empty: the whole namespace (or, in the root namespace, the mesh).
    pub selector: BTreeMap<String, String>,
    pub mode: PeerMode,
    /// Per workload port; Istio honours it only with a selector.
    pub port_level: BTreeMap<u16, PeerMode>,
    /// `metadata.creationTimestamp` (RFC 3339) when given: the oldest of a level wins, as in
    /// Istio; without, the first in file order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    /// Parsed to say clearly that it is not supported (it needs an ext-authz provider).
    Custom,
}

/// A string match as Istio writes them: exact, `prefix*`, `*suffix` or `*` (any, present).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    pub fn new(s: &str) -> Self {
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_string())
        } else {
            Pattern::Exact(s.to_string())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        match p {
            Pattern::Any => "*".into(),
            Pattern::Exact(e) => e,
            Pattern::Prefix(p) => format!("{p}*"),
            Pattern::Suffix(s) => format!("*{s}"),
        }
    }
}

/// One clause of a rule: every field that is set must hold; within a field any value does;
/// a `not_` field holds when none of its values does. A `from` source, a `to` operation and
/// each `when` condition are all clauses, so one matcher evaluates them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Clause {
    /// Client identities without `spiffe://` (`td/ns/N/sa/S`), as Istio writes principals.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    /// Lower case: hosts match whatever the request's case (istiod's `ignore_case`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<Pattern>,
    /// The request's path without its query.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<Pattern>,
    /// `when: request.headers[NAME]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderCondition>,
}

impl Clause {
    /// It names what only a request carries (judged per request on HTTP ports).
    pub fn is_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.header.is_none())
    }
}

/// A request header condition: any of `values` (none: any), none of `not_values`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeaderCondition {
    /// Lower case.
    pub name: String,
    pub values: Vec<Pattern>,
    pub not_values: Vec<Pattern>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rule {
    /// Any of them (none: any source).
    pub from: Vec<Clause>,
    /// Any of them (none: any operation).
    pub to: Vec<Clause>,
    /// All of them.
    pub when: Vec<Clause>,
    /// The request fields this rule names (`to[0].operation.paths`, ...): judged per request
    /// on HTTP ports; on others the rule fails closed, as Istio on TCP chains.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_fields: Vec<String>,
    /// Fields that need what we never have (a JWT: `requestPrincipals`, `request.auth.*`):
    /// the rule always fails closed (an ALLOW rule never matches, a DENY rule matches
    /// without them), as Istio where no RequestAuthentication applies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_only: Vec<String>,
}

impl Rule {
    pub fn is_http(&self) -> bool {
        !self.http_fields.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// Empty: every workload of the namespace (of the mesh, in the root namespace).
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

// --- decoding (strict, as Istio's: an unknown field is an error) ---

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    #[serde(default)]
    mode: PeerMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PeerAuthenticationSpec {
    selector: Option<SelectorSpec>,
    mtls: Option<MtlsSpec>,
    #[serde(default)]
    port_level_mtls: BTreeMap<u16, MtlsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AuthorizationPolicySpec {
    selector: Option<SelectorSpec>,
    target_ref: Option<Value>,
    #[serde(default)]
    target_refs: Vec<Value>,
    #[serde(default)]
    action: Action,
    provider: Option<Value>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Vec<FromSpec>,
    #[serde(default)]
    to: Vec<ToSpec>,
    #[serde(default)]
    when: Vec<ConditionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    #[serde(default)]
    source: SourceSpec,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceSpec {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    #[serde(default)]
    operation: OperationSpec,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OperationSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionSpec {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// What is wrong with a policy, at a field path below `spec`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn selector(s: Option<SelectorSpec>) -> BTreeMap<String, String> {
    s.map(|s| s.match_labels).unwrap_or_default()
}

pub(super) fn peer_authentication(
    name: String,
    namespace: String,
    created: Option<String>,
    spec: PeerAuthenticationSpec,
) -> PeerAuthentication {
    PeerAuthentication {
        name,
        namespace,
        selector: selector(spec.selector),
        mode: spec.mtls.map(|m| m.mode).unwrap_or_default(),
        port_level: spec
            .port_level_mtls
            .into_iter()
            .map(|(p, m)| (p, m.mode))
            .collect(),
        created,
    }
}

pub(super) fn authorization_policy(
    name: String,
    namespace: String,
    spec: AuthorizationPolicySpec,
) -> Result<AuthorizationPolicy, Invalid> {
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return Err(invalid(
            "targetRef",
            "policies bound to a Gateway or waypoint are enforced there, not on a VM; use selector",
        ));
    }
    if spec.action == Action::Custom || spec.provider.is_some() {
        return Err(invalid(
            "action",
            "CUSTOM needs an ext-authz provider, which interceptor does not call; use ALLOW or DENY",
        ));
    }
    let rules = spec
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| rule(&format!("rules[{i}]"), r))
        .collect::<Result<_, _>>()?;
    Ok(AuthorizationPolicy {
        name,
        namespace,
        selector: selector(spec.selector),
        action: spec.action,
        rules,
    })
}

fn cidrs(field: &str, values: &[String]) -> Result<Vec<Cidr>, Invalid> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Cidr::parse(v).map_err(|e| invalid(format!("{field}[{i}]"), e.to_string())))
        .collect()
}

fn ports(field: &str, values: &[String]) -> Result<Vec<u16>, Invalid> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("{field}[{i}]"), format!("{v:?} is not a port")))
        })
        .collect()
}

/// `request.headers[NAME]`'s NAME.
fn header_key(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?
        .strip_suffix(']')
        .filter(|n| !n.is_empty())
}

/// Paths as Istio writes them; its path templates (`{*}`, `{**}`) are refused, not guessed.
fn paths(field: &str, values: &[String]) -> Result<Vec<Pattern>, Invalid> {
    match values.iter().position(|v| v.contains('{')) {
        Some(i) => Err(invalid(
            format!("{field}[{i}]"),
            "path templates ({*}, {**}) are not supported yet; use exact, prefix* or *suffix",
        )),
        None => Ok(patterns(values)),
    }
}

fn patterns(values: &[String]) -> Vec<Pattern> {
    values.iter().map(|v| Pattern::new(v)).collect()
}

fn rule(at: &str, r: RuleSpec) -> Result<Rule, Invalid> {
    let mut out = Rule::default();
    let mut jwt = |field: String, set: bool| {
        if set {
            out.http_only.push(field);
        }
    };
    for (i, f) in r.from.iter().enumerate() {
        let s = &f.source;
        let p = format!("{at}.from[{i}].source");
        jwt(
            format!("{p}.requestPrincipals"),
            !s.request_principals.is_empty(),
        );
        jwt(
            format!("{p}.notRequestPrincipals"),
            !s.not_request_principals.is_empty(),
        );
    }
    for (i, c) in r.when.iter().enumerate() {
        let never = (c.key.starts_with("request.") && header_key(&c.key).is_none())
            || c.key.starts_with("experimental.");
        jwt(format!("{at}.when[{i}].key: {}", c.key), never);
    }
    for (i, t) in r.to.iter().enumerate() {
        let o = &t.operation;
        let p = format!("{at}.to[{i}].operation");
        for (name, values) in [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ] {
            if !values.is_empty() {
                out.http_fields.push(format!("{p}.{name}"));
            }
        }
    }
    for (i, c) in r.when.iter().enumerate() {
        if header_key(&c.key).is_some() {
            out.http_fields
                .push(format!("{at}.when[{i}].key: {}", c.key));
        }
    }
    for (i, f) in r.from.into_iter().enumerate() {
        let s = f.source;
        let p = format!("{at}.from[{i}].source");
        let mut source_ips = cidrs(&format!("{p}.ipBlocks"), &s.ip_blocks)?;
        // Without a proxy in front of us the remote address is the peer's: the same match.
        source_ips.extend(cidrs(&format!("{p}.remoteIpBlocks"), &s.remote_ip_blocks)?);
        let mut not_source_ips = cidrs(&format!("{p}.notIpBlocks"), &s.not_ip_blocks)?;
        not_source_ips.extend(cidrs(
            &format!("{p}.notRemoteIpBlocks"),
            &s.not_remote_ip_blocks,
        )?);
        out.from.push(Clause {
            principals: patterns(&s.principals),
            not_principals: patterns(&s.not_principals),
            namespaces: patterns(&s.namespaces),
            not_namespaces: patterns(&s.not_namespaces),
            source_ips,
            not_source_ips,
            ..Clause::default()
        });
    }
    for (i, t) in r.to.into_iter().enumerate() {
        let o = t.operation;
        let p = format!("{at}.to[{i}].operation");
        let lower =
            |v: &[String]| patterns(&v.iter().map(|h| h.to_ascii_lowercase()).collect::<Vec<_>>());
        out.to.push(Clause {
            ports: ports(&format!("{p}.ports"), &o.ports)?,
            not_ports: ports(&format!("{p}.notPorts"), &o.not_ports)?,
            hosts: lower(&o.hosts),
            not_hosts: lower(&o.not_hosts),
            methods: patterns(&o.methods),
            not_methods: patterns(&o.not_methods),
            paths: paths(&format!("{p}.paths"), &o.paths)?,
            not_paths: paths(&format!("{p}.notPaths"), &o.not_paths)?,
            ..Clause::default()
        });
    }
    for (i, c) in r.when.into_iter().enumerate() {
        let p = format!("{at}.when[{i}]");
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(invalid(p, "a condition needs values or notValues"));
        }
        let (v, nv) = (format!("{p}.values"), format!("{p}.notValues"));
        let clause = match c.key.as_str() {
            "source.principal" => Clause {
                principals: patterns(&c.values),
                not_principals: patterns(&c.not_values),
                ..Clause::default()
            },
            "source.namespace" => Clause {
                namespaces: patterns(&c.values),
                not_namespaces: patterns(&c.not_values),
                ..Clause::default()
            },
            "source.ip" | "remote.ip" => Clause {
                source_ips: cidrs(&v, &c.values)?,
                not_source_ips: cidrs(&nv, &c.not_values)?,
                ..Clause::default()
            },
            "destination.ip" => Clause {
                destination_ips: cidrs(&v, &c.values)?,
                not_destination_ips: cidrs(&nv, &c.not_values)?,
                ..Clause::default()
            },
            "destination.port" => Clause {
                ports: ports(&v, &c.values)?,
                not_ports: ports(&nv, &c.not_values)?,
                ..Clause::default()
            },
            k if header_key(k).is_some() => Clause {
                header: header_key(k).map(|name| HeaderCondition {
                    name: name.to_ascii_lowercase(),
                    values: patterns(&c.values),
                    not_values: patterns(&c.not_values),
                }),
                ..Clause::default()
            },
            k if k.starts_with("request.") || k.starts_with("experimental.") => continue,
            other => {
                return Err(invalid(
                    format!("{p}.key"),
                    format!(
                        "{other:?}: supported at L4 are source.principal, source.namespace, \
                         source.ip, remote.ip, destination.ip, destination.port"
                    ),
                ))
            }
        };
        out.when.push(clause);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Result<AuthorizationPolicy, Invalid> {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).unwrap();
        authorization_policy("ns/p".into(), "ns".into(), spec)
    }

    #[test]
    fn patterns_as_istio_writes_them() {
        assert!(Pattern::new("*").matches("anything"));
        assert!(Pattern::new("td/ns/a/*").matches("td/ns/a/sa/x"));
        assert!(!Pattern::new("td/ns/a/*").matches("td/ns/b/sa/x"));
        assert!(Pattern::new("*/sa/x").matches("td/ns/a/sa/x"));
        assert!(Pattern::new("a").matches("a") && !Pattern::new("a").matches("ab"));
    }

    #[test]
    fn l4_fields_become_clauses() {
        let p = policy(
            "action: DENY\nrules:\n- from:\n  - source: {principals: [td/ns/a/sa/x], ipBlocks: [10.0.0.0/8], remoteIpBlocks: [192.0.2.1]}\n  to:\n  - operation: {ports: ['8080'], notPorts: ['9']}\n  when:\n  - {key: destination.port, values: ['8080']}\n  - {key: source.namespace, notValues: [b]}\n",
        )
        .unwrap();
        assert_eq!(p.action, Action::Deny);
        let r = &p.rules[0];
        assert_eq!(
            r.from[0].principals,
            vec![Pattern::Exact("td/ns/a/sa/x".into())]
        );
        assert_eq!(r.from[0].source_ips.len(), 2);
        assert_eq!(
            (r.to[0].ports.clone(), r.to[0].not_ports.clone()),
            (vec![8080], vec![9])
        );
        assert_eq!(r.when.len(), 2);
        assert!(r.http_only.is_empty());
    }

    #[test]
    fn http_fields_are_named_and_bad_values_refused() {
        let p = policy("rules:\n- to:\n  - operation: {paths: [/admin], methods: [GET], hosts: [API.example]}\n  when:\n  - {key: 'request.headers[X-User]', values: [y]}\n  - {key: 'request.auth.claims[iss]', values: [z]}\n").unwrap();
        assert_eq!(
            p.rules[0].http_fields,
            vec![
                "rules[0].to[0].operation.hosts",
                "rules[0].to[0].operation.methods",
                "rules[0].to[0].operation.paths",
                "rules[0].when[0].key: request.headers[X-User]",
            ]
        );
        assert_eq!(
            p.rules[0].http_only,
            vec!["rules[0].when[1].key: request.auth.claims[iss]"]
        );
        let to = &p.rules[0].to[0];
        assert_eq!(to.hosts, vec![Pattern::Exact("api.example".into())]);
        assert_eq!(to.paths, vec![Pattern::Exact("/admin".into())]);
        let h = p.rules[0].when[0].header.as_ref().unwrap();
        assert_eq!(
            (h.name.as_str(), &h.values),
            ("x-user", &vec![Pattern::Exact("y".into())])
        );
        let e = policy("rules:\n- to:\n  - operation: {paths: ['/a/{*}/b']}\n").unwrap_err();
        assert_eq!(e.field, "rules[0].to[0].operation.paths[0]");
        let e = policy("rules:\n- to:\n  - operation: {ports: ['http']}\n").unwrap_err();
        assert_eq!(e.field, "rules[0].to[0].operation.ports[0]");
        let e = policy("rules:\n- when:\n  - {key: connection.sni, values: [a]}\n").unwrap_err();
        assert_eq!(e.field, "rules[0].when[0].key");
        let e = policy("action: CUSTOM\nprovider: {name: x}\n").unwrap_err();
        assert_eq!(e.field, "action");
        let e = policy("rules:\n- from:\n  - source: {ipBlocks: [not-an-ip]}\n").unwrap_err();
        assert_eq!(e.field, "rules[0].from[0].source.ipBlocks[0]");
    }
}
