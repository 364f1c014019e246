/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * VXLAN mode: other nodes' pods are reached through a collect-metadata VXLAN device, the
 * tunnel's far end set per packet from the pod CIDR's owner (weir_tunnel4/6, written by the
 * agent from the Node objects). The receiving node's VXLAN device hands the inner packet to
 * from_netdev, which delivers it to the pod.
 */
#ifndef WEIR_LIB_TUNNEL_H
#define WEIR_LIB_TUNNEL_H

#include "endpoint.h"
#include "nodeport.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct tunnel_key4);
	__type(value, struct tunnel_info);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_tunnel4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct tunnel_key6);
	__type(value, struct tunnel_info);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_tunnel6 SEC(".maps");

/* The node config when VXLAN mode is on, else NULL. */
static __always_inline const struct node_config *tunnel_mode(void)
{
	__u32 zero = 0;
	const struct node_config *cfg = bpf_map_lookup_elem(&weir_config, &zero);

	if (!cfg || !(cfg->flags & WEIR_CFG_VXLAN) || !cfg->tunnel_ifindex)
		return NULL;
	return cfg;
}

static __always_inline const struct tunnel_info *tunnel4(__be32 daddr)
{
	struct tunnel_key4 k = { .prefixlen = 32, .addr = daddr };

	return bpf_map_lookup_elem(&weir_tunnel4, &k);
}

static __always_inline const struct tunnel_info *tunnel6(const struct in6_addr *daddr)
{
	struct tunnel_key6 k = { .prefixlen = 128 };

	__builtin_memcpy(k.addr, daddr, sizeof(k.addr));
	return bpf_map_lookup_elem(&weir_tunnel6, &k);
}

/*
 * Sends the packet (TTL already decremented) to `node` through the VXLAN device.
 * Returns a tc verdict.
 */
static __always_inline int fwd_tunnel(struct __sk_buff *skb, __u32 dir,
				      const struct node_config *cfg, __be32 node)
{
	struct bpf_tunnel_key key = {
		.remote_ipv4 = bpf_ntohl(node),
		.tunnel_id = WEIR_VXLAN_VNI,
		.tunnel_ttl = 64,
	};

	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	return count(skb, dir, REASON_FORWARD_TUNNEL, bpf_redirect(cfg->tunnel_ifindex, 0));
}

#endif /* WEIR_LIB_TUNNEL_H */
