//! Istio's inbound policy for this VM, from the table's PeerAuthentications and
//! AuthorizationPolicies: the mTLS mode of a port and whether a connection may go on.
//! The flags (`--mtls-mode`, `--inbound-allow`) are the defaults the kinds override.
//!
//! As istiod composes them (I: pilot/pkg/security/authn/policy_applier.go
//! composePeerAuthentication; pilot/pkg/model/authorization.go ListAuthorizationPolicies):
//! a PeerAuthentication of the workload (selector; ignored in the root namespace) beats the
//! namespace's, which beats the mesh's (root namespace, no selector); UNSET inherits; of two
//! at one level the oldest wins. AuthorizationPolicies of the root namespace and of ours whose
//! selector matches apply: any matching DENY denies; then, if any ALLOW applies, one must match.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::allow::{InboundPolicy, MtlsMode};
use crate::mesh::{
    Action, AuthorizationPolicy, Clause, Pattern, PeerAuthentication, PeerMode, Rule, Table,
};
use crate::spiffe::SpiffeId;

/// Istio's default `rootNamespace` (meshConfig).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// What policies select this VM by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Policies here without a selector are mesh-wide.
    pub root_namespace: String,
    /// `region/zone/subzone` (or a prefix; empty: unknown): locality load balancing's origin.
    pub locality: String,
}

impl Default for Subject {
    fn default() -> Self {
        Self {
            namespace: crate::mesh::DEFAULT_NAMESPACE.into(),
            labels: BTreeMap::new(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            locality: String::new(),
        }
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The mode of a port and who set it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeDecision {
    pub mode: MtlsMode,
    /// The PeerAuthentication (`ns/name`), or `--mtls-mode`.
    pub by: String,
}

/// `a` is older than `b` by their timestamps; without both, the first in order stays.
fn older(a: &PeerAuthentication, b: &PeerAuthentication) -> bool {
    matches!((&a.created, &b.created), (Some(x), Some(y)) if x < y)
}

/// The mTLS mode of connections to `port` (a port of this VM's app): istiod's, when it sent
/// `virtualInbound` (it composed every PeerAuthentication for us), else from the table's.
pub fn mtls_mode(table: &Table, policy: &InboundPolicy, port: u16) -> ModeDecision {
    if let Some(intent) = &table.traffic.inbound {
        let mode = intent.port(port).map_or(PeerMode::Permissive, |p| p.mode);
        return ModeDecision {
            mode: match mode {
                PeerMode::Strict => MtlsMode::Strict,
                PeerMode::Disable => MtlsMode::Disable,
                PeerMode::Permissive | PeerMode::Unset => MtlsMode::Permissive,
            },
            by: if intent.ports.contains_key(&port) {
                format!("istiod virtualInbound (port {port}'s chains)")
            } else {
                "istiod virtualInbound (the passthrough chains)".into()
            },
        };
    }
    let s = &policy.subject;
    let (mut mesh, mut namespace, mut workload): (Option<&PeerAuthentication>, _, _) =
        (None, None, None);
    for pa in &table.peer_authentications {
        let in_scope = pa.namespace == s.namespace || pa.namespace == s.root_namespace;
        if !in_scope || !selects(&pa.selector, &s.labels) {
            continue;
        }
        let slot = match (pa.selector.is_empty(), pa.namespace == s.root_namespace) {
            (true, true) => &mut mesh,
            (true, false) => &mut namespace,
            // Istio ignores workload selectors in the root namespace.
            (false, true) => continue,
            (false, false) => &mut workload,
        };
        if slot.is_none_or(|cur| older(pa, cur)) {
            *slot = Some(&**pa);
        }
    }
    let mut out = ModeDecision {
        mode: policy.mode,
        by: "--mtls-mode".into(),
    };
    let mut apply = |mode: PeerMode, by: &str| {
        let mode = match mode {
            PeerMode::Unset => return,
            PeerMode::Disable => MtlsMode::Disable,
            PeerMode::Permissive => MtlsMode::Permissive,
            PeerMode::Strict => MtlsMode::Strict,
        };
        out = ModeDecision {
            mode,
            by: by.to_string(),
        };
    };
    for pa in [mesh, namespace, workload].into_iter().flatten() {
        apply(pa.mode, &pa.name);
    }
    if let Some(pa) = workload {
        if let Some(m) = pa.port_level.get(&port) {
            apply(*m, &format!("{} (portLevelMtls {port})", pa.name));
        }
    }
    out
}

/// One inbound connection as policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The app's port (the original destination's).
    pub port: u16,
    /// The verified client identity; None for plaintext and TLS we do not terminate.
    pub identity: Option<&'a SpiffeId>,
    /// Whether we terminated the client's mTLS (the allow-list flag applies only then).
    pub mtls: bool,
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The request, where the connection is served as HTTP; None at L4, where conditions
    /// only a request carries fail closed.
    pub http: Option<&'a HttpAttrs<'a>>,
}

/// What of an HTTP request authorization may look at.
#[derive(Clone, Copy, Debug)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// The path without its query or fragment (Envoy's url_path; Istio's `paths`).
    pub path: &'a str,
    /// The whole request target (`:path`).
    pub target: &'a str,
    /// The authority (`:authority`, or `Host`).
    pub host: &'a str,
    pub headers: &'a hyper::HeaderMap,
}

impl HttpAttrs<'_> {
    /// A header's value as Envoy's HeaderMatcher sees it: pseudo-headers from the request
    /// line, several values joined by `,`; None when absent.
    pub fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match name {
            ":method" => return Some(Cow::Borrowed(self.method)),
            ":authority" | "host" => return Some(Cow::Borrowed(self.host)),
            ":path" => return Some(Cow::Borrowed(self.target)),
            _ => {}
        }
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        let first = String::from_utf8_lossy(first.as_bytes());
        match values.next() {
            None => Some(first),
            Some(second) => {
                let mut all = first.into_owned();
                for v in std::iter::once(second).chain(values) {
                    all.push(',');
                    all.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                Some(Cow::Owned(all))
            }
        }
    }
}

