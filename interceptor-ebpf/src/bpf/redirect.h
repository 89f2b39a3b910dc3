/* The capture decision, shared by connect and sendmsg so TCP and UDP can never disagree. */
#pragma once
#include "maps.h"

/* Which loopback listener port a socket to dst is redirected to, or 0 to leave it alone.
 * DNS (any nameserver, UDP or TCP) goes to dns::Server; TCP to a mesh VIP:port goes to
 * proxy::Outbound. */
static __always_inline __u16 capture_port(__u32 protocol, const struct ip_port *dst)
{
	if (dst->port == DNS_PORT && (protocol == IPPROTO_UDP || protocol == IPPROTO_TCP))
		return dns_port;
	if (protocol == IPPROTO_TCP && bpf_map_lookup_elem(&vips, dst))
		return outbound_port;
	return 0;
}

/* Under REGISTRY_ONLY, is a TCP connection to dst (not a mesh address) refused? Loopback, SSH
 * and the passthrough CIDRs never are. */
static __always_inline int refused_outside_mesh(__u32 protocol, const struct ip_port *dst)
{
	__u32 zero = 0;
	const enum outbound_traffic_mode *mode;
	struct cidr_key key;
	__u64 *refused;

	if (protocol != IPPROTO_TCP)
		return 0;
	mode = bpf_map_lookup_elem(&outbound_mode, &zero);
	if (!mode || *mode != OUTBOUND_REGISTRY_ONLY)
		return 0;
	if (dst->port == SSH_PORT)
		return 0;
	if (dst->family == AF_INET && (bpf_ntohl(dst->addr[3]) >> 24) == 127)
		return 0;
	if (dst->family == AF_INET6 && !dst->addr[0] && !dst->addr[1] && !dst->addr[2] &&
	    dst->addr[3] == bpf_htonl(1))
		return 0;
	key.prefixlen = 128;
	key.addr[0] = dst->addr[0];
	key.addr[1] = dst->addr[1];
	key.addr[2] = dst->addr[2];
	key.addr[3] = dst->addr[3];
	if (bpf_map_lookup_elem(&passthrough, &key))
		return 0;
	refused = bpf_map_lookup_elem(&registry_only_refused, &zero);
	if (refused)
		*refused += 1;
	return 1;
}

/* The original destination is kept by socket cookie: sockops, recvmsg and getpeername find it
 * from the socket alone. */
static __always_inline void remember(void *ctx, const struct ip_port *dst)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	bpf_map_update_elem(&cookie_orig, &cookie, dst, BPF_ANY);
}

static __always_inline int redirect4(struct bpf_sock_addr *ctx)
{
	struct ip_port dst;
	__u16 port;

	if (from_daemon())
		return ALLOW;
	ip_port_from_v4(&dst, ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port));
	port = capture_port(ctx->protocol, &dst);
	if (!port)
		return refused_outside_mesh(ctx->protocol, &dst) ? DENY : ALLOW;
	remember(ctx, &dst);
	ctx->user_ip4 = bpf_htonl(LOOPBACK4);
	ctx->user_port = bpf_htons(port);
	return ALLOW;
}

static __always_inline int redirect6(struct bpf_sock_addr *ctx)
{
	struct ip_port dst;
	__u32 ip6[4];
	__u16 port;

	if (from_daemon())
		return ALLOW;
	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	ip_port_from_v6(&dst, ip6, bpf_ntohs((__u16)ctx->user_port));
	port = capture_port(ctx->protocol, &dst);
	if (!port)
		return refused_outside_mesh(ctx->protocol, &dst) ? DENY : ALLOW;
	remember(ctx, &dst);
	/* A v6 socket aimed at a v4-mapped address stays in the v4 world: ::ffff:127.0.0.1. */
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	if (dst.family == AF_INET) {
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = bpf_htonl(LOOPBACK4);
	} else {
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(port);
	return ALLOW;
}

/* For replies and getpeername: if the socket's peer is one of our listeners, give back the
 * address the application originally asked for. */
static __always_inline const struct ip_port *original_of(void *ctx, __u16 seen_port)
{
	__u64 cookie;

	if (seen_port != dns_port && seen_port != outbound_port)
		return 0;
	cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_lookup_elem(&cookie_orig, &cookie);
}

static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
	const struct ip_port *orig;

	if (ctx->user_ip4 != bpf_htonl(LOOPBACK4))
		return ALLOW;
	orig = original_of(ctx, bpf_ntohs((__u16)ctx->user_port));
	if (!orig || orig->family != AF_INET)
		return ALLOW;
	ctx->user_ip4 = orig->addr[3];
	ctx->user_port = bpf_htons(orig->port);
	return ALLOW;
}

static __always_inline int restore6(struct bpf_sock_addr *ctx)
{
	const struct ip_port *orig;
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2],
	      a3 = ctx->user_ip6[3];
	int loop6 = !a0 && !a1 && !a2 && a3 == bpf_htonl(1);
	int loop4 = !a0 && !a1 && a2 == bpf_htonl(0xffff) && a3 == bpf_htonl(LOOPBACK4);

	if (!loop6 && !loop4)
		return ALLOW;
	orig = original_of(ctx, bpf_ntohs((__u16)ctx->user_port));
	if (!orig)
		return ALLOW;
	ctx->user_ip6[0] = orig->addr[0];
	ctx->user_ip6[1] = orig->addr[1];
	ctx->user_ip6[2] = orig->addr[2];
	ctx->user_ip6[3] = orig->addr[3];
	ctx->user_port = bpf_htons(orig->port);
	return ALLOW;
}
