//! Istio's own YAML (`networking.istio.io` v1, v1beta1, v1alpha3) into source-neutral
//! `Resources`. Field names and rules follow istio/api; unknown fields are errors, as in
//! Istio's strict decoding, so a typo is never silently ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::Value;

use super::model::{
    Address, Health, Host, Location, Resolution, ServicePort, Workload, WorkloadGroup,
    AMBIENT_REDIRECTION, TUNNEL_LABEL,
};

/// The service account of a workload that names none (Kubernetes' default).
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
use super::table::{Resources, ServiceDecl};
use super::{policy, traffic, Error};

const GROUP: &str = "networking.istio.io";
const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
const SECURITY_GROUP: &str = "security.istio.io";
const SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// `metadata.name` and namespace of a document.
fn identity<'v>(
    doc: &Doc,
    value: &'v Value,
    default_namespace: &'v str,
) -> Result<(&'v str, &'v str), Error> {
    let meta = value
        .get("metadata")
        .ok_or_else(|| doc.err("metadata", "missing"))?;
    let name = str_at(meta, "name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| doc.err("metadata.name", "missing"))?;
    Ok((name, str_at(meta, "namespace").unwrap_or(default_namespace)))
}

/// PeerAuthentication and AuthorizationPolicy; other security kinds (RequestAuthentication:
/// JWTs, which only HTTP carries) are ignored with a line in the log.
fn parse_security(
    doc: &Doc,
    value: &Value,
    api: &str,
    version: &str,
    kind: &str,
    default_namespace: &str,
    res: &mut Resources,
) -> Result<(), Error> {
    if !SECURITY_VERSIONS.contains(&version) {
        return Err(doc.err(
            "apiVersion",
            format!(
                "{api}: supported versions are {}",
                SECURITY_VERSIONS.join(", ")
            ),
        ));
    }
    let (name, namespace) = identity(doc, value, default_namespace)?;
    let origin = format!("{namespace}/{name}");
    let spec = value
        .get("spec")
        .cloned()
        .unwrap_or(Value::Mapping(Default::default()));
    match kind {
        "PeerAuthentication" => {
            let created = value
                .get("metadata")
                .and_then(|m| str_at(m, "creationTimestamp"))
                .map(str::to_string);
            let spec = doc.typed(spec, "spec")?;
            res.peer_authentications
                .push(Arc::new(policy::peer_authentication(
                    origin,
                    namespace.to_string(),
                    created,
                    spec,
                )));
        }
        "AuthorizationPolicy" => {
            let spec = doc.typed(spec, "spec")?;
            let p = policy::authorization_policy(origin, namespace.to_string(), spec)
                .map_err(|e| doc.err(format!("spec.{}", e.field), e.message))?;
            for r in &p.rules {
                for f in &r.http_fields {
                    tracing::info!(
                        file = %doc.file.display(), doc = doc.index, policy = %p.name, field = %f,
                        action = ?p.action,
                        "HTTP-only field: judged request by request on the VM's HTTP ports; on \
                         other ports this rule fails closed (an ALLOW rule never matches, a DENY \
                         rule matches without it), as Istio on TCP chains"
                    );
                }
                for f in &r.http_only {
                    tracing::warn!(
                        file = %doc.file.display(), doc = doc.index, policy = %p.name, field = %f,
                        action = ?p.action,
                        "field needs a JWT (RequestAuthentication), which interceptor does not \
                         verify: this rule fails closed (an ALLOW rule never matches, a DENY rule \
                         matches without it)"
                    );
                }
            }
            res.authorization_policies.push(Arc::new(p));
        }
        other => {
            tracing::info!(file = %doc.file.display(), doc = doc.index, kind = other, "kind not used by interceptor; ignored");
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceEntrySpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    location: Location,
    #[serde(default)]
    resolution: Resolution,
    #[serde(default)]
    endpoints: Vec<WorkloadEntrySpec>,
    workload_selector: Option<Selector>,
    #[serde(default)]
    #[allow(dead_code)]
    export_to: Vec<String>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortSpec {
    number: u16,
    protocol: Option<String>,
    name: Option<String>,
    target_port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadEntrySpec {
    address: Option<String>,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    network: Option<String>,
    locality: Option<String>,
    weight: Option<u32>,
    service_account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadGroupSpec {
    #[serde(default)]
    metadata: GroupMeta,
    #[serde(default)]
    template: WorkloadEntrySpec,
    #[allow(dead_code)]
    probe: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GroupMeta {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

/// Builds errors for one document.
struct Doc<'a> {
    file: &'a Path,
    index: usize,
}

impl Doc<'_> {
    fn err(&self, field: impl Into<String>, message: impl std::fmt::Display) -> Error {
        Error::Invalid {
            file: self.file.to_path_buf(),
            doc: self.index,
            field: field.into(),
            message: message.to_string(),
        }
    }

    fn typed<T: DeserializeOwned>(&self, value: Value, prefix: &str) -> Result<T, Error> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                prefix.to_string()
            } else {
                format!("{prefix}.{path}")
            };
            self.err(field, e.inner())
        })
    }
}

fn str_at<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

/// Parses every document of `text` into `res`. A bad document adds to `errors` and nothing to
/// `res`; the caller decides whether any error discards the whole input (it does: a table is
/// applied whole or not at all).
pub fn parse_documents(
    file: &Path,
    text: &str,
    default_namespace: &str,
    res: &mut Resources,
    errors: &mut Vec<Error>,
) {
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = Doc { file, index: i + 1 };
        let value = match Value::deserialize(de) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(doc.err("(yaml)", e));
                // The YAML stream cannot be resumed after a syntax error.
                return;
            }
        };
        if let Err(e) = parse_document(&doc, value, default_namespace, res) {
            errors.push(e);
        }
    }
}