/// Why a connection may or may not go on; the refusals are metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No ALLOW policy applies and the allow-list flag lets it in.
    NoPolicy,
    /// An ALLOW policy matched.
    Allowed,
    /// A DENY policy matched.
    PolicyDenied,
    /// ALLOW policies apply and none matched.
    PolicyNotAllowed,
    /// No ALLOW policy applies and `--inbound-allow` does not name the identity.
    NotAllowed,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::NoPolicy => "no_policy",
            Reason::Allowed => "allowed",
            Reason::PolicyDenied => "policy_denied",
            Reason::PolicyNotAllowed => "policy_not_allowed",
            Reason::NotAllowed => "not_allowed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The policy that decided (`ns/name`, rule index), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// AUDIT policies that matched (they decide nothing; they are logged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<String>,
    /// The AuthorizationPolicies that apply to this VM, whatever the verdict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applicable: Vec<String>,
    /// Judged without a request, a rule needed one (a path, a method, a header): failed closed
    /// here, it is decided request by request where the port is served as HTTP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub needs_http: bool,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by = self.policy.as_deref().unwrap_or("-");
        let rule = self.rule.unwrap_or(0);
        match self.reason {
            Reason::NoPolicy => f.write_str("allowed: no ALLOW AuthorizationPolicy applies"),
            Reason::Allowed => write!(f, "allowed by {by} rules[{rule}]"),
            Reason::PolicyDenied => write!(f, "denied by {by} rules[{rule}] (DENY)"),
            Reason::PolicyNotAllowed => write!(
                f,
                "denied: no rule of the ALLOW policies that apply matches ({})",
                self.applicable.join(", ")
            ),
            Reason::NotAllowed => f.write_str("denied: identity not in --inbound-allow"),
        }
    }
}

/// The policies that select this VM, in table order.
pub fn applicable<'t, 's>(
    table: &'t Table,
    s: &'s Subject,
) -> impl Iterator<Item = &'t AuthorizationPolicy> + use<'t, 's> {
    table
        .authorization_policies
        .iter()
        .map(|p| &**p)
        .filter(move |p| {
            (p.namespace == s.namespace || p.namespace == s.root_namespace)
                && selects(&p.selector, &s.labels)
        })
}

