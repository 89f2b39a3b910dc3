//! VIP auto-allocation for ServiceEntries without addresses (SPEC section 3): deterministic from
//! the host name, so a VIP is stable across restarts and independent of file order.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use super::model::Host;

/// 240.240.0.0/16 and 2001:2::/48, the ranges istiod allocates from (I: pilot/pkg/features).
const V4_BASE: u32 = u32::from_be_bytes([240, 240, 0, 0]);
const V6_BASE: u128 = 0x2001_0002_0000_0000_0000_0000_0000_0000;

/// FNV-1a: fixed by definition, unlike std's hasher, so allocations survive a toolchain change.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Allocates one v4 and one v6 address per host. Hosts are taken in sorted order, so on a hash
/// collision the winner is decided by name, never by which file was read first.
pub fn allocate<'a>(
    hosts: impl IntoIterator<Item = &'a Host>,
) -> BTreeMap<Host, (Ipv4Addr, Ipv6Addr)> {
    let mut sorted: Vec<&Host> = hosts.into_iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut used4 = HashSet::new();
    let mut used6 = HashSet::new();
    let mut out = BTreeMap::new();
    for host in sorted {
        let h = fnv1a(host.as_str());
        // Slots 1..=65534: skip .0.0 and .255.255.
        let mut slot4 = (h % 65534) as u32 + 1;
        while !used4.insert(slot4) {
            slot4 = slot4 % 65534 + 1;
        }
        let mut slot6 = u128::from(h) | 1;
        while !used6.insert(slot6) {
            slot6 = slot6.wrapping_add(2) & u128::from(u64::MAX);
        }
        out.insert(
            host.clone(),
            (
                Ipv4Addr::from(V4_BASE + slot4),
                Ipv6Addr::from(V6_BASE + slot6),
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_order_independent() {
        let a = Host::new("a.example.com");
        let b = Host::new("b.example.com");
        let one = allocate([&a, &b]);
        let two = allocate([&b, &a]);
        assert_eq!(one, two);
        let (v4, v6) = one[&a];
        assert_eq!(v4.octets()[..2], [240, 240]);
        assert!(v6.segments()[..3] == [0x2001, 0x2, 0]);
        assert_ne!(one[&a], one[&b]);
        // Adding a host does not move the others.
        let c = Host::new("c.example.com");
        assert_eq!(allocate([&a, &b, &c])[&a], one[&a]);
    }

    #[test]
    fn many_hosts_get_distinct_addresses() {
        let hosts: Vec<Host> = (0..20_000)
            .map(|i| Host::new(&format!("s{i}.ns.svc.cluster.local")))
            .collect();
        let all = allocate(hosts.iter());
        let v4: HashSet<_> = all.values().map(|(v4, _)| *v4).collect();
        assert_eq!(v4.len(), hosts.len());
    }
}