fn parse_document(
    doc: &Doc,
    value: Value,
    default_namespace: &str,
    res: &mut Resources,
) -> Result<(), Error> {
    let api = str_at(&value, "apiVersion").ok_or_else(|| doc.err("apiVersion", "missing"))?;
    let kind = str_at(&value, "kind").ok_or_else(|| doc.err("kind", "missing"))?;
    let (group, version) = api.split_once('/').unwrap_or(("", api));
    if group == SECURITY_GROUP {
        return parse_security(doc, &value, api, version, kind, default_namespace, res);
    }
    if group != GROUP {
        tracing::info!(file = %doc.file.display(), doc = doc.index, api, kind, "not an Istio networking resource; ignored");
        return Ok(());
    }
    if !VERSIONS.contains(&version) {
        return Err(doc.err(
            "apiVersion",
            format!("{api}: supported versions are {}", VERSIONS.join(", ")),
        ));
    }
    let meta = value
        .get("metadata")
        .ok_or_else(|| doc.err("metadata", "missing"))?;
    let name = str_at(meta, "name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| doc.err("metadata.name", "missing"))?;
    let namespace = str_at(meta, "namespace")
        .unwrap_or(default_namespace)
        .to_string();
    let origin = format!("{namespace}/{name}");
    let spec = value
        .get("spec")
        .cloned()
        .unwrap_or(Value::Mapping(Default::default()));
    match kind {
        "ServiceEntry" => {
            let spec: ServiceEntrySpec = doc.typed(spec, "spec")?;
            res.services
                .push(Arc::new(service_entry(doc, origin, namespace, spec)?));
        }
        "WorkloadEntry" => {
            let spec: WorkloadEntrySpec = doc.typed(spec, "spec")?;
            let mut w = workload(doc, "spec", origin, &namespace, spec, false)?;
            w.health = health(&value);
            if ambient(&value) && !w.labels.contains_key(TUNNEL_LABEL) {
                // The model has one HBONE marker: the label.
                Arc::make_mut(&mut w.labels).insert(TUNNEL_LABEL.into(), "http".into());
            }
            res.workloads.push(Arc::new(w));
        }
        "WorkloadGroup" => {
            let spec: WorkloadGroupSpec = doc.typed(spec, "spec")?;
            let template = workload(
                doc,
                "spec.template",
                origin.clone(),
                &namespace,
                spec.template,
                true,
            )?;
            res.groups.push(WorkloadGroup {
                name: origin,
                namespace,
                labels: spec.metadata.labels,
                template,
            });
        }
        "VirtualService" | "DestinationRule" => {
            let created = str_at(meta, "creationTimestamp").map(str::to_string);
            parse_traffic(doc, kind, name, namespace, created, spec, res)?;
        }
        other => {
            tracing::info!(file = %doc.file.display(), doc = doc.index, kind = other, "kind not used by interceptor; ignored");
        }
    }
    Ok(())
}

/// VirtualService and DestinationRule, checked field by field; what is not honoured yet is
/// refused where it would change where traffic goes, else logged.
fn parse_traffic(
    doc: &Doc,
    kind: &str,
    name: &str,
    namespace: String,
    created: Option<String>,
    spec: Value,
    res: &mut Resources,
) -> Result<(), Error> {
    let field = |e: traffic::Invalid| doc.err(format!("spec.{}", e.field), e.message);
    if kind == "VirtualService" {
        let spec: traffic::VirtualServiceSpec = doc.typed(spec, "spec")?;
        let vs = traffic::virtual_service(name.into(), namespace, created, spec).map_err(field)?;
        res.virtual_services.push(Arc::new(vs));
    } else {
        let spec: traffic::DestinationRuleSpec = doc.typed(spec, "spec")?;
        if spec.workload_selector.is_some() {
            return Err(doc.err(
                "spec.workloadSelector",
                "not supported: a DestinationRule for a VM applies to every client here",
            ));
        }
        let dr = traffic::destination_rule(name.into(), namespace, created, spec).map_err(field)?;
        res.destination_rules.push(Arc::new(dr));
    }
    Ok(())
}

/// `metadata.annotations["ambient.istio.io/redirection"] == "enabled"`.
fn ambient(value: &Value) -> bool {
    value
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| str_at(a, AMBIENT_REDIRECTION))
        == Some("enabled")
}