/// Whether `req` may go on: istiod's RBAC when it sent `virtualInbound`, else the table's
/// policies. DENY first, then ALLOW (none applying: everything, or what `--inbound-allow`
/// says for mTLS), AUDIT only noted.
pub fn authorize(table: &Table, policy: &InboundPolicy, req: &Request) -> Decision {
    if let Some(port) = table
        .traffic
        .inbound
        .as_ref()
        .and_then(|i| i.port(req.port))
    {
        let d = super::rbac::authorize(port, req);
        // istiod sent no ALLOW for this port: the flag still narrows mTLS clients.
        if d.reason == Reason::NoPolicy && req.mtls && !policy.allow.allows(req.port, req.identity)
        {
            return Decision {
                allowed: false,
                reason: Reason::NotAllowed,
                ..d
            };
        }
        return d;
    }
    let mut out = Decision {
        allowed: true,
        reason: Reason::NoPolicy,
        policy: None,
        rule: None,
        audited: vec![],
        applicable: vec![],
        needs_http: false,
    };
    let mut any_allow = false;
    let mut allowed_by = None;
    let mut denied_by = None;
    for p in applicable(table, &policy.subject) {
        out.applicable.push(p.name.clone());
        let hit = p.rules.iter().position(|r| {
            out.needs_http |= r.is_http() && req.http.is_none() && p.action != Action::Audit;
            rule_matches(r, p.action, req)
        });
        match (p.action, hit) {
            (Action::Deny, Some(i)) if denied_by.is_none() => denied_by = Some((&p.name, i)),
            (Action::Allow, hit) => {
                any_allow = true;
                if let (Some(i), None) = (hit, &allowed_by) {
                    allowed_by = Some((&p.name, i));
                }
            }
            (Action::Audit, Some(_)) => out.audited.push(p.name.clone()),
            _ => {}
        }
    }
    let decided = |reason, allowed, by: Option<(&String, usize)>| Decision {
        allowed,
        reason,
        policy: by.map(|(n, _)| n.clone()),
        rule: by.map(|(_, i)| i),
        ..out.clone()
    };
    if denied_by.is_some() {
        return decided(Reason::PolicyDenied, false, denied_by);
    }
    if any_allow {
        return match allowed_by {
            Some(by) => decided(Reason::Allowed, true, Some(by)),
            None => decided(Reason::PolicyNotAllowed, false, None),
        };
    }
    if req.mtls && !policy.allow.allows(req.port, req.identity) {
        return decided(Reason::NotAllowed, false, None);
    }
    out
}

fn rule_matches(rule: &Rule, action: Action, req: &Request) -> bool {
    // Failing closed on what we cannot see (a JWT; at L4, the request): such an ALLOW (or
    // AUDIT) rule never matches; a DENY rule matches on the rest (those conditions dropped).
    let unseen = !rule.http_only.is_empty() || (rule.is_http() && req.http.is_none());
    if unseen && action != Action::Deny {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|c| clause_matches(c, req)))
        && (rule.to.is_empty() || rule.to.iter().any(|c| clause_matches(c, req)))
        && rule.when.iter().all(|c| clause_matches(c, req))
}

/// `td/ns/N/sa/S`: a principal as Istio writes it.
fn principal(id: &SpiffeId) -> &str {
    id.as_str().strip_prefix("spiffe://").unwrap_or(id.as_str())
}

/// The namespace a principal names (`td/ns/N/...`).
fn namespace_of(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    parts.next()?;
    (parts.next()? == "ns").then_some(())?;
    parts.next()
}

fn one_of(ps: &[Pattern], v: Option<&str>) -> bool {
    ps.is_empty() || v.is_some_and(|v| ps.iter().any(|p| p.matches(v)))
}

fn none_of(ps: &[Pattern], v: Option<&str>) -> bool {
    v.is_none_or(|v| !ps.iter().any(|p| p.matches(v)))
}

fn clause_matches(c: &Clause, req: &Request) -> bool {
    let principal = req.identity.map(principal);
    let namespace = principal.and_then(namespace_of);
    let in_cidrs = |cs: &[crate::mesh::Cidr], ip: IpAddr| cs.iter().any(|c| c.contains(ip));
    one_of(&c.principals, principal)
        && none_of(&c.not_principals, principal)
        && one_of(&c.namespaces, namespace)
        && none_of(&c.not_namespaces, namespace)
        && (c.source_ips.is_empty() || in_cidrs(&c.source_ips, req.source))
        && !in_cidrs(&c.not_source_ips, req.source)
        && (c.destination_ips.is_empty() || in_cidrs(&c.destination_ips, req.destination))
        && !in_cidrs(&c.not_destination_ips, req.destination)
        && (c.ports.is_empty() || c.ports.contains(&req.port))
        && !c.not_ports.contains(&req.port)
        && req.http.is_none_or(|h| request_matches(c, h))
}

