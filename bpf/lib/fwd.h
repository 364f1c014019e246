/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Forwarding without the host stack: local pods are reached with bpf_redirect_peer (straight
 * into the pod's namespace), everything else the node routes goes out of the device the FIB
 * names (bpf_redirect, or bpf_redirect_neigh while the neighbour is unresolved). Packets for
 * the node itself, and whatever the FIB will not forward, go to the host stack, which also
 * answers with the ICMP errors a router owes.
 */
#ifndef WEIR_LIB_FWD_H
#define WEIR_LIB_FWD_H

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
static __always_inline int count(struct __sk_buff *skb, __u32 dir, __u32 reason, int verdict)
{
	__u32 idx = dir * WEIR_METRICS_STRIDE + reason;
	struct metrics_value *m = bpf_map_lookup_elem(&weir_metrics, &idx);

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

/*
 * Hands the packet to a local pod: the L2 header its host-side veth would have written, then
 * bpf_redirect_peer into the pod's namespace (no backlog queue, no host stack). The TTL was
 * decremented by the caller.
 */
static __always_inline int fwd_to_endpoint(struct __sk_buff *skb, __u32 dir,
					   const struct endpoint_info *ep)
{
	if (pkt_set_macs(skb, ep->mac, ep->node_mac) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	return count(skb, dir, REASON_FORWARD_PEER, bpf_redirect_peer(ep->ifindex, 0));
}

/*
 * Sends the packet out of the device a successful FIB lookup named: with the resolved
 * neighbour's address, or through bpf_redirect_neigh while it is unresolved (the lookup left
 * the next hop, gateway or destination, in the address fields).
 */
static __always_inline int fwd_fib(struct __sk_buff *skb, __u32 dir, struct bpf_fib_lookup *p,
				   long rc)
{
	struct bpf_redir_neigh nh = {};

	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (pkt_set_macs(skb, p->dmac, p->smac) < 0)
			return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
		return count(skb, dir, REASON_FORWARD_FIB, bpf_redirect(p->ifindex, 0));
	}
	nh.nh_family = p->family;
	if (p->family == AF_INET_)
		nh.ipv4_nh = p->ipv4_dst;
	else
		__builtin_memcpy(nh.ipv6_nh, p->ipv6_dst, sizeof(nh.ipv6_nh));
	return count(skb, dir, REASON_FORWARD_NEIGH,
		     bpf_redirect_neigh(p->ifindex, &nh, sizeof(nh), 0));
}

/* Whether a FIB answer lets the packet be forwarded here; otherwise the stack decides. */
static __always_inline bool fib_forwardable(long rc)
{
	return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;
}

/*
 * Forwards an IPv4 packet arriving on `skb->ingress_ifindex`: to a local pod, or out of the
 * FIB's device. Returns a tc verdict; TC_ACT_OK leaves the packet to the host stack.
 */
static __always_inline int fwd_ip4(struct __sk_buff *skb, __u32 dir, bool use_fib)
{
	struct bpf_fib_lookup p = {};
	const struct endpoint_info *ep;
	struct iphdr *ip4 = pkt_ip4(skb);
	__be32 saddr, daddr;
	long rc = 0;
	__u8 ttl;

	if (!ip4)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	if (ip4->ihl < 5 || ip4->version != 4)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	daddr = ip4->daddr;
	saddr = ip4->saddr;
	ttl = ip4->ttl;
	if (ip4_is_local_scope(daddr))
		return count(skb, dir, REASON_PASS_NOT_IP, TC_ACT_OK);
	ep = endpoint4(daddr);
	if (!ep && !use_fib)
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (ep && (ep->flags & WEIR_EP_HOST_STACK))
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (ttl <= 1)
		return count(skb, dir, REASON_PASS_TTL, TC_ACT_OK);
	if (!ep) {
		p.family = AF_INET_;
		p.tos = ip4->tos;
		p.l4_protocol = ip4->protocol;
		p.tot_len = bpf_ntohs(ip4->tot_len);
		p.ipv4_src = saddr;
		p.ipv4_dst = daddr;
		p.ifindex = skb->ingress_ifindex;
		/* Ask first, rewrite after: a packet left to the stack must be untouched. */
		rc = bpf_fib_lookup(skb, &p, sizeof(p), 0);
		if (!fib_forwardable(rc))
			return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	}
	if (pkt_ip4_dec_ttl(skb, ttl) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	if (ep)
		return fwd_to_endpoint(skb, dir, ep);
	return fwd_fib(skb, dir, &p, rc);
}

/* IPv6 counterpart of fwd_ip4. */
static __always_inline int fwd_ip6(struct __sk_buff *skb, __u32 dir, bool use_fib)
{
	struct bpf_fib_lookup p = {};
	const struct endpoint_info *ep;
	struct ipv6hdr *ip6 = pkt_ip6(skb);
	struct in6_addr saddr, daddr;
	long rc = 0;
	__u8 hlim;

	if (!ip6 || ip6->version != 6)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	__builtin_memcpy(&daddr, &ip6->daddr, sizeof(daddr));
	__builtin_memcpy(&saddr, &ip6->saddr, sizeof(saddr));
	hlim = ip6->hop_limit;
	if (ip6_is_local_scope(&daddr))
		return count(skb, dir, REASON_PASS_NOT_IP, TC_ACT_OK);
	ep = endpoint6(&daddr);
	if (!ep && !use_fib)
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (ep && (ep->flags & WEIR_EP_HOST_STACK))
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (hlim <= 1)
		return count(skb, dir, REASON_PASS_TTL, TC_ACT_OK);
	if (!ep) {
		p.family = AF_INET6_;
		p.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
		p.l4_protocol = ip6->nexthdr;
		p.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr);
		__builtin_memcpy(p.ipv6_src, &saddr, sizeof(p.ipv6_src));
		__builtin_memcpy(p.ipv6_dst, &daddr, sizeof(p.ipv6_dst));
		p.ifindex = skb->ingress_ifindex;
		rc = bpf_fib_lookup(skb, &p, sizeof(p), 0);
		if (!fib_forwardable(rc))
			return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	}
	if (pkt_ip6_dec_hlim(skb, hlim) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	if (ep)
		return fwd_to_endpoint(skb, dir, ep);
	return fwd_fib(skb, dir, &p, rc);
}

/* Forwards an IP packet, or leaves anything else to the stack. */
static __always_inline int fwd(struct __sk_buff *skb, __u32 dir, bool use_fib)
{
	__be16 proto = pkt_proto(skb);

	if (proto == bpf_htons(ETH_P_IP))
		return fwd_ip4(skb, dir, use_fib);
	if (proto == bpf_htons(ETH_P_IPV6))
		return fwd_ip6(skb, dir, use_fib);
	if (proto == 0)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	return count(skb, dir, REASON_PASS_NOT_IP, TC_ACT_OK);
}

#endif /* WEIR_LIB_FWD_H */
