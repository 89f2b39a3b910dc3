/* connect(): TCP to a mesh VIP -> proxy::Outbound; UDP/TCP to port 53 -> dns::Server. */
#include "redirect.h"

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx);
}
