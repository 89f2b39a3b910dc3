//! Batched UDP: one recvmmsg(2) takes every datagram that is waiting (up to `BATCH`), one
//! sendmmsg(2) sends every reply they produced. Under load a wake-up then costs two syscalls
//! for a batch instead of two per datagram; when idle it is the same as recv_from/send_to.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per syscall. dnsperf-style load (hundreds outstanding) fills it; more buys little.
pub const BATCH: usize = 32;
/// Room per datagram. Larger ones arrive cut (MSG_TRUNC) and are reported as such: a DNS query
/// that big is not one a resolver sends.
pub const SLOT: usize = 4096;

/// Receive buffers for one socket, reused for every batch.
pub struct RecvBatch {
    bufs: Vec<[u8; SLOT]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
}

// SAFETY: the raw pointers in `iovs`/`hdrs` point into this struct's own heap buffers and are
// rebuilt before every syscall; nothing else aliases them.
unsafe impl Send for RecvBatch {}

/// One received datagram.
pub struct Datagram<'a> {
    pub bytes: &'a [u8],
    pub from: Option<SocketAddr>,
    /// The datagram was longer than `SLOT`: `bytes` holds only its start.
    pub truncated: bool,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Self {
            bufs: vec![[0u8; SLOT]; BATCH],
            addrs: vec![zero_addr; BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            hdrs: vec![zero_hdr; BATCH],
            len: 0,
        }
    }

    /// Waits for at least one datagram, then takes all that are queued (up to `BATCH`).
    pub async fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        loop {
            sock.readable().await?;
            match sock.try_io(Interest::READABLE, || self.recv_now(sock.as_raw_fd())) {
                Ok(n) => {
                    self.len = n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn recv_now(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        // SAFETY: `hdrs` holds BATCH initialised headers whose buffers live in `self`.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// The `i`-th datagram of the last batch.
    pub fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.len {
            return None;
        }
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(SLOT);
        // SAFETY: the kernel wrote a sockaddr of `msg_namelen` bytes into addrs[i].
        let from = unsafe { SockAddr::new(self.addrs[i], h.msg_hdr.msg_namelen) }.as_socket();
        Some(Datagram {
            bytes: &self.bufs[i][..len],
            from,
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        })
    }
}

/// Replies gathered from one batch, sent with one sendmmsg. Reply buffers are kept between
/// batches: a reply written with `slot` costs no allocation once the pool has grown.
#[derive(Default)]
pub struct SendBatch {
    out: Vec<(Vec<u8>, SockAddr)>,
    used: usize,
}

impl SendBatch {
    /// A cleared buffer for one more reply to `to`.
    pub fn slot(&mut self, to: SocketAddr) -> &mut Vec<u8> {
        let to = SockAddr::from(to);
        if self.used == self.out.len() {
            self.out.push((Vec::with_capacity(512), to));
        } else {
            self.out[self.used].1 = to;
        }
        self.used += 1;
        let buf = &mut self.out[self.used - 1].0;
        buf.clear();
        buf
    }

    /// Takes back the last `slot` (its reply was not written after all).
    pub fn unslot(&mut self) {
        self.used = self.used.saturating_sub(1);
    }

    pub fn push(&mut self, bytes: Vec<u8>, to: SocketAddr) {
        let to = SockAddr::from(to);
        if self.used == self.out.len() {
            self.out.push((bytes, to));
        } else {
            self.out[self.used] = (bytes, to);
        }
        self.used += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Sends everything queued; what the socket cannot take now is sent as it becomes
    /// writable. Per-datagram errors (an unreachable client) are dropped: UDP promises nothing.
    pub async fn flush(&mut self, sock: &UdpSocket) {
        let mut sent = 0;
        while sent < self.used {
            let pending = &self.out[sent..self.used];
            match sock.try_io(Interest::WRITABLE, || send_now(sock.as_raw_fd(), pending)) {
                Ok(n) => sent += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sock.writable().await.is_err() {
                        break;
                    }
                }
                // The first datagram failed (bad address): skip it and go on.
                Err(_) => sent += 1,
            }
        }
        self.used = 0;
        // A burst of upstream-sized replies must not pin memory for ever.
        self.out.truncate(BATCH);
    }
}

fn send_now(fd: std::os::fd::RawFd, out: &[(Vec<u8>, SockAddr)]) -> io::Result<usize> {
    let n = out.len().min(BATCH);
    let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: all-zero is a valid mmsghdr.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, (bytes, to)) in out.iter().take(n).enumerate() {
        iovs[i] = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        hdrs[i].msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
        hdrs[i].msg_hdr.msg_namelen = to.len();
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `n` initialised headers pointing at buffers borrowed for the call; the kernel only
    // reads them.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many datagrams from two senders arrive in few batches, each with its sender; replies go
    /// back with one flush and reach the right sender.
    #[tokio::test]
    async fn batches_in_and_out() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..40u8 {
            let s = if i.is_multiple_of(2) { &a } else { &b };
            s.send_to(&[i; 3], addr).await.unwrap();
        }
        s_big(&a, addr).await;
        let mut batch = RecvBatch::new();
        let mut send = SendBatch::default();
        let (mut got, mut truncated) = (0, 0);
        while got < 41 {
            let n = batch.recv(&server).await.unwrap();
            assert!(n <= BATCH);
            for i in 0..n {
                let d = batch.get(i).unwrap();
                let from = d.from.unwrap();
                if d.truncated {
                    truncated += 1;
                    assert_eq!(d.bytes.len(), SLOT);
                    assert_eq!(from, a.local_addr().unwrap());
                } else {
                    let want = if d.bytes[0].is_multiple_of(2) { &a } else { &b };
                    assert_eq!(from, want.local_addr().unwrap());
                    send.push(vec![d.bytes[0] + 100], from);
                }
                got += 1;
            }
            send.flush(&server).await;
        }
        assert_eq!(truncated, 1);
        let mut buf = [0u8; 8];
        for s in [&a, &b] {
            for _ in 0..20 {
                let (n, from) = s.recv_from(&mut buf).await.unwrap();
                assert_eq!((n, from), (1, addr));
                assert!(buf[0] >= 100);
            }
        }
    }

    async fn s_big(s: &UdpSocket, to: SocketAddr) {
        s.send_to(&vec![7u8; SLOT + 100], to).await.unwrap();
    }
}
