/* sendto()/sendmsg() on unconnected UDP: queries to any nameserver -> dns::Server. Only port 53
 * can match for UDP (capture_port), so other datagrams pass untouched. */
#include "redirect.h"

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx);
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx);
}
