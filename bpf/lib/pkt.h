/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Packet access for tc programs: header parsing with bounds checks, and the rewrites a router
 * does when it forwards (L2 addresses, TTL / hop limit with the IPv4 checksum).
 */
#ifndef WEIR_LIB_PKT_H
#define WEIR_LIB_PKT_H

#include "common.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>

#define AF_INET_  2
#define AF_INET6_ 10

/* The IPv4 or IPv6 header after the Ethernet header, or NULL if the packet is too short. */
static __always_inline struct iphdr *pkt_ip4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip4 = data + sizeof(struct ethhdr);

	if ((void *)(ip4 + 1) > end)
		return NULL;
	return ip4;
}

static __always_inline struct ipv6hdr *pkt_ip6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);

	if ((void *)(ip6 + 1) > end)
		return NULL;
	return ip6;
}

/* The EtherType (network order), or 0 if the frame is too short. */
static __always_inline __be16 pkt_proto(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return 0;
	return eth->h_proto;
}

/* Writes the destination and source MAC addresses. Returns 0, or <0 on failure. */
static __always_inline int pkt_set_macs(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	if (bpf_skb_store_bytes(skb, 0, dst, ETH_ALEN, 0) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ETH_ALEN, src, ETH_ALEN, 0);
}

#define IP4_TTL_OFF   (sizeof(struct ethhdr) + __builtin_offsetof(struct iphdr, ttl))
#define IP4_CSUM_OFF  (sizeof(struct ethhdr) + __builtin_offsetof(struct iphdr, check))
#define IP6_HLIM_OFF  (sizeof(struct ethhdr) + __builtin_offsetof(struct ipv6hdr, hop_limit))

/*
 * Decrements the IPv4 TTL as a router does, fixing the header checksum incrementally.
 * Returns 0, or <0 on failure. Packet pointers are invalid afterwards.
 */
static __always_inline int pkt_ip4_dec_ttl(struct __sk_buff *skb, __u8 ttl)
{
	__u8 new_ttl = ttl - 1;

	/* TTL is the high byte of the 16-bit word it shares with the protocol. */
	if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, bpf_htons((__u16)ttl << 8),
				bpf_htons((__u16)new_ttl << 8), 2) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, IP4_TTL_OFF, &new_ttl, 1, 0);
}

/* Decrements the IPv6 hop limit (no checksum covers it). Returns 0, or <0 on failure. */
static __always_inline int pkt_ip6_dec_hlim(struct __sk_buff *skb, __u8 hlim)
{
	__u8 new_hlim = hlim - 1;

	return bpf_skb_store_bytes(skb, IP6_HLIM_OFF, &new_hlim, 1, 0);
}

/* True for addresses a router never forwards: IPv4 multicast and limited broadcast. */
static __always_inline bool ip4_is_local_scope(__be32 daddr)
{
	__u32 a = bpf_ntohl(daddr);

	return (a >> 28) == 0xe || a == 0xffffffff;
}

/* True for IPv6 link-local (fe80::/10) and multicast (ff00::/8) destinations. */
static __always_inline bool ip6_is_local_scope(const struct in6_addr *daddr)
{
	__u32 w = bpf_ntohl(daddr->in6_u.u6_addr32[0]);

	return (w >> 24) == 0xff || (w >> 22) == (0xfe80 >> 6);
}

#endif /* WEIR_LIB_PKT_H */
