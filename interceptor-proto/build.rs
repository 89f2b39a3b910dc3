//! Compiles the vendored Istio protos with protox (a protobuf compiler in Rust: no protoc to
//! install). google.protobuf types are envoy-types' own, so a Struct is one type everywhere.

fn main() {
    let files = [
        "proto/istio/networking/nds/v1/nds.proto",
        "proto/istio/security/v1alpha1/ca.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = match protox::compile(files, ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("vendored protos do not compile: {e}");
            std::process::exit(1);
        }
    };
    // Well-known types are not generated (the extern path below supplies them); the flag only
    // lifts prost's own default mapping so envoy-types' can take its place.
    if let Err(e) = tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::envoy_types::pb::google::protobuf")
        .compile_fds(fds)
    {
        eprintln!("generating code for the vendored protos failed: {e}");
        std::process::exit(1);
    }
}
