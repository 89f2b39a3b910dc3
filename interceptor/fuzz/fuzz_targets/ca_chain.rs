//! What the Istio CA (or the files provider) hands over, on arbitrary bytes: the input is split
//! at NUL bytes into the certificate chain, the key and the roots, and checked as every provider
//! checks them before an identity is used. A bad answer is an error; nothing panics.
#![no_main]

use interceptor::identity::Identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (chain, key, roots) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if let Ok(id) = Identity::from_pem(chain, key, roots) {
        let _ = id.trust_domain();
        let _ = id.expires_in();
    }
});
