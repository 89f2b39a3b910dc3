//! Finding the cgroup v2 hierarchy (it may be the `unified` mount of a hybrid setup) and the
//! cgroup to capture.

use std::path::{Path, PathBuf};

use super::Error;

/// The cgroup2 mount point, read from /proc/mounts (never assumed).
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|e| Error::NoCgroup2(e.to_string()))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape(dir)))
        })
        .next()
        .ok_or_else(|| Error::NoCgroup2("no cgroup2 file system in /proc/mounts".into()))
}

/// /proc/mounts escapes spaces and the like as octal (\040).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup directory to attach to: `requested` as an absolute path inside the cgroup2 mount,
/// or relative to it; the mount's root when not given.
pub fn resolve(requested: Option<&Path>) -> Result<PathBuf, Error> {
    let mount = cgroup2_mount()?;
    let path = match requested {
        None => mount.clone(),
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => mount.join(p),
    };
    let canon = path
        .canonicalize()
        .map_err(|_| Error::CgroupMissing(path.clone()))?;
    if !canon.starts_with(&mount) || !canon.join("cgroup.procs").exists() {
        return Err(Error::NotACgroup { path: canon, mount });
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_octal() {
        assert_eq!(super::unescape("/a\\040b"), "/a b");
        assert_eq!(
            super::unescape("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
    }
}
