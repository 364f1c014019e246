/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The XDP prefilter (`weir prefilter`): source prefixes whose packets a node's devices drop
 * before anything else runs, before an skb exists (DDoS deny lists). One LPM trie for both
 * families (keyed as the ipcache) gives each prefix a counter slot; the counters are per CPU.
 */
#ifndef WEIR_PREFILTER_H
#define WEIR_PREFILTER_H

#include "common.h"

#define PREFILTER_MAX 16384

/* Source prefix -> its counter slot in weir_prefilter_stats. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, __u32);
	__uint(max_entries, PREFILTER_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_prefilter SEC(".maps");

/* Packets and bytes dropped per prefix (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, PREFILTER_MAX);
} weir_prefilter_stats SEC(".maps");

/* XDP_DROP when the packet's source is in the deny list, else XDP_PASS. */
static __always_inline int prefilter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipcache_key k = {};
	struct metrics_value *m;
	__u32 *slot;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip4 = (void *)(eth + 1);

		if ((void *)(ip4 + 1) > end)
			return XDP_PASS;
		k.prefixlen = 32 + 32;
		k.family = WEIR_AF_INET;
		k.addr[0] = ip4->saddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return XDP_PASS;
		k.prefixlen = 32 + 128;
		k.family = WEIR_AF_INET6;
		__builtin_memcpy(k.addr, &ip6->saddr, sizeof(k.addr));
	} else {
		return XDP_PASS;
	}
	slot = bpf_map_lookup_elem(&weir_prefilter, &k);
	if (!slot)
		return XDP_PASS;
	m = bpf_map_lookup_elem(&weir_prefilter_stats, slot);
	if (m) {
		m->packets += 1;
		m->bytes += end - data;
	}
	return XDP_DROP;
}

#endif
