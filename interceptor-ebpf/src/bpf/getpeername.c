/* getpeername(): a captured socket reports the peer the application connected to, not our
 * loopback listener, so applications that log or check their peer see no difference. */
#include "redirect.h"

SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	return restore4(ctx);
}

SEC("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	return restore6(ctx);
}
