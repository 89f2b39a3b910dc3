//! The kernel side of interceptor: the C capture object (built by `build/`), embedded, and the
//! Rust mirror of every type its maps share with userspace.

pub mod abi;

/// Wraps the object bytes so they are 8-byte aligned, as aya's ELF parser wants.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/capture.bpf.o")));

/// The compiled capture object (ELF, with BTF), ready for `aya::EbpfLoader::load`.
pub fn capture_object() -> &'static [u8] {
    &OBJECT.0
}

/// Program names in the object (the C function names).
pub mod programs {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SENDMSG4: &str = "sendmsg4";
    pub const SENDMSG6: &str = "sendmsg6";
    pub const RECVMSG4: &str = "recvmsg4";
    pub const RECVMSG6: &str = "recvmsg6";
    pub const GETPEERNAME4: &str = "getpeername4";
    pub const GETPEERNAME6: &str = "getpeername6";
    pub const SOCKOPS: &str = "publish_orig_dst";
    pub const SK_LOOKUP: &str = "inbound_lookup";
    pub const LOCAL_HOP: &str = "local_hop_redirect";

    /// Every cgroup sock_addr program.
    pub const SOCK_ADDR: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
}

/// Map names in the object (see `src/bpf/maps.h` for who writes and reads each).
pub mod maps {
    pub const VIPS: &str = "vips";
    pub const COOKIE_ORIG: &str = "cookie_orig";
    pub const ORIG_BY_PEER: &str = "orig_by_peer";
    pub const INBOUND_PORTS: &str = "inbound_ports";
    pub const INBOUND_LISTENER: &str = "inbound_listener";
    pub const LOCAL_HOPS: &str = "local_hops";
    pub const OUTBOUND_MODE: &str = "outbound_mode";
    pub const PASSTHROUGH: &str = "passthrough";
    pub const REGISTRY_ONLY_REFUSED: &str = "registry_only_refused";
}

/// `const volatile` globals the daemon sets before load (see `src/bpf/common.h`).
pub mod globals {
    pub const DAEMON_TGID: &str = "daemon_tgid";
    pub const LOCAL_HOP: &str = "local_hop";
    pub const OUTBOUND_PORT: &str = "outbound_port";
    pub const DNS_PORT: &str = "dns_port";
    pub const INBOUND_PORT: &str = "inbound_port";
    pub const INBOUND_ALL_PORTS: &str = "inbound_all_ports";
    pub const EXEMPT_CGROUP: &str = "exempt_cgroup";
}
