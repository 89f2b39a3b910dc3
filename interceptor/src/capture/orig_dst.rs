//! Where a connection accepted by proxy::Outbound was originally going.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use interceptor_ebpf::abi::IpPort;
use tokio::net::TcpStream;

/// Looks up the original destination of a captured connection: the eBPF map first (published by
/// sockops under the client's address), then netfilter's SO_ORIGINAL_DST, so the same listener
/// also serves behind an iptables REDIRECT rule.
pub struct OriginalDst {
    map: Option<Mutex<HashMap<MapData, IpPort, IpPort>>>,
    /// After a restart: the previous process's map, where its programs wrote the connections
    /// that waited in the listener's queue until this process accepted them.
    previous: Option<Mutex<HashMap<MapData, IpPort, IpPort>>>,
}

impl OriginalDst {
    pub(super) fn from_maps(
        map: HashMap<MapData, IpPort, IpPort>,
        previous: Option<HashMap<MapData, IpPort, IpPort>>,
    ) -> Self {
        Self {
            map: Some(Mutex::new(map)),
            previous: previous.map(Mutex::new),
        }
    }

    /// No eBPF capture: only connections redirected by netfilter can be resolved.
    pub fn netfilter_only() -> Self {
        Self {
            map: None,
            previous: None,
        }
    }

    pub fn lookup(&self, stream: &TcpStream) -> Option<SocketAddr> {
        let peer = stream.peer_addr().ok()?;
        self.take_from_ebpf(peer)
            .or_else(|| netfilter_original_dst(stream))
    }

    /// Whether this kernel refuses map access through descriptors we hold to a thread with no
    /// capabilities (bpf(2) on 5.10 with unprivileged BPF disabled: EPERM for every command).
    /// Asked from a thread of its own that drops its capabilities (capabilities are per
    /// thread), with a lookup of a key no connection has.
    pub fn needs_capability(&self) -> bool {
        let Some(map) = self.map.as_ref() else {
            return false;
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                if crate::privilege::drop_this_thread_only().is_err() {
                    return false;
                }
                let map = map.lock().unwrap_or_else(|e| e.into_inner());
                let nobody = IpPort::from_socket_addr(SocketAddr::from(([0, 0, 0, 0], 0)));
                matches!(
                    map.get(&nobody, 0),
                    Err(aya::maps::MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EPERM)
                )
            })
            .join()
            .unwrap_or(false)
        })
    }

    fn take_from_ebpf(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let key = IpPort::from_socket_addr(peer);
        take(self.map.as_ref()?, &key).or_else(|| take(self.previous.as_ref()?, &key))
    }
}

fn take(map: &Mutex<HashMap<MapData, IpPort, IpPort>>, key: &IpPort) -> Option<SocketAddr> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    let orig = map.get(key, 0).ok()?;
    // The entry is single-use: the client port will be reused by a later connection.
    let _ = map.remove(key);
    Some(orig.socket_addr())
}

fn netfilter_original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80; // linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST too
    let fd = stream.as_raw_fd();
    let v6 = stream.local_addr().ok()?.is_ipv6();
    // SAFETY: getsockopt writes at most `len` bytes into a zeroed sockaddr_storage.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
        if libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return None;
        }
        match ss.ss_family as libc::c_int {
            libc::AF_INET => {
                let sin = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(SocketAddr::new(
                    std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                    u16::from_be(sin.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let sin6 = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Some(SocketAddr::new(
                    std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                    u16::from_be(sin6.sin6_port),
                ))
            }
            _ => None,
        }
    }
}
