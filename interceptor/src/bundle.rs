//! The Istio VM bundle: the files `istioctl x workload entry configure` writes and Istio's VM
//! guide puts on the VM. Everything needed to join istiod comes from them: where istiod is
//! (`mesh` `defaultConfig.discoveryAddress`, its name resolved by the `hosts` lines), how to
//! prove who we are (root-cert.pem, the istio-token), and who we are (`cluster.env` and
//! `proxyMetadata`: namespace, service account, network, cluster, mesh, labels, workload name,
//! trust domain, auto-registration group, the readiness probe).
//!
//! Problems name the file and the field; nothing is half loaded.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where each bundle file is, relative to the root (`/`, or `--istio-dir`).
pub const CLUSTER_ENV: &str = "var/lib/istio/envoy/cluster.env";
pub const MESH_CONFIG: &str = "etc/istio/config/mesh";
pub const ROOT_CERT: &str = "etc/certs/root-cert.pem";
pub const TOKEN: &str = "var/run/secrets/tokens/istio-token";
pub const HOSTS: &str = "etc/hosts";
/// Where issued certificates go (Istio's OUTPUT_CERTS default on VMs).
pub const OUTPUT_CERTS: &str = "etc/certs";
/// Where the last accepted table is kept.
pub const STATE_DIR: &str = "var/lib/interceptor";

/// istiod's port for xDS and the CA.
pub const DEFAULT_DISCOVERY_PORT: u16 = 15012;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {message}", file.display())]
    Env {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {field}: {message}", file.display())]
    Field {
        file: PathBuf,
        field: String,
        message: String,
    },
}

/// Paths of the bundle's files.
#[derive(Clone, Debug)]
pub struct Paths {
    /// What every default path is under (`--istio-dir`, `/` by default).
    pub root: PathBuf,
    pub cluster_env: PathBuf,
    pub mesh_config: PathBuf,
    pub root_cert: PathBuf,
    pub token: PathBuf,
    pub hosts: PathBuf,
    pub output_certs: PathBuf,
    pub state_dir: PathBuf,
}

impl Paths {
    /// Istio's VM layout under `root`.
    pub fn under(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            cluster_env: root.join(CLUSTER_ENV),
            mesh_config: root.join(MESH_CONFIG),
            root_cert: root.join(ROOT_CERT),
            token: root.join(TOKEN),
            hosts: root.join(HOSTS),
            output_certs: root.join(OUTPUT_CERTS),
            state_dir: root.join(STATE_DIR),
        }
    }
}

/// istiod's address as the VM reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// The name in `discoveryAddress` (`istiod.istio-system.svc`): also the name istiod's
    /// certificate must carry.
    pub host: String,
    pub port: u16,
    /// Where that name points, from the hosts file (or the address itself).
    pub addr: SocketAddr,
}

/// WorkloadGroup probe, as the bundle's `defaultConfig.readinessProbe` carries it (A:
/// networking/v1alpha3/workload_group.proto ReadinessProbe).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default)]
    pub initial_delay_seconds: Option<u64>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub period_seconds: Option<u64>,
    #[serde(default)]
    pub success_threshold: Option<u32>,
    #[serde(default)]
    pub failure_threshold: Option<u32>,
    #[serde(default)]
    pub http_get: Option<HttpGet>,
    #[serde(default)]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default)]
    pub exec: Option<Exec>,
    #[serde(default)]
    pub grpc: Option<Grpc>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<Header>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
