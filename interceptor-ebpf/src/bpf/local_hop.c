/* The local hop (`--local-hop sockmap`): a message sent on one end of an app <-> outbound
 * connection is put straight into the other end's receive queue, skipping loopback TCP. The
 * peer is looked up by the sender's (remote, local); not found (the other end is gone or not
 * in the map), the message takes the normal TCP path. */
#include "maps.h"

SEC("sk_msg")
int local_hop_redirect(struct sk_msg_md *msg)
{
	struct local_hop_key peer = {};
	__u32 family = msg->family, lport = msg->local_port, l4 = msg->local_ip4,
	      r4 = msg->remote_ip4, l6[4], r6[4];
	__u16 rport = remote_port_host(msg->remote_port);

	l6[0] = msg->local_ip6[0];
	l6[1] = msg->local_ip6[1];
	l6[2] = msg->local_ip6[2];
	l6[3] = msg->local_ip6[3];
	r6[0] = msg->remote_ip6[0];
	r6[1] = msg->remote_ip6[1];
	r6[2] = msg->remote_ip6[2];
	r6[3] = msg->remote_ip6[3];
	barrier_var(l4);
	barrier_var(r4);
	barrier_var(l6[0]);
	barrier_var(r6[0]);
	/* The peer's local is our remote. */
	local_hop_key_of(&peer, family, r4, r6, rport, l4, l6, (__u16)lport);
	bpf_msg_redirect_hash(msg, &local_hops, &peer, BPF_F_INGRESS);
	return SK_PASS;
}
