//! systemd's file descriptor store: the kernel objects a restarted daemon adopts from the process
//! before it, and hands on to the next.
//!
//! Under systemd (`FileDescriptorStoreMax=`) the listeners and the capture links are kept by the
//! service manager as well as by us. When the process ends for a restart (`systemctl restart`,
//! a crash `Restart=on-failure` brings back), capture stays attached and the listening sockets
//! stay open: new connections and DNS queries wait in their kernel queues for the next process,
//! which adopts them (`LISTEN_FDS`, `LISTEN_FDNAMES`). When the unit stops for good, systemd
//! closes the store, the links detach and traffic flows as if we never ran (fail-open). Run
//! outside systemd nothing is stored and a process that dies takes capture with it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::config::FdStore as Mode;

/// The store's record of how many processes came before this one.
const GENERATION: &str = "generation";
/// Set by a process that hands its descriptors to its successor itself (`systemctl reload`):
/// LISTEN_FDS and LISTEN_FDNAMES are then ours, with no LISTEN_PID (the parent cannot know
/// the child's pid before it runs).
pub const HANDOVER_ENV: &str = "INTERCEPTOR_HANDOVER";
/// The pipe a successor writes one byte to once it is ready.
pub const READY_FD_ENV: &str = "INTERCEPTOR_HANDOVER_READY_FD";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot record the generation in a memfd: {0}")]
    Generation(std::io::Error),
    #[error("systemd refused descriptor {name}: {source}")]
    Notify {
        name: String,
        source: std::io::Error,
    },
}

/// A restarted process told from a fresh one, for status and metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Restart {
    /// Listeners and links are kept in systemd's store for the next process.
    pub fd_store: bool,
    /// 0 for a fresh start; one more for each restart that adopted the store.
    pub generation: u64,
    /// Descriptors this process adopted from the one before it.
    pub adopted: usize,
}

/// What the store holds for us, what this process adopted from it, and what it stores.
pub struct FdStore {
    enabled: bool,
    /// Passed by systemd and not taken (yet) by a part.
    adopted: BTreeMap<String, OwnedFd>,
    /// Names systemd holds; `kept` are those a part took and uses as they are.
    stored: BTreeSet<String>,
    kept: BTreeSet<String>,
    generation: u64,
    adopted_count: usize,
    /// Our copy of every descriptor in the store, for a successor we start ourselves.
    held: BTreeMap<String, OwnedFd>,
    /// Started by a predecessor's reload: where to say we are ready.
    ready_pipe: Option<OwnedFd>,
}

impl FdStore {
    /// Reads what systemd passed (every named descriptor, whatever `mode` says: a process that
    /// does not use them must still tell systemd to drop them, or old capture links would stay).
    pub fn open(mode: Mode) -> Self {
        let under_systemd = std::env::var_os("NOTIFY_SOCKET").is_some();
        // systemd 254 and later say how many descriptors the unit may store.
        let allowed = std::env::var("FDSTORE").map_or(true, |n| n.trim() != "0");
        let (adopted, ready_pipe) = passed();
        let stored: BTreeSet<String> = adopted.keys().cloned().collect();
        let mut store = Self {
            enabled: mode == Mode::Auto && under_systemd && allowed,
            adopted_count: adopted.len(),
            adopted,
            stored,
            kept: BTreeSet::new(),
            generation: 0,
            held: BTreeMap::new(),
            ready_pipe,
        };
        if !store.enabled {
            store.finish();
            return store;
        }
        store.generation = store.next_generation();
        if store.adopted_count > 0 {
            tracing::info!(
                generation = store.generation,
                descriptors = store.adopted_count,
                "restarted: adopting the previous process's listeners and capture"
            );
        }
        store
    }

