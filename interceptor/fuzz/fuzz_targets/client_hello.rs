//! ClientHello parsing (the gateway's SNI routing and the inbound side's mTLS detection) on
//! arbitrary bytes: a hello, "not complete yet" or an error, never a panic.
#![no_main]

use interceptor::proxy::gateway_route;
use interceptor::tls::parse_client_hello;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(hello)) = parse_client_hello(data) {
        let _ = gateway_route(&hello);
    }
});
