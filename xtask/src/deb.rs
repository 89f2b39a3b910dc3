//! `cargo xtask deb`: the Debian package users install (`apt install ./interceptor_*.deb`).
//!
//! Laid out as Debian packages are, not as `cargo xtask install` lays out an admin's own copy:
//! the binary in /usr/bin, the unit in /usr/lib/systemd/system, the config a conffile (dpkg
//! keeps an edited one), the example mesh under /usr/share/doc (a mesh directory that loads an
//! example service on start would capture traffic nobody asked for). The maintainer scripts
//! enable and start nothing: the operator decides when a VM's traffic is captured. Purge
//! removes /etc/interceptor and the state directory: nothing is left. `dpkg-deb` builds the
//! archive, `dpkg-shlibdeps` computes the library dependencies, `strip` drops debug sections.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::install::{CONFIG, MESH_EXAMPLE, UNIT};
use crate::run;

const NAME: &str = "interceptor";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs on `configure`: systemd learns of the unit (and a running daemon hands over to the new
/// binary after an upgrade: a reload, with nothing a client sees failing; a restart if it does
/// not run); nothing is enabled or started. Paths and
/// systemctl honour DPKG_ROOT (an install into another root runs no systemctl).
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ -n "$2" ]; then
        systemctl try-reload-or-restart interceptor.service || true
    fi
fi
mkdir -p "${DPKG_ROOT:-}/var/lib/interceptor"
chmod 0700 "${DPKG_ROOT:-}/var/lib/interceptor"
if [ "$1" = configure ] && [ -z "$2" ]; then
    echo "interceptor installed, not enabled: edit /etc/interceptor/config.yaml, then"
    echo "  systemctl enable --now interceptor"
fi
exit 0
"#;

/// Runs before removal: a removed package's daemon is stopped (its programs detach with it:
/// fail-open). An upgrade does not stop it here; postinst reloads it.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl stop interceptor.service || true
    systemctl disable interceptor.service || true
fi
exit 0
"#;

/// Runs after removal: systemd forgets the unit; purge leaves nothing of ours behind (the
/// persisted istiod table, certificates the CA provider wrote under the state directory,
/// mesh files the operator added).
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ "$1" = purge ]; then
    rm -rf "${DPKG_ROOT:-}/var/lib/interceptor" "${DPKG_ROOT:-}/etc/interceptor"
fi
exit 0
"#;

/// One file of the package: its installed path, mode and content.
struct File {
    path: &'static str,
    mode: u32,
    content: Vec<u8>,
}

fn files(bin: &[u8]) -> Vec<File> {
    let unit = UNIT.replace("/usr/local/bin/interceptor", "/usr/bin/interceptor");
    let copyright = format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: {NAME}\n\nFiles: *\nCopyright: the interceptor authors\nLicense: {}\n",
        env!("CARGO_PKG_LICENSE")
    );
    vec![
        File {
            path: "/usr/bin/interceptor",
            mode: 0o755,
            content: bin.to_vec(),
        },
        File {
            path: "/usr/lib/systemd/system/interceptor.service",
            mode: 0o644,
            content: unit.into_bytes(),
        },
        File {
            path: "/etc/interceptor/config.yaml",
            mode: 0o644,
            content: CONFIG.as_bytes().to_vec(),
        },
        File {
            path: "/usr/share/doc/interceptor/examples/mesh/example.yaml",
            mode: 0o644,
            content: MESH_EXAMPLE.as_bytes().to_vec(),
        },
        File {
            path: "/usr/share/doc/interceptor/copyright",
            mode: 0o644,
            content: copyright.into_bytes(),
        },
    ]
}

/// Builds `interceptor_<version>_<arch>.deb` from `bin` into `out`; returns its path.
pub fn build(bin: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    build_version(bin, out, VERSION)
}

