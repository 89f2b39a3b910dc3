//! BPF links as descriptors of our own, so that systemd's store can keep them across a restart
//! and the next process can swap its programs into them.
//!
//! aya attaches and owns each link but keeps its descriptor private; the kernel lists it in
//! /proc/self/fdinfo with the id of the program it runs, which is how we find and duplicate it.
//! aya has no public BPF_LINK_UPDATE either: `update` is that one command, with aya-obj's
//! bindings of the kernel's `bpf_attr`.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// A duplicate of the descriptor of the link running program `prog_id` in this process.
pub fn find(prog_id: u32) -> std::io::Result<OwnedFd> {
    let want = format!("prog_id:\t{prog_id}");
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let entry = entry?;
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        // A program's own descriptor lists its id too; only a link has link_id.
        let is_link = info.lines().any(|l| l.starts_with("link_id:"));
        if !is_link || !info.lines().any(|l| l == want) {
            continue;
        }
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is open (aya holds it for the lifetime of the link, and the
        // link outlives this call); it is only borrowed to be duplicated.
        return unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned();
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no link runs program {prog_id}"),
    ))
}

/// Replaces the program `link` runs with `prog`, atomically: no packet or connect() is ever
/// without a program (BPF_LINK_UPDATE, cgroup and netns links since Linux 5.7 and 5.8).
pub fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: bpf_attr is plain data; all-zero is its valid empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = prog.as_raw_fd() as u32;
    // SAFETY: the command reads `size_of::<bpf_attr>()` bytes of `attr`, which live across the
    // call; both descriptors are open for its duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_LINK_UPDATE as libc::c_long,
            &attr as *const bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The id of a program, from the fdinfo of its descriptor or of a link running it.
pub fn prog_id(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("prog_id:\t"))
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a BPF link"))
}
