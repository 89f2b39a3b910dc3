mod compile;

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("capture.bpf.o");
    let src = root.join(compile::SOURCE_DIR);
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    if let Err(e) = compile::compile(&src, &out) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
