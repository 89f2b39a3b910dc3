//! `cargo xtask install | uninstall`: the daemon as a systemd service on this machine, or staged
//! under a destdir (images, packages).
//!
//! Install records what it created in a manifest (one installed-system path a line, directories
//! with a trailing `/`), so uninstall removes exactly that: never a file or directory that was
//! there before, and never a config file the operator edited since.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};

use crate::run;

// Embedded so the task works from any directory, and installs what this checkout packages.
pub(crate) const UNIT: &str = include_str!("../../packaging/interceptor.service");
pub(crate) const CONFIG: &str = include_str!("../../packaging/config.yaml");
pub(crate) const MESH_EXAMPLE: &str = include_str!("../../packaging/mesh/example.yaml");

// Paths as seen on the installed system.
const BIN_PATH: &str = "/usr/local/bin/interceptor";
const UNIT_PATH: &str = "/etc/systemd/system/interceptor.service";
const CONFIG_PATH: &str = "/etc/interceptor/config.yaml";
const MESH_DIR: &str = "/etc/interceptor/mesh";
const EXAMPLE_PATH: &str = "/etc/interceptor/mesh/example.yaml";
const MANIFEST_PATH: &str = "/var/lib/interceptor/installed";

/// Files the operator is meant to edit: uninstall keeps them when they differ from the package.
const EDITABLE: &[(&str, &str)] = &[(CONFIG_PATH, CONFIG), (EXAMPLE_PATH, MESH_EXAMPLE)];

/// Where the files go: the live system (`/`) or a staging directory.
pub struct Target {
    root: PathBuf,
    staged: bool,
}

impl Target {
    pub fn new(destdir: Option<&Path>) -> Self {
        match destdir.filter(|d| !d.as_os_str().is_empty() && *d != Path::new("/")) {
            Some(d) => Target {
                root: d.to_path_buf(),
                staged: true,
            },
            None => Target {
                root: PathBuf::from("/"),
                staged: false,
            },
        }
    }

    fn path(&self, installed: &str) -> PathBuf {
        self.root.join(installed.trim_start_matches('/'))
    }

    /// Only a live install talks to systemd, and only when systemd is the running init.
    fn systemd(&self) -> bool {
        !self.staged && Path::new("/run/systemd/system").exists()
    }
}

/// What install created, in creation order.
#[derive(Default)]
struct Manifest(Vec<String>);

impl Manifest {
    fn read(t: &Target) -> anyhow::Result<Option<Manifest>> {
        let path = t.path(MANIFEST_PATH);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut m = Manifest::default();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            // Uninstall deletes what is listed: anything that could point outside the target
            // is refused rather than trusted.
            let p = Path::new(line);
            let bad = !p.is_absolute()
                || p.parent().is_none()
                || p.components().any(|c| c == Component::ParentDir);
            if bad {
                bail!(
                    "{}: line {}: {line:?} is not an absolute path below /",
                    path.display(),
                    n + 1
                );
            }
            m.add(line);
        }
        Ok(Some(m))
    }

    fn add(&mut self, installed: &str) {
        if !self.0.iter().any(|p| p == installed) {
            self.0.push(installed.to_string());
        }
    }

    fn has(&self, installed: &str) -> bool {
        self.0.iter().any(|p| p == installed)
    }

    fn write(&self, t: &Target) -> anyhow::Result<()> {
        let text: String = self.0.iter().map(|p| format!("{p}\n")).collect();
        put(&t.path(MANIFEST_PATH), 0o644, |tmp| fs::write(tmp, &text))
    }
}

