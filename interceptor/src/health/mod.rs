//! The application's health, as istio-agent checks it on a VM: the WorkloadGroup's readiness
//! probe (or one given in file mode) run with Istio's defaults (period 10 s, timeout 1 s,
//! thresholds 1, no initial delay, the first probe at once). Its state is published on a watch
//! channel: the xDS source reports every transition to istiod (HealthInformation), readiness
//! follows it, status and metrics show it.

pub mod probe;

pub use probe::Kind;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bundle;
use crate::readiness::Readiness;

/// The readiness condition a probe adds.
pub const READY: &str = "application probe";

/// A probe with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub kind: Kind,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("a probe names exactly one of httpGet, tcpSocket, exec and grpc; this one names {0}")]
    Kinds(usize),
    #[error("exec.command is empty")]
    EmptyCommand,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("httpGet.scheme {0:?}: HTTP or HTTPS")]
    Scheme(String),
}

impl Spec {
    /// The WorkloadGroup probe as Istio reads it (SPEC 10 defaults).
    pub fn from_probe(p: &bundle::Probe) -> Result<Spec, SpecError> {
        let host = |h: &Option<String>| {
            h.clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| probe::DEFAULT_HOST.to_string())
        };
        let mut kinds = Vec::new();
        if let Some(h) = &p.http_get {
            let https = match h.scheme.as_deref().map(str::to_ascii_uppercase).as_deref() {
                None | Some("") | Some("HTTP") => false,
                Some("HTTPS") => true,
                Some(_) => return Err(SpecError::Scheme(h.scheme.clone().unwrap_or_default())),
            };
            let path = h
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or("/".into());
            kinds.push(Kind::Http(probe::Http {
                host: host(&h.host),
                port: h.port,
                path: if path.starts_with('/') {
                    path
                } else {
                    format!("/{path}")
                },
                https,
                headers: h
                    .http_headers
                    .iter()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }));
        }
        if let Some(t) = &p.tcp_socket {
            kinds.push(Kind::Tcp {
                host: host(&t.host),
                port: t.port,
            });
        }
        if let Some(e) = &p.exec {
            if e.command.is_empty() {
                return Err(SpecError::EmptyCommand);
            }
            kinds.push(Kind::Exec {
                command: e.command.clone(),
            });
        }
        if let Some(g) = &p.grpc {
            kinds.push(Kind::Grpc {
                port: g.port,
                service: g.service.clone().unwrap_or_default(),
            });
        }
        if kinds.len() != 1 {
            return Err(SpecError::Kinds(kinds.len()));
        }
        let secs = |v: Option<u64>, default: u64| Duration::from_secs(v.unwrap_or(default));
        let threshold = |v: Option<u32>, what| match v {
            Some(0) => Err(SpecError::Zero(what)),
            v => Ok(v.unwrap_or(1)),
        };
        let period = secs(p.period_seconds, 10);
        let timeout = secs(p.timeout_seconds, 1);
        if period.is_zero() {
            return Err(SpecError::Zero("periodSeconds"));
        }
        if timeout.is_zero() {
            return Err(SpecError::Zero("timeoutSeconds"));
        }
        Ok(Spec {
            kind: kinds.remove(0),
            initial_delay: secs(p.initial_delay_seconds, 0),
            period,
            timeout,
            success_threshold: threshold(p.success_threshold, "successThreshold")?,
            failure_threshold: threshold(p.failure_threshold, "failureThreshold")?,
        })
    }
}

/// What the probe says now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeState {
    /// httpGet, tcpSocket, exec or grpc.
    pub kind: String,
    /// None until the thresholds decided once.
    pub healthy: Option<bool>,
    /// Why the last failing probe failed.
    pub message: String,
    /// When `healthy` last changed (milliseconds since the epoch).
    pub since_unix_ms: u64,
    pub probes: u64,
    pub failures: u64,
}

/// The probe's state, shared by the prober (writer) and its readers.
pub struct Health {
    state: watch::Sender<ProbeState>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    pub fn new(spec: &Spec) -> Arc<Self> {
        Arc::new(Self {
            state: watch::Sender::new(ProbeState {
                kind: spec.kind.label().into(),
                ..Default::default()
            }),
        })
    }

    pub fn state(&self) -> ProbeState {
        self.state.borrow().clone()
    }

    /// Wakes on every change of `healthy` (and of the counters).
    pub fn subscribe(&self) -> watch::Receiver<ProbeState> {
        self.state.subscribe()
    }

