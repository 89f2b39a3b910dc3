/* Another product's cgroup programs (a monitoring agent, say), for the coexistence test: they
 * count what they see and allow everything. Loaded and attached by bpftool, never by us. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* [0]: connect4 calls, [1]: sockops calls. Written by both programs, read by the test. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} foreign_counts SEC(".maps");

static __always_inline void count(__u32 k)
{
	__u64 *v = bpf_map_lookup_elem(&foreign_counts, &k);
	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("cgroup/connect4")
int foreign_connect4(struct bpf_sock_addr *ctx)
{
	count(0);
	return 1;
}

SEC("sockops")
int foreign_sockops(struct bpf_sock_ops *ctx)
{
	count(1);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