/// Creates `dir` and its missing ancestors, recording each one created.
fn make_dirs(t: &Target, dir: &str, m: &mut Manifest) -> anyhow::Result<()> {
    let mut installed = String::new();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        installed = format!("{installed}/{part}");
        let path = t.path(&installed);
        match fs::create_dir(&path) {
            Ok(()) => {
                // Explicit mode: the caller's umask must not decide who can read /etc/interceptor.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("chmod {}", path.display()))?;
                m.add(&format!("{installed}/"));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    Ok(())
}

/// Writes `dst` through a temporary file and a rename: a running binary cannot be written to
/// (ETXTBSY), and a reader never sees half a file.
fn put(
    dst: &Path,
    mode: u32,
    fill: impl FnOnce(&Path) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let name = dst
        .file_name()
        .ok_or_else(|| anyhow!("{}: no file name", dst.display()))?;
    let tmp = dst.with_file_name(format!(".{}.xtask-tmp", name.to_string_lossy()));
    let written = fill(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", tmp.display()))
        })
        .and_then(|()| {
            fs::rename(&tmp, dst)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Places one file, recording it when it is new. A file that was there before and is not ours
/// is replaced but not recorded: uninstall then leaves the replacement in its place.
fn place(
    t: &Target,
    installed: &str,
    mode: u32,
    fill: impl FnOnce(&Path) -> std::io::Result<()>,
    m: &mut Manifest,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let dst = t.path(installed);
    let existed = dst.symlink_metadata().is_ok();
    put(&dst, mode, fill)?;
    if !existed {
        m.add(installed);
    } else if !m.has(installed) {
        notes.push(format!(
            "replaced {installed}, which this task did not install: uninstall will keep it"
        ));
    }
    notes.push(format!("installed {installed} ({mode:04o})"));
    Ok(())
}

fn is_empty_or_missing(dir: &Path) -> anyhow::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

fn place_all(
    t: &Target,
    bin: &Path,
    m: &mut Manifest,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mesh_empty = is_empty_or_missing(&t.path(MESH_DIR))?;
    for dir in ["/usr/local/bin", "/etc/systemd/system", MESH_DIR] {
        make_dirs(t, dir, m)?;
    }
    place(
        t,
        BIN_PATH,
        0o755,
        |tmp| fs::copy(bin, tmp).map(drop),
        m,
        notes,
    )?;
    place(t, UNIT_PATH, 0o644, |tmp| fs::write(tmp, UNIT), m, notes)?;
    if t.path(CONFIG_PATH).symlink_metadata().is_ok() {
        notes.push(format!(
            "kept the existing {CONFIG_PATH} (never overwritten)"
        ));
    } else {
        place(
            t,
            CONFIG_PATH,
            0o644,
            |tmp| fs::write(tmp, CONFIG),
            m,
            notes,
        )?;
        if !t.path("/etc/certs/cert-chain.pem").exists() {
            notes.push(format!(
                "the daemon needs the workload certificates in /etc/certs (cert-chain.pem, \
                 key.pem, root-cert.pem) before it starts, or `certs:` commented out in \
                 {CONFIG_PATH}"
            ));
        }
    }
    if mesh_empty {
        place(
            t,
            EXAMPLE_PATH,
            0o644,
            |tmp| fs::write(tmp, MESH_EXAMPLE),
            m,
            notes,
        )?;
    } else {
        notes.push(format!("{MESH_DIR} has files already: no example added"));
    }
    Ok(())
}

/// Places every file and writes the manifest; returns what happened, one line each.
pub fn install_files(t: &Target, bin: &Path) -> anyhow::Result<Vec<String>> {
    let meta = fs::metadata(bin).with_context(|| format!("--bin {}", bin.display()))?;
    if !meta.is_file() {
        bail!("--bin {}: not a file", bin.display());
    }
    // A reinstall keeps what the first install created (the config, say) on the list.
    let mut m = Manifest::read(t)?.unwrap_or_default();
    let mut notes = Vec::new();
    let placed = place_all(t, bin, &mut m, &mut notes);
    // Recorded even when a step failed, so that uninstall can clean up a partial install.
    let recorded = make_dirs(t, "/var/lib/interceptor", &mut m).and_then(|()| m.write(t));
    placed?;
    recorded?;
    notes.push(format!("recorded what was created in {MANIFEST_PATH}"));
    Ok(notes)
}

#[derive(Debug, Default)]
pub struct Uninstalled {
    pub removed: Vec<String>,
    /// Left in place, with why.
    pub kept: Vec<String>,
}

fn no_manifest(t: &Target) -> anyhow::Error {
    anyhow!(
        "{}: no manifest, so nothing here was installed by `cargo xtask install`",
        t.path(MANIFEST_PATH).display()
    )
}

/// Removes what the manifest lists: files first, then the directories that are empty now.
pub fn uninstall_files(t: &Target) -> anyhow::Result<Uninstalled> {
    let manifest = t.path(MANIFEST_PATH);
    let m = Manifest::read(t)?.ok_or_else(|| no_manifest(t))?;
    let mut done = Uninstalled::default();
    let (dirs, files): (Vec<&String>, Vec<&String>) = m.0.iter().partition(|p| p.ends_with('/'));
    for installed in files {
        let path = t.path(installed);
        if let Some((_, packaged)) = EDITABLE.iter().find(|(p, _)| p == installed) {
            match fs::read(&path) {
                Ok(now) if now != packaged.as_bytes() => {
                    done.kept.push(format!(
                        "{installed}: edited since install (differs from the packaged one)"
                    ));
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => done.removed.push(installed.clone()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    // Last among the files: an interrupted uninstall can be run again.
    fs::remove_file(&manifest).with_context(|| format!("removing {}", manifest.display()))?;
    done.removed.push(MANIFEST_PATH.to_string());
    let mut dirs = dirs;
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for installed in dirs {
        let path = t.path(installed);
        match fs::remove_dir(&path) {
            Ok(()) => done.removed.push(installed.clone()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
                done.kept.push(format!("{installed}: not empty"));
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(done)
}

fn systemctl(args: &[&str]) -> Command {
    let mut c = Command::new("systemctl");
    c.args(args);
    c
}

fn require_root(t: &Target, what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if !t.staged && unsafe { libc::geteuid() } != 0 {
        bail!("{what} into / needs root: run it as root, or stage it with --destdir DIR");
    }
    Ok(())
}

pub fn install(destdir: Option<&Path>, bin: Option<&Path>) -> anyhow::Result<()> {
    let t = Target::new(destdir);
    require_root(&t, "install")?;
    let bin = match bin {
        Some(b) => b.to_path_buf(),
        None => crate::build(true)?.join("interceptor"),
    };
    for note in install_files(&t, &bin)? {
        println!("{note}");
    }
    if t.systemd() {
        run(&mut systemctl(&["daemon-reload"]))?;
        // Never started here: the operator decides when this VM's traffic is captured.
        let active = systemctl(&["is-active", "--quiet", "interceptor"])
            .status()
            .is_ok_and(|s| s.success());
        if active {
            println!("still running the previous binary: systemctl restart interceptor");
        } else {
            println!("enable and start it with: systemctl enable --now interceptor");
        }
    } else if t.staged {
        println!("staged under {}; nothing was run", t.root.display());
    } else {
        println!(
            "systemd is not running here: start it with `{BIN_PATH} run --config {CONFIG_PATH}`"
        );
    }
    Ok(())
}

pub fn uninstall(destdir: Option<&Path>) -> anyhow::Result<()> {
    let t = Target::new(destdir);
    require_root(&t, "uninstall")?;
    // Before stopping anything: an interceptor installed some other way is not ours to stop.
    if Manifest::read(&t)?.is_none() {
        return Err(no_manifest(&t));
    }
    if t.systemd() {
        // Fails when it was never enabled or is not loaded: nothing to stop then.
        let mut c = systemctl(&["disable", "--now", "interceptor"]);
        if let Err(e) = run(&mut c) {
            eprintln!("ignored: {e:#}");
        }
    }
    let done = uninstall_files(&t)?;
    for p in &done.removed {
        println!("removed {p}");
    }
    for k in &done.kept {
        println!("kept {k}");
    }
    if t.systemd() {
        run(&mut systemctl(&["daemon-reload"]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in daemon binary, deliberately not executable: install must set the mode.
    fn fake_bin(dir: &Path) -> PathBuf {
        let p = dir.join("interceptor-fake");
        fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    }

    /// Everything under `root`, relative, sorted.
    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                if p.is_dir() {
                    todo.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn install_then_uninstall_leaves_nothing() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let bin = fake_bin(src.path());
        let t = Target::new(Some(dest.path()));
        install_files(&t, &bin).unwrap();
        for (installed, want) in [
            (BIN_PATH, 0o755),
            (UNIT_PATH, 0o644),
            (CONFIG_PATH, 0o644),
            (EXAMPLE_PATH, 0o644),
            (MANIFEST_PATH, 0o644),
            ("/etc/interceptor", 0o755),
        ] {
            assert_eq!(mode(&t.path(installed)), want, "{installed}");
        }
        assert_eq!(fs::read(t.path(BIN_PATH)).unwrap(), fs::read(&bin).unwrap());
        assert_eq!(fs::read_to_string(t.path(UNIT_PATH)).unwrap(), UNIT);
        // A reinstall (an upgrade) must not lose track of what the first one created.
        install_files(&t, &bin).unwrap();
        let done = uninstall_files(&t).unwrap();
        assert!(done.kept.is_empty(), "{done:?}");
        assert_eq!(tree(dest.path()), Vec::<String>::new());
    }

    #[test]
    fn edited_config_is_kept_and_reported() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let t = Target::new(Some(dest.path()));
        install_files(&t, &fake_bin(src.path())).unwrap();
        let config = t.path(CONFIG_PATH);
        fs::write(&config, format!("{CONFIG}namespace: prod\n")).unwrap();
        // A reinstall never overwrites the operator's config.
        install_files(&t, &fake_bin(src.path())).unwrap();
        assert!(fs::read_to_string(&config)
            .unwrap()
            .ends_with("namespace: prod\n"));
        let done = uninstall_files(&t).unwrap();
        assert!(
            done.kept
                .iter()
                .any(|k| k.starts_with(CONFIG_PATH) && k.contains("edited")),
            "{done:?}"
        );
        assert_eq!(
            tree(dest.path()),
            ["etc", "etc/interceptor", "etc/interceptor/config.yaml"]
        );
    }

    #[test]
    fn what_was_there_before_stays() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let t = Target::new(Some(dest.path()));
        // An empty directory of the system and the operator's own mesh file.
        fs::create_dir_all(t.path("/usr/local/bin")).unwrap();
        fs::create_dir_all(t.path(MESH_DIR)).unwrap();
        fs::write(t.path("/etc/interceptor/mesh/mine.yaml"), "{}\n").unwrap();
        install_files(&t, &fake_bin(src.path())).unwrap();
        assert!(
            !t.path(EXAMPLE_PATH).exists(),
            "example added to a non-empty mesh dir"
        );
        uninstall_files(&t).unwrap();
        assert_eq!(
            tree(dest.path()),
            [
                "etc",
                "etc/interceptor",
                "etc/interceptor/mesh",
                "etc/interceptor/mesh/mine.yaml",
                "usr",
                "usr/local",
                "usr/local/bin"
            ]
        );
    }

    #[test]
    fn systemd_accepts_the_unit() {
        let version = Command::new("systemd-analyze").arg("--version").output();
        assert!(
            version.is_ok_and(|o| o.status.success()),
            "systemd-analyze is missing: install the `systemd` package (`cargo xtask setup` does)"
        );
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let t = Target::new(Some(dest.path()));
        install_files(&t, &fake_bin(src.path())).unwrap();
        // `verify --root=DEST` would find ExecStart's binary in the staging dir, but it also
        // looks for sysinit.target and the other default dependencies there and fails. So the
        // unit is verified against the host's units, with ExecStart naming the staged binary.
        let unit = fs::read_to_string(t.path(UNIT_PATH)).unwrap();
        let exec = format!("ExecStart={BIN_PATH} ");
        assert_eq!(unit.matches(&exec).count(), 1, "one ExecStart={BIN_PATH}");
        // ExecReload= runs the same binary.
        let staged = t.path(BIN_PATH).display().to_string();
        let check = tempfile::tempdir().unwrap();
        let copy = check.path().join("interceptor.service");
        fs::write(&copy, unit.replace(BIN_PATH, &staged)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify exits 0 on warnings (an unknown key, say): any line about the unit fails.
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("interceptor.service"))
            .collect();
        assert!(
            out.status.success() && complaints.is_empty(),
            "systemd-analyze verify {}: {}\n{stderr}",
            copy.display(),
            out.status
        );
    }
}