/// WorkloadEntry status as written by Istio's health checking: condition Healthy=False.
fn health(value: &Value) -> Health {
    let unhealthy = value
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_sequence)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                str_at(c, "type") == Some("Healthy") && str_at(c, "status") == Some("False")
            })
        });
    if unhealthy {
        Health::Unhealthy
    } else {
        Health::Healthy
    }
}

fn valid_host(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    h == "*"
        || (!name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }))
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    // A single-address CIDR is a plain address; wider ranges are not VIPs.
    let s = s
        .strip_suffix("/32")
        .or_else(|| s.strip_suffix("/128"))
        .unwrap_or(s);
    s.parse().ok()
}

fn service_entry(
    doc: &Doc,
    origin: String,
    namespace: String,
    spec: ServiceEntrySpec,
) -> Result<ServiceDecl, Error> {
    if spec.hosts.is_empty() {
        return Err(doc.err("spec.hosts", "at least one host is required"));
    }
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        if !valid_host(h) {
            return Err(doc.err(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a DNS name or *.wildcard"),
            ));
        }
        hosts.push(Host::new(h));
    }
    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let ip = parse_ip(a).ok_or_else(|| {
            doc.err(
                format!("spec.addresses[{i}]"),
                format!("{a:?} is not an IP address (CIDR ranges are not supported)"),
            )
        })?;
        addresses.push(ip);
    }
    if spec.ports.is_empty() {
        return Err(doc.err("spec.ports", "at least one port is required"));
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.number == 0 {
            return Err(doc.err(format!("spec.ports[{i}].number"), "must be 1-65535"));
        }
        if p.target_port == Some(0) {
            return Err(doc.err(format!("spec.ports[{i}].targetPort"), "must be 1-65535"));
        }
        if ports.iter().any(|q| q.number == p.number) {
            return Err(doc.err(
                format!("spec.ports[{i}].number"),
                format!("port {} listed twice", p.number),
            ));
        }
        // Omitted, Istio's `protocol.Parse("")` makes it Unsupported: sniffed, whatever its
        // name says (serviceentry `convertPort`); AUTO is a protocol Istio does not know either.
        let protocol = p
            .protocol
            .clone()
            .unwrap_or_else(|| "AUTO".into())
            .to_ascii_uppercase();
        ports.push(ServicePort {
            number: p.number,
            name: p
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", protocol.to_ascii_lowercase(), p.number)),
            protocol,
            target_port: p.target_port,
        });
    }
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        return Err(doc.err(
            "spec.workloadSelector",
            "only one of workloadSelector and endpoints may be set",
        ));
    }
    if spec.resolution == Resolution::Dns
        && spec.endpoints.is_empty()
        && hosts.iter().any(Host::is_wildcard)
    {
        return Err(doc.err(
            "spec.resolution",
            "DNS resolution needs endpoints when a host is a wildcard",
        ));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in spec.endpoints.into_iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        let w = workload(doc, &field, format!("{origin}#{i}"), &namespace, ep, false)?;
        if matches!(w.address, Address::Hostname(_)) && spec.resolution == Resolution::Static {
            return Err(doc.err(
                format!("{field}.address"),
                "STATIC resolution needs an IP address",
            ));
        }
        endpoints.push(Arc::new(w));
    }
    Ok(ServiceDecl {
        origin,
        namespace,
        hosts,
        addresses,
        allocate_vips: true,
        ports,
        resolution: spec.resolution,
        location: spec.location,
        subject_alt_names: spec.subject_alt_names,
        selector: spec.workload_selector.map(|s| s.labels),
        endpoints,
        port_endpoints: Default::default(),
        endpoints_as_given: false,
        names_given: false,
        subsets: vec![],
        policies: None,
    })
}

