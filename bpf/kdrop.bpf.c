// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Kernel drops: packets the kernel frees with a drop reason outside weir's programs
 * (netfilter, routing, neighbours, sockets, TCP, full queues), from the skb:kfree_skb
 * tracepoint, attached as a raw tracepoint (by name: no tracefs needed). The tracepoint's
 * arguments, the structures read through them and the reason values change between kernels:
 * the loader resolves all of them from the running kernel's BTF into `layout` (see
 * weir/api/kdrop.h). Each drop in a watched network namespace (weir_kdrop_netns: the node's,
 * and each local pod's, where socket and TCP drops happen) is counted per reason
 * (authoritative), and sent as an event with its addresses; what a full ring buffer refuses
 * is counted per reason too.
 * Minimum kernel: 5.17 (drop reasons).
 */
#include "lib/common.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include "weir/api/kdrop.h"

const volatile struct kdrop_layout layout = {};

/* The network namespaces watched (inode number -> 1), kept by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDROP_NETNS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} weir_kdrop_netns SEC(".maps");

/* Drops per reason (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} weir_kdrops SEC(".maps");

/* Events the full ring buffer refused, per reason (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} weir_kdrops_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} weir_kdrop_events SEC(".maps");

static __always_inline void bump(void *map, __u32 reason)
{
	__u64 one = 1, *c = bpf_map_lookup_elem(map, &reason);

	if (c) {
		*c += 1;
		return;
	}
	if (bpf_map_update_elem(map, &reason, &one, BPF_NOEXIST) == 0)
		return;
	c = bpf_map_lookup_elem(map, &reason);
	if (c)
		*c += 1;
}

/* The network namespace's inode number of `skb` (its device's, else its socket's), or 0. */
static __always_inline __u32 skb_netns(const void *skb)
{
	void *dev = read_ptr(skb, layout.skb_dev), *net = NULL;
	__u32 inum = 0;

	if (dev) {
		net = read_ptr(dev, layout.dev_net);
	} else {
		void *sk = read_ptr(skb, layout.skb_sk);

		if (sk)
			net = read_ptr(sk, layout.sk_net);
	}
	if (net)
		bpf_probe_read_kernel(&inum, sizeof(inum), net + layout.net_inum);
	return inum;
}

/* Addresses and ports of an IP packet (the headers the skb points at). */
static __always_inline void skb_addrs(const void *skb, struct kdrop_event *ev)
{
	unsigned char *head = read_ptr(skb, layout.skb_head);
	__u16 nh = 0, th = 0;
	__be16 proto = 0, ports[2] = {};

	bpf_probe_read_kernel(&nh, sizeof(nh), skb + layout.skb_network_header);
	bpf_probe_read_kernel(&th, sizeof(th), skb + layout.skb_transport_header);
	bpf_probe_read_kernel(&proto, sizeof(proto), skb + layout.skb_protocol);
	if (!head || nh == (__u16)~0U)
		return;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh) < 0 || ip.version != 4)
			return;
		ev->family = 4;
		ev->proto = ip.protocol;
		ev->saddr[0] = ip.saddr;
		ev->daddr[0] = ip.daddr;
		if (th == (__u16)~0U || th <= nh)
			th = nh + ip.ihl * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh) < 0 || ip6.version != 6)
			return;
		ev->family = 6;
		ev->proto = ip6.nexthdr;
		__builtin_memcpy(ev->saddr, &ip6.saddr, sizeof(ev->saddr));
		__builtin_memcpy(ev->daddr, &ip6.daddr, sizeof(ev->daddr));
		if (th == (__u16)~0U || th <= nh)
			th = nh + sizeof(ip6);
	} else {
		return;
	}
	if ((ev->proto == IPPROTO_TCP_ || ev->proto == IPPROTO_UDP_) &&
	    bpf_probe_read_kernel(ports, sizeof(ports), head + th) == 0) {
		ev->sport = ports[0];
		ev->dport = ports[1];
	}
}

SEC("raw_tp/kfree_skb")
int kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
	const void *skb = (const void *)ctx->args[0];
	__u32 i = layout.arg_reason, reason, inum;
	struct kdrop_event *ev;
	__u64 arg = 0;
	void *dev;

	if (i < 1 || i > 3)
		return 0;
	arg = raw_tp_arg(ctx, i);
	reason = arg;
	if (reason < layout.reason_min || !skb)
		return 0;
	inum = skb_netns(skb);
	if (!inum || !bpf_map_lookup_elem(&weir_kdrop_netns, &inum))
		return 0;
	bump(&weir_kdrops, reason);
	ev = bpf_ringbuf_reserve(&weir_kdrop_events, sizeof(*ev), 0);
	if (!ev) {
		bump(&weir_kdrops_lost, reason);
		return 0;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts = bpf_ktime_get_boot_ns();
	ev->location = ctx->args[1];
	ev->reason = reason;
	ev->netns = inum;
	dev = read_ptr(skb, layout.skb_dev);
	if (dev)
		bpf_probe_read_kernel(&ev->ifindex, sizeof(ev->ifindex), dev + layout.dev_ifindex);
	skb_addrs(skb, ev);
	/* The agent drains the ring on a timer: woken at each quarter of it that waits. */
	bpf_ringbuf_submit(ev, ringbuf_lazy_wakeup(&weir_kdrop_events, 64 << 10, sizeof(*ev)));
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
