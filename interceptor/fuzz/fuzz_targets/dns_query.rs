//! The DNS query path on arbitrary bytes: must answer (FORMERR, table answer) or decline, never
//! panic.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use interceptor::dns::{Server, Stats, Upstream};
use interceptor::mesh::{parse_documents, Options, Resources, SourceId, Store};
use libfuzzer_sys::fuzz_target;

const MESH: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: p, namespace: default}\nspec:\n  hosts: [product.default.svc.cluster.local, '*.wild.example']\n  addresses: [240.240.0.9, 2001:2::9]\n  ports: [{number: 80}]\n  resolution: STATIC\n";

fn server() -> &'static Arc<Server> {
    static S: OnceLock<Arc<Server>> = OnceLock::new();
    S.get_or_init(|| {
        let mut res = Resources::default();
        let mut errors = Vec::new();
        parse_documents(
            Path::new("fuzz.yaml"),
            MESH,
            "default",
            &mut res,
            &mut errors,
        );
        assert!(errors.is_empty());
        let store = Store::new(Options::default());
        store.publish(SourceId::Files, res);
        Server::new(
            store,
            Upstream::new(vec![], Duration::from_secs(1)),
            Some("corp.internal".into()),
            Arc::new(Stats::default()),
            interceptor::net::Limit::new("dns_forwards", 16),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let s = server();
    let _ = s.answer_locally(data, false);
    let _ = s.answer_locally(data, true);
});
