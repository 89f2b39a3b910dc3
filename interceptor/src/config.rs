//! Settings of `interceptor run`: flags, the same keys in a YAML file (`--config`), defaults.
//! One struct serves clap and serde so the two can never disagree on a name; `resolve` turns it
//! into typed settings, one section per part of the daemon.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::mesh::{DEFAULT_CLUSTER_DOMAIN, DEFAULT_NAMESPACE};
pub use crate::route::MtlsMode;
use crate::route::{AllowList, AllowListError, InboundPolicy};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {path}: {message}")]
    Invalid {
        file: PathBuf,
        path: String,
        message: String,
    },
    #[error("{what}: {value:?} is not a port")]
    Port { what: &'static str, value: String },
    #[error("--worker-threads: at least 1")]
    WorkerThreads,
    #[error("--{0}: at least 1 (a cap of 0 would refuse everything)")]
    Limit(&'static str),
    #[error("--gateway-identity: {0:?} is not a SPIFFE id (spiffe://TD/ns/NS/sa/SA)")]
    GatewayIdentity(String),
    #[error("--inbound-allow: {0}")]
    Allow(#[from] AllowListError),
    #[error("Istio VM bundle: {0}")]
    Bundle(#[from] crate::bundle::Error),
    #[error("--identity-provider istio-ca needs --control-plane istiod (the CA is istiod's)")]
    CaWithoutIstiod,
    #[error("--label: {0:?} is not KEY=VALUE")]
    Label(String),
    #[error("--exclude-outbound-cidrs: {0:?}: {1}")]
    ExcludeOutbound(String, crate::mesh::CidrError),
    #[error("readiness probe: {0}")]
    Probe(#[from] crate::health::SpecError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ControlPlane {
    /// Only the mesh files
    #[default]
    None,
    /// istiod, from the Istio VM bundle (`istioctl x workload entry configure`)
    Istiod,
}

/// Where this VM's certificate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityProvider {
    /// cert-chain.pem, key.pem, root-cert.pem in --certs, watched (you rotate them)
    Files,
    /// the Istio CA: a CSR with the bootstrap token, renewed at half-life (needs
    /// --control-plane istiod)
    IstioCa,
}

/// A probe on the command line (YAML or JSON, the WorkloadGroup probe's format) or as a
/// mapping in the config file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct ProbeArg(pub crate::bundle::Probe);

impl std::str::FromStr for ProbeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_yaml_ng::from_str(s)
            .map(ProbeArg)
            .map_err(|e| format!("not a probe ({{httpGet|tcpSocket|exec|grpc: ...}}): {e}"))
    }
}

/// A duration as people write one: `500ms`, `5s`, `1.5s`, `2m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait(pub std::time::Duration);

impl std::str::FromStr for Wait {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: f64 = n
            .parse()
            .map_err(|_| format!("{s:?}: not a duration (500ms, 5s, 2m)"))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            _ => return Err(format!("{s:?}: the unit is ms, s or m")),
        };
        match std::time::Duration::try_from_secs_f64(secs) {
            Ok(d) if !d.is_zero() => Ok(Wait(d)),
            _ => Err(format!("{s:?}: must be more than 0")),
        }
    }
}

impl<'de> Deserialize<'de> for Wait {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn shutdown_grace(flag: Option<Wait>) -> std::time::Duration {
    flag.map_or(crate::net::drain::DEFAULT_GRACE, |w| w.0)
}

/// The dial timeouts of `run` and `gateway`, from their flags.
fn timeouts(
    connect: Option<Wait>,
    handshake: Option<Wait>,
    hedge: Option<Wait>,
) -> crate::transport::Timeouts {
    let d = crate::transport::Timeouts::default();
    crate::transport::Timeouts {
        connect: connect.map_or(d.connect, |w| w.0),
        handshake: handshake.map_or(d.handshake, |w| w.0),
        hedge_after: hedge.map_or(d.hedge_after, |w| w.0),
    }
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

/// Istio's meshConfig `outboundTrafficPolicy.mode`: what the VM's apps may reach outside the
/// mesh. istiod's `virtualOutbound` wins over the flag when the VM follows istiod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundTrafficPolicy {
    /// connections outside the mesh go where they were aimed, untouched (Istio's default)
    #[default]
    AllowAny,
    /// TCP connections outside the mesh are refused at connect() (EPERM), except loopback,
    /// SSH and --exclude-outbound-cidrs
    RegistryOnly,
}

/// `--protocol-detection-timeout`'s default: long enough for any client that speaks first,
/// short enough that a server-first protocol on a port with no declared protocol is delayed,
/// not hung as under Istio's 0s (no timeout).
const DEFAULT_PROTOCOL_DETECTION: std::time::Duration = std::time::Duration::from_secs(5);

/// How connections to this VM's HTTP ports are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InboundHttp {
    /// request by request, as an Istio sidecar's HTTP chains: each judged by
    /// AuthorizationPolicy (403 `RBAC: access denied`), counted in Istio's request metrics
    /// (reporter destination) and logged
    #[default]
    Requests,
    /// relayed as bytes unless a policy needs a request's attributes: cheaper, but the
    /// requests are neither counted nor logged
    Connections,
}