/// As `build`, with another version (an upgrade for the VM tests).
pub fn build_version(bin: &Path, out: &Path, version: &str) -> anyhow::Result<PathBuf> {
    let content = fs::read(bin).with_context(|| format!("--bin {}", bin.display()))?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let depends = depends(bin, &out.join(format!("{NAME}-shlibdeps")))?;
    let root = out.join(format!("{NAME}-deb-root"));
    let _ = fs::remove_dir_all(&root);
    for f in files(&content) {
        put(&root, f.path, f.mode, &f.content)?;
    }
    // The release profile keeps line tables for profiling (123 MB); the package ships the
    // program alone, as dh_strip would (binutils' strip).
    run(Command::new("strip")
        .args(["--strip-debug", "--remove-section=.comment"])
        .arg(root.join("usr/bin/interceptor")))?;
    // The mesh directory the config names, empty: the operator's files go there.
    fs::create_dir_all(root.join("etc/interceptor/mesh"))?;
    let installed_kib = dir_kib(&root)?;
    let control = format!(
        "Package: {NAME}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: interceptor \
         developers <interceptor@localhost>\nInstalled-Size: {installed_kib}\nDepends: \
         {depends}\nSection: net\nPriority: optional\nDescription: eBPF transparent \
         interceptor joining this VM to an Istio service mesh\n Cgroup BPF programs send the \
         VM's DNS and its connections to mesh services to one\n process that answers DNS from \
         the mesh and carries each connection over Istio mTLS\n or HBONE. Fail-open: a \
         stopped daemon leaves nothing attached.\n"
    );
    put(&root, "/DEBIAN/control", 0o644, control.as_bytes())?;
    put(
        &root,
        "/DEBIAN/conffiles",
        0o644,
        b"/etc/interceptor/config.yaml\n",
    )?;
    put(&root, "/DEBIAN/postinst", 0o755, POSTINST.as_bytes())?;
    put(&root, "/DEBIAN/prerm", 0o755, PRERM.as_bytes())?;
    put(&root, "/DEBIAN/postrm", 0o755, POSTRM.as_bytes())?;
    let deb = out.join(format!("{NAME}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb))?;
    fs::remove_dir_all(&root)?;
    Ok(deb)
}

/// The shared libraries `bin` needs, as Debian dependencies (`dpkg-shlibdeps`, which wants a
/// source package's `debian/control` beside it: made in `dir`, removed after).
fn depends(bin: &Path, dir: &Path) -> anyhow::Result<String> {
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(
        dir.join("debian/control"),
        format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"),
    )?;
    let bin = bin.canonicalize()?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .args(["-O", "--ignore-missing-info", "-e"])
            .arg(&bin)
            .current_dir(dir),
    );
    let _ = fs::remove_dir_all(dir);
    let out = out?;
    match out.strip_prefix("shlibs:Depends=") {
        Some(d) if !d.trim().is_empty() => Ok(match glibc_needed(&bin)? {
            Some(v) => with_libc6_at_least(d.trim(), &v),
            None => d.trim().to_string(),
        }),
        _ => bail!(
            "dpkg-shlibdeps gave no dependencies for {}: {out:?}",
            bin.display()
        ),
    }
}

/// The newest glibc symbol version the binary references (`objdump -p`'s version references):
/// the glibc it really needs. dpkg-shlibdeps answers from this machine's libc6 symbols file,
/// where libpthread's symbols moved into libc in 2.34 and are listed at 2.34: right for a
/// binary linked here, wrong for the portable build linked against 2.31's libpthread.so.0,
/// which it would keep off bullseye.
fn glibc_needed(bin: &Path) -> anyhow::Result<Option<String>> {
    let out = output(Command::new("objdump").arg("-p").arg(bin))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.strip_prefix("GLIBC_"))
        .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .max_by_key(|v| version_key(v))
        .map(str::to_string))
}

fn version_key(v: &str) -> Vec<u32> {
    v.split('.').filter_map(|n| n.parse().ok()).collect()
}

