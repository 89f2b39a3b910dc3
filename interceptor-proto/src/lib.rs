//! The messages and services interceptor exchanges with istiod. Envoy's xDS types come from
//! envoy-types; Istio's own (NDS name table, CA) are compiled here from `proto/`.

pub use envoy_types::pb::envoy;
pub use envoy_types::pb::google;

/// istiod's DNS name table (NDS).
pub mod nds {
    tonic::include_proto!("istio.networking.nds.v1");
}

/// The Istio CA.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// Type URLs of the resources interceptor subscribes to and sends.
pub mod type_url {
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const TCP_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const NAME_TABLE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";
    pub const HEALTH: &str = "type.googleapis.com/istio.v1.HealthInformation";
    pub const UPSTREAM_TLS: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
}
