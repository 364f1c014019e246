// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TCP health per pod, from tracepoints (raw, attached by name): retransmits
 * (tcp_retransmit_skb), resets sent and received (tcp_send_reset, tcp_receive_reset),
 * connects, failed connects, connect time and smoothed RTT (inet_sock_set_state). Counters
 * are kept per watched network namespace (the node's and each local pod's: weir_tcp_netns,
 * kept by the agent); sockets elsewhere are ignored. The argument positions and structure
 * offsets come from the running kernel's BTF through `layout`. The TCP state numbers are the
 * kernel's ABI (include/net/tcp_states.h, reported as-is by inet_diag).
 * Minimum kernel: 5.6 (sk_protocol a whole field).
 */
#include "lib/common.h"
#include "weir/api/tcp_health.h"

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_	 2
#define TCP_CLOSE_	 7

const volatile struct tcp_layout layout = {};

/* Network namespace inode -> slot of weir_tcp_counters. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TCP_HEALTH_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} weir_tcp_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCP_HEALTH_SLOTS);
	__type(key, __u32);
	__type(value, struct tcp_counters);
} weir_tcp_counters SEC(".maps");

/* A watched socket in SYN_SENT: when it entered it, and its namespace's slot. */
struct connecting {
	__u64 since; /* boot clock, ns */
	__u32 slot;
	__u32 pad;
};

/* Sockets in SYN_SENT (of watched namespaces only). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_COMMON_LRU); /* no lock shared by every CPU */
	__type(key, __u64);
	__type(value, struct connecting);
} weir_tcp_connecting SEC(".maps");

/* The slot of the namespace `net` (a struct net *), or NULL when it is not watched. */
static __always_inline __u32 *slot_of_net(const void *net)
{
	__u32 inum = 0;

	if (!net)
		return NULL;
	bpf_probe_read_kernel(&inum, sizeof(inum), net + layout.net_inum);
	return bpf_map_lookup_elem(&weir_tcp_netns, &inum);
}

/* The counters of the namespace `net`, or NULL when it is not watched. */
static __always_inline struct tcp_counters *counters_of_net(const void *net)
{
	__u32 *slot = slot_of_net(net);

	return slot ? bpf_map_lookup_elem(&weir_tcp_counters, slot) : NULL;
}

static __always_inline struct tcp_counters *counters_of_sk(const void *sk)
{
	return sk ? counters_of_net(read_ptr(sk, layout.sk_net)) : NULL;
}

SEC("raw_tp/tcp_retransmit_skb")
int tcp_retransmit(struct bpf_raw_tracepoint_args *ctx)
{
	struct tcp_counters *c = counters_of_sk((const void *)ctx->args[0]);

	if (c)
		c->retransmits += 1;
	return 0;
}

SEC("raw_tp/tcp_send_reset")
int tcp_send_reset(struct bpf_raw_tracepoint_args *ctx)
{
	const void *sk = (const void *)ctx->args[0], *skb = (const void *)ctx->args[1];
	struct tcp_counters *c;

	/* Without a socket (an answer to a segment for no connection): the namespace of the
	 * device the segment came in on. */
	if (sk) {
		c = counters_of_sk(sk);
	} else {
		const void *dev = skb ? read_ptr(skb, layout.skb_dev) : NULL;

		c = dev ? counters_of_net(read_ptr(dev, layout.dev_net)) : NULL;
	}
	if (c)
		c->resets_sent += 1;
	return 0;
}

SEC("raw_tp/tcp_receive_reset")
int tcp_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
	struct tcp_counters *c = counters_of_sk((const void *)ctx->args[0]);

	if (c)
		c->resets_received += 1;
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	const void *sk = (const void *)ctx->args[0];
	int oldstate = raw_tp_arg(ctx, layout.arg_oldstate);
	int newstate = raw_tp_arg(ctx, layout.arg_newstate);
	struct connecting *conn, fresh = {};
	__u64 key = (__u64)sk;
	struct tcp_counters *c;
	__u16 proto = 0;
	__u32 srtt = 0, *slot;

	/* The transitions counted: into SYN_SENT, out of SYN_SENT or ESTABLISHED. */
	if (!sk || (newstate != TCP_SYN_SENT_ && oldstate != TCP_SYN_SENT_ &&
		    oldstate != TCP_ESTABLISHED_))
		return 0;
	if (oldstate == TCP_SYN_SENT_) {
		/* Only watched sockets were recorded: nothing to read of the others. */
		conn = bpf_map_lookup_elem(&weir_tcp_connecting, &key);
		if (!conn)
			return 0;
		c = bpf_map_lookup_elem(&weir_tcp_counters, &conn->slot);
		if (c && newstate == TCP_ESTABLISHED_) {
			c->connects += 1;
			c->connect_ns += bpf_ktime_get_boot_ns() - conn->since;
		} else if (c && newstate == TCP_CLOSE_) {
			c->connect_failures += 1;
		}
		bpf_map_delete_elem(&weir_tcp_connecting, &key);
		return 0;
	}
	bpf_probe_read_kernel(&proto, sizeof(proto), sk + layout.sk_protocol);
	if (proto != IPPROTO_TCP_)
		return 0;
	slot = slot_of_net(read_ptr(sk, layout.sk_net));
	if (!slot)
		return 0;
	if (newstate == TCP_SYN_SENT_) {
		fresh.since = bpf_ktime_get_boot_ns();
		fresh.slot = *slot;
		bpf_map_update_elem(&weir_tcp_connecting, &key, &fresh, BPF_ANY);
		return 0;
	}
	/* Leaving ESTABLISHED: the connection's smoothed RTT. */
	c = bpf_map_lookup_elem(&weir_tcp_counters, slot);
	bpf_probe_read_kernel(&srtt, sizeof(srtt), sk + layout.srtt_us);
	if (c && srtt) {
		c->rtt_us += srtt >> 3;
		c->rtt_samples += 1;
	}
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