pub struct Header {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
pub struct TcpSocket {
    #[serde(default)]
    pub host: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
pub struct Exec {
    pub command: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
pub struct Grpc {
    pub port: u16,
    #[serde(default)]
    pub service: Option<String>,
}

/// Everything the bundle says.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub paths: Paths,
    pub discovery: Discovery,
    /// The CA's address (`CA_ADDR`), istiod's by default.
    pub ca: Discovery,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub cluster_id: String,
    pub mesh_id: String,
    pub network: String,
    pub workload_name: String,
    /// POD_NAME, else the host name: the name in the node id.
    pub pod_name: String,
    /// `INSTANCE_IP`: this VM's address as the mesh reaches it, when the bundle says (as
    /// istio-agent reads it); otherwise the address istiod is reached from.
    pub instance_ip: Option<std::net::IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub auto_register_group: Option<String>,
    /// `ISTIO_INBOUND_PORTS`: "*" or a list.
    pub inbound_ports: Option<String>,
    /// `ISTIO_LOCAL_EXCLUDE_PORTS`.
    pub exclude_inbound_ports: Option<String>,
    /// Every `ISTIO_META_*` key (prefix removed) of cluster.env and proxyMetadata, proxyMetadata
    /// winning, as istio-agent reads them.
    pub meta: BTreeMap<String, String>,
    /// `defaultConfig` as given (the node's PROXY_CONFIG).
    pub proxy_config: serde_json::Value,
    pub readiness_probe: Option<Probe>,
    /// `SECRET_TTL` in seconds (24 h by default).
    pub secret_ttl_s: u64,
    /// `ISTIO_VERSION` to announce (what config istiod may send).
    pub istio_version: String,
}

/// The Istio version whose config this build understands (sent as ISTIO_VERSION).
pub const ISTIO_VERSION: &str = "1.28.0";

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        file: path.to_path_buf(),
        source,
    })
}

/// `KEY=value` lines of a shell env file (istioctl writes `KEY='value'`); comments and blank
/// lines skipped. Quoting as POSIX sh does for single and double quotes.
pub fn parse_env(path: &Path, text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let err = |message: &str| Error::Env {
            file: path.to_path_buf(),
            line: i + 1,
            message: message.to_string(),
        };
        let (key, value) = line.split_once('=').ok_or_else(|| err("not KEY=value"))?;
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(err(&format!("{key:?} is not a variable name")));
        }
        out.insert(key.to_string(), unquote(value).map_err(err)?);
    }
    Ok(out)
}

fn unquote(v: &str) -> Result<String, &'static str> {
    let v = v.trim();
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err("unterminated single quote"),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => out.push(c),
                        None => return Err("unterminated double quote"),
                    },
                    Some(c) => out.push(c),
                    None => return Err("unterminated double quote"),
                }
            },
            '\\' => {
                if let Some(c) = chars.next() {
                    out.push(c)
                }
            }
            c if c.is_whitespace() => return Err("unquoted space in value"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The address `host` has in a hosts file, if it is there.
pub fn lookup_hosts(text: &str, host: &str) -> Option<IpAddr> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            let ip: IpAddr = fields.next()?.parse().ok()?;
            fields
                .any(|name| name.eq_ignore_ascii_case(host))
                .then_some(ip)
        })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    #[serde(default)]
    default_config: serde_yaml_ng::Value,
    #[serde(default)]
    trust_domain: Option<String>,
}

