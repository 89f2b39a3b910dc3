//! The mesh table in force, merged from every source's view. Each source (the mesh files,
//! istiod) publishes its whole `Resources`; the store merges them with a fixed precedence
//! (istiod first: on a host both define, istiod's service wins and the shadowed one is logged)
//! and swaps the new table in whole. Readers take one immutable snapshot per `load()` and never
//! see a half-applied table.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::model::Host;
use super::table::{Options, Resources, ServiceDecl, Table};

/// Who publishes into the store. Declaration order is precedence: earlier wins a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceId {
    Istiod,
    Files,
}

impl std::fmt::Display for SourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceId::Istiod => "istiod",
            SourceId::Files => "files",
        })
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the store knows of one source.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceStatus {
    pub services: usize,
    pub workloads: usize,
    /// When its last view was taken in (seconds since the epoch).
    pub published_unix: u64,
    /// Loads or pushes of it that were refused (the last good view stayed).
    pub rejected: u64,
    /// Why its last load was refused; cleared by the next view taken in.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Hosts it defines that a source of higher precedence defines too.
    pub shadowed: Vec<String>,
}

struct Inner {
    views: BTreeMap<SourceId, Resources>,
    status: BTreeMap<SourceId, SourceStatus>,
    /// Refused loads by reason (`mesh::Error::reason`), for the metric.
    rejections: BTreeMap<&'static str, u64>,
}

pub struct Store {
    options: Options,
    inner: Mutex<Inner>,
    current: ArcSwap<Table>,
    /// The table DNS answers from. A name must never resolve to a VIP the kernel does not
    /// redirect yet (the client's connect would go nowhere), so with capture on this is the table
    /// whose VIPs are in the capture map (`gate_dns`, `release_dns`); without, it is `current`.
    dns: ArcSwap<Table>,
    dns_gated: AtomicBool,
    next_version: AtomicU64,
    changed: watch::Sender<u64>,
    reload_errors: AtomicU64,
}

impl Store {
    /// An empty store (version 0: no source has published yet).
    pub fn new(options: Options) -> Arc<Self> {
        let empty = Table::build(Resources::default(), options.clone());
        let (changed, _) = watch::channel(0);
        let options_dns = options.clone();
        Arc::new(Self {
            options,
            inner: Mutex::new(Inner {
                views: BTreeMap::new(),
                status: BTreeMap::new(),
                rejections: BTreeMap::new(),
            }),
            current: ArcSwap::from_pointee(empty),
            dns: ArcSwap::from_pointee(Table::build(Resources::default(), options_dns)),
            dns_gated: AtomicBool::new(false),
            next_version: AtomicU64::new(1),
            changed,
            reload_errors: AtomicU64::new(0),
        })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn load(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// The table DNS answers from (see `dns`).
    pub fn load_dns(&self) -> Arc<Table> {
        self.dns.load_full()
    }

    /// From now on DNS answers from what `release_dns` hands over, not from each published
    /// table. Capture calls it before it first fills the kernel's map.
    pub fn gate_dns(&self) {
        self.dns_gated.store(true, Ordering::SeqCst);
    }

    /// `table`'s VIPs are in force in the kernel: DNS may answer with them.
    pub fn release_dns(&self, table: Arc<Table>) {
        self.dns.store(table);
    }

    /// Replaces `source`'s view and puts the merged table in force. Returns its version.
    pub fn publish(&self, source: SourceId, res: Resources) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let status = inner.status.entry(source).or_default();
        status.services = res.services.len();
        status.workloads = res.workloads.len();
        status.published_unix = now_unix();
        status.last_error = None;
        inner.views.insert(source, res);
        let merged = merge(&mut inner);
        let prev = self.current.load_full();
        let mut table = Table::build_on(merged, self.options.clone(), Some(&prev));
        // Under the lock: versions are in force in the order they were numbered.
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        table.version = version;
        table.loaded_unix = now_unix();
        let table = Arc::new(table);
        self.current.store(table.clone());
        if !self.dns_gated.load(Ordering::SeqCst) {
            self.dns.store(table);
        }
        drop(inner);
        self.changed.send_replace(version);
        retire(prev);
        version
    }

    /// A source failed to produce a view (`reason` a metric label, `message` the first error);
    /// its last good one stays.
    pub fn record_reload_error(&self, source: SourceId, reason: &'static str, message: String) {
        self.reload_errors.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner.rejections.entry(reason).or_default() += 1;
        let status = inner.status.entry(source).or_default();
        status.rejected += 1;
        status.last_error = Some(message);
    }

    /// Refused loads so far, by reason.
    pub fn reload_errors_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rejections
            .clone()
    }

    pub fn reload_errors(&self) -> u64 {
        self.reload_errors.load(Ordering::Relaxed)
    }

    pub fn sources(&self) -> BTreeMap<SourceId, SourceStatus> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status
            .clone()
    }

    /// Wakes on every published version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Tables this large are freed off the caller's thread: freeing what a 10 000-service table
/// no longer shares takes longer than building the next one.
const RETIRE_OFF_THREAD_FROM: usize = 1000;

/// Lets go of a table that is no longer in force (readers may still hold it).
fn retire(table: Arc<Table>) {
    if table.services.len() < RETIRE_OFF_THREAD_FROM {
        return;
    }
    // If no thread can be made, the closure (and the table) is dropped here instead.
    let _ = std::thread::Builder::new()
        .name("mesh-retire".into())
        .spawn(move || drop(table));
}