/// Whether the daemon keeps its listeners and capture links in systemd's file descriptor store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FdStore {
    /// under systemd (NOTIFY_SOCKET set): a restart or a crash systemd restarts keeps capture
    /// and the listeners, so connections and DNS queries wait in kernel queues for the next
    /// process instead of failing (the unit needs FileDescriptorStoreMax=)
    #[default]
    Auto,
    /// never: a restart is a gap, as when run outside systemd
    Off,
}

/// How bytes cross the hop between a captured app and proxy::Outbound on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LocalHop {
    /// loopback TCP, as any two local sockets
    #[default]
    Tcp,
    /// sockops + sk_msg: a send on one end lands in the other's receive queue, skipping the
    /// loopback TCP stack (opt-in: see the README's bench figures)
    Sockmap,
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
    /// Inbound mTLS mode where no PeerAuthentication in the mesh files sets one
    /// [default: permissive]
    #[arg(long, value_enum)]
    pub mtls_mode: Option<MtlsMode>,
    /// This VM's workload labels, `KEY=VALUE`, repeatable: what the selectors of
    /// PeerAuthentication and AuthorizationPolicy match [default: the bundle's labels with
    /// --control-plane istiod, else none]
    #[arg(long = "label", value_name = "KEY=VALUE")]
    #[serde(default)]
    pub labels: Vec<String>,
    /// Istio's root namespace: its policies without a selector are mesh-wide
    /// [default: istio-system]
    #[arg(long)]
    pub root_namespace: Option<String>,
    /// This VM's locality, REGION/ZONE/SUBZONE (a prefix is fine): with outlier detection set,
    /// endpoints nearer it are tried first, and istiod is told it [default: the labels'
    /// istio-locality, region.zone.subzone, as istio-agent reads it]
    #[arg(long, value_name = "REGION/ZONE/SUBZONE")]
    pub locality: Option<String>,
    /// This VM's workload name in Istio's telemetry (its peers' `source_workload` and
    /// `destination_workload`; Istio names a VM by its WorkloadGroup) [default: the bundle's
    /// WORKLOAD_NAME with --control-plane istiod, else unknown]
    #[arg(long, value_name = "NAME")]
    pub workload_name: Option<String>,
    /// Outbound capture listener port on loopback [default: 15001]
    #[arg(long)]
    pub outbound_port: Option<u16>,
    /// Inbound capture listener port [default: 15006]
    #[arg(long)]
    pub inbound_port: Option<u16>,
    /// Port this VM takes HBONE on (steered to the inbound listener, always mTLS; needs a
    /// certificate); 0 turns HBONE inbound off [default: 15008]
    #[arg(long)]
    pub hbone_port: Option<u16>,
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
    /// The SPIFFE id east-west gateways present for double HBONE
    /// [default: spiffe://<trust domain>/ns/istio-system/sa/istio-eastwestgateway]
    #[arg(long, value_name = "ID")]
    pub gateway_identity: Option<String>,
    /// Threads that run the data paths; 1 makes every hop of a connection one thread's work
    /// (fewer wake-ups, like a sidecar with --concurrency 1) [default: one per core]
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
    /// How bytes cross the app <-> outbound hop on this host [default: tcp]
    #[arg(long, value_enum)]
    pub local_hop: Option<LocalHop>,
    /// Keep listeners and capture in systemd's file descriptor store across restarts
    /// [default: auto]
    #[arg(long, value_enum)]
    pub fd_store: Option<FdStore>,
    /// How connections to this VM's HTTP ports (declared HTTP, HTTP2 or gRPC; from istiod, its
    /// HTTP inbound chains) are served [default: requests]
    #[arg(long, value_enum)]
    pub inbound_http: Option<InboundHttp>,
    /// How long a cold start may wait for the mesh to be usable (istiod's first table, the
    /// first certificate from the Istio CA) before telling systemd READY=1 anyway; capture is
    /// attached before [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub startup_wait: Option<Wait>,
    /// How long a connection to a port with no declared protocol may take to show whether it
    /// speaks HTTP (its request line or the HTTP/2 preface), where routing needs to know;
    /// after that, or on other bytes, it is served as TCP. Istio waits for ever (its
    /// protocolDetectionTimeout 0s), which hangs server-first protocols [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub protocol_detection_timeout: Option<Wait>,
    /// What apps may reach outside the mesh (Istio's outboundTrafficPolicy) [default:
    /// allow-any; istiod's virtualOutbound wins]
    #[arg(long, value_enum)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Destinations REGISTRY_ONLY never refuses (Istio's excludeOutboundIPRanges), CIDRs
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Captured outbound connections served at once; beyond, new ones are reset and counted
    /// [default: 65536]
    #[arg(long, value_name = "N")]
    pub max_outbound_connections: Option<usize>,
    /// Inbound connections (sidecar wire and HBONE) served at once [default: 65536]
    #[arg(long, value_name = "N")]
    pub max_inbound_connections: Option<usize>,
    /// DNS-over-TCP connections open at once [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_dns_tcp_connections: Option<usize>,
    /// DNS queries waiting on the upstream nameservers at once; beyond, SERVFAIL at once
    /// (dnsmasq's dns-forward-max) [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_dns_forwards: Option<usize>,
    /// Inbound connections still in their TLS handshake (or before their first bytes): what a
    /// slowloris holds [default: 4096]
    #[arg(long, value_name = "N")]
    pub max_pending_handshakes: Option<usize>,
    /// TCP connect to an endpoint or gateway, per attempt [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<Wait>,
    /// TLS (and HBONE) handshake with an endpoint, per attempt [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub handshake_timeout: Option<Wait>,
    /// An endpoint that has not answered within this is raced by the next one (the slow one is
    /// marked an outlier) [default: 500ms]
    #[arg(long, value_name = "DURATION")]
    pub hedge_after: Option<Wait>,
    /// On SIGTERM, how long connections in progress may go on before they are closed cleanly
    /// (TLS close_notify, HTTP/2 GOAWAY); capture is detached first [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<Wait>,
    /// On `systemctl reload` (and a package upgrade), how long this process drains the
    /// connections it holds once its successor serves [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<Wait>,
    /// Where the mesh comes from besides the files: `istiod` joins the control plane named by
    /// the Istio VM bundle [default: none]
    #[arg(long, value_enum)]
    pub control_plane: Option<ControlPlane>,
    /// Root of the Istio VM bundle layout: ROOT/var/lib/istio/envoy/cluster.env,
    /// ROOT/etc/istio/config/mesh, ROOT/etc/certs, ROOT/var/run/secrets/tokens/istio-token,
    /// ROOT/etc/hosts, ROOT/var/lib/interceptor [default: /]
    #[arg(long, value_name = "ROOT")]
    pub istio_dir: Option<PathBuf>,
    /// The bundle's cluster.env [default: ROOT/var/lib/istio/envoy/cluster.env]
    #[arg(long, value_name = "FILE")]
    pub cluster_env: Option<PathBuf>,
    /// The bundle's mesh config [default: ROOT/etc/istio/config/mesh]
    #[arg(long, value_name = "FILE")]
    pub mesh_config: Option<PathBuf>,
    /// istiod's root certificate [default: ROOT/etc/certs/root-cert.pem]
    #[arg(long, value_name = "FILE")]
    pub root_cert: Option<PathBuf>,
    /// The bootstrap token [default: ROOT/var/run/secrets/tokens/istio-token]
    #[arg(long, value_name = "FILE")]
    pub istio_token: Option<PathBuf>,
    /// Where the discovery address's name is resolved [default: ROOT/etc/hosts]
    #[arg(long, value_name = "FILE")]
    pub hosts_file: Option<PathBuf>,
    /// Where the last table accepted from istiod is kept [default: ROOT/var/lib/interceptor]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Which ADS variant to speak to istiod [default: delta]
    #[arg(long, value_enum)]
    pub xds_protocol: Option<crate::xds::Protocol>,
    /// Where the certificate comes from [default: istio-ca with --control-plane istiod, else
    /// files]
    #[arg(long, value_enum)]
    pub identity_provider: Option<IdentityProvider>,
    /// The key the Istio CA certifies [default: ecdsa]
    #[arg(long, value_enum)]
    pub ca_key: Option<crate::identity::KeyKind>,
    /// The application's readiness probe, e.g. '{httpGet: {port: 8080, path: /ready}}'
    /// [default: the bundle's readinessProbe with istiod, else none]
    #[arg(long, value_name = "YAML")]
    pub readiness_probe: Option<ProbeArg>,
    /// YAML file with any of these settings (kebab-case keys); flags override it
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// Ports of the daemon's own listeners (Istio's by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// proxy::Outbound on loopback: where capture sends mesh connections.
    pub outbound: u16,
    /// proxy::Inbound: where sk_lookup steers connections to this VM's services.
    pub inbound: u16,
    /// dns::Server on loopback, UDP and TCP.
    pub dns: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            outbound: 15001,
            inbound: 15006,
            dns: 15053,
        }
    }
}

