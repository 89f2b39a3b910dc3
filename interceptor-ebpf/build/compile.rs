//! How the C capture object is built. Shared by this crate's build script and `cargo xtask
//! build-ebpf` (via `#[path]`), so there is exactly one set of compiler flags.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The C sources the object is built from, relative to the crate root.
pub const SOURCE_DIR: &str = "src/bpf";
/// The file that gathers every program.
pub const ENTRY: &str = "capture.bpf.c";

fn multiarch_include() -> Option<PathBuf> {
    // <asm/types.h> lives under the multiarch directory on Debian; clang -target bpf does not
    // look there by itself.
    let out = Command::new("gcc").arg("-print-multiarch").output().ok()?;
    let triple = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let dir = PathBuf::from("/usr/include").join(triple);
    dir.is_dir().then_some(dir)
}

/// Compiles `src_dir/capture.bpf.c` into `out` with BTF (needed by aya for the BTF-style maps).
pub fn compile(src_dir: &Path, out: &Path) -> Result<(), String> {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
    if let Some(dir) = multiarch_include() {
        cmd.arg("-I").arg(dir);
    }
    cmd.arg("-c").arg(src_dir.join(ENTRY)).arg("-o").arg(out);
    let output = cmd.output().map_err(|e| {
        format!(
            "cannot run `{clang}` ({e}): install clang and libbpf-dev (`cargo xtask setup` does it)"
        )
    })?;
    if !output.status.success() {
        return Err(format!(
            "`{clang}` failed to build the BPF object:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
