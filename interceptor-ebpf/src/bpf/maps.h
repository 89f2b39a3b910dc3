/* Every map of the capture object, declared once. Each says who writes it and who reads it. */
#pragma once
#include "common.h"

/* Mesh service addresses to capture (VIP, service port). Value is reserved (0).
 * Writer: daemon, capture::Vips::sync keeps it equal to the mesh table.
 * Reader: connect4/connect6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ip_port);
	__type(value, __u32);
} vips SEC(".maps");

/* outboundTrafficPolicy: key 0 holds an enum outbound_traffic_mode. ALLOW_ANY (the default, and what
 * an absent daemon leaves) lets non-mesh TCP go where it was aimed; REGISTRY_ONLY refuses it
 * at connect() (EPERM) unless `passthrough` or the fixed exceptions (loopback, SSH) let it.
 * Writer: daemon (capture::Vips::sync, from the table). Reader: connect4/connect6. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, enum outbound_traffic_mode);
} outbound_mode SEC(".maps");

/* Destinations REGISTRY_ONLY never refuses (--exclude-outbound-cidrs).
 * Writer: daemon at attach. Reader: connect4/connect6. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, __u32);
} passthrough SEC(".maps");

/* Connections REGISTRY_ONLY refused, per CPU (key 0).
 * Writer: connect4/connect6. Reader: daemon (metrics). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} registry_only_refused SEC(".maps");

/* Original destination of a redirected socket, by socket cookie. Cookies are never reused, so
 * stale entries are harmless and LRU bounds them.
 * Writer: connect4/6, sendmsg4/6. Reader: sockops (TCP to the outbound listener),
 * recvmsg4/6 (DNS reply source), getpeername4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct ip_port);
} cookie_orig SEC(".maps");

/* Original destination of a connection to the outbound listener, by the client's own
 * (address, port): what the proxy sees as the peer of the accepted socket.
 * Writer: sockops on ACTIVE_ESTABLISHED. Reader and deleter: daemon (capture::OriginalDst). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ip_port);
	__type(value, struct ip_port);
} orig_by_peer SEC(".maps");

/* Local TCP ports captured inbound, and ports that never are (SSH, admin).
 * Writer: daemon at attach (capture::attach_inbound). Reader: sk_lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, struct inbound_port);
} inbound_ports SEC(".maps");

/* The proxy::Inbound listener sockets sk_lookup steers to: key 0 the IPv4 one, key 1 the IPv6
 * one. Writer: daemon at attach (capture::attach_inbound). Reader: sk_lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} inbound_listener SEC(".maps");

/* Both ends of each app <-> proxy::Outbound connection on this host, by (local, remote), for
 * the sk_msg local hop (`--local-hop sockmap`). Kernel only: a closed socket leaves the map by
 * itself, so nothing is stranded when the daemon dies.
 * Writer: sockops (ACTIVE_ESTABLISHED for the app's end, PASSIVE_ESTABLISHED for the proxy's).
 * Reader: sk_msg local_hop. */
struct local_hop_key {
	struct ip_port local;
	struct ip_port remote;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct local_hop_key);
	__type(value, __u32);
} local_hops SEC(".maps");

/* A local_hops key from one socket's own view: (local, remote). sk_msg asks with the two
 * swapped, which is the peer's own view. */
static __always_inline void local_hop_key_of(struct local_hop_key *k, __u32 family,
					     __u32 l4, const __u32 *l6, __u16 lport,
					     __u32 r4, const __u32 *r6, __u16 rport)
{
	if (family == AF_INET) {
		ip_port_from_v4(&k->local, l4, lport);
		ip_port_from_v4(&k->remote, r4, rport);
	} else {
		ip_port_from_v6(&k->local, l6, lport);
		ip_port_from_v6(&k->remote, r6, rport);
	}
}
