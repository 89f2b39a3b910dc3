//! Least privilege. Attaching programs, creating maps and binding listeners need capabilities;
//! once `run` has done all that, nothing it does needs them again: maps are written through
//! descriptors it holds, links detach when their descriptors close, every listener is bound,
//! and the files it reads must be readable by root as owner, group or other anyway (the unit
//! grants no DAC override). So it drops every capability from every set, the bounding set
//! included: a compromised daemon cannot regain one, and the commands exec probes run start
//! with none.
//!
//! One exception, measured in Debian 11 guests (`cargo xtask vm-test`): on older kernels
//! (5.10) with unprivileged BPF disabled (Debian's default), bpf(2) refuses *every* command to
//! a caller without CAP_BPF, lookups and updates through descriptors it already holds included,
//! so a daemon with no capabilities can no longer read an original destination or write the
//! VIP map. Newer kernels (6.1 here) check only program loads and map creation. `run` asks the
//! kernel (`capture::OriginalDst::needs_capability`, from a thread that dropped everything)
//! and keeps CAP_BPF alone where it must, saying so in its log and status.
//!
//! Capabilities belong to each thread, not to the process: capset(2) changes only the caller's.
//! By the time `run` is done with them the runtime's worker and blocking threads exist, each
//! holding what the process started with. So `drop_all` does as glibc does for setuid and Go's
//! `AllThreadsSyscall` for capabilities: it signals every other thread, whose handler drops its
//! own, and then checks each thread's masks in /proc until all match the caller's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use caps::{CapSet, Capability};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dropping capabilities ({set:?}): {source}")]
    Drop {
        set: CapSet,
        source: caps::errors::CapsError,
    },
    #[error("installing the handler that drops other threads' capabilities: {0}")]
    Handler(std::io::Error),
    #[error("thread {tid} still holds capabilities after {waited:?}: {masks}")]
    ThreadKept {
        tid: u32,
        waited: Duration,
        masks: String,
    },
}

/// The five capability lines of a /proc status file, in file order.
const MASKS: [&str; 5] = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"];

fn masks(status: &str) -> String {
    status
        .lines()
        .filter(|l| MASKS.iter().any(|m| l.starts_with(m)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What this thread's handler does: only raw syscalls (async-signal-safe), the same drops as
/// `drop_this_thread` in the same order. Errors are left for the /proc check to find.
extern "C" fn drop_in_handler(_: libc::c_int) {
    if BOUNDING.load(Ordering::Relaxed) {
        let keep = KEEP.load(Ordering::Relaxed);
        for cap in (0..64).filter(|c| keep & (1u64 << c) == 0) {
            // SAFETY: prctl with integer arguments touches no memory of ours.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let keep = KEEP.load(Ordering::Relaxed);
    let word = |shift: u32| {
        let w = (keep >> shift) as u32;
        CapData {
            effective: w,
            permitted: w,
            inheritable: 0,
        }
    };
    let data = [word(0), word(32)];
    // SAFETY: header and data are valid for capset's reads (version 3 takes two data words).
    unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
}

/// Whether the handler drops the bounding set too (only when the caller could).
static BOUNDING: AtomicBool = AtomicBool::new(false);
/// The capabilities every thread keeps (a bit per capability number).
static KEEP: AtomicU64 = AtomicU64::new(0);

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The other threads of this process.
fn other_threads() -> Vec<u32> {
    // SAFETY: gettid has no arguments.
    let me = unsafe { libc::gettid() } as u32;
    std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&t| t != me)
                .collect()
        })
        .unwrap_or_default()
}

/// Effective capabilities now, as the `CapEff` mask of /proc/self/status.
pub fn effective_mask() -> u64 {
    caps::read(None, CapSet::Effective)
        .map(|set| set.iter().fold(0u64, |m, c| m | c.bitmask()))
        .unwrap_or(0)
}

/// Empties the bounding, ambient, inheritable, effective and permitted sets of every thread of
/// the process (in that order: the bounding set needs CAP_SETPCAP, which goes last). A process
/// without CAP_SETPCAP (not root, or a unit that does not grant it) keeps its bounding set: it
/// cannot shrink it.
pub fn drop_all() -> Result<(), Error> {
    drop_all_but(None)
}

/// As `drop_all`, but every thread keeps `keep` (effective, permitted and bounding).
pub fn drop_all_but(keep: Option<Capability>) -> Result<(), Error> {
    KEEP.store(keep.map_or(0, |c| c.bitmask()), Ordering::Relaxed);
    let bounding = drop_this_thread(keep)?;
    BOUNDING.store(bounding, Ordering::Relaxed);
    let want = std::fs::read_to_string("/proc/thread-self/status")
        .map(|s| masks(&s))
        .unwrap_or_default();
    // A real-time signal nobody else uses (glibc keeps the first ones for itself).
    let signal = libc::SIGRTMIN() + 3;
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = drop_in_handler as extern "C" fn(libc::c_int) as usize;
    action.sa_flags = libc::SA_RESTART;
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both structs are valid for the call.
    if unsafe { libc::sigaction(signal, &action, &mut previous) } != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    let result = signal_until_dropped(signal, &want);
    // SAFETY: restores what was there.
    unsafe { libc::sigaction(signal, &previous, std::ptr::null_mut()) };
    result
}

/// Signals each other thread whose masks differ from `want` until none does. A thread made
/// while this runs inherits its maker's sets: if the maker had not dropped yet, the next pass
/// finds the new thread.
fn signal_until_dropped(signal: libc::c_int, want: &str) -> Result<(), Error> {
    const PATIENCE: Duration = Duration::from_secs(2);
    let start = Instant::now();
    // SAFETY: getpid has no arguments.
    let pid = unsafe { libc::getpid() };
    loop {
        let mut kept = None;
        for tid in other_threads() {
            let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            else {
                continue; // it exited
            };
            let have = masks(&status);
            if have != want {
                // SAFETY: tgkill with integer arguments; an exited thread gives ESRCH.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
                kept = Some((tid, have));
            }
        }
        match kept {
            None => return Ok(()),
            Some((tid, masks)) if start.elapsed() > PATIENCE => {
                return Err(Error::ThreadKept {
                    tid,
                    waited: start.elapsed(),
                    masks,
                })
            }
            Some(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// The caller's thread; true if its bounding set was emptied too (but for `keep`).
fn drop_this_thread(keep: Option<Capability>) -> Result<bool, Error> {
    let err = |set| move |source| Error::Drop { set, source };
    let bounding = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(err(CapSet::Effective))?;
    if bounding {
        // As caps::clear does: only what the bounding set holds (a capability newer than the
        // kernel is not there to drop).
        for cap in caps::all().into_iter().filter(|c| Some(*c) != keep) {
            if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap).map_err(err(CapSet::Bounding))?;
            }
        }
    }
    let kept: caps::CapsHashSet = keep.into_iter().collect();
    for set in [CapSet::Ambient, CapSet::Inheritable] {
        caps::clear(None, set).map_err(err(set))?;
    }
    // Effective before permitted: a capability must leave the effective set first.
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &kept).map_err(err(set))?;
    }
    Ok(bounding)
}

/// Drops every capability of the calling thread only (a probe thread's, to see what the kernel
/// allows a daemon without them).
pub fn drop_this_thread_only() -> Result<(), Error> {
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|source| Error::Drop { set, source })?;
    }
    Ok(())
}
