//! Istio's `x-envoy-peer-metadata` header (base64 of a protobuf Struct) from any HTTP peer, on
//! arbitrary bytes: a peer or none, never a panic.
#![no_main]

use interceptor::metadata_exchange::{decode, read};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = read(data);
    let _ = decode(data);
});