    /// Whether descriptors are kept for the next process.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn restart(&self) -> Restart {
        Restart {
            fd_store: self.enabled,
            generation: self.generation,
            adopted: self.adopted_count,
        }
    }

    /// The descriptor stored under `name`, to be used as it is (it stays in the store).
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let fd = self.adopted.remove(name)?;
        self.kept.insert(name.to_string());
        self.hold(name, fd.as_fd());
        Some(fd)
    }

    fn hold(&mut self, name: &str, fd: BorrowedFd<'_>) {
        match fd.try_clone_to_owned() {
            Ok(copy) => {
                self.held.insert(name.to_string(), copy);
            }
            Err(e) => tracing::warn!(name, error = %e, "a reload will not hand this descriptor on"),
        }
    }

    /// Every descriptor in the store, by name: what a successor started by a reload adopts.
    pub fn held(&self) -> impl Iterator<Item = (&str, BorrowedFd<'_>)> {
        self.held.iter().map(|(n, fd)| (n.as_str(), fd.as_fd()))
    }

    /// Tells the predecessor that started us (a reload) that we are ready; true if there was one.
    pub fn tell_predecessor_ready(&mut self) -> bool {
        let Some(pipe) = self.ready_pipe.take() else {
            return false;
        };
        let mut pipe = std::fs::File::from(pipe);
        if let Err(e) = pipe.write_all(b"1") {
            tracing::warn!(error = %e, "cannot tell the process that started us we are ready");
        }
        true
    }

    /// Forgets a taken descriptor that turned out unusable: `put` will replace it.
    pub fn reject(&mut self, name: &str) {
        self.kept.remove(name);
    }

    /// Keeps `fd` for the next process under `name` (replacing what was stored under it), unless
    /// it is the very descriptor this process took. `poll: false` for descriptors that never
    /// hang up (BPF objects, memfds): systemd need not watch them.
    pub fn put(&mut self, name: &str, fd: BorrowedFd<'_>, poll: bool) -> Result<(), Error> {
        if !self.enabled || self.kept.contains(name) {
            return Ok(());
        }
        if self.stored.contains(name) {
            self.remove(name);
        }
        let mut state = vec![
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(name),
        ];
        if !poll {
            state.push(sd_notify::NotifyState::Custom("FDPOLL=0"));
        }
        sd_notify::notify_with_fds(&state, &[fd]).map_err(|source| Error::Notify {
            name: name.to_string(),
            source,
        })?;
        self.stored.insert(name.to_string());
        self.kept.insert(name.to_string());
        self.hold(name, fd);
        Ok(())
    }

    /// Drops what no part took: closed here and removed from the store, so that nothing of an
    /// older process (a link to a program no longer wanted) outlives this start.
    pub fn finish(&mut self) {
        for (name, fd) in std::mem::take(&mut self.adopted) {
            tracing::info!(
                name,
                "dropping a stored descriptor this process does not use"
            );
            drop(fd);
            self.remove(&name);
        }
        if !self.enabled {
            for name in std::mem::take(&mut self.stored) {
                self.remove(&name);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        self.stored.remove(name);
        self.kept.remove(name);
        self.held.remove(name);
        let state = [
            sd_notify::NotifyState::FdStoreRemove,
            sd_notify::NotifyState::FdName(name),
        ];
        if let Err(e) = sd_notify::notify(&state) {
            tracing::warn!(name, error = %e, "cannot remove a descriptor from systemd's store");
        }
    }

    /// The previous generation + 1, recorded for the next process (a memfd systemd keeps).
    fn next_generation(&mut self) -> u64 {
        let result = match self.take(GENERATION) {
            Some(fd) => bump(fd),
            None => new_record().and_then(|fd| {
                self.put(GENERATION, fd.as_fd(), false)
                    .map_err(|e| Error::Generation(std::io::Error::other(e.to_string())))
                    .map(|()| 0)
            }),
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "restarts are not counted");
            0
        })
    }
}

/// The named descriptors systemd passed (LISTEN_PID is ours), or a predecessor's reload did
/// (HANDOVER_ENV), and the pipe to tell that predecessor we are ready.
fn passed() -> (BTreeMap<String, OwnedFd>, Option<OwnedFd>) {
    let mut adopted = BTreeMap::new();
    let handover = std::env::var_os(HANDOVER_ENV).is_some();
    let fds = if handover {
        handed_over()
    } else {
        sd_notify::listen_fds_with_names().map(|fds| fds.collect::<Vec<_>>())
    };
    match fds {
        Ok(fds) => {
            for (fd, name) in fds {
                // SAFETY: passed to this process (by systemd, or by the predecessor that
                // started it) and owned by nothing else in it.
                adopted.insert(name, unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        Err(e) => tracing::warn!(error = %e, "ignoring the descriptors passed to us"),
    }
    let ready = handover
        .then(|| std::env::var(READY_FD_ENV).ok()?.parse::<i32>().ok())
        .flatten()
        .filter(|fd| *fd > 2)
        // SAFETY: the predecessor passed this pipe's write end to us alone.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    (adopted, ready)
}

/// LISTEN_FDS and LISTEN_FDNAMES as a predecessor set them (no LISTEN_PID), close-on-exec from
/// here on.
fn handed_over() -> std::io::Result<Vec<(i32, String)>> {
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    let mut out = Vec::new();
    for i in 0..n.max(0) {
        let fd = 3 + i;
        // SAFETY: fcntl on a descriptor number has no memory effects.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let name = names.get(i as usize).copied().unwrap_or("unknown");
        out.push((fd, name.to_string()));
    }
    Ok(out)
}

fn bump(fd: OwnedFd) -> Result<u64, Error> {
    let mut file = std::fs::File::from(fd);
    let mut text = String::new();
    // The offset is shared with every copy (systemd's too): read from the start.
    file.rewind().map_err(Error::Generation)?;
    file.read_to_string(&mut text).map_err(Error::Generation)?;
    let next = text.trim().parse::<u64>().unwrap_or(0).saturating_add(1);
    file.rewind().map_err(Error::Generation)?;
    file.set_len(0).map_err(Error::Generation)?;
    write!(file, "{next}").map_err(Error::Generation)?;
    Ok(next)
}

fn new_record() -> Result<OwnedFd, Error> {
    // SAFETY: the name is a NUL-terminated literal; the call has no other precondition.
    let fd = unsafe { libc::memfd_create(c"interceptor-generation".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Generation(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor only we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.write_all(b"0").map_err(Error::Generation)?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_record_counts_up_from_zero() {
        let fd = new_record().expect("memfd");
        let again = fd.try_clone().expect("dup");
        assert_eq!(bump(fd).expect("bump"), 1);
        assert_eq!(bump(again).expect("bump"), 2);
    }

    #[test]
    fn outside_systemd_nothing_is_stored_or_adopted() {
        let mut store = FdStore {
            enabled: false,
            adopted: BTreeMap::new(),
            stored: BTreeSet::new(),
            kept: BTreeSet::new(),
            generation: 0,
            adopted_count: 0,
            held: BTreeMap::new(),
            ready_pipe: None,
        };
        let fd = new_record().expect("memfd");
        store.put("x", fd.as_fd(), false).expect("no-op");
        assert!(store.stored.is_empty());
        assert!(store.take("x").is_none());
    }
}