/// Where the mesh files are.
#[derive(Clone, Debug)]
pub struct MeshFiles {
    pub paths: Vec<PathBuf>,
    /// Named on the command line or in the config (a missing default directory is fine).
    pub explicit: bool,
    pub networks: Option<PathBuf>,
}

/// Which of this VM's ports are captured inbound.
#[derive(Clone, Debug, Default)]
pub struct InboundPorts {
    /// Ports captured; ignored when `all`.
    pub ports: Vec<u16>,
    pub all: bool,
    /// Never captured, whatever `ports` says (SSH, the admin ports and our listeners included).
    pub exclude: Vec<u16>,
    /// The HBONE port, captured as well (with a certificate only: HBONE is always mTLS).
    pub hbone: Option<u16>,
}

impl InboundPorts {
    pub fn enabled(&self) -> bool {
        self.all || !self.ports.is_empty() || self.hbone.is_some()
    }

    /// Every port steered to the inbound listener by number (with `all`, every port is).
    pub fn captured(&self) -> impl Iterator<Item = &u16> {
        self.ports.iter().chain(self.hbone.iter())
    }
}

use crate::route::HBONE_PORT;

/// Settings with every default applied.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mesh: MeshFiles,
    /// Name variants and the namespace of documents that name none.
    pub options: crate::mesh::Options,
    /// This VM's network ("" = single network).
    pub network: String,
    /// None: attach nothing (`--capture none`).
    pub cgroup: Option<Option<PathBuf>>,
    pub ports: Ports,
    pub inbound: InboundPorts,
    pub policy: InboundPolicy,
    pub resolv_conf: PathBuf,
    pub admin_addr: SocketAddr,
    /// `--control-plane istiod`: the bundle, read and checked.
    pub istiod: Option<Istiod>,
    pub identity: IdentitySource,
    pub probe: Option<crate::health::Spec>,
    /// None: one per core.
    pub worker_threads: Option<usize>,
    pub local_hop: LocalHop,
    pub fd_store: FdStore,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    pub exclude_outbound_cidrs: Vec<crate::mesh::Cidr>,
    pub gateway_identity: Option<crate::spiffe::SpiffeId>,
    pub limits: Limits,
    pub timeouts: crate::transport::Timeouts,
    pub shutdown_grace: std::time::Duration,
    pub drain_timeout: std::time::Duration,
    /// `--protocol-detection-timeout`.
    pub protocol_detection: std::time::Duration,
    /// `--startup-wait`.
    pub startup_wait: std::time::Duration,
    /// `--workload-name` (else the bundle's).
    pub workload_name: Option<String>,
}

