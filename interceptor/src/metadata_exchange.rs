//! Istio's HTTP peer metadata exchange (sheet 6.3; P: source/extensions/filters/http/
//! peer_metadata/filter.cc, extensions/common/metadata_object.cc
//! `convertWorkloadMetadataToStruct`): a sidecar puts `x-envoy-peer-metadata-id` (its node id)
//! and `x-envoy-peer-metadata` (base64 of a serialized `google.protobuf.Struct` of its workload)
//! on each request it sends; the server reads and removes them, and answers with its own only
//! when the request carried them. Each side's request metrics name the other from them, so an
//! Istio sidecar talking to this VM reports the VM's workload and we report the pod's.

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use interceptor_proto::google::protobuf::{value::Kind, Struct, Value};
use prost::Message;

use crate::metrics::Peer;

pub const METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
pub const METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");

/// A header bigger than this is not decoded (a workload's struct is a few hundred bytes).
const MAX_HEADER: usize = 8 * 1024;

/// Labels of ours the struct carries (the ones Istio's telemetry reads).
const LABELS: [&str; 4] = [
    "app",
    "version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
];

/// This VM's side of the telemetry: how its own metrics name it, and the headers it sends.
#[derive(Clone, Debug, Default)]
pub struct Local {
    pub peer: Peer,
    pub headers: Option<Ours>,
}

/// This VM's two headers, made once.
#[derive(Clone, Debug)]
pub struct Ours {
    id: HeaderValue,
    metadata: HeaderValue,
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

impl Ours {
    /// From this VM's workload: its name, namespace, cluster and labels; `id` is its node id
    /// (`sidecar~IP~NAME.NS~NS.svc.cluster.local` as istio-agent makes it).
    pub fn new(
        id: &str,
        workload: &str,
        namespace: &str,
        cluster: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Option<Self> {
        let mut fields = std::collections::HashMap::new();
        for (k, v) in [
            ("NAME", workload),
            ("NAMESPACE", namespace),
            ("CLUSTER_ID", cluster),
            ("WORKLOAD_NAME", workload),
        ] {
            if !v.is_empty() {
                fields.insert(k.to_string(), string(v));
            }
        }
        let ours: std::collections::HashMap<String, Value> = labels
            .iter()
            .filter(|(k, _)| LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), string(v)))
            .collect();
        if !ours.is_empty() {
            fields.insert(
                "LABELS".into(),
                Value {
                    kind: Some(Kind::StructValue(Struct { fields: ours })),
                },
            );
        }
        let bytes = Struct { fields }.encode_to_vec();
        let metadata = base64::engine::general_purpose::STANDARD.encode(bytes);
        Some(Ours {
            id: HeaderValue::from_str(id).ok()?,
            metadata: HeaderValue::from_str(&metadata).ok()?,
        })
    }

    /// Puts our headers on a request or response.
    pub fn add(&self, headers: &mut HeaderMap) {
        headers.insert(METADATA_ID, self.id.clone());
        headers.insert(METADATA, self.metadata.clone());
    }
}

/// The peer `headers` describe, the headers removed (as Istio's filter removes them); None
/// when they carry none (or nothing readable).
pub fn take(headers: &mut HeaderMap) -> Option<Peer> {
    let _ = headers.remove(METADATA_ID);
    let value = headers.remove(METADATA)?;
    read(value.as_bytes())
}

/// The peer an `x-envoy-peer-metadata` value describes (base64 of a protobuf Struct).
pub fn read(value: &[u8]) -> Option<Peer> {
    if value.len() > MAX_HEADER {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    decode(&bytes)
}

/// The peer a serialized Struct of Istio's workload fields describes.
pub fn decode(bytes: &[u8]) -> Option<Peer> {
    let s = Struct::decode(bytes).ok()?;
    let text = |st: &Struct, k: &str| match st.fields.get(k)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v.clone()),
        _ => None,
    };
    let labels: std::collections::BTreeMap<String, String> =
        match s.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(l)) => l
                .fields
                .keys()
                .filter_map(|k| Some((k.clone(), text(l, k)?)))
                .collect(),
            _ => Default::default(),
        };
    let workload = text(&s, "WORKLOAD_NAME");
    let namespace = text(&s, "NAMESPACE");
    let cluster = text(&s, "CLUSTER_ID");
    Some(Peer::new(
        workload.as_deref(),
        namespace.as_deref(),
        &labels,
        cluster.as_deref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_headers_read_back_as_our_workload_and_are_removed() {
        let labels = [("app", "billing"), ("version", "v7"), ("team", "not sent")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ours = Ours::new(
            "sidecar~10.0.0.9~billing-vm.shop~shop.svc.cluster.local",
            "billing-vm",
            "shop",
            "vms",
            &labels,
        )
        .unwrap();
        let mut h = HeaderMap::new();
        ours.add(&mut h);
        let peer = take(&mut h).unwrap();
        assert!(h.is_empty(), "the headers are removed: {h:?}");
        assert_eq!(&*peer.workload, "billing-vm");
        assert_eq!(&*peer.namespace, "shop");
        assert_eq!(&*peer.app, "billing");
        assert_eq!(&*peer.version, "v7");
        assert_eq!(&*peer.canonical_service, "billing");
        assert_eq!(&*peer.canonical_revision, "v7");
        assert_eq!(&*peer.cluster, "vms");
    }

    #[test]
    fn garbage_is_no_peer_and_still_removed() {
        for bad in ["%%%", "bm90IGEgc3RydWN0", ""] {
            let mut h = HeaderMap::new();
            h.insert(METADATA, HeaderValue::from_str(bad).unwrap());
            h.insert(METADATA_ID, HeaderValue::from_static("x"));
            // "not a struct" may decode as an empty struct (protobuf is lenient): then every
            // part is unknown.
            if let Some(p) = take(&mut h) {
                assert_eq!(&*p.workload, "unknown", "{bad}");
            }
            assert!(h.is_empty());
        }
        let mut h = HeaderMap::new();
        assert!(take(&mut h).is_none());
    }
}
