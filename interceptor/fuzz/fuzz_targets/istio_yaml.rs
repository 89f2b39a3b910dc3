//! The file source on arbitrary text: Istio YAML documents (ServiceEntry, WorkloadEntry,
//! WorkloadGroup, anything else) parsed and, when accepted, built into a table and merged in a
//! store, as a reload does. Errors name a file and field; nothing panics.
#![no_main]

use std::path::Path;

use interceptor::mesh::{parse_documents, Options, Resources, SourceId, Store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut res = Resources::default();
    let mut errors = Vec::new();
    parse_documents(
        Path::new("fuzz.yaml"),
        text,
        "default",
        &mut res,
        &mut errors,
    );
    for e in &errors {
        let _ = e.to_string();
    }
    if errors.is_empty() {
        let store = Store::new(Options::default());
        store.publish(SourceId::Files, res);
        let table = store.load();
        let _ = table.captured().count();
    }
});
