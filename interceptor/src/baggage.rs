//! What a workload says of itself to its HBONE peers, in W3C `baggage` as ztunnel writes and
//! reads it (I: ztunnel src/baggage.rs; `Workload::baggage` in src/state/workload.rs): the
//! client puts its own on each CONNECT, the server on its 200, and each side's telemetry names
//! the other from it. Unknown values are left out, never sent empty.

/// This workload, as its peers' telemetry should name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// The workload's name (a VM's WorkloadGroup); istiod types WorkloadEntries as pods.
    pub name: Option<String>,
    /// Istio's canonical service and revision (`service.istio.io/canonical-name`, ...).
    pub service: Option<String>,
    pub revision: Option<String>,
}

/// Istio's canonical service labels, in the order istiod reads them (I: pkg/kube/labels
/// `CanonicalService`): the canonical label, then the Kubernetes recommended one, then the
/// classic one; the name falls back to the workload's name and the revision to "latest".
const NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
const REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

impl Workload {
    /// From this VM's settings: its namespace, labels, cluster and workload name (the last two
    /// from the VM bundle, when there is one).
    pub fn new(
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        cluster: Option<&str>,
        name: Option<&str>,
    ) -> Self {
        let first = |keys: [&str; 3]| {
            keys.iter()
                .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
        };
        let some = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
        let name = some(name);
        Self {
            cluster: some(cluster),
            namespace: some(Some(namespace)),
            service: first(NAME_LABELS).or_else(|| name.clone()),
            revision: Some(first(REVISION_LABELS).unwrap_or_else(|| "latest".into())),
            name,
        }
    }

    /// The `baggage` header's value; None when nothing is known.
    pub fn header(&self) -> Option<String> {
        let parts: Vec<String> = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            ("k8s.pod.name", &self.name),
            ("service.name", &self.service),
            ("service.version", &self.revision),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
        (!parts.is_empty()).then(|| parts.join(","))
    }

    /// A peer's `baggage` headers, as ztunnel reads them: unknown keys and empty values are
    /// ignored; any of the workload-name keys names the workload.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut w = Self::default();
        for member in values.into_iter().flat_map(|v| v.split(',')) {
            let Some((k, v)) = member.split_once('=') else {
                continue;
            };
            // W3C members may carry `;properties` after the value.
            let v = v.split(';').next().unwrap_or("").trim();
            let v = (!v.is_empty()).then(|| v.to_string());
            match k.trim() {
                "k8s.cluster.name" => w.cluster = v,
                "k8s.namespace.name" => w.namespace = v,
                "k8s.deployment.name" | "k8s.cronjob.name" | "k8s.pod.name" | "k8s.job.name" => {
                    w.name = v
                }
                "service.name" => w.service = v,
                "service.version" => w.revision = v,
                _ => {}
            }
        }
        w
    }
}

/// The `host=` of a `forwarded` header (RFC 7239), as ztunnel reads it: the service the client
/// meant. Quotes are stripped; an empty or non-ASCII value is no host.
pub fn forwarded_host(value: &str) -> Option<&str> {
    forwarded_param(value, "host")
}

/// The `for=` of a `forwarded` header: the client's address as the sender saw it.
pub fn forwarded_for(value: &str) -> Option<&str> {
    forwarded_param(value, "for")
}

fn forwarded_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    if !value.is_ascii() {
        return None;
    }
    value
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The `forwarded` header a client sends, as ztunnel builds it: the application's address
/// and, when known, the service it meant.
pub fn forwarded(client: std::net::SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(h) => format!("for=\"{client}\";host={h}"),
        None => format!("for=\"{client}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn canonical_service_as_istiod_derives_it() {
        let w = Workload::new(
            "vm-ns",
            &labels(&[("app", "vm-app"), ("version", "v1")]),
            Some("Kubernetes"),
            Some("vm-group"),
        );
        assert_eq!(
            w.header().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=vm-ns,k8s.pod.name=vm-group,service.name=vm-app,service.version=v1"
        );
        let canonical = Workload::new(
            "ns",
            &labels(&[
                ("app", "a"),
                ("service.istio.io/canonical-name", "c"),
                ("app.kubernetes.io/version", "k"),
            ]),
            None,
            None,
        );
        assert_eq!(
            canonical.header().unwrap(),
            "k8s.namespace.name=ns,service.name=c,service.version=k"
        );
        // No labels: the workload's name and "latest", as istiod.
        let bare = Workload::new("ns", &BTreeMap::new(), None, Some("w"));
        assert_eq!(
            bare.header().unwrap(),
            "k8s.namespace.name=ns,k8s.pod.name=w,service.name=w,service.version=latest"
        );
    }

    #[test]
    fn parses_what_ztunnel_sends_and_round_trips() {
        let w = Workload::parse([
            "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1",
            "service.name=N2,service.version=V1;p=1,other=x,broken",
        ]);
        assert_eq!(w.cluster.as_deref(), Some("K1"));
        assert_eq!(w.namespace.as_deref(), Some("NS1"));
        assert_eq!(w.name.as_deref(), Some("N1"));
        assert_eq!(w.service.as_deref(), Some("N2"));
        assert_eq!(w.revision.as_deref(), Some("V1"));
        let empty = Workload::parse(["k8s.namespace.name=,service.name="]);
        assert_eq!(empty, Workload::default());
        assert_eq!(empty.header(), None);
        let ours = Workload::new("ns", &labels(&[("app", "a")]), Some("c"), Some("w"));
        assert_eq!(Workload::parse([ours.header().unwrap().as_str()]), ours);
    }

    #[test]
    fn forwarded_as_ztunnel_writes_and_reads_it() {
        let client: std::net::SocketAddr = "10.0.2.1:33872".parse().unwrap();
        let f = forwarded(client, Some("product.default.svc.cluster.local"));
        assert_eq!(
            f,
            r#"for="10.0.2.1:33872";host=product.default.svc.cluster.local"#
        );
        assert_eq!(
            forwarded_host(&f),
            Some("product.default.svc.cluster.local")
        );
        assert_eq!(forwarded_for(&f), Some("10.0.2.1:33872"));
        assert_eq!(
            forwarded(client, None),
            r#"for="10.0.2.1:33872""#.to_string()
        );
        assert_eq!(
            forwarded_host(r#"by=x;for=y;host="example.com";proto=https"#),
            Some("example.com")
        );
        assert_eq!(forwarded_host("for=y;host=;proto=https"), None);
        assert_eq!(forwarded_host("for=y;proto=https"), None);
        assert_eq!(forwarded_host(r#"for=for;host=höst"#), None);
        assert_eq!(forwarded_for(r#"for="[::1]:80""#), Some("[::1]:80"));
    }
}