/// One `Resources` of every view: services by precedence (a host goes to the first source that
/// defines it), everything else side by side. A single view is used as is.
fn merge(inner: &mut Inner) -> Resources {
    let mut nonempty = inner.views.values().filter(|v| !v.services.is_empty());
    let single = match (nonempty.next(), nonempty.next()) {
        (first, None) => Some(first),
        _ => None,
    };
    let mut out = Resources::default();
    let mut shadowed: BTreeMap<SourceId, Vec<String>> = BTreeMap::new();
    match single {
        // One source has services (the usual case, whatever the others bring): no host can be
        // shadowed, the services are taken as they are.
        Some(first) => {
            if let Some(v) = first {
                out.services = v.services.clone();
            }
        }
        None => {
            let mut taken: HashSet<&Host> = HashSet::new();
            for (source, view) in &inner.views {
                for decl in &view.services {
                    if decl.hosts.iter().all(|h| !taken.contains(h)) {
                        out.services.push(decl.clone());
                        continue;
                    }
                    let (mine, theirs): (Vec<Host>, Vec<Host>) =
                        decl.hosts.iter().cloned().partition(|h| !taken.contains(h));
                    shadowed
                        .entry(*source)
                        .or_default()
                        .extend(theirs.iter().map(|h| h.to_string()));
                    if !mine.is_empty() {
                        let mut d = ServiceDecl::clone(decl);
                        d.hosts = mine;
                        out.services.push(Arc::new(d));
                    }
                }
                // Hosts of this source are taken for the ones after it.
                for decl in &view.services {
                    taken.extend(decl.hosts.iter());
                }
            }
        }
    }
    for view in inner.views.values() {
        out.workloads.extend(view.workloads.iter().cloned());
        out.groups.extend(view.groups.iter().cloned());
        out.peer_authentications
            .extend(view.peer_authentications.iter().cloned());
        out.authorization_policies
            .extend(view.authorization_policies.iter().cloned());
        out.virtual_services
            .extend(view.virtual_services.iter().cloned());
        out.destination_rules
            .extend(view.destination_rules.iter().cloned());
        out.listener_routes
            .extend(view.listener_routes.iter().cloned());
        out.http_hosts.extend(view.http_hosts.iter().cloned());
        if out.inbound.is_none() {
            out.inbound = view.inbound.clone();
        }
        for (name, net) in &view.networks.networks {
            out.networks
                .networks
                .entry(name.clone())
                .or_insert_with(|| net.clone());
        }
        if out.names.is_none() {
            out.names = view.names.clone();
        }
    }
    for (source, status) in inner.status.iter_mut() {
        let now = shadowed.remove(source).unwrap_or_default();
        if now != status.shadowed {
            for host in now.iter().filter(|h| !status.shadowed.contains(h)) {
                tracing::warn!(%host, %source, "host defined by a source of higher precedence too; that one is used");
            }
            status.shadowed = now;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::table::tests::{product, workload};

    /// Ungated, DNS sees each table as it is published; gated (capture on), only the tables
    /// capture has released.
    #[test]
    fn dns_answers_from_the_table_capture_released() {
        let store = Store::new(Options::default());
        let res = || Resources {
            services: vec![Arc::new(product())],
            ..Default::default()
        };
        let v1 = store.publish(SourceId::Files, res());
        assert_eq!(store.load_dns().version, v1);
        store.gate_dns();
        let v2 = store.publish(SourceId::Files, res());
        assert_eq!((store.load().version, store.load_dns().version), (v2, v1));
        store.release_dns(store.load());
        assert_eq!(store.load_dns().version, v2);
    }

    #[test]
    fn istiod_wins_a_host_files_add_the_rest() {
        let store = Store::new(Options::default());
        assert_eq!(store.load().version, 0);
        let mut from_files = product();
        from_files.selector = None;
        from_files.addresses = vec!["10.9.9.9".parse().unwrap()];
        from_files.endpoints = vec![Arc::new(workload("default", "10.0.0.1", &[]))];
        let mut only_files = from_files.clone();
        only_files.origin = "default/legacy".into();
        only_files.hosts = vec![Host::new("legacy.example.com")];
        store.publish(
            SourceId::Files,
            Resources {
                services: vec![Arc::new(from_files.clone()), Arc::new(only_files)],
                ..Default::default()
            },
        );
        let mut from_istiod = from_files;
        from_istiod.origin = "istiod/product".into();
        from_istiod.addresses = vec!["240.240.0.1".parse().unwrap()];
        from_istiod.endpoints = vec![Arc::new(workload("default", "10.0.0.2", &[]))];
        let v = store.publish(
            SourceId::Istiod,
            Resources {
                services: vec![Arc::new(from_istiod)],
                ..Default::default()
            },
        );
        assert_eq!(v, 2);
        let t = store.load();
        let p = t
            .service_by_host("product.default.svc.cluster.local")
            .unwrap();
        assert_eq!(p.origin, "istiod/product");
        assert_eq!(
            p.vips,
            vec!["240.240.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(t.service_by_host("legacy.example.com").is_some());
        let status = store.sources();
        assert_eq!(
            status[&SourceId::Files].shadowed,
            vec!["product.default.svc.cluster.local".to_string()]
        );
        assert!(status[&SourceId::Istiod].shadowed.is_empty());
    }
}
