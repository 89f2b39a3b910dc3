//! meshNetworks (the file beside the mesh files, and istiod's mesh config) on arbitrary text.
#![no_main]

use interceptor::mesh::Networks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(n) = Networks::from_yaml(text) {
            let _ = n.has_gateways();
            let _ = n.network_of("10.0.0.1".parse().expect("literal"));
        }
    }
});