impl Settings {
    /// This VM's workload as its HBONE peers' telemetry names it: the namespace and labels of
    /// the policy subject, the cluster and workload name of the VM bundle.
    pub fn workload(&self) -> crate::baggage::Workload {
        let bundle = self.istiod.as_ref().map(|i| &i.bundle);
        crate::baggage::Workload::new(
            &self.policy.subject.namespace,
            &self.policy.subject.labels,
            bundle.map(|b| b.cluster_id.as_str()),
            self.workload_name
                .as_deref()
                .or(bundle.map(|b| b.workload_name.as_str())),
        )
    }
}

impl Settings {
    /// This VM as Istio's request and connection metrics name it (its own side).
    pub fn peer(&self) -> crate::metrics::Peer {
        let w = self.workload();
        crate::metrics::Peer::new(
            w.name.as_deref(),
            w.namespace.as_deref(),
            &self.policy.subject.labels,
            w.cluster.as_deref(),
        )
    }

    /// This VM's side of the request and connection telemetry.
    pub fn local_telemetry(&self) -> crate::metadata_exchange::Local {
        crate::metadata_exchange::Local {
            peer: self.peer(),
            headers: self.metadata_exchange(),
        }
    }

    /// The `x-envoy-peer-metadata` headers this VM sends its HTTP peers.
    pub fn metadata_exchange(&self) -> Option<crate::metadata_exchange::Ours> {
        let w = self.workload();
        let ns = w.namespace.as_deref().unwrap_or_default();
        let name = w.name.as_deref().unwrap_or_default();
        // istio-agent's node id shape; the address part is informational for a VM.
        let id = format!("sidecar~0.0.0.0~{name}.{ns}~{ns}.svc.cluster.local");
        crate::metadata_exchange::Ours::new(
            &id,
            name,
            ns,
            w.cluster.as_deref().unwrap_or_default(),
            &self.policy.subject.labels,
        )
    }
}

/// Resource caps (`net::Limits` enforces them). The defaults sit far above what one VM's apps
/// need and far below what exhausts the unit's 1 048 576 descriptors (two per connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub outbound_connections: usize,
    pub inbound_connections: usize,
    pub dns_tcp_connections: usize,
    pub dns_forwards: usize,
    pub pending_handshakes: usize,
    /// `interceptor gateway` only.
    pub gateway_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            outbound_connections: 65536,
            inbound_connections: 65536,
            dns_tcp_connections: 1024,
            dns_forwards: 1024,
            pending_handshakes: 4096,
            gateway_connections: 65536,
        }
    }
}

/// The identity provider, configured.
#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// No certificate: plaintext only.
    None,
    /// Files in `dir`; `required`: they must be there at start.
    Files {
        dir: PathBuf,
        required: bool,
    },
    IstioCa(crate::identity::CaSettings),
}

