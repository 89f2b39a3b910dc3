//! Connection counters the TCP data paths bump; the admin endpoint exposes them with whatever it
//! reads at scrape time. Istio's standard TCP metric names and labels (I: istio.io docs,
//! "Istio Standard Metrics"), so existing dashboards and alerts apply to VMs too.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Who reports a connection, in Istio's terms.
pub const SOURCE: &str = "source";
pub const DESTINATION: &str = "destination";
/// Not an Istio reporter: the east-west gateway, which sees neither end's identity.
pub const GATEWAY: &str = "gateway";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    /// The service host (outbound, gateway) or the local address:port served (inbound).
    pub destination_service: String,
    /// `mutual_tls` or `none`, as Istio labels it.
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    pub fn new(reporter: &'static str, destination_service: String, mtls: bool) -> Self {
        Self {
            reporter,
            destination_service,
            connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        }
    }
}

#[derive(Default, Debug)]
pub struct Metrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    /// Bytes towards the client (Istio: "sent during response").
    sent: Family<TcpLabels, Counter>,
    /// Bytes from the client (Istio: "received during request").
    received: Family<TcpLabels, Counter>,
}

impl Metrics {
    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// A connection ended; `from_client`/`to_client` are the bytes relayed each way.
    pub fn closed(&self, labels: &TcpLabels, from_client: u64, to_client: u64) {
        self.closed.get_or_create(labels).inc();
        self.received.get_or_create(labels).inc_by(from_client);
        self.sent.get_or_create(labels).inc_by(to_client);
    }

    /// Adds the families to `registry` (they stay shared with the data paths).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client during the connection",
            self.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client during the connection",
            self.received.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels_in_the_exposition() {
        let m = Metrics::default();
        let l = TcpLabels::new(SOURCE, "product.default.svc.cluster.local".into(), true);
        m.opened(&l);
        m.closed(&l, 10, 20);
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"source\",destination_service=\"product.default.svc.cluster.local\",connection_security_policy=\"mutual_tls\"} 1"), "{text}");
        assert!(text.contains("istio_tcp_received_bytes_total{reporter=\"source\",destination_service=\"product.default.svc.cluster.local\",connection_security_policy=\"mutual_tls\"} 10"), "{text}");
        assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"source\",destination_service=\"product.default.svc.cluster.local\",connection_security_policy=\"mutual_tls\"} 20"), "{text}");
    }
}
