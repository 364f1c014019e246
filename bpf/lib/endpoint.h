/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The node's local pods (the endpoint map, written by the agent from the network plugin's
 * endpoint records) and the per-reason packet counters every tc program updates.
 */
#ifndef WEIR_LIB_ENDPOINT_H
#define WEIR_LIB_ENDPOINT_H

#include "pkt.h"
#include "weir/api/datapath.h"

#define ENDPOINT_MAP_SIZE 65536

/* Local pods, written by the agent from the CNI's endpoint records. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ENDPOINT_MAP_SIZE);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_endpoints SEC(".maps");

/* Packets and bytes per (direction, reason). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_METRICS_SIZE);
	__type(key, __u32);
	__type(value, struct metrics_value);
} weir_metrics SEC(".maps");

/* Drops other than policy's, one event each (struct drop_event). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} weir_drop_events SEC(".maps");

/* Drop events the full weir_drop_events refused, per reason (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_METRICS_STRIDE);
	__type(key, __u32);
	__type(value, __u64);
} weir_drop_lost SEC(".maps");

/* Keeps enum weir_reason in the object's BTF, so that Rust takes the reason names from it. */
const volatile enum weir_reason weir_reason_btf = REASON_MAX;

/*
 * Reports a packet dropped under `reason` (its addresses and ports from the headers as they
 * are now) into weir_drop_events, or counts it in weir_drop_lost when the ring is full.
 * Not inlined: count() is everywhere.
 */
static __noinline int drop_event(struct __sk_buff *skb, __u32 dir, __u32 reason)
{
	struct drop_event *ev = bpf_ringbuf_reserve(&weir_drop_events, sizeof(*ev), 0);
	__u32 l4 = 0, key = reason % WEIR_METRICS_STRIDE;
	__be16 ports[2];

	if (!ev) {
		__u64 *n = bpf_map_lookup_elem(&weir_drop_lost, &key);

		if (n)
			*n += 1;
		return 0;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts = bpf_ktime_get_boot_ns();
	ev->reason = reason;
	ev->dir = dir;
	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) == 0 && ip.version == 4) {
			ev->family = WEIR_AF_INET;
			ev->proto = ip.protocol;
			ev->saddr[0] = ip.saddr;
			ev->daddr[0] = ip.daddr;
			if (!(ip.frag_off & bpf_htons(0x1fff)))
				l4 = ETH_HLEN + ip.ihl * 4;
		}
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) == 0) {
			ev->family = WEIR_AF_INET6;
			ev->proto = ip6.nexthdr;
			__builtin_memcpy(ev->saddr, &ip6.saddr, sizeof(ev->saddr));
			__builtin_memcpy(ev->daddr, &ip6.daddr, sizeof(ev->daddr));
			l4 = ETH_HLEN + sizeof(ip6);
		}
	}
	if (l4 && (ev->proto == IPPROTO_TCP_ || ev->proto == IPPROTO_UDP_) &&
	    bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) == 0) {
		ev->sport = ports[0];
		ev->dport = ports[1];
	}
	/* The agent drains the ring on a timer: woken at each quarter of it that waits. */
	bpf_ringbuf_submit(ev, ringbuf_lazy_wakeup(&weir_drop_events, 256 << 10, sizeof(*ev)));
	return 0;
}

/* Forwarding summaries (trace.h). */
static __noinline int trace_skb(struct __sk_buff *skb, __u32 dir, __u32 reason, bool xlate);

/* A `weir explain` packet: observe, change nothing. */
static __always_inline bool explaining(const struct __sk_buff *skb)
{
	return skb->mark == WEIR_MARK_EXPLAIN;
}

/*
 * Counts the packet under `reason` and returns `verdict`, so a program ends in one line. A
 * drop for a reason other than policy (whose drops are reported as verdicts) is reported
 * as an event; what goes on is summarized per flow (trace.h), its translation looked for
 * only when `xlate` (false: the caller knows the packet was not translated).
 */
static __always_inline int count_fwd(struct __sk_buff *skb, __u32 dir, __u32 reason,
				     int verdict, bool xlate)
{
	__u32 idx = dir * WEIR_METRICS_STRIDE + reason;
	struct metrics_value *m;

	if (explaining(skb)) {
		skb->cb[0] = reason + 1;
		return verdict;
	}
	m = bpf_map_lookup_elem(&weir_metrics, &idx);

	if (m) {
		m->packets += 1;
		m->bytes += skb->len;
	}
	if (verdict == TC_ACT_SHOT && reason >= DROP_INVALID_PACKET &&
	    reason != DROP_POLICY_DENIED && reason != DROP_POLICY_FAILED)
		drop_event(skb, dir, reason);
	else if (verdict != TC_ACT_SHOT && reason < REASON_POLICY_ALLOWED)
		trace_skb(skb, dir, reason, xlate);
	return verdict;
}

/* count_fwd for a packet that may have been translated. */
static __always_inline int count(struct __sk_buff *skb, __u32 dir, __u32 reason, int verdict)
{
	return count_fwd(skb, dir, reason, verdict, true);
}

static __always_inline const struct endpoint_info *endpoint4(__be32 addr)
{
	struct endpoint_key k = { .addr = { addr }, .family = WEIR_AF_INET };

	return bpf_map_lookup_elem(&weir_endpoints, &k);
}

static __always_inline const struct endpoint_info *endpoint6(const struct in6_addr *addr)
{
	struct endpoint_key k = { .family = WEIR_AF_INET6 };

	__builtin_memcpy(k.addr, addr, sizeof(k.addr));
	return bpf_map_lookup_elem(&weir_endpoints, &k);
}

#endif /* WEIR_LIB_ENDPOINT_H */