fn workload(
    doc: &Doc,
    field: &str,
    name: String,
    namespace: &str,
    spec: WorkloadEntrySpec,
    template: bool,
) -> Result<Workload, Error> {
    let address = match spec.address.as_deref() {
        Some(a) if !a.is_empty() => match a.parse::<IpAddr>() {
            Ok(ip) => Address::Ip(ip),
            Err(_) if valid_host(a) && !a.starts_with('*') => {
                Address::Hostname(a.to_ascii_lowercase())
            }
            Err(_) => {
                return Err(doc.err(
                    format!("{field}.address"),
                    format!("{a:?} is not an IP address or host name"),
                ))
            }
        },
        // A WorkloadGroup template has no address: auto-registration fills it in.
        _ if template => Address::Hostname(String::new()),
        _ => return Err(doc.err(format!("{field}.address"), "missing")),
    };
    for (p, n) in &spec.ports {
        if *n == 0 {
            return Err(doc.err(format!("{field}.ports.{p}"), "must be 1-65535"));
        }
    }
    Ok(Workload {
        name,
        namespace: namespace.to_string(),
        address,
        labels: Arc::new(spec.labels),
        ports: spec.ports,
        port: None,
        network: spec.network.unwrap_or_default(),
        locality: spec.locality.unwrap_or_default(),
        weight: spec.weight.filter(|w| *w > 0).unwrap_or(1),
        service_account: spec
            .service_account
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.into()),
        health: Health::Healthy,
        priority: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Resources, Vec<Error>) {
        let mut res = Resources::default();
        let mut errors = Vec::new();
        parse_documents(
            Path::new("mesh.yaml"),
            text,
            "default",
            &mut res,
            &mut errors,
        );
        (res, errors)
    }

    const GOOD: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: product, namespace: default}
spec:
  hosts: [product.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP, targetPort: 9080}]
  resolution: STATIC
  workloadSelector: {labels: {app: product}}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: product-vm}
spec:
  address: 10.0.0.2
  labels: {app: product, security.istio.io/tlsMode: istio}
  serviceAccount: product
  network: net-a
status:
  conditions: [{type: Healthy, status: "False"}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
"#;

    #[test]
    fn parses_service_and_workload_entries() {
        let (res, errors) = parse(GOOD);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(res.services.len(), 1);
        assert_eq!(res.services[0].ports[0].target_port, Some(9080));
        assert_eq!(res.workloads[0].service_account, "product");
        assert_eq!(res.workloads[0].health, Health::Unhealthy);
        assert!(res.workloads[0].speaks_istio_mtls());
    }

    #[test]
    fn errors_name_document_and_field() {
        let bad = GOOD.replace("number: 8080", "number: 80800");
        let (_, errors) = parse(&bad);
        let msg = errors[0].to_string();
        assert!(
            msg.starts_with("mesh.yaml: document 1: spec.ports[0].number:"),
            "{msg}"
        );

        let bad = GOOD.replace("address: 10.0.0.2", "adress: 10.0.0.2");
        let msg = parse(&bad).1[0].to_string();
        assert!(
            msg.contains("document 2") && msg.contains("adress"),
            "{msg}"
        );

        let bad = GOOD.replace("resolution: STATIC", "resolution: STATC");
        let msg = parse(&bad).1[0].to_string();
        assert!(
            msg.contains("spec.resolution") && msg.contains("STATC"),
            "{msg}"
        );
    }

    #[test]
    fn inline_endpoints_and_conflicts() {
        let (_, errors) = parse(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec:\n  hosts: [a.example.com]\n  ports: [{number: 80}]\n  resolution: STATIC\n  endpoints: [{address: db.example.com}]\n",
        );
        assert!(
            errors[0].to_string().contains("spec.endpoints[0].address"),
            "{}",
            errors[0]
        );
        let (_, errors) = parse("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec:\n  hosts: [a.example.com]\n  ports: [{number: 80}]\n  workloadSelector: {labels: {a: b}}\n  endpoints: [{address: 1.2.3.4}]\n");
        assert!(errors[0].to_string().contains("spec.workloadSelector"));
    }

    #[test]
    fn yaml_syntax_error_is_reported() {
        let (_, errors) = parse("kind: [unclosed\n");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("document 1"));
    }

    #[test]
    fn the_ambient_annotation_marks_a_workload_entry_as_hbone() {
        let doc = |meta: &str, labels: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {meta}\nspec:\n  address: 10.0.0.9\n  labels: {labels}\n")
        };
        for (meta, labels, hbone) in [
            (
                "{name: a, annotations: {ambient.istio.io/redirection: enabled}}",
                "{app: a}",
                true,
            ),
            (
                "{name: a}",
                "{app: a, networking.istio.io/tunnel: http}",
                true,
            ),
            (
                "{name: a, annotations: {ambient.istio.io/redirection: disabled}}",
                "{app: a}",
                false,
            ),
            ("{name: a}", "{app: a}", false),
        ] {
            let (res, errors) = parse(&doc(meta, labels));
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(res.workloads[0].speaks_hbone(), hbone, "{meta} {labels}");
        }
    }
}