/// Joining istiod.
#[derive(Clone, Debug)]
pub struct Istiod {
    pub bundle: std::sync::Arc<crate::bundle::Bundle>,
    pub protocol: crate::xds::Protocol,
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";
pub const DEFAULT_MESH_DIR: &str = "/etc/interceptor/mesh";
/// Never captured inbound, whatever the configuration says: SSH (the kernel program skips it
/// too) and Istio's admin ports.
pub const ALWAYS_EXCLUDED_INBOUND: [u16; 3] = [interceptor_ebpf::abi::SSH_PORT, 15020, 15021];
const DEFAULT_EXCLUDED_INBOUND: &str = "22,15020,15021";

fn ports(list: &str, what: &'static str) -> Result<Vec<u16>, Error> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Error::Port {
                    what,
                    value: s.to_string(),
                })
        })
        .collect()
}

fn read_file(path: &Path) -> Result<RunArgs, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        file: path.to_path_buf(),
        source,
    })?;
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| Error::Invalid {
        file: path.to_path_buf(),
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// `KEY=VALUE` labels.
fn parse_labels(entries: &[String]) -> Result<BTreeMap<String, String>, Error> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().into(), v.trim().into())),
            _ => Err(Error::Label(e.clone())),
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
            labels: if self.labels.is_empty() {
                file.labels
            } else {
                self.labels
            },
            root_namespace: self.root_namespace.or(file.root_namespace),
            locality: self.locality.or(file.locality),
            workload_name: self.workload_name.or(file.workload_name),
            outbound_port: self.outbound_port.or(file.outbound_port),
            inbound_port: self.inbound_port.or(file.inbound_port),
            hbone_port: self.hbone_port.or(file.hbone_port),
            dns_port: self.dns_port.or(file.dns_port),
            resolv_conf: self.resolv_conf.or(file.resolv_conf),
            capture: self.capture.or(file.capture),
            worker_threads: self.worker_threads.or(file.worker_threads),
            local_hop: self.local_hop.or(file.local_hop),
            fd_store: self.fd_store.or(file.fd_store),
            inbound_http: self.inbound_http.or(file.inbound_http),
            outbound_traffic_policy: self
                .outbound_traffic_policy
                .or(file.outbound_traffic_policy),
            exclude_outbound_cidrs: if self.exclude_outbound_cidrs.is_empty() {
                file.exclude_outbound_cidrs
            } else {
                self.exclude_outbound_cidrs
            },
            max_outbound_connections: self
                .max_outbound_connections
                .or(file.max_outbound_connections),
            max_inbound_connections: self
                .max_inbound_connections
                .or(file.max_inbound_connections),
            max_dns_tcp_connections: self
                .max_dns_tcp_connections
                .or(file.max_dns_tcp_connections),
            max_dns_forwards: self.max_dns_forwards.or(file.max_dns_forwards),
            max_pending_handshakes: self.max_pending_handshakes.or(file.max_pending_handshakes),
            connect_timeout: self.connect_timeout.or(file.connect_timeout),
            handshake_timeout: self.handshake_timeout.or(file.handshake_timeout),
            hedge_after: self.hedge_after.or(file.hedge_after),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace),
            drain_timeout: self.drain_timeout.or(file.drain_timeout),
            protocol_detection_timeout: self
                .protocol_detection_timeout
                .or(file.protocol_detection_timeout),
            startup_wait: self.startup_wait.or(file.startup_wait),
            gateway_identity: self.gateway_identity.or(file.gateway_identity),
            control_plane: self.control_plane.or(file.control_plane),
            istio_dir: self.istio_dir.or(file.istio_dir),
            cluster_env: self.cluster_env.or(file.cluster_env),
            mesh_config: self.mesh_config.or(file.mesh_config),
            root_cert: self.root_cert.or(file.root_cert),
            istio_token: self.istio_token.or(file.istio_token),
            hosts_file: self.hosts_file.or(file.hosts_file),
            state_dir: self.state_dir.or(file.state_dir),
            xds_protocol: self.xds_protocol.or(file.xds_protocol),
            identity_provider: self.identity_provider.or(file.identity_provider),
            ca_key: self.ca_key.or(file.ca_key),
            readiness_probe: self.readiness_probe.or(file.readiness_probe),
            admin_addr: self.admin_addr.or(file.admin_addr),
            config: self.config,
        }
    }

    pub fn resolve(self) -> Result<Settings, Error> {
        let mut args = match &self.config {
            Some(path) => {
                let file = read_file(path)?;
                self.merge(file)
            }
            None => self,
        };
        let istiod = args.istiod()?;
        let bundle = istiod.as_ref().map(|i| i.bundle.as_ref());
        let identity = args.identity(bundle)?;
        let probe = args.probe(bundle)?;
        let defaults = Ports::default();
        let ports = Ports {
            outbound: args.outbound_port.unwrap_or(defaults.outbound),
            inbound: args.inbound_port.unwrap_or(defaults.inbound),
            dns: args.dns_port.unwrap_or(defaults.dns),
        };
        let admin_addr = args
            .admin_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15020)));
        let inbound = args.inbound(&identity, ports, admin_addr)?;
        let policy = args.policy(bundle)?;
        let limits = args.limits()?;
        Ok(Settings {
            mesh: args.mesh_files(),
            options: crate::mesh::Options {
                registry_only: args.outbound_traffic_policy
                    == Some(OutboundTrafficPolicy::RegistryOnly),
                namespace: policy.subject.namespace.clone(),
                cluster_domain: args
                    .cluster_domain
                    .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.into()),
            },
            network: args.network.unwrap_or_default(),
            cgroup: match args.capture.unwrap_or_default() {
                CaptureMode::Ebpf => Some(args.cgroup),
                CaptureMode::None => None,
            },
            inbound,
            policy,
            ports,
            resolv_conf: args
                .resolv_conf
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
            admin_addr,
            istiod,
            identity,
            probe,
            worker_threads: match args.worker_threads {
                Some(0) => return Err(Error::WorkerThreads),
                n => n,
            },
            local_hop: args.local_hop.unwrap_or_default(),
            fd_store: args.fd_store.unwrap_or_default(),
            outbound_traffic_policy: args.outbound_traffic_policy.unwrap_or_default(),
            exclude_outbound_cidrs: args
                .exclude_outbound_cidrs
                .iter()
                .map(|c| {
                    crate::mesh::Cidr::parse(c).map_err(|e| Error::ExcludeOutbound(c.clone(), e))
                })
                .collect::<Result<_, _>>()?,
            timeouts: timeouts(
                args.connect_timeout,
                args.handshake_timeout,
                args.hedge_after,
            ),
            shutdown_grace: shutdown_grace(args.shutdown_grace),
            workload_name: args.workload_name.clone(),
            drain_timeout: args
                .drain_timeout
                .map_or(std::time::Duration::from_secs(60), |w| w.0),
            protocol_detection: args
                .protocol_detection_timeout
                .map_or(DEFAULT_PROTOCOL_DETECTION, |w| w.0),
            startup_wait: args
                .startup_wait
                .map_or(std::time::Duration::from_secs(30), |w| w.0),
            limits,
            gateway_identity: match args.gateway_identity {
                Some(id) => {
                    Some(crate::spiffe::SpiffeId::parse(&id).ok_or(Error::GatewayIdentity(id))?)
                }
                None => None,
            },
        })
    }

    /// `--control-plane istiod`: the VM bundle, read and checked. It says who and where this
    /// VM is; flags and the config file still win, so it only fills what they left unset.
    fn istiod(&mut self) -> Result<Option<Istiod>, Error> {
        if self.control_plane.unwrap_or_default() == ControlPlane::None {
            return Ok(None);
        }
        let root = self.istio_dir.clone().unwrap_or_else(|| "/".into());
        let mut paths = crate::bundle::Paths::under(&root);
        for (flag, path) in [
            (&self.cluster_env, &mut paths.cluster_env),
            (&self.mesh_config, &mut paths.mesh_config),
            (&self.root_cert, &mut paths.root_cert),
            (&self.hosts_file, &mut paths.hosts),
            (&self.state_dir, &mut paths.state_dir),
            (&self.istio_token, &mut paths.token),
        ] {
            if let Some(p) = flag {
                *path = p.clone();
            }
        }
        let bundle = crate::bundle::Bundle::load(paths)?;
        self.namespace = self
            .namespace
            .take()
            .or_else(|| Some(bundle.namespace.clone()));
        self.network = self.network.take().or_else(|| Some(bundle.network.clone()));
        self.inbound_ports = self
            .inbound_ports
            .take()
            .or_else(|| bundle.inbound_ports.clone());
        self.exclude_inbound_ports = self
            .exclude_inbound_ports
            .take()
            .or_else(|| bundle.exclude_inbound_ports.clone());
        Ok(Some(Istiod {
            bundle: std::sync::Arc::new(bundle),
            protocol: self.xds_protocol.unwrap_or_default(),
        }))
    }

    /// The identity provider: the Istio CA by default with a bundle, else certificate files.
    fn identity(&self, bundle: Option<&crate::bundle::Bundle>) -> Result<IdentitySource, Error> {
        let provider = self.identity_provider.unwrap_or(match bundle {
            Some(_) => IdentityProvider::IstioCa,
            None => IdentityProvider::Files,
        });
        Ok(match (provider, bundle) {
            (IdentityProvider::IstioCa, None) => return Err(Error::CaWithoutIstiod),
            (IdentityProvider::IstioCa, Some(b)) => {
                IdentitySource::IstioCa(crate::identity::CaSettings {
                    key: self.ca_key.unwrap_or_default(),
                    ttl: std::time::Duration::from_secs(b.secret_ttl_s),
                    out_dir: self
                        .certs
                        .clone()
                        .unwrap_or_else(|| b.paths.output_certs.clone()),
                })
            }
            (IdentityProvider::Files, _) => match self
                .certs
                .clone()
                .or_else(|| bundle.map(|b| b.paths.output_certs.clone()))
            {
                // The bundle's certificate directory may be empty until something fills it.
                Some(dir) => IdentitySource::Files {
                    required: bundle.is_none_or(|b| dir != b.paths.output_certs),
                    dir,
                },
                None => IdentitySource::None,
            },
        })
    }

    /// The application's readiness probe: the flag's, else the bundle's.
    fn probe(
        &self,
        bundle: Option<&crate::bundle::Bundle>,
    ) -> Result<Option<crate::health::Spec>, Error> {
        match self
            .readiness_probe
            .as_ref()
            .map(|p| &p.0)
            .or_else(|| bundle.and_then(|b| b.readiness_probe.as_ref()))
        {
            Some(p) => Ok(Some(crate::health::Spec::from_probe(p)?)),
            None => Ok(None),
        }
    }

    /// What sk_lookup steers inbound: the ports (or all), HBONE's when there is a certificate
    /// to terminate it with, and what it must leave alone.
    fn inbound(
        &self,
        identity: &IdentitySource,
        ports: Ports,
        admin: SocketAddr,
    ) -> Result<InboundPorts, Error> {
        let inbound = self.inbound_ports.clone().unwrap_or_default();
        let all = inbound.trim() == "*";
        let exclude = self
            .exclude_inbound_ports
            .as_deref()
            .unwrap_or(DEFAULT_EXCLUDED_INBOUND);
        Ok(InboundPorts {
            ports: if all {
                vec![]
            } else {
                self::ports(&inbound, "--inbound-ports")?
            },
            all,
            hbone: match self.hbone_port.unwrap_or(HBONE_PORT) {
                0 => None,
                _ if matches!(identity, IdentitySource::None) => None,
                p => Some(p),
            },
            exclude: excluded(
                self::ports(exclude, "--exclude-inbound-ports")?,
                ports,
                admin,
            ),
        })
    }

    /// Inbound policy: the mTLS mode, the allow-list, and who this VM is to policy selectors
    /// (its labels: the flags', else the bundle's).
    fn policy(&self, bundle: Option<&crate::bundle::Bundle>) -> Result<InboundPolicy, Error> {
        let labels = match self.labels.is_empty() {
            true => bundle.map(|b| b.labels.clone()).unwrap_or_default(),
            false => parse_labels(&self.labels)?,
        };
        // istio-agent: the `istio-locality` label, dots for slashes.
        let locality = self
            .locality
            .clone()
            .or_else(|| labels.get("istio-locality").map(|l| l.replace('.', "/")))
            .unwrap_or_default();
        Ok(InboundPolicy {
            http_requests: self.inbound_http.unwrap_or_default() == InboundHttp::Requests,
            protocol_detection: self
                .protocol_detection_timeout
                .map_or(DEFAULT_PROTOCOL_DETECTION, |w| w.0),
            mode: self.mtls_mode.unwrap_or_default(),
            allow: AllowList::parse(&self.inbound_allow)?,
            subject: crate::route::policy::Subject {
                namespace: self
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
                labels,
                locality,
                root_namespace: self
                    .root_namespace
                    .clone()
                    .unwrap_or_else(|| crate::route::policy::DEFAULT_ROOT_NAMESPACE.into()),
            },
        })
    }

    /// The resource caps; 0 is refused (it would refuse everything).
    fn limits(&self) -> Result<Limits, Error> {
        let d = Limits::default();
        let cap = |v: Option<usize>, default: usize, what: &'static str| match v {
            Some(0) => Err(Error::Limit(what)),
            v => Ok(v.unwrap_or(default)),
        };
        Ok(Limits {
            outbound_connections: cap(
                self.max_outbound_connections,
                d.outbound_connections,
                "max-outbound-connections",
            )?,
            inbound_connections: cap(
                self.max_inbound_connections,
                d.inbound_connections,
                "max-inbound-connections",
            )?,
            dns_tcp_connections: cap(
                self.max_dns_tcp_connections,
                d.dns_tcp_connections,
                "max-dns-tcp-connections",
            )?,
            dns_forwards: cap(self.max_dns_forwards, d.dns_forwards, "max-dns-forwards")?,
            pending_handshakes: cap(
                self.max_pending_handshakes,
                d.pending_handshakes,
                "max-pending-handshakes",
            )?,
            ..d
        })
    }

    /// The mesh files: the flags', else the default directory (which may not exist).
    fn mesh_files(&self) -> MeshFiles {
        let explicit = !self.mesh.is_empty();
        MeshFiles {
            paths: if explicit {
                self.mesh.clone()
            } else {
                vec![DEFAULT_MESH_DIR.into()]
            },
            explicit,
            networks: self.mesh_networks.clone(),
        }
    }
}

