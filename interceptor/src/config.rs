//! Settings of `interceptor run`: flags, the same keys in a YAML file (`--config`), defaults.
//! One struct serves clap and serde so the two can never disagree on a name.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// cgroup eBPF programs redirect DNS and mesh connections (the normal mode)
    #[default]
    Ebpf,
    /// attach nothing: only connections redirected by your own iptables rules are served
    None,
}

#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunArgs {
    /// Istio YAML files or directories (multi-document); watched and reloaded on change
    /// [default: /etc/interceptor/mesh]
    #[arg(long, num_args = 1.., value_name = "PATH")]
    #[serde(default)]
    pub mesh: Vec<PathBuf>,
    /// Istio meshNetworks YAML (networks -> gateways)
    #[arg(long, value_name = "FILE")]
    pub mesh_networks: Option<PathBuf>,
    /// This VM's network ("" = single network)
    #[arg(long)]
    pub network: Option<String>,
    /// This VM's namespace [default: default]
    #[arg(long)]
    pub namespace: Option<String>,
    /// Cluster DNS domain [default: cluster.local]
    #[arg(long)]
    pub cluster_domain: Option<String>,
    /// Directory with cert-chain.pem, key.pem, root-cert.pem (Istio VM layout)
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// cgroup v2 directory whose processes are captured: absolute, or relative to the cgroup2
    /// mount [default: the root of the cgroup2 mount]
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Ports of this VM's services captured inbound, comma separated, or "*" for all but the
    /// excluded ones [default: none]
    #[arg(long, value_name = "LIST")]
    pub inbound_ports: Option<String>,
    /// Ports never captured inbound [default: 22,15020,15021]; SSH and the admin port are
    /// excluded whatever this says
    #[arg(long, value_name = "LIST")]
    pub exclude_inbound_ports: Option<String>,
    /// Client identities allowed inbound: `spiffe://...` (every port) or `PORT=spiffe://...`;
    /// repeatable [default: every identity the roots verify]
    #[arg(long, value_name = "ID")]
    #[serde(default)]
    pub inbound_allow: Vec<String>,
    /// Inbound mTLS mode [default: permissive]
    #[arg(long, value_enum)]
    pub mtls_mode: Option<MtlsMode>,
    /// Outbound capture listener port on loopback [default: 15001]
    #[arg(long)]
    pub outbound_port: Option<u16>,
    /// Inbound capture listener port [default: 15006]
    #[arg(long)]
    pub inbound_port: Option<u16>,
    /// DNS listener port on loopback, UDP and TCP [default: 15053]
    #[arg(long)]
    pub dns_port: Option<u16>,
    /// resolv.conf whose nameservers receive names not in the mesh [default: /etc/resolv.conf]
    #[arg(long, value_name = "FILE")]
    pub resolv_conf: Option<PathBuf>,
    /// Admin endpoint: /healthz/ready, /stats/prometheus, /config_dump, /status, /explain
    /// [default: 127.0.0.1:15020]
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// How connections reach the listeners [default: ebpf]
    #[arg(long, value_enum)]
    pub capture: Option<CaptureMode>,
    /// YAML file with any of these settings (kebab-case keys); flags override it
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// Settings with every default applied.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mesh: Vec<PathBuf>,
    pub mesh_explicit: bool,
    pub mesh_networks: Option<PathBuf>,
    pub network: String,
    pub namespace: String,
    pub cluster_domain: String,
    pub certs: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub inbound_ports: Vec<u16>,
    pub inbound_all: bool,
    pub exclude_inbound_ports: Vec<u16>,
    pub inbound_allow: Vec<String>,
    pub mtls_mode: MtlsMode,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub dns_port: u16,
    pub resolv_conf: PathBuf,
    pub capture: CaptureMode,
    pub admin_addr: SocketAddr,
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";
pub const DEFAULT_MESH_DIR: &str = "/etc/interceptor/mesh";
/// Never captured inbound, whatever the configuration says: SSH and the admin ports.
pub const ALWAYS_EXCLUDED_INBOUND: [u16; 3] = [22, 15020, 15021];

fn ports(list: &str, what: &str) -> anyhow::Result<Vec<u16>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| anyhow::anyhow!("{what}: {s:?} is not a port"))
        })
        .collect()
}

