//! istiod's pushes on arbitrary bytes. The first byte picks the shape: a whole encoded
//! DiscoveryResponse or DeltaDiscoveryResponse (the gRPC payload as received), or the rest as
//! one resource of a type we subscribe to (CDS, EDS, NDS) inside a response, so the fuzzer
//! reaches the resource decoders without having to find a type URL first. Applied to a state,
//! which then builds a table: a bad push is an error (a NACK), never a panic.
#![no_main]

use interceptor::mesh::{Options, SourceId, Store};
use interceptor::xds::{apply_delta, apply_sotw, State};
use interceptor_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use interceptor_proto::google::protobuf::Any;
use interceptor_proto::type_url;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const TYPES: [&str; 3] = [type_url::CLUSTER, type_url::ENDPOINT, type_url::NAME_TABLE];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let mut state = State::new("default", "cluster.local");
    let applied = match pick % 4 {
        0 => DiscoveryResponse::decode(rest)
            .ok()
            .map(|r| apply_sotw(&mut state, &r).is_ok()),
        1 => DeltaDiscoveryResponse::decode(rest)
            .ok()
            .map(|r| apply_delta(&mut state, &r).is_ok()),
        n => {
            let type_url = TYPES[usize::from(pick / 4) % TYPES.len()].to_string();
            let any = Any {
                type_url: type_url.clone(),
                value: rest.to_vec(),
            };
            if n == 2 {
                let r = DiscoveryResponse {
                    type_url,
                    resources: vec![any],
                    ..Default::default()
                };
                Some(apply_sotw(&mut state, &r).is_ok())
            } else {
                let r = DeltaDiscoveryResponse {
                    type_url,
                    resources: vec![Resource {
                        name: "r".into(),
                        resource: Some(any),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                Some(apply_delta(&mut state, &r).is_ok())
            }
        }
    };
    if applied == Some(true) {
        let store = Store::new(Options::default());
        store.publish(SourceId::Istiod, state.resources());
    }
});
