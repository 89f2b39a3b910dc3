//! The mesh model: one table every data path reads and only sources write.

mod files;
mod istio;
mod model;
mod names;
mod networks;
mod table;
mod vip;

pub use files::FileSource;
pub use istio::parse_documents;
pub use model::{
    Address, Health, Host, Location, Resolution, Service, ServicePort, Workload, WorkloadGroup,
    TLS_MODE_LABEL,
};
pub use names::{NameEntry, NameTable};
pub use networks::{Cidr, Gateway, Network, Networks};
pub use table::{Options, Resources, ServiceDecl, Table};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

/// A problem in mesh input, located precisely enough to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: document {doc}: {field}: {message}")]
    Invalid {
        file: PathBuf,
        doc: usize,
        field: String,
        message: String,
    },
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Holds the table in force. Readers take a snapshot (`load`) per connection or query and never
/// see a half-applied table; writers replace it whole.
pub struct Store {
    current: ArcSwap<Table>,
    next_version: AtomicU64,
    changed: watch::Sender<u64>,
    reload_errors: AtomicU64,
}

impl Store {
    pub fn new(mut first: Table) -> Arc<Self> {
        first.version = 1;
        first.loaded_unix = now_unix();
        let (changed, _) = watch::channel(1);
        Arc::new(Self {
            current: ArcSwap::from_pointee(first),
            next_version: AtomicU64::new(2),
            changed,
            reload_errors: AtomicU64::new(0),
        })
    }

    pub fn load(&self) -> Arc<Table> {
        self.current.load_full()
    }

    pub fn publish(&self, mut table: Table) -> u64 {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        table.version = version;
        table.loaded_unix = now_unix();
        self.current.store(Arc::new(table));
        self.changed.send_replace(version);
        version
    }

    /// A source failed to produce a table; the current one stays.
    pub fn record_reload_error(&self) {
        self.reload_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reload_errors(&self) -> u64 {
        self.reload_errors.load(Ordering::Relaxed)
    }

    /// Wakes on every published version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