/// `libc6 (>= X)` in `depends` lowered (or raised) to `glibc`, the rest as it was.
fn with_libc6_at_least(depends: &str, glibc: &str) -> String {
    depends
        .split(", ")
        .map(|d| {
            if d.starts_with("libc6 ") || d == "libc6" {
                format!("libc6 (>= {glibc})")
            } else {
                d.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn put(root: &Path, installed: &str, mode: u32, content: &[u8]) -> anyhow::Result<()> {
    let path = root.join(installed.trim_start_matches('/'));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn dir_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        bytes += if meta.is_dir() {
            dir_kib(&entry.path())? * 1024
        } else {
            meta.len()
        };
    }
    Ok(bytes.div_ceil(1024))
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn libc6_follows_the_binary_s_own_glibc_needs() {
        assert_eq!(
            super::with_libc6_at_least("libc6 (>= 2.34), libgcc-s1 (>= 4.2)", "2.30"),
            "libc6 (>= 2.30), libgcc-s1 (>= 4.2)"
        );
        assert!(super::version_key("2.30") > super::version_key("2.3.4"));
    }

    use super::*;

    fn dpkg(root: &Path, args: &[&str]) -> String {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            // The fresh root has no libc6 in its database: its dependencies are the host's.
            .args([
                "--force-script-chrootless",
                "--force-not-root",
                "--force-depends",
            ])
            .arg("--log=/dev/null")
            .args(args)
            .output()
            .expect("dpkg runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "dpkg {args:?}: {text}");
        text
    }

    /// Every path under `root`, relative, sorted.
    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).expect("read_dir").flatten() {
                let p = e.path();
                out.push(
                    p.strip_prefix(root)
                        .expect("under root")
                        .display()
                        .to_string(),
                );
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// The package built from a real ELF binary installs into a fresh dpkg root with the
    /// layout Debian expects, keeps an edited conffile over a reinstall, and purges to nothing:
    /// the root afterwards holds exactly what it held before (dpkg's own database aside).
    #[test]
    fn installs_keeps_an_edited_config_and_purges_to_nothing() {
        let work = tempfile::tempdir().expect("tempdir");
        let deb = build(Path::new("/usr/bin/true"), &work.path().join("out")).expect("deb");
        let name = deb.file_name().expect("name").to_string_lossy().to_string();
        assert!(
            name.starts_with(&format!("interceptor_{VERSION}_")) && name.ends_with(".deb"),
            "{name}"
        );
        let info = output(Command::new("dpkg-deb").arg("--info").arg(&deb)).expect("info");
        assert!(info.contains("Package: interceptor"), "{info}");
        assert!(info.contains("Depends: libc6"), "{info}");
        let contents =
            output(Command::new("dpkg-deb").arg("--contents").arg(&deb)).expect("contents");
        for line in contents.lines() {
            assert!(line.contains(" root/root "), "owned by root: {line}");
        }
        for path in [
            "./usr/bin/interceptor",
            "./usr/lib/systemd/system/interceptor.service",
            "./etc/interceptor/config.yaml",
            "./etc/interceptor/mesh/",
        ] {
            assert!(contents.contains(path), "{path} missing:\n{contents}");
        }

        // A fresh root with an empty dpkg database.
        let root = work.path().join("root");
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        fs::write(root.join("var/lib/dpkg/status"), "").expect("status");
        let before = tree(&root);
        let said = dpkg(&root, &["--install", deb.to_str().expect("utf-8")]);
        assert!(said.contains("not enabled"), "{said}");
        let unit = fs::read_to_string(root.join("usr/lib/systemd/system/interceptor.service"))
            .expect("unit installed");
        assert!(
            unit.contains("ExecStart=/usr/bin/interceptor run"),
            "{unit}"
        );
        assert!(root.join("var/lib/interceptor").is_dir());
        assert!(root.join("etc/interceptor/mesh").is_dir());
        assert!(
            fs::read_dir(root.join("etc/interceptor/mesh"))
                .expect("mesh dir")
                .next()
                .is_none(),
            "no example loaded on start"
        );
        let mode = fs::metadata(root.join("usr/bin/interceptor"))
            .expect("binary")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);

        // An edited config survives a reinstall (a conffile).
        let config = root.join("etc/interceptor/config.yaml");
        fs::write(&config, "namespace: edited\n").expect("edit");
        dpkg(
            &root,
            &["--force-confold", "--install", deb.to_str().expect("utf-8")],
        );
        assert_eq!(
            fs::read_to_string(&config).expect("config"),
            "namespace: edited\n"
        );

        // State and operator files, then purge: nothing of ours is left.
        fs::write(root.join("var/lib/interceptor/istiod-table.json"), "{}").expect("state");
        fs::write(root.join("etc/interceptor/mesh/mine.yaml"), "# mine\n").expect("mesh");
        dpkg(&root, &["--purge", "interceptor"]);
        let after: Vec<String> = tree(&root)
            .into_iter()
            .filter(|p| !p.starts_with("var/lib/dpkg"))
            .collect();
        let before: Vec<String> = before
            .into_iter()
            .filter(|p| !p.starts_with("var/lib/dpkg"))
            .collect();
        assert_eq!(after, before, "left behind after purge");
    }
}
