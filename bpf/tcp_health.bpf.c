// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TCP health per pod, from tracepoints (raw, attached by name): retransmits
 * (tcp_retransmit_skb), resets sent and received (tcp_send_reset, tcp_receive_reset),
 * connects, failed connects, connect time and smoothed RTT (inet_sock_set_state). Counters
 * are kept per watched network namespace (the node's and each local pod's: weir_tcp_netns,
 * kept by the agent); sockets elsewhere are ignored. A watched namespace's client sockets
 * (those that connected) are counted per peer too (weir_tcp_peers: the address and port they
 * connected to), from their SYN_SENT until they leave ESTABLISHED. The argument positions and structure
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

/* A watched client socket: when it entered SYN_SENT (0 once established), and its peer. */
struct client {
	__u64 since; /* boot clock, ns */
	struct tcp_peer_key peer;
};

/* Client sockets of watched namespaces, from SYN_SENT until they leave ESTABLISHED. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_COMMON_LRU); /* no lock shared by every CPU */
	__type(key, __u64);
	__type(value, struct client);
} weir_tcp_clients SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, TCP_HEALTH_PEERS);
	__type(key, struct tcp_peer_key);
	__type(value, struct tcp_counters);
} weir_tcp_peers SEC(".maps");

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

/* The counters of a client socket's peer (made on first use), or NULL. */
static __always_inline struct tcp_counters *counters_of_peer(const struct tcp_peer_key *peer)
{
	struct tcp_counters *c = bpf_map_lookup_elem(&weir_tcp_peers, peer), zero = {};

	if (c)
		return c;
	bpf_map_update_elem(&weir_tcp_peers, peer, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&weir_tcp_peers, peer);
}

/*
 * The counters of socket `sk`'s namespace (NULL: not watched), and in `*peer` those of its
 * peer when it is a watched client socket (whose record names its slot: nothing of the
 * socket is read then).
 */
static __always_inline struct tcp_counters *counters_and_peer(const void *sk,
							      struct tcp_counters **peer)
{
	__u64 key = (__u64)sk;
	struct client *cl = bpf_map_lookup_elem(&weir_tcp_clients, &key);

	*peer = NULL;
	if (!cl)
		return counters_of_sk(sk);
	*peer = counters_of_peer(&cl->peer);
	return bpf_map_lookup_elem(&weir_tcp_counters, &cl->peer.slot);
}

/* Fills `peer` with the address and port socket `sk` connects to. */
static __always_inline void peer_of(const void *sk, struct tcp_peer_key *peer)
{
	__u16 family = 0;

	bpf_probe_read_kernel(&family, sizeof(family), sk + layout.sk_family);
	bpf_probe_read_kernel(&peer->port, sizeof(peer->port), sk + layout.sk_dport);
	peer->family = family;
	if (family == 10 /* AF_INET6 */)
		bpf_probe_read_kernel(peer->addr, sizeof(peer->addr), sk + layout.sk_v6_daddr);
	else
		bpf_probe_read_kernel(peer->addr, sizeof(peer->addr[0]), sk + layout.sk_daddr);
}

SEC("raw_tp/tcp_retransmit_skb")
int tcp_retransmit(struct bpf_raw_tracepoint_args *ctx)
{
	const void *sk = (const void *)ctx->args[0];
	struct tcp_counters *p, *c = sk ? counters_and_peer(sk, &p) : NULL;

	if (c)
		c->retransmits += 1;
	if (c && p)
		p->retransmits += 1;
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
		struct tcp_counters *p;

		c = counters_and_peer(sk, &p);
		if (c && p)
			p->resets_sent += 1;
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
	const void *sk = (const void *)ctx->args[0];
	struct tcp_counters *p, *c = sk ? counters_and_peer(sk, &p) : NULL;

	if (c)
		c->resets_received += 1;
	if (c && p)
		p->resets_received += 1;
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	const void *sk = (const void *)ctx->args[0];
	int oldstate = raw_tp_arg(ctx, layout.arg_oldstate);
	int newstate = raw_tp_arg(ctx, layout.arg_newstate);
	struct tcp_counters *c, *p = NULL;
	struct client *cl, fresh = {};
	__u64 key = (__u64)sk;
	__u16 proto = 0;
	__u32 srtt = 0, *slot;

	/* The transitions counted: into SYN_SENT, out of SYN_SENT or ESTABLISHED. */
	if (!sk || (newstate != TCP_SYN_SENT_ && oldstate != TCP_SYN_SENT_ &&
		    oldstate != TCP_ESTABLISHED_))
		return 0;
	if (oldstate == TCP_SYN_SENT_) {
		/* Only watched sockets were recorded: nothing to read of the others. */
		cl = bpf_map_lookup_elem(&weir_tcp_clients, &key);
		if (!cl)
			return 0;
		c = bpf_map_lookup_elem(&weir_tcp_counters, &cl->peer.slot);
		p = counters_of_peer(&cl->peer);
		if (newstate == TCP_ESTABLISHED_) {
			__u64 took = bpf_ktime_get_boot_ns() - cl->since;

			if (c) {
				c->connects += 1;
				c->connect_ns += took;
			}
			if (p) {
				p->connects += 1;
				p->connect_ns += took;
			}
			cl->since = 0; /* watched on until it leaves ESTABLISHED */
			return 0;
		}
		if (newstate == TCP_CLOSE_) {
			if (c)
				c->connect_failures += 1;
			if (p)
				p->connect_failures += 1;
		}
		bpf_map_delete_elem(&weir_tcp_clients, &key);
		return 0;
	}
	/* Leaving ESTABLISHED, a watched client socket: its record names the slot. */
	cl = newstate == TCP_SYN_SENT_ ? NULL : bpf_map_lookup_elem(&weir_tcp_clients, &key);
	if (cl) {
		c = bpf_map_lookup_elem(&weir_tcp_counters, &cl->peer.slot);
		p = counters_of_peer(&cl->peer);
	} else {
		bpf_probe_read_kernel(&proto, sizeof(proto), sk + layout.sk_protocol);
		if (proto != IPPROTO_TCP_)
			return 0;
		slot = slot_of_net(read_ptr(sk, layout.sk_net));
		if (!slot)
			return 0;
		if (newstate == TCP_SYN_SENT_) {
			fresh.since = bpf_ktime_get_boot_ns();
			fresh.peer.slot = *slot;
			peer_of(sk, &fresh.peer);
			bpf_map_update_elem(&weir_tcp_clients, &key, &fresh, BPF_ANY);
			return 0;
		}
		c = bpf_map_lookup_elem(&weir_tcp_counters, slot);
	}
	/* Leaving ESTABLISHED: the connection's smoothed RTT (for its peer too, when it is a
	 * client socket, which is watched no longer). */
	bpf_probe_read_kernel(&srtt, sizeof(srtt), sk + layout.srtt_us);
	if (c && srtt) {
		c->rtt_us += srtt >> 3;
		c->rtt_samples += 1;
	}
	if (p && srtt) {
		p->rtt_us += srtt >> 3;
		p->rtt_samples += 1;
	}
	if (cl)
		bpf_map_delete_elem(&weir_tcp_clients, &key);
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