impl RunArgs {
    /// Flags win over the file, field by field.
    fn merge(self, file: RunArgs) -> RunArgs {
        RunArgs {
            mesh: if self.mesh.is_empty() {
                file.mesh
            } else {
                self.mesh
            },
            mesh_networks: self.mesh_networks.or(file.mesh_networks),
            network: self.network.or(file.network),
            namespace: self.namespace.or(file.namespace),
            cluster_domain: self.cluster_domain.or(file.cluster_domain),
            certs: self.certs.or(file.certs),
            cgroup: self.cgroup.or(file.cgroup),
            inbound_ports: self.inbound_ports.or(file.inbound_ports),
            exclude_inbound_ports: self.exclude_inbound_ports.or(file.exclude_inbound_ports),
            inbound_allow: if self.inbound_allow.is_empty() {
                file.inbound_allow
            } else {
                self.inbound_allow
            },
            mtls_mode: self.mtls_mode.or(file.mtls_mode),
            outbound_port: self.outbound_port.or(file.outbound_port),
            inbound_port: self.inbound_port.or(file.inbound_port),
            dns_port: self.dns_port.or(file.dns_port),
            resolv_conf: self.resolv_conf.or(file.resolv_conf),
            capture: self.capture.or(file.capture),
            admin_addr: self.admin_addr.or(file.admin_addr),
            config: self.config,
        }
    }

    pub fn resolve(self) -> anyhow::Result<Settings> {
        let args = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let de = serde_yaml_ng::Deserializer::from_str(&text);
                let file: RunArgs = serde_path_to_error::deserialize(de).map_err(|e| {
                    anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner())
                })?;
                self.merge(file)
            }
            None => self,
        };
        let inbound = args.inbound_ports.unwrap_or_default();
        let inbound_all = inbound.trim() == "*";
        let inbound_ports = if inbound_all {
            vec![]
        } else {
            ports(&inbound, "--inbound-ports")?
        };
        let exclude = ports(
            args.exclude_inbound_ports
                .as_deref()
                .unwrap_or("22,15020,15021"),
            "--exclude-inbound-ports",
        )?;
        let mesh_explicit = !args.mesh.is_empty();
        Ok(Settings {
            mesh: if mesh_explicit {
                args.mesh
            } else {
                vec![DEFAULT_MESH_DIR.into()]
            },
            mesh_explicit,
            mesh_networks: args.mesh_networks,
            network: args.network.unwrap_or_default(),
            namespace: args.namespace.unwrap_or_else(|| "default".into()),
            cluster_domain: args
                .cluster_domain
                .unwrap_or_else(|| "cluster.local".into()),
            certs: args.certs,
            cgroup: args.cgroup,
            inbound_ports,
            inbound_all,
            exclude_inbound_ports: exclude,
            inbound_allow: args.inbound_allow,
            mtls_mode: args.mtls_mode.unwrap_or_default(),
            outbound_port: args.outbound_port.unwrap_or(15001),
            inbound_port: args.inbound_port.unwrap_or(15006),
            dns_port: args.dns_port.unwrap_or(15053),
            resolv_conf: args
                .resolv_conf
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
            capture: args.capture.unwrap_or_default(),
            admin_addr: args
                .admin_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15020))),
        })
    }
}

impl Settings {
    pub fn inbound_enabled(&self) -> bool {
        self.inbound_all || !self.inbound_ports.is_empty()
    }

    /// Every port sk_lookup must leave alone: the configured exclusions, SSH, the admin ports and
    /// our own listeners.
    pub fn inbound_excluded(&self) -> Vec<u16> {
        let mut v = self.exclude_inbound_ports.clone();
        v.extend(ALWAYS_EXCLUDED_INBOUND);
        v.extend([
            self.outbound_port,
            self.inbound_port,
            self.dns_port,
            self.admin_addr.port(),
        ]);
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn loopback(port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        ]
    }
}

/// Settings of `interceptor gateway`: the east-west gateway of one network.
#[derive(Clone, Debug, clap::Args)]
pub struct GatewayArgs {
    /// Istio YAML files or directories (multi-document); watched and reloaded on change
    #[arg(long, num_args = 1.., value_name = "PATH", default_value = DEFAULT_MESH_DIR)]
    pub mesh: Vec<PathBuf>,
    /// Istio meshNetworks YAML (which network an endpoint is in, by fromCidr)
    #[arg(long, value_name = "FILE")]
    pub mesh_networks: Option<PathBuf>,
    /// The network this gateway serves: it routes only to endpoints in it
    #[arg(long)]
    pub network: String,
    /// Address(es) to listen on for SNI-routed mTLS from other networks
    #[arg(long, num_args = 1.., value_name = "ADDR", default_value = "0.0.0.0:15443")]
    pub listen: Vec<SocketAddr>,
    /// Namespace for documents that name none
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Cluster DNS domain
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Admin endpoint: /healthz/ready, /stats/prometheus, /config_dump, /status
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    pub admin_addr: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "namespace: prod\ndns-port: 5353\nmesh: [/x]\ninbound-ports: '8080, 9090'\n",
        )
        .unwrap();
        let s = RunArgs {
            config: Some(f.clone()),
            dns_port: Some(1053),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.dns_port, s.inbound_ports.clone()),
            ("prod", 1053, vec![8080, 9090])
        );
        assert_eq!(s.exclude_inbound_ports, vec![22, 15020, 15021]);
        std::fs::write(&f, "namespce: prod\n").unwrap();
        let e = RunArgs {
            config: Some(f),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.contains("namespce"), "{e}");
    }
}
