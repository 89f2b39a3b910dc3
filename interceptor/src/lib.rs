//! interceptor: an eBPF transparent interceptor that joins Linux VMs to an Istio mesh.
//!
//! One module per concern. Sources (`mesh`) write the mesh model, data paths (`proxy`, `dns`)
//! read it; identity providers (`identity`) write the identity, `tls` turns it into configs the
//! data paths read. `route` is the routing policy (pure functions `explain` calls too),
//! `transport` dials a route's target, `net` moves bytes, `capture` holds the kernel programs,
//! `admin` serves readiness, metrics and explain, `daemon` owns the parts.

pub mod admin;
pub mod baggage;
pub mod bundle;
pub mod capture;
pub mod channel;
pub mod config;
pub mod daemon;
pub mod dns;
mod fault;
pub mod fdstore;
pub mod health;
pub mod identity;
pub mod mesh;
pub mod metadata_exchange;
pub mod metrics;
pub mod net;
pub mod privilege;
pub mod proxy;
pub mod readiness;
pub mod route;
pub mod spiffe;
pub mod tls;
pub mod transport;
pub mod watch;
pub mod xds;
