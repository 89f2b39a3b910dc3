//! Watching files for change, shared by every file-backed source (mesh files, identity files).
//! Directories are watched, not files: editors and config managers replace a file by rename,
//! which a watch on the old inode would miss. A burst of events (a rotation writing three files,
//! an editor's write-then-rename) is reported once, after it settles, so a half-written file is
//! not read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Changes under some paths; `changed()` wakes once per settled burst.
pub struct FileWatch {
    // Held for its lifetime: dropping the watcher ends the events.
    watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
    settle: Duration,
    /// The paths asked for: a directory among them may be removed and made again (a deploy
    /// that replaces the whole directory), which ends its inotify watch; its parent's watch sees
    /// it come back, and the next wake watches the new one.
    paths: Vec<PathBuf>,
}

impl FileWatch {
    /// Watches `paths` (files or directories). `relevant` filters the changed paths that count
    /// (a path itself counts when it is made or removed); `settle` is how long a burst may last.
    pub fn new(
        paths: &[PathBuf],
        relevant: impl Fn(&Path) -> bool + Send + 'static,
        settle: Duration,
    ) -> notify::Result<Self> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if !ev.kind.is_access() && ev.paths.iter().any(|p| relevant(p)) {
                    let _ = tx.send(());
                }
            }
        })?;
        for p in paths {
            watcher.watch(&watch_dir(p), RecursiveMode::NonRecursive)?;
            if p.is_dir() {
                if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    // Best effort: without it, only a recreated directory goes unseen.
                    if let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %parent.display(), error = %e, "cannot watch the parent directory; a recreated directory will not be seen");
                    }
                }
            }
        }
        Ok(Self {
            watcher,
            events,
            settle,
            paths: paths.to_vec(),
        })
    }

    /// Waits for the next settled burst of changes. None once the watcher is gone.
    pub async fn changed(&mut self) -> Option<()> {
        self.events.recv().await?;
        tokio::time::sleep(self.settle).await;
        while self.events.try_recv().is_ok() {}
        for p in &self.paths {
            if p.is_dir() {
                // Adding a watch that exists is a no-op; one for a recreated directory is new.
                let _ = self.watcher.watch(p, RecursiveMode::NonRecursive);
            }
        }
        Some(())
    }
}

/// The directory to watch for `p`: itself when it is one, else its parent.
fn watch_dir(p: &Path) -> PathBuf {
    if p.is_dir() {
        return p.to_path_buf();
    }
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rename_into_place_is_one_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "1").unwrap();
        let target = file.clone();
        let mut w = FileWatch::new(
            std::slice::from_ref(&file),
            move |p| p == target,
            Duration::from_millis(50),
        )
        .unwrap();
        let tmp = dir.path().join("a.yaml.tmp");
        std::fs::write(&tmp, "2").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap()
            .unwrap();
        // The burst was drained: nothing else is pending.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.changed())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_directory_removed_and_made_again_is_still_watched() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("mesh.d");
        std::fs::create_dir(&dir).unwrap();
        let watched = dir.clone();
        let mut w = FileWatch::new(
            std::slice::from_ref(&dir),
            move |p| p.starts_with(&watched),
            Duration::from_millis(50),
        )
        .unwrap();
        async fn wake(w: &mut FileWatch) {
            tokio::time::timeout(Duration::from_secs(5), w.changed())
                .await
                .unwrap()
                .unwrap()
        }
        std::fs::remove_dir(&dir).unwrap();
        wake(&mut w).await;
        std::fs::create_dir(&dir).unwrap();
        wake(&mut w).await;
        // A file in the new directory is seen: its watch was set again.
        std::fs::write(dir.join("a.yaml"), "1").unwrap();
        wake(&mut w).await;
    }
}
