//! Rust mirror of `src/bpf/abi.h`. `tests/abi.rs` checks sizes and offsets against the BTF of the
//! built object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `struct ip_port`: an address (IPv4 stored v4-mapped) and a host-order port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpPort {
    /// The 16 address bytes in network order, as four words the way the C side stores them.
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

// SAFETY: plain old data with no padding (16 + 2 + 2 bytes, align 4); every bit pattern is valid.
unsafe impl aya::Pod for IpPort {}

impl IpPort {
    pub fn from_socket_addr(sa: SocketAddr) -> Self {
        Self::new(sa.ip(), sa.port())
    }

    pub fn new(ip: IpAddr, port: u16) -> Self {
        // One key for an address however a socket spells it: v4 and v4-mapped v6 are the same.
        let (v6, family) = match ip {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), AF_INET),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => (v4.to_ipv6_mapped(), AF_INET),
                None => (v6, AF_INET6),
            },
        };
        let o = v6.octets();
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Self {
            addr: [word(0), word(4), word(8), word(12)],
            port,
            family,
        }
    }

    pub fn ip(&self) -> IpAddr {
        let mut o = [0u8; 16];
        for (i, w) in self.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(o);
        match (self.family, v6.to_ipv4_mapped()) {
            (AF_INET, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port)
    }
}

/// `struct inbound_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundPort {
    pub action: u32,
}

// SAFETY: a single u32.
unsafe impl aya::Pod for InboundPort {}

/// `enum inbound_action`.
pub const INBOUND_CAPTURE: u32 = 1;
pub const INBOUND_EXCLUDE: u32 = 2;

/// `enum abi_constant`: SSH, never captured inbound (sk_lookup skips it whatever the map says).
pub const SSH_PORT: u16 = 22;
/// `enum abi_constant`: the IPv4 source proxy::Inbound uses towards the local app; sk_lookup
/// skips it (no re-capture).
pub const INBOUND_SOURCE4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_mapped_v4_are_one_key() {
        let a = IpPort::new("10.1.2.3".parse().unwrap(), 80);
        let b = IpPort::new("::ffff:10.1.2.3".parse().unwrap(), 80);
        assert_eq!(a, b);
        assert_eq!(a.ip(), "10.1.2.3".parse::<IpAddr>().unwrap());
        let c = IpPort::new("2001:2::7".parse().unwrap(), 443);
        assert_eq!(c.family, AF_INET6);
        assert_eq!(c.socket_addr(), "[2001:2::7]:443".parse().unwrap());
    }
}

/// `struct cidr_key`: an LPM trie key over the 16 address bytes (IPv4 v4-mapped: /n is /96+n).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CidrKey {
    pub prefixlen: u32,
    pub addr: [u32; 4],
}

// SAFETY: plain old data with no padding (4 + 16 bytes, align 4).
unsafe impl aya::Pod for CidrKey {}

impl CidrKey {
    pub fn new(ip: IpAddr, prefix: u8) -> Self {
        let mapped = IpPort::new(ip, 0);
        let extra = if mapped.family == AF_INET { 96 } else { 0 };
        Self {
            prefixlen: u32::from(prefix) + extra,
            addr: mapped.addr,
        }
    }
}

/// `enum outbound_traffic_mode`.
pub const OUTBOUND_ALLOW_ANY: u32 = 0;
pub const OUTBOUND_REGISTRY_ONLY: u32 = 1;