    /// One probe's result; thresholds decide the state. Returns whether `healthy` changed.
    fn record(&self, spec: &Spec, streak: &mut (u32, u32), result: &Result<(), String>) -> bool {
        let mut changed = false;
        self.state.send_modify(|s| {
            s.probes += 1;
            let (ok, bad) = streak;
            let verdict = match result {
                Ok(()) => {
                    *ok += 1;
                    *bad = 0;
                    (*ok >= spec.success_threshold).then_some(true)
                }
                Err(e) => {
                    s.failures += 1;
                    s.message = e.clone();
                    *bad += 1;
                    *ok = 0;
                    (*bad >= spec.failure_threshold).then_some(false)
                }
            };
            if let Some(v) = verdict {
                if s.healthy != Some(v) {
                    s.healthy = Some(v);
                    s.since_unix_ms = now_ms();
                    if v {
                        s.message.clear();
                    }
                    changed = true;
                }
            }
        });
        changed
    }
}

/// Probes for ever. Readiness (`READY`) follows the verdict.
pub async fn run(
    spec: Spec,
    health: Arc<Health>,
    readiness: Arc<Readiness>,
    exec_cgroup: Option<PathBuf>,
) {
    tokio::time::sleep(spec.initial_delay).await;
    let mut tick = tokio::time::interval(spec.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = (0, 0);
    loop {
        tick.tick().await;
        let result = probe::check(&spec.kind, spec.timeout, exec_cgroup.as_deref()).await;
        if health.record(&spec, &mut streak, &result) {
            let healthy = result.is_ok();
            readiness.set(READY, healthy);
            match &result {
                Ok(()) => tracing::info!(probe = spec.kind.label(), "application healthy"),
                Err(e) => {
                    tracing::warn!(probe = spec.kind.label(), error = %e, "application unhealthy")
                }
            }
        }
    }
}

/// A cgroup for exec probes: its id is given to the capture programs, which leave every
/// socket made in it alone (a probe command is ours, not the application's traffic). Removed
/// when dropped.
pub struct ExecCgroup {
    path: PathBuf,
    id: u64,
}

impl ExecCgroup {
    pub fn create(parent: &Path) -> std::io::Result<Self> {
        let path = parent.join("interceptor-probes");
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // A cgroup's id is its directory's inode number in cgroup2.
        let id = std::fs::metadata(&path)?.ino();
        Ok(Self { path, id })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for ExecCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            tracing::warn!(error = %e, cgroup = %self.path.display(), "cannot remove the exec probe cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Result<Spec, SpecError> {
        Spec::from_probe(&serde_yaml_ng::from_str(text).unwrap())
    }

    #[test]
    fn istio_defaults_and_one_kind_only() {
        let s = yaml("httpGet: {port: 8080}").unwrap();
        assert_eq!(s.period, Duration::from_secs(10));
        assert_eq!(s.timeout, Duration::from_secs(1));
        assert_eq!((s.success_threshold, s.failure_threshold), (1, 1));
        assert_eq!(s.initial_delay, Duration::ZERO);
        assert_eq!(
            s.kind,
            Kind::Http(probe::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/".into(),
                https: false,
                headers: vec![],
            })
        );
        assert_eq!(
            yaml("httpGet: {port: 1}\ntcpSocket: {port: 2}"),
            Err(SpecError::Kinds(2))
        );
        assert_eq!(yaml("periodSeconds: 3"), Err(SpecError::Kinds(0)));
        assert_eq!(yaml("exec: {command: []}"), Err(SpecError::EmptyCommand));
        assert_eq!(
            yaml("tcpSocket: {port: 1}\nfailureThreshold: 0"),
            Err(SpecError::Zero("failureThreshold"))
        );
        let g = yaml("grpc: {port: 9000, service: app}\nperiodSeconds: 2").unwrap();
        assert_eq!(
            g.kind,
            Kind::Grpc {
                port: 9000,
                service: "app".into()
            }
        );
        assert_eq!(g.period, Duration::from_secs(2));
    }

    #[test]
    fn thresholds_decide_transitions() {
        let mut spec = yaml("tcpSocket: {port: 1}").unwrap();
        spec.failure_threshold = 2;
        let h = Health::new(&spec);
        let mut streak = (0, 0);
        assert!(h.record(&spec, &mut streak, &Ok(())));
        assert_eq!(h.state().healthy, Some(true));
        // One failure is not enough with a threshold of two.
        assert!(!h.record(&spec, &mut streak, &Err("refused".into())));
        assert_eq!(h.state().healthy, Some(true));
        assert!(h.record(&spec, &mut streak, &Err("refused".into())));
        let s = h.state();
        assert_eq!(
            (s.healthy, s.message.as_str(), s.failures),
            (Some(false), "refused", 2)
        );
        assert!(h.record(&spec, &mut streak, &Ok(())));
        assert_eq!(h.state().message, "");
    }
}
