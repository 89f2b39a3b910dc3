//! The first bytes of any captured or inbound connection to a port of no declared protocol,
//! told HTTP or not as Envoy's HTTP inspector tells them: a verdict or "more", never a panic.
#![no_main]

use interceptor::net::sniff::classify;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
});