/// Splits `host:port` (`[v6]:port` too); a missing port is istiod's.
fn split_address(addr: &str) -> Option<(String, u16)> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Some((sa.ip().to_string(), sa.port()));
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        _ => (!addr.is_empty()).then(|| (addr.to_string(), DEFAULT_DISCOVERY_PORT)),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl Bundle {
    pub fn load(mut paths: Paths) -> Result<Self, Error> {
        let env_text = read(&paths.cluster_env)?;
        let env = parse_env(&paths.cluster_env, &env_text)?;
        let mesh_text = read(&paths.mesh_config)?;
        let mesh_file = paths.mesh_config.clone();
        let field = |field: &str, message: String| Error::Field {
            file: mesh_file.clone(),
            field: field.to_string(),
            message,
        };
        let de = serde_yaml_ng::Deserializer::from_str(&mesh_text);
        let mesh: MeshConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| field(&e.path().to_string(), e.inner().to_string()))?;
        let default_config = &mesh.default_config;
        let discovery_address = default_config
            .get("discoveryAddress")
            .and_then(|v| v.as_str())
            .ok_or_else(|| field("defaultConfig.discoveryAddress", "missing".into()))?;
        // proxyMetadata: strings, as Kubernetes env vars are.
        let mut proxy_meta: BTreeMap<String, String> = BTreeMap::new();
        if let Some(m) = default_config.get("proxyMetadata") {
            let m = m.as_mapping().ok_or_else(|| {
                field("defaultConfig.proxyMetadata", "not a map of strings".into())
            })?;
            for (k, v) in m {
                let (Some(k), Some(v)) = (
                    k.as_str(),
                    v.as_str()
                        .map(str::to_string)
                        .or_else(|| v.as_bool().map(|b| b.to_string())),
                ) else {
                    return Err(field(
                        "defaultConfig.proxyMetadata",
                        format!("{k:?}: values must be strings"),
                    ));
                };
                proxy_meta.insert(k.to_string(), v);
            }
        }
        // istio-agent reads cluster.env as its environment and proxyMetadata on top of it.
        let mut vars = env.clone();
        vars.extend(proxy_meta);
        let var = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
        let env_field = |k: &str, message: String| Error::Field {
            file: paths.cluster_env.clone(),
            field: k.to_string(),
            message,
        };

        let (host, port) = split_address(discovery_address).ok_or_else(|| {
            field(
                "defaultConfig.discoveryAddress",
                format!("{discovery_address:?} is not host:port"),
            )
        })?;
        let hosts = read(&paths.hosts)?;
        let resolve = |host: &str, port: u16, what: &str| -> Result<Discovery, Error> {
            let ip = host
                .parse::<IpAddr>()
                .ok()
                .or_else(|| lookup_hosts(&hosts, host))
                .ok_or_else(|| Error::Field {
                    file: paths.hosts.clone(),
                    field: host.to_string(),
                    message: format!(
                        "no address for {what} {host}: the bundle's hosts lines map it to istiod or the east-west gateway"
                    ),
                })?;
            Ok(Discovery {
                host: host.to_string(),
                port,
                addr: SocketAddr::new(ip, port),
            })
        };
        let discovery = resolve(&host, port, "the discovery address")?;
        let ca = match var("CA_ADDR") {
            Some(a) => {
                let (h, p) = split_address(&a)
                    .ok_or_else(|| env_field("CA_ADDR", format!("{a:?} is not host:port")))?;
                resolve(&h, p, "CA_ADDR")?
            }
            None => discovery.clone(),
        };
        let namespace = var("POD_NAMESPACE")
            .or_else(|| var("ISTIO_NAMESPACE"))
            .ok_or_else(|| env_field("POD_NAMESPACE", "missing (or ISTIO_NAMESPACE)".into()))?;
        let service_account =
            var("SERVICE_ACCOUNT").ok_or_else(|| env_field("SERVICE_ACCOUNT", "missing".into()))?;
        let mut meta: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &vars {
            if let Some(name) = k.strip_prefix("ISTIO_META_") {
                meta.insert(name.to_string(), v.clone());
            }
        }
        let labels: BTreeMap<String, String> = match var("ISTIO_METAJSON_LABELS") {
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                env_field(
                    "ISTIO_METAJSON_LABELS",
                    format!("not a JSON object of strings: {e}"),
                )
            })?,
            None => BTreeMap::new(),
        };
        let readiness_probe = match default_config.get("readinessProbe") {
            Some(v) => Some(
                serde_path_to_error::deserialize::<_, Probe>(v.clone()).map_err(|e| {
                    field(
                        &format!("defaultConfig.readinessProbe.{}", e.path()),
                        e.inner().to_string(),
                    )
                })?,
            ),
            None => None,
        };
        let secret_ttl_s = match var("SECRET_TTL") {
            Some(t) => parse_duration(&t)
                .ok_or_else(|| env_field("SECRET_TTL", format!("{t:?} is not a duration")))?,
            None => 24 * 3600,
        };
        let proxy_config = serde_json::to_value(default_config)
            .map_err(|e| field("defaultConfig", e.to_string()))?;
        // Istio's OUTPUT_CERTS, under the same root as everything else.
        if let Some(dir) = var("OUTPUT_CERTS") {
            paths.output_certs = paths.root.join(dir.trim_start_matches('/'));
        }
        // The token proves who we are until we hold a certificate; after that the certificate
        // does, and a missing or expired token is no reason not to start.
        let have_cert = paths
            .output_certs
            .join(crate::identity::CERT_CHAIN)
            .exists();
        match read(&paths.token) {
            Ok(t) if !t.trim().is_empty() => {}
            Ok(_) if !have_cert => {
                return Err(Error::Field {
                    file: paths.token.clone(),
                    field: "token".into(),
                    message: "empty".into(),
                })
            }
            Err(e) if !have_cert => return Err(e),
            _ => {}
        }
        Ok(Self {
            discovery,
            ca,
            trust_domain: var("TRUST_DOMAIN")
                .or(mesh.trust_domain)
                .unwrap_or_else(|| crate::spiffe::DEFAULT_TRUST_DOMAIN.into()),
            cluster_id: meta
                .get("CLUSTER_ID")
                .cloned()
                .unwrap_or_else(|| "Kubernetes".into()),
            mesh_id: meta.get("MESH_ID").cloned().unwrap_or_default(),
            network: meta.get("NETWORK").cloned().unwrap_or_default(),
            workload_name: meta
                .get("WORKLOAD_NAME")
                .cloned()
                .or_else(|| var("CANONICAL_SERVICE"))
                .unwrap_or_default(),
            pod_name: var("POD_NAME").unwrap_or_else(hostname),
            instance_ip: match var("INSTANCE_IP") {
                Some(ip) => Some(ip.parse().map_err(|_| {
                    env_field("INSTANCE_IP", format!("{ip:?} is not an IP address"))
                })?),
                None => None,
            },
            auto_register_group: meta.get("AUTO_REGISTER_GROUP").cloned(),
            inbound_ports: var("ISTIO_INBOUND_PORTS"),
            exclude_inbound_ports: var("ISTIO_LOCAL_EXCLUDE_PORTS"),
            istio_version: var("ISTIO_VERSION").unwrap_or_else(|| ISTIO_VERSION.into()),
            namespace,
            service_account,
            labels,
            meta,
            proxy_config,
            readiness_probe,
            secret_ttl_s,
            paths,
        })
    }

    /// The bearer token, read now: it is rotated and expires in an hour.
    pub fn token(&self) -> Result<String, Error> {
        Ok(read(&self.paths.token)?.trim().to_string())
    }
}