/// Every port sk_lookup must leave alone: the configured exclusions, SSH, the admin ports and
/// our own listeners.
fn excluded(mut list: Vec<u16>, ports: Ports, admin: SocketAddr) -> Vec<u16> {
    list.extend(ALWAYS_EXCLUDED_INBOUND);
    list.extend([ports.outbound, ports.inbound, ports.dns, admin.port()]);
    list.sort_unstable();
    list.dedup();
    list
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
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Cluster DNS domain
    #[arg(long, default_value = DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,
    /// Admin endpoint: /healthz/ready, /stats/prometheus, /config_dump, /status
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    pub admin_addr: SocketAddr,
    /// istiod's address: TLS for istiod's name on the --istiod-ports of the --listen
    /// addresses passes through to it unterminated (Istio's expose-istiod Gateway), so VMs in
    /// other networks reach xDS and the CA through this gateway
    #[arg(long, value_name = "ADDR")]
    pub expose_istiod: Option<std::net::IpAddr>,
    /// The name istiod's clients ask for (their discoveryAddress host)
    #[arg(long, value_name = "NAME", default_value = "istiod.istio-system.svc")]
    pub istiod_sni: String,
    /// istiod's ports passed through: xDS and CA, webhooks
    #[arg(long, value_name = "PORT", num_args = 1.., default_value = "15012 15017", value_delimiter = ' ')]
    pub istiod_ports: Vec<u16>,
    /// The gateway's own certificate (cert-chain.pem, key.pem, root-cert.pem): with it, the
    /// gateway also terminates double HBONE's outer tunnel on --hbone-listen
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Threads that run the gateway [default: one per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    /// Address(es) for double HBONE's outer tunnels (with --certs)
    #[arg(long, num_args = 1.., value_name = "ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_listen: Vec<SocketAddr>,
    /// Connections served at once, all listeners together; beyond, new ones are reset and
    /// counted (`interceptor_limit_refused_total{limit="gateway_connections"}`)
    #[arg(long, value_name = "N", default_value_t = 65536,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// TCP connect to an endpoint, per attempt [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<Wait>,
    /// HBONE handshake with an endpoint, per attempt [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub handshake_timeout: Option<Wait>,
    /// An endpoint that has not answered within this is raced by the next one [default: 500ms]
    #[arg(long, value_name = "DURATION")]
    pub hedge_after: Option<Wait>,
    /// On SIGTERM, how long connections in progress may go on before they are closed cleanly
    /// (TLS close_notify, HTTP/2 GOAWAY); capture is detached first [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<Wait>,
}

impl GatewayArgs {
    pub fn shutdown_grace(&self) -> std::time::Duration {
        shutdown_grace(self.shutdown_grace)
    }

    pub fn timeouts(&self) -> crate::transport::Timeouts {
        timeouts(
            self.connect_timeout,
            self.handshake_timeout,
            self.hedge_after,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_as_people_write_them() {
        use std::time::Duration;
        let w = |s: &str| s.parse::<Wait>().map(|w| w.0);
        assert_eq!(w("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(w("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(w("2m"), Ok(Duration::from_secs(120)));
        assert!(w("0s").is_err() && w("5").is_err() && w("fast").is_err() && w("5h").is_err());
        let t = timeouts(None, None, Some(Wait(Duration::from_millis(200))));
        assert_eq!(t.hedge_after, Duration::from_millis(200));
        assert_eq!(t.connect, crate::transport::Timeouts::default().connect);
    }

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
            (
                s.options.namespace.as_str(),
                s.ports.dns,
                s.inbound.ports.clone()
            ),
            ("prod", 1053, vec![8080, 9090])
        );
        // The defaults, SSH, the admin port and our own listeners.
        assert_eq!(
            s.inbound.exclude,
            vec![22, 1053, 15001, 15006, 15020, 15021]
        );
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

    #[test]
    fn hbone_needs_a_certificate_and_bad_numbers_and_ids_are_refused() {
        let plain = RunArgs::default().resolve().unwrap();
        assert_eq!(
            plain.inbound.hbone, None,
            "no certificate, no HBONE inbound"
        );
        let dir = tempfile::tempdir().unwrap();
        let with_certs = |extra: RunArgs| {
            RunArgs {
                certs: Some(dir.path().to_path_buf()),
                ..extra
            }
            .resolve()
        };
        let s = with_certs(RunArgs::default()).unwrap();
        assert_eq!(s.inbound.hbone, Some(15008));
        assert!(s.inbound.enabled());
        let off = with_certs(RunArgs {
            hbone_port: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(off.inbound.hbone, None);
        let e = with_certs(RunArgs {
            worker_threads: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, Error::WorkerThreads), "{e}");
        let e = with_certs(RunArgs {
            gateway_identity: Some("istio-eastwestgateway".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not a SPIFFE id"), "{e}");
    }
}