/// The request's part of a clause (at L4 there is none: those conditions are dropped).
fn request_matches(c: &Clause, h: &HttpAttrs) -> bool {
    let host = h.host.to_ascii_lowercase();
    let host = Some(host.as_str());
    let header_holds = c.header.as_ref().is_none_or(|cond| {
        let value = h.header(&cond.name);
        let value = value.as_deref();
        one_of(&cond.values, value) && none_of(&cond.not_values, value)
    });
    one_of(&c.hosts, host)
        && none_of(&c.not_hosts, host)
        && one_of(&c.methods, Some(h.method))
        && none_of(&c.not_methods, Some(h.method))
        && one_of(&c.paths, Some(h.path))
        && none_of(&c.not_paths, Some(h.path))
        && header_holds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Options, Resources};
    use crate::route::AllowList;

    fn table(yaml: &str) -> Table {
        let mut res = Resources::default();
        let mut errors = vec![];
        crate::mesh::parse_documents(
            std::path::Path::new("p.yaml"),
            yaml,
            "default",
            &mut res,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        Table::build(res, Options::default())
    }

    fn vm() -> InboundPolicy {
        InboundPolicy {
            subject: Subject {
                namespace: "vms".into(),
                labels: [("app".to_string(), "db".to_string())].into(),
                root_namespace: "istio-system".into(),
                locality: String::new(),
            },
            ..InboundPolicy::default()
        }
    }

    fn pa(ns: &str, name: &str, body: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n---\n")
    }

    fn ap(ns: &str, name: &str, body: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n---\n")
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/{s}")).unwrap()
    }

    fn req(port: u16, identity: Option<&SpiffeId>) -> Request<'_> {
        Request {
            port,
            identity,
            mtls: identity.is_some(),
            source: "10.0.0.7".parse().unwrap(),
            destination: "10.1.0.1".parse().unwrap(),
            http: None,
        }
    }

    /// Paths (Istio's prefix and suffix forms), methods, hosts (any case) and a request
    /// header, judged on the request; without one the same rules fail closed and say so.
    #[test]
    fn http_fields_are_judged_on_the_request() {
        let t = table(&(ap(
            "vms",
            "web",
            "  rules:\n  - to: [{operation: {methods: [GET], paths: ['/public*', '*.css'], hosts: [Shop.Example]}}]\n  - to: [{operation: {notPaths: ['/admin*'], methods: [POST]}}]\n    when: [{key: 'request.headers[x-user]', values: [alice]}]",
        ) + &ap(
            "vms",
            "deny-evil",
            "  action: DENY\n  rules:\n  - when: [{key: 'request.headers[x-evil]', values: ['*']}]",
        )));
        let mut headers = hyper::HeaderMap::new();
        let judge = |method: &str, path: &str, host: &str, h: &hyper::HeaderMap| {
            let attrs = HttpAttrs {
                method,
                path,
                target: path,
                host,
                headers: h,
            };
            authorize(
                &t,
                &vm(),
                &Request {
                    http: Some(&attrs),
                    ..req(8080, None)
                },
            )
        };
        assert!(judge("GET", "/public/a", "shop.example", &headers).allowed);
        assert!(judge("GET", "/x/site.css", "SHOP.example", &headers).allowed);
        assert!(!judge("GET", "/public/a", "other.example", &headers).allowed);
        assert!(!judge("DELETE", "/public/a", "shop.example", &headers).allowed);
        assert!(!judge("POST", "/orders", "shop.example", &headers).allowed);
        headers.insert("x-user", "alice".parse().unwrap());
        let d = judge("POST", "/orders", "shop.example", &headers);
        assert_eq!((d.allowed, d.rule), (true, Some(1)), "{d:?}");
        assert!(!judge("POST", "/admin/x", "shop.example", &headers).allowed);
        headers.insert("x-evil", "".parse().unwrap());
        let d = judge("GET", "/public/a", "shop.example", &headers);
        assert_eq!(d.reason, Reason::PolicyDenied, "{d:?}");
        // At L4: the ALLOW rules never match, the DENY matches without its header.
        let d = authorize(&t, &vm(), &req(8080, None));
        assert_eq!(d.reason, Reason::PolicyDenied, "{d:?}");
        assert!(d.needs_http);
    }

    #[test]
    fn peer_authentication_levels_inherit_and_override() {
        let p = vm();
        let mode = |yaml: &str, port| mtls_mode(&table(yaml), &p, port);
        assert_eq!(mode("", 80).by, "--mtls-mode");
        assert_eq!(mode("", 80).mode, MtlsMode::Permissive);
        let mesh = pa("istio-system", "mesh", "  mtls: {mode: STRICT}");
        assert_eq!(mode(&mesh, 80).mode, MtlsMode::Strict);
        // Namespace UNSET inherits the mesh's; another namespace's is not ours.
        let ns_unset = pa("vms", "ns", "  mtls: {}");
        let other = pa("web", "ns", "  mtls: {mode: DISABLE}");
        let d = mode(&format!("{mesh}{ns_unset}{other}"), 80);
        assert_eq!(
            (d.mode, d.by.as_str()),
            (MtlsMode::Strict, "istio-system/mesh")
        );
        // Workload beats namespace; portLevelMtls beats workload, only on its port.
        let ns = pa("vms", "ns", "  mtls: {mode: PERMISSIVE}");
        let wl = pa(
            "vms",
            "db",
            "  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    9090: {mode: DISABLE}\n    9091: {}",
        );
        let y = format!("{mesh}{ns}{wl}");
        assert_eq!(mode(&y, 80).mode, MtlsMode::Strict);
        assert_eq!(mode(&y, 9090).mode, MtlsMode::Disable);
        assert_eq!(mode(&y, 9090).by, "vms/db (portLevelMtls 9090)");
        assert_eq!(mode(&y, 9091).mode, MtlsMode::Strict);
        // A selector for other labels, or one in the root namespace, does not apply.
        let theirs = pa(
            "vms",
            "web",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}",
        );
        let root_sel = pa(
            "istio-system",
            "sel",
            "  selector: {matchLabels: {app: db}}\n  mtls: {mode: DISABLE}",
        );
        assert_eq!(
            mode(&format!("{ns}{theirs}{root_sel}"), 80).mode,
            MtlsMode::Permissive
        );
        // Two namespace-wide: the older by timestamp, else the first.
        let a = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: vms, creationTimestamp: '2026-02-01T00:00:00Z'}\nspec: {mtls: {mode: STRICT}}\n---\n";
        let b = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: vms, creationTimestamp: '2026-01-01T00:00:00Z'}\nspec: {mtls: {mode: DISABLE}}\n---\n";
        assert_eq!(mode(&format!("{a}{b}"), 80).by, "vms/b");
        let c = pa("vms", "c", "  mtls: {mode: DISABLE}");
        assert_eq!(mode(&format!("{ns}{c}"), 80).by, "vms/ns");
    }

    #[test]
    fn deny_beats_allow_and_allow_policies_close_the_rest() {
        let p = vm();
        let (a, b) = (id("a/sa/x"), id("b/sa/y"));
        let allow_a = ap(
            "vms",
            "allow-a",
            "  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/a/sa/x]}\n    to:\n    - operation: {ports: ['8080']}",
        );
        let t = table(&allow_a);
        let d = authorize(&t, &p, &req(8080, Some(&a)));
        assert_eq!(
            (d.allowed, d.reason, d.policy.as_deref(), d.rule),
            (true, Reason::Allowed, Some("vms/allow-a"), Some(0))
        );
        assert_eq!(
            authorize(&t, &p, &req(8080, Some(&b))).reason,
            Reason::PolicyNotAllowed
        );
        assert_eq!(
            authorize(&t, &p, &req(9090, Some(&a))).reason,
            Reason::PolicyNotAllowed
        );
        assert_eq!(
            authorize(&t, &p, &req(8080, None)).reason,
            Reason::PolicyNotAllowed
        );
        // A mesh-wide DENY of namespace a beats the ALLOW.
        let deny = ap(
            "istio-system",
            "deny-a",
            "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [a]}",
        );
        let d = authorize(
            &table(&format!("{allow_a}{deny}")),
            &p,
            &req(8080, Some(&a)),
        );
        assert_eq!(
            (d.allowed, d.reason, d.policy.as_deref()),
            (false, Reason::PolicyDenied, Some("istio-system/deny-a"))
        );
        // ALLOW with no rules allows nothing; DENY with no rules denies nothing.
        let none = ap("vms", "nothing", "  {}");
        assert_eq!(
            authorize(&table(&none), &p, &req(1, Some(&a))).reason,
            Reason::PolicyNotAllowed
        );
        let deny_none = ap("vms", "deny-nothing", "  action: DENY");
        assert_eq!(
            authorize(&table(&deny_none), &p, &req(1, Some(&a))).reason,
            Reason::NoPolicy
        );
        // Another workload's policy does not apply.
        let theirs = ap(
            "vms",
            "web",
            "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{}]",
        );
        assert!(authorize(&table(&theirs), &p, &req(1, None)).allowed);
    }

    #[test]
    fn clauses_not_fields_conditions_and_http_rules() {
        let p = vm();
        let a = id("a/sa/x");
        let y = ap(
            "vms",
            "mixed",
            "  rules:\n  - from:\n    - source: {notPrincipals: ['*/sa/x'], ipBlocks: [10.0.0.0/24]}\n  - when:\n    - {key: source.principal, values: ['cluster.local/ns/a/*']}\n    - {key: destination.port, notValues: ['22']}",
        );
        let t = table(&y);
        // Rule 0: plaintext from 10.0.0.0/24 (no principal, so notPrincipals holds).
        assert_eq!(authorize(&t, &p, &req(5, None)).rule, Some(0));
        // Rule 1: a's principal on any port but 22.
        assert_eq!(authorize(&t, &p, &req(5, Some(&a))).rule, Some(1));
        assert_eq!(
            authorize(&t, &p, &req(22, Some(&a))).reason,
            Reason::PolicyNotAllowed
        );
        let mut far = req(5, None);
        far.source = "192.0.2.1".parse().unwrap();
        assert!(!authorize(&t, &p, &far).allowed);
        // HTTP-only: the ALLOW rule never matches; the DENY rule matches without its paths.
        let allow_http = ap(
            "vms",
            "h",
            "  rules:\n  - to:\n    - operation: {paths: [/x]}",
        );
        assert_eq!(
            authorize(&table(&allow_http), &p, &req(5, Some(&a))).reason,
            Reason::PolicyNotAllowed
        );
        let deny_http = ap(
            "vms",
            "h",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [POST], ports: ['5']}",
        );
        let t = table(&deny_http);
        assert_eq!(
            authorize(&t, &p, &req(5, Some(&a))).reason,
            Reason::PolicyDenied
        );
        assert!(authorize(&t, &p, &req(6, Some(&a))).allowed);
        // AUDIT decides nothing.
        let audit = ap("vms", "audit", "  action: AUDIT\n  rules: [{}]");
        let d = authorize(&table(&audit), &p, &req(5, None));
        assert!(d.allowed && d.audited == ["vms/audit"]);
    }

    #[test]
    fn without_allow_policies_the_flag_list_decides_for_mtls() {
        let mut p = vm();
        p.allow = AllowList::parse(&["spiffe://cluster.local/ns/a/sa/x".into()]).unwrap();
        let (a, b) = (id("a/sa/x"), id("b/sa/y"));
        let t = table("");
        assert!(authorize(&t, &p, &req(1, Some(&a))).allowed);
        assert_eq!(
            authorize(&t, &p, &req(1, Some(&b))).reason,
            Reason::NotAllowed
        );
        assert!(
            authorize(&t, &p, &req(1, None)).allowed,
            "plaintext: the list is for mTLS"
        );
        // An ALLOW policy takes over from the list.
        let allow_b = ap(
            "vms",
            "b",
            "  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/b/sa/y]}",
        );
        assert!(authorize(&table(&allow_b), &p, &req(1, Some(&b))).allowed);
    }
}
