/* Inbound: steer TCP for captured local ports to proxy::Inbound's listener. No NAT: the
 * accepted socket's local address is the original destination. */
#include "maps.h"

/* "*" on the command line: every port not explicitly excluded. */
const volatile __u8 inbound_all_ports = 0;

static __always_inline int is_loopback(const struct bpf_sk_lookup *ctx)
{
	if (ctx->family == AF_INET)
		return (bpf_ntohl(ctx->local_ip4) >> 24) == 127;
	return !ctx->local_ip6[0] && !ctx->local_ip6[1] && !ctx->local_ip6[2] &&
	       ctx->local_ip6[3] == bpf_htonl(1);
}

SEC("sk_lookup")
int inbound_lookup(struct bpf_sk_lookup *ctx)
{
	__u16 port = (__u16)ctx->local_port;
	const struct inbound_port *rule;
	struct bpf_sock *listener;
	__u32 key;

	/* Same as the sidecar: only traffic arriving from outside, never SSH. */
	if (ctx->protocol != IPPROTO_TCP || port == SSH_PORT || is_loopback(ctx))
		return SK_PASS;
	if (ctx->family == AF_INET && ctx->remote_ip4 == bpf_htonl(INBOUND_SOURCE4))
		return SK_PASS;
	rule = bpf_map_lookup_elem(&inbound_ports, &port);
	if (rule ? rule->action != INBOUND_CAPTURE : !inbound_all_ports)
		return SK_PASS;
	key = ctx->family == AF_INET6 ? 1 : 0;
	listener = bpf_map_lookup_elem(&inbound_listener, &key);
	if (!listener)
		return SK_PASS;
	bpf_sk_assign(ctx, listener, 0);
	bpf_sk_release(listener);
	return SK_PASS;
}
