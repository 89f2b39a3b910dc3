/* recvfrom()/recvmsg(): a DNS reply from dns::Server must look like it came from the nameserver
 * the application asked, or resolvers such as glibc drop it. */
#include "redirect.h"

SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	return restore4(ctx);
}

SEC("cgroup/recvmsg6")
int recvmsg6(struct bpf_sock_addr *ctx)
{
	return restore6(ctx);
}
