//! `systemctl reload` (and the package's upgrade, which reloads): the running daemon hands its
//! descriptors (listeners, capture links, the original-destination map) to a successor running
//! the binary installed now. The daemon has dropped every capability, so it cannot start a
//! privileged successor itself: `interceptor reload` (the unit's ExecReload=, with the unit's
//! capabilities) asks it for them over a Unix socket in the unit's runtime directory, starts
//! the successor with them, and returns once the successor is ready (systemd's main process
//! from then on). Both accept while the successor starts; then the daemon stops accepting,
//! drains what it holds and exits. Nothing a client sees fails.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};

use crate::fdstore::{FdStore, HANDOVER_ENV, READY_FD_ENV};

/// How long a successor may take to say it is ready before the reload is given up.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Descriptors per message (the kernel's SCM_MAX_FD is 253).
const FDS_PER_MESSAGE: usize = 200;
/// The socket's name in the unit's runtime directory.
const SOCKET: &str = "handover.sock";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no runtime directory (RUNTIME_DIRECTORY): the unit needs RuntimeDirectory=")]
    NoRuntimeDirectory,
    #[error("the daemon's hand-over socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the successor {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("the successor exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    #[error("the successor was not ready within {0:?}")]
    NotReady(Duration),
    #[error("the daemon's hand-over message is malformed: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the daemon sends before the descriptors: how it was started and their names.
#[derive(serde::Serialize, serde::Deserialize)]
struct Offer {
    args: Vec<OsString>,
    names: Vec<String>,
}

/// Where the daemon listens for `interceptor reload`: its unit's runtime directory.
pub fn socket_path() -> Result<PathBuf, Error> {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|d| {
            // systemd lists every runtime directory, separated by colons: ours is the first.
            let d = d.to_string_lossy().split(':').next()?.to_string();
            Some(PathBuf::from(d).join(SOCKET))
        })
        .ok_or(Error::NoRuntimeDirectory)
}

/// The daemon's side: a listener for `interceptor reload` (a stale socket file of an earlier
/// process is replaced).
pub fn listen(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
}

/// The daemon's side of one reload: to a root peer, the store's descriptors; then, with
/// accepting stopped, waits for the word that the successor is ready. Ok(true): handed over.
pub async fn offer(conn: tokio::net::UnixStream, store: &FdStore) -> Result<bool, Error> {
    let cred = conn.peer_cred()?;
    if cred.uid() != 0 {
        tracing::warn!(
            uid = cred.uid(),
            "a non-root process asked for a hand-over: refused"
        );
        return Ok(false);
    }
    let held: Vec<(String, RawFd)> = store
        .held()
        .map(|(n, fd)| (n.to_string(), fd.as_raw_fd()))
        .collect();
    let offer = Offer {
        args: std::env::args_os().skip(1).collect(),
        names: held.iter().map(|(n, _)| n.clone()).collect(),
    };
    let fds: Vec<RawFd> = held.iter().map(|(_, fd)| *fd).collect();
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    // We go on accepting while the successor starts, and it accepts as soon as it can: the maps
    // where either's programs record original destinations are one (capture::shared).
    let handed = tokio::task::spawn_blocking(move || -> Result<bool, Error> {
        let mut conn = conn;
        let header = serde_json::to_vec(&offer).map_err(|e| Error::Malformed(e.to_string()))?;
        conn.write_all(&(header.len() as u32).to_be_bytes())?;
        conn.write_all(&header)?;
        for chunk in fds.chunks(FDS_PER_MESSAGE) {
            conn.send_with_fd(b"F", chunk)?;
        }
        conn.set_read_timeout(Some(READY_WITHIN + Duration::from_secs(5)))?;
        let mut b = [0u8; 1];
        Ok(matches!(conn.read(&mut b), Ok(1)))
    })
    .await
    .map_err(|e| Error::Malformed(e.to_string()))??;
    Ok(handed)
}

/// `interceptor reload`: the descriptors from the daemon, the successor started with them;
/// returns once it is ready (and has told the daemon), or fails and the daemon goes on.
pub fn run_helper(path: &Path) -> Result<u32, Error> {
    let mut conn = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(Error::Malformed(format!("a {len}-byte header")));
    }
    let mut header = vec![0u8; len];
    conn.read_exact(&mut header)?;
    let offer: Offer =
        serde_json::from_slice(&header).map_err(|e| Error::Malformed(e.to_string()))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    while fds.len() < offer.names.len() {
        let mut byte = [0u8; 1];
        let mut got = [-1 as RawFd; FDS_PER_MESSAGE];
        let (n, k) = conn.recv_with_fd(&mut byte, &mut got)?;
        if n == 0 {
            return Err(Error::Malformed(
                "the daemon closed before every descriptor".into(),
            ));
        }
        // SAFETY: the kernel installed these descriptors in this process for us alone.
        fds.extend(
            got[..k]
                .iter()
                .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) }),
        );
    }
    let pid = start_successor(&offer.args, &offer.names, &fds)?;
    conn.write_all(b"1")?;
    Ok(pid)
}

/// The binary to run: the one installed at the path we were started from (after an upgrade the
/// kernel calls the replaced file "(deleted)").
fn installed_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => path.into(),
        None => exe,
    })
}

/// Starts `interceptor` with `args` and `fds` (as LISTEN_FDS, named), and waits until it says
/// it is ready, or has died, or READY_WITHIN passed (then it is killed).
fn start_successor(args: &[OsString], names: &[String], fds: &[OwnedFd]) -> Result<u32, Error> {
    let (ready_read, ready_write) = pipe()?;
    let exe = installed_binary()?;
    let mut sources: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    sources.push(ready_write.as_raw_fd());
    let n = fds.len();
    let mut cmd = Command::new(&exe);
    cmd.args(args)
        .env(HANDOVER_ENV, "1")
        .env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(READY_FD_ENV, (3 + n).to_string())
        .env_remove("LISTEN_PID");
    let mut moved = vec![-1; sources.len()];
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl and
    // dup2 (async-signal-safe) on preallocated memory.
    unsafe {
        cmd.pre_exec(move || place_descriptors(&sources, &mut moved));
    }
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        exe: exe.display().to_string(),
        source,
    })?;
    drop(ready_write);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::fs::File::from(ready_read);
        let mut b = [0u8; 1];
        // EOF: the successor exited, or closed the pipe, before it was ready.
        let _ = tx.send(matches!(reader.read(&mut b), Ok(1)));
    });
    match rx.recv_timeout(READY_WITHIN) {
        // It outlives us: systemd (its new parent) reaps it.
        Ok(true) => Ok(pid),
        Ok(false) => Err(Error::Exited(child.wait()?)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(Error::NotReady(READY_WITHIN))
        }
    }
}

/// In the child: `sources[i]` becomes descriptor 3 + i, inheritable. Each is first copied above
/// the target range, so that placing one never overwrites another still to be placed.
fn place_descriptors(sources: &[RawFd], moved: &mut [RawFd]) -> std::io::Result<()> {
    let above = 3 + sources.len() as RawFd;
    for (i, fd) in sources.iter().enumerate() {
        // SAFETY: fcntl and dup2 on descriptor numbers have no memory effects.
        let m = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if m < 0 {
            return Err(std::io::Error::last_os_error());
        }
        moved[i] = m;
    }
    for (i, m) in moved.iter().enumerate() {
        // SAFETY: as above; dup2 leaves the new descriptor without close-on-exec.
        if unsafe { libc::dup2(*m, 3 + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
