/* Helpers shared by every program. Kept header-only so each program file stays a few lines. */
#pragma once
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "abi.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define DNS_PORT 53
#define LOOPBACK4 0x7f000001 /* 127.0.0.1 */

/* barrier_var (bpf_helpers.h) forces a ctx field load to happen where written: clang
 * otherwise merges loads from different branches into one pointer-offset load, which the
 * verifier rejects for ctx. */
#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "=r"(var) : "0"(var))
#endif

/* cgroup sock_addr programs: 1 lets the syscall go on (with any rewrite we made), 0 fails it
 * with EPERM. */
#define ALLOW 1
#define DENY 0

/* Set by the daemon before load (aya EbpfLoader::set_global). Read-only for the programs. */
const volatile __u32 daemon_tgid = 0;      /* the daemon's own sockets are never captured */
const volatile __u16 outbound_port = 15001; /* proxy::Outbound listener on loopback */
const volatile __u16 dns_port = 15053;      /* dns::Server listener on loopback */
const volatile __u16 inbound_port = 15006;  /* proxy::Inbound listener (sk_lookup target) */
const volatile __u8 local_hop = 0;        /* 1: sockmap the app <-> outbound hop */
const volatile __u64 exempt_cgroup = 0;     /* cgroup id whose sockets are never captured (the
                                             * daemon's exec probes); 0: none */

/* Exclusion is by process (tgid): it covers every socket the daemon opens, including ones made by
 * libraries, with no per-socket setup, and it holds when the daemon runs inside the captured
 * cgroup (the default cgroup is the root of the hierarchy). Commands the daemon runs (exec
 * probes) are other processes: they run in the exempt cgroup, and so do their children. Only
 * called from sock_addr programs, which run in the calling task's context. */
static __always_inline int from_daemon(void)
{
	if ((bpf_get_current_pid_tgid() >> 32) == daemon_tgid)
		return 1;
	return exempt_cgroup != 0 && bpf_get_current_cgroup_id() == exempt_cgroup;
}

static __always_inline void ip_port_from_v4(struct ip_port *out, __u32 ip4, __u16 port)
{
	out->addr[0] = 0;
	out->addr[1] = 0;
	out->addr[2] = bpf_htonl(0xffff);
	out->addr[3] = ip4;
	out->port = port;
	out->family = AF_INET;
}

/* A sock_ops / sk_msg remote_port field in host order: it is network order in the low 16 bits
 * on some kernels and shifted into the high 16 bits on others; accept both. */
static __always_inline __u16 remote_port_host(__u32 rp)
{
	return rp > 0xffff ? (__u16)bpf_ntohl(rp) : bpf_ntohs((__u16)rp);
}

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline void ip_port_from_v6(struct ip_port *out, const __u32 *a, __u16 port)
{
	out->addr[0] = a[0];
	out->addr[1] = a[1];
	out->addr[2] = a[2];
	out->addr[3] = a[3];
	out->port = port;
	out->family = is_v4_mapped(a) ? AF_INET : AF_INET6;
}
