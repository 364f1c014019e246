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

/* Keeps enum weir_reason in the object's BTF, so that Rust takes the reason names from it. */
const volatile enum weir_reason weir_reason_btf = REASON_MAX;

/* Counts the packet under `reason` and returns `verdict`, so a program ends in one line. */
/* A `weir explain` packet: observe, change nothing. */
static __always_inline bool explaining(const struct __sk_buff *skb)
{
	return skb->mark == WEIR_MARK_EXPLAIN;
}

static __always_inline int count(struct __sk_buff *skb, __u32 dir, __u32 reason, int verdict)
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
	return verdict;
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
