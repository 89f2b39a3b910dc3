//! interceptor: an eBPF transparent interceptor that joins Linux VMs to an Istio mesh.
//!
//! Modules, one concern each: `capture` (kernel programs), `mesh` (the model and its sources),
//! `dns` (dns::Server), `proxy` (proxy::Outbound, Inbound, Gateway), `identity`, `metrics`,
//! `admin` (readiness, metrics, config dump, explain), `run` (wiring them into the daemon).

pub mod admin;
pub mod capture;
pub mod config;
pub mod dns;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod proxy;
pub mod run;
pub mod tls;