/// `90s`, `24h`, `30m`, `1h30m` or plain seconds, as Go's time.ParseDuration for what istio
/// uses.
pub fn parse_duration(s: &str) -> Option<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        // Outside input: an absurd figure is refused, never wrapped or panicked on.
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    num.is_empty().then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "CANONICAL_REVISION='latest'\nCANONICAL_SERVICE='vm-app'\nISTIO_INBOUND_PORTS='8080'\nISTIO_LOCAL_EXCLUDE_PORTS='15090,15021,15020'\nISTIO_METAJSON_LABELS='{\"app\":\"vm-app\",\"version\":\"v1\"}'\nISTIO_META_CLUSTER_ID='Kubernetes'\nISTIO_META_DNS_CAPTURE='true'\nISTIO_META_MESH_ID=''\nISTIO_META_NETWORK='vm-net'\nISTIO_META_WORKLOAD_NAME='vm-app'\nISTIO_NAMESPACE='vm-ns'\nISTIO_SERVICE='vm-app.vm-ns'\nISTIO_SERVICE_CIDR='*'\nPOD_NAMESPACE='vm-ns'\nSERVICE_ACCOUNT='vm-sa'\nTRUST_DOMAIN='cluster.local'\n";
    const MESH: &str = "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  proxyMetadata:\n    ISTIO_META_AUTO_REGISTER_GROUP: vm-app\n    ISTIO_META_MESH_ID: mesh1\n    CANONICAL_SERVICE: vm-app\n  readinessProbe:\n    httpGet: {path: /ready, port: 8080}\n    periodSeconds: 5\n";

    fn bundle(env: &str, mesh: &str, hosts: &str) -> Result<Bundle, Error> {
        let dir = tempfile::tempdir().unwrap();
        let p = Paths::under(dir.path());
        for (f, text) in [
            (&p.cluster_env, env),
            (&p.mesh_config, mesh),
            (&p.hosts, hosts),
            (&p.token, "a.jwt.token"),
        ] {
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, text).unwrap();
        }
        let b = Bundle::load(p);
        drop(dir);
        b
    }

    #[test]
    fn reads_what_istioctl_writes() {
        let b = bundle(
            ENV,
            MESH,
            "127.0.0.1 localhost\n10.0.0.9 istiod.istio-system.svc\n",
        )
        .unwrap();
        assert_eq!(b.discovery.addr, "10.0.0.9:15012".parse().unwrap());
        assert_eq!(b.discovery.host, "istiod.istio-system.svc");
        assert_eq!(b.ca, b.discovery);
        assert_eq!(
            (b.namespace.as_str(), b.service_account.as_str()),
            ("vm-ns", "vm-sa")
        );
        assert_eq!(b.network, "vm-net");
        // proxyMetadata wins over cluster.env.
        assert_eq!(b.mesh_id, "mesh1");
        assert_eq!(b.auto_register_group.as_deref(), Some("vm-app"));
        assert_eq!(b.labels["version"], "v1");
        assert_eq!(b.meta["DNS_CAPTURE"], "true");
        let probe = b.readiness_probe.unwrap();
        assert_eq!(probe.period_seconds, Some(5));
        assert_eq!(probe.http_get.unwrap().path.as_deref(), Some("/ready"));
        assert_eq!(b.secret_ttl_s, 24 * 3600);
        assert_eq!(b.inbound_ports.as_deref(), Some("8080"));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let hosts = "10.0.0.9 istiod.istio-system.svc\n";
        let e = bundle(&ENV.replace("SERVICE_ACCOUNT='vm-sa'\n", ""), MESH, hosts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.env: SERVICE_ACCOUNT: missing"), "{e}");
        let e = bundle(ENV, "defaultConfig: {}\n", hosts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config/mesh: defaultConfig.discoveryAddress: missing"),
            "{e}"
        );
        let e = bundle(ENV, MESH, "10.0.0.9 other\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hosts: istiod.istio-system.svc: no address"),
            "{e}"
        );
        let e = bundle(&format!("{ENV}BROKEN='x\n"), MESH, hosts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 17: unterminated single quote"), "{e}");
        let e = bundle(
            ENV,
            &MESH.replace("periodSeconds: 5", "periodSeconds: often"),
            hosts,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("defaultConfig.readinessProbe.periodSeconds"),
            "{e}"
        );
        let e = bundle(
            &ENV.replace("'{\"app\":\"vm-app\",\"version\":\"v1\"}'", "'{oops'"),
            MESH,
            hosts,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ISTIO_METAJSON_LABELS"), "{e}");
    }

    #[test]
    fn env_quoting_and_durations() {
        let m = parse_env(
            Path::new("e"),
            "A='x y'\nB=\"a\\\"b\"\n# c\nexport C=plain\n",
        )
        .unwrap();
        assert_eq!(
            (m["A"].as_str(), m["B"].as_str(), m["C"].as_str()),
            ("x y", "a\"b", "plain")
        );
        assert_eq!(parse_duration("24h"), Some(86400));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("20s"), Some(20));
        assert_eq!(parse_duration("x"), None);
        // Found by the vm_bundle fuzz target: a figure whose seconds overflow is refused.
        assert_eq!(parse_duration("9999999999999999h"), None);
        assert_eq!(parse_duration("5124095576030431h5124095576030431h"), None);
    }
}
