//! The mesh model: one table every data path reads and only sources write.

mod files;
pub mod http_route;
pub mod inbound;
mod istio;
mod model;
mod names;
mod networks;
mod policy;
mod store;
mod table;
pub mod traffic;
mod vip;

pub use files::{release_freed_memory, FileSource};
pub use istio::parse_documents;
pub use model::{
    Address, ClusterPolicy, Health, Host, ListenerProtocol, Location, PortEndpoints, Resolution,
    Service, ServicePort, SubsetEndpoints, Workload, WorkloadGroup, AMBIENT_REDIRECTION,
    DEFAULT_CLUSTER_DOMAIN, DEFAULT_NAMESPACE, TLS_MODE_LABEL, TUNNEL_LABEL,
};
pub use names::{NameEntry, NameTable};
pub use networks::{Cidr, CidrError, Gateway, Network, Networks, NetworksError};
pub use policy::{
    Action, AuthorizationPolicy, Clause, Pattern, PeerAuthentication, PeerMode, Rule,
};
pub use store::{SourceId, SourceStatus, Store};
#[cfg(test)]
pub(crate) use table::tests as table_tests;
pub use table::{Options, Resources, ServiceDecl, Table, Traffic};

use std::path::PathBuf;

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
    #[error("{file}: {source}")]
    Networks {
        file: PathBuf,
        source: NetworksError,
    },
}

impl Error {
    /// Every `reason`, so the metric shows zeros before the first refusal.
    pub const REASONS: [&'static str; 5] = ["missing", "permission", "read", "invalid", "networks"];

    /// Why, as a metric label: what an operator fixes differs (a deploy that removed the
    /// directory, a chmod, a bad edit).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Read { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => "missing",
                std::io::ErrorKind::PermissionDenied => "permission",
                _ => "read",
            },
            Error::Invalid { .. } => "invalid",
            Error::Networks { .. } => "networks",
        }
    }
}
