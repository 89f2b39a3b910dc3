//! The Istio VM bundle as `istioctl x workload entry configure` writes it, laid out under a
//! root as Istio's VM guide places it (the daemon reads it with `--istio-dir ROOT`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the bundle says.
#[derive(Clone, Debug)]
pub struct Spec {
    pub namespace: String,
    pub service_account: String,
    pub network: String,
    pub cluster_id: String,
    pub workload_name: String,
    pub labels: BTreeMap<String, String>,
    pub auto_register_group: Option<String>,
    /// `defaultConfig.discoveryAddress`.
    pub discovery: String,
    /// The `hosts` line: where istiod's name points (istiod, or the east-west gateway).
    pub istiod_ip: String,
    pub root_pem: String,
    pub token: String,
    /// `defaultConfig.readinessProbe`, YAML indented under it.
    pub probe: Option<String>,
    pub inbound_ports: String,
    /// More cluster.env lines (KEY=value).
    pub extra_env: Vec<(String, String)>,
}

impl Spec {
    pub fn new(namespace: &str, service_account: &str, istiod_ip: &str, root_pem: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            network: String::new(),
            cluster_id: "Kubernetes".into(),
            workload_name: "vm-app".into(),
            labels: [("app".to_string(), "vm-app".to_string())].into(),
            auto_register_group: None,
            discovery: "istiod.istio-system.svc:15012".into(),
            istiod_ip: istiod_ip.into(),
            root_pem: root_pem.into(),
            token: "vm-bootstrap-token".into(),
            probe: None,
            inbound_ports: "*".into(),
            extra_env: vec![],
        }
    }

    /// The SPIFFE id the bundle's service account stands for.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("bundle dir");
    std::fs::write(&p, text).expect("bundle file");
}

/// Writes the bundle under `root`; returns `root`.
pub fn write_bundle(root: &Path, s: &Spec) -> PathBuf {
    let labels = serde_json::to_string(&s.labels).expect("labels");
    let mut env = vec![
        ("CANONICAL_REVISION", "latest".to_string()),
        ("CANONICAL_SERVICE", s.workload_name.clone()),
        ("ISTIO_INBOUND_PORTS", s.inbound_ports.clone()),
        ("ISTIO_LOCAL_EXCLUDE_PORTS", "15090,15021,15020".into()),
        ("ISTIO_METAJSON_LABELS", labels.clone()),
        ("ISTIO_META_CLUSTER_ID", s.cluster_id.clone()),
        ("ISTIO_META_DNS_CAPTURE", "true".into()),
        ("ISTIO_META_MESH_ID", String::new()),
        ("ISTIO_META_NETWORK", s.network.clone()),
        ("ISTIO_META_WORKLOAD_NAME", s.workload_name.clone()),
        ("ISTIO_NAMESPACE", s.namespace.clone()),
        (
            "ISTIO_SERVICE",
            format!("{}.{}", s.workload_name, s.namespace),
        ),
        ("ISTIO_SERVICE_CIDR", "*".into()),
        ("POD_NAMESPACE", s.namespace.clone()),
        ("SERVICE_ACCOUNT", s.service_account.clone()),
        ("TRUST_DOMAIN", "cluster.local".into()),
    ];
    let mut text: String = env.drain(..).map(|(k, v)| format!("{k}='{v}'\n")).collect();
    for (k, v) in &s.extra_env {
        text.push_str(&format!("{k}='{v}'\n"));
    }
    write(root, "var/lib/istio/envoy/cluster.env", &text);
    let mut mesh = format!(
        "defaultConfig:\n  discoveryAddress: {}\n  meshId: mesh1\n  proxyMetadata:\n    CANONICAL_REVISION: latest\n    CANONICAL_SERVICE: {wl}\n    ISTIO_META_CLUSTER_ID: {cluster}\n    ISTIO_META_DNS_CAPTURE: \"true\"\n    ISTIO_META_MESH_ID: mesh1\n    ISTIO_META_NETWORK: \"{net}\"\n    ISTIO_META_WORKLOAD_NAME: {wl}\n    ISTIO_METAJSON_LABELS: '{labels}'\n    POD_NAMESPACE: {ns}\n    SERVICE_ACCOUNT: {sa}\n    TRUST_DOMAIN: cluster.local\n",
        s.discovery,
        wl = s.workload_name,
        cluster = s.cluster_id,
        net = s.network,
        ns = s.namespace,
        sa = s.service_account,
    );
    if let Some(g) = &s.auto_register_group {
        mesh.push_str(&format!("    ISTIO_META_AUTO_REGISTER_GROUP: {g}\n"));
    }
    if let Some(p) = &s.probe {
        mesh.push_str("  readinessProbe:\n");
        for line in p.lines() {
            mesh.push_str(&format!("    {line}\n"));
        }
    }
    write(root, "etc/istio/config/mesh", &mesh);
    write(root, "etc/certs/root-cert.pem", &s.root_pem);
    write(root, "var/run/secrets/tokens/istio-token", &s.token);
    write(
        root,
        "etc/hosts",
        &format!(
            "127.0.0.1 localhost\n{} istiod.istio-system.svc\n",
            s.istiod_ip
        ),
    );
    root.to_path_buf()
}
