/* When a captured TCP connection is established, republish its original destination under the
 * client's (address, port): the one key proxy::Outbound has after accept(). With the local hop
 * on, both ends of that connection also go into local_hops for sk_msg (local_hop.c). */
#include "maps.h"

static __always_inline __u16 sockops_remote_port(const struct bpf_sock_ops *ctx)
{
	return remote_port_host(ctx->remote_port);
}

/* Reads every field unconditionally, as publish_orig_dst does (the verifier and ctx loads). */
static __always_inline void local_hop_insert(struct bpf_sock_ops *ctx)
{
	struct local_hop_key key = {};
	__u32 family = ctx->family, lport = ctx->local_port, l4 = ctx->local_ip4,
	      r4 = ctx->remote_ip4, l6[4], r6[4];
	__u16 rport = sockops_remote_port(ctx);

	l6[0] = ctx->local_ip6[0];
	l6[1] = ctx->local_ip6[1];
	l6[2] = ctx->local_ip6[2];
	l6[3] = ctx->local_ip6[3];
	r6[0] = ctx->remote_ip6[0];
	r6[1] = ctx->remote_ip6[1];
	r6[2] = ctx->remote_ip6[2];
	r6[3] = ctx->remote_ip6[3];
	barrier_var(l4);
	barrier_var(r4);
	barrier_var(l6[0]);
	barrier_var(r6[0]);
	local_hop_key_of(&key, family, l4, l6, (__u16)lport, r4, r6, rport);
	bpf_sock_hash_update(ctx, &local_hops, &key, BPF_ANY);
}

SEC("sockops")
int publish_orig_dst(struct bpf_sock_ops *ctx)
{
	struct ip_port client;
	const struct ip_port *orig;
	__u32 family, local_port, local4, local6[4];
	__u64 cookie;

	if (ctx->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		/* The proxy's end: accepted on the outbound listener. */
		if (local_hop && ctx->local_port == outbound_port)
			local_hop_insert(ctx);
		return 1;
	}
	if (ctx->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (sockops_remote_port(ctx) != outbound_port)
		return 1;
	if (local_hop)
		local_hop_insert(ctx);
	cookie = bpf_get_socket_cookie(ctx);
	orig = bpf_map_lookup_elem(&cookie_orig, &cookie);
	if (!orig)
		return 1;
	/* Read every field unconditionally: clang would otherwise share one pointer-offset load
	 * between the branches, and the verifier rejects a modified ctx pointer. */
	family = ctx->family;
	local_port = ctx->local_port;
	local4 = ctx->local_ip4;
	local6[0] = ctx->local_ip6[0];
	local6[1] = ctx->local_ip6[1];
	local6[2] = ctx->local_ip6[2];
	local6[3] = ctx->local_ip6[3];
	barrier_var(local4);
	barrier_var(local6[0]);
	barrier_var(local6[1]);
	barrier_var(local6[2]);
	barrier_var(local6[3]);
	if (family == AF_INET)
		ip_port_from_v4(&client, local4, (__u16)local_port);
	else
		ip_port_from_v6(&client, local6, (__u16)local_port);
	bpf_map_update_elem(&orig_by_peer, &client, orig, BPF_ANY);
	return 1;
}
