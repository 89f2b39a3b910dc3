//! The bundle `istioctl x workload entry configure` writes, on arbitrary input: the input is
//! split at NUL bytes into cluster.env, mesh.yaml and hosts, written under a scratch root, and
//! loaded as the daemon loads it at start.
#![no_main]

use std::sync::OnceLock;

use interceptor::bundle::{parse_duration, parse_env, Bundle, Paths};
use libfuzzer_sys::fuzz_target;

fn root() -> &'static std::path::Path {
    static ROOT: OnceLock<std::path::PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // Under the fuzz crate's own target directory: nothing left in /tmp.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bundle-scratch");
        let paths = Paths::under(&dir);
        for f in [&paths.cluster_env, &paths.mesh_config, &paths.hosts] {
            std::fs::create_dir_all(f.parent().expect("a parent")).expect("scratch dir");
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (env, mesh, hosts) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let paths = Paths::under(root());
    if let Ok(text) = std::str::from_utf8(env) {
        let _ = parse_env(&paths.cluster_env, text);
        let _ = parse_duration(text);
    }
    let write = |p: &std::path::Path, b: &[u8]| std::fs::write(p, b).expect("scratch write");
    write(&paths.cluster_env, env);
    write(&paths.mesh_config, mesh);
    write(&paths.hosts, hosts);
    let _ = Bundle::load(paths);
});
