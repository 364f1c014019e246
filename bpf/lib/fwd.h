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

#include "endpoint.h"
#include "masq.h"
#include "nodeport.h"
#include "nodeport6.h"
#include "policy.h"
#include "tunnel.h"
#include "trace.h"

/*
 * Hands the packet to a local pod: the L2 header its host-side veth would have written, then
 * bpf_redirect_peer into the pod's namespace (no backlog queue, no host stack). The TTL was
 * decremented by the caller.
 */
static __always_inline int fwd_to_endpoint(struct __sk_buff *skb, __u32 dir,
					   const struct endpoint_info *ep, bool xlate)
{
	if (pkt_set_macs(skb, ep->mac, ep->node_mac) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	return count_fwd(skb, dir, REASON_FORWARD_PEER, bpf_redirect_peer(ep->ifindex, 0), xlate);
}

/*
 * Sends the packet out of the device a successful FIB lookup named: with the resolved
 * neighbour's address, or through bpf_redirect_neigh while it is unresolved (the lookup left
 * the next hop, gateway or destination, in the address fields).
 */
static __always_inline int fwd_fib(struct __sk_buff *skb, __u32 dir, struct bpf_fib_lookup *p,
				   long rc, bool xlate)
{
	struct bpf_redir_neigh nh = {};

	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (pkt_set_macs(skb, p->dmac, p->smac) < 0)
			return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
		return count_fwd(skb, dir, REASON_FORWARD_FIB, bpf_redirect(p->ifindex, 0), xlate);
	}
	nh.nh_family = p->family;
	if (p->family == AF_INET_)
		nh.ipv4_nh = p->ipv4_dst;
	else
		__builtin_memcpy(nh.ipv6_nh, p->ipv6_dst, sizeof(nh.ipv6_nh));
	return count_fwd(skb, dir, REASON_FORWARD_NEIGH,
			 bpf_redirect_neigh(p->ifindex, &nh, sizeof(nh), 0), xlate);
}

/* Whether a FIB answer lets the packet be forwarded here; otherwise the stack decides. */
static __always_inline bool fib_forwardable(long rc)
{
	return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;
}

/*
 * Reads the ports (and TCP flags) of an IPv4 TCP/UDP packet, or the identifier of an ICMP
 * echo request or reply, without IP options or fragmentation into `t`. Returns 0, or -1 when
 * the packet is not one conntrack tracks (ICMP errors are matched by the packet they quote).
 */
static __always_inline int pkt_ip4_tuple(struct __sk_buff *skb, const struct iphdr *ip4,
					 struct ct4_key *t, __u8 *tcp_flags)
{
	__be16 ports[2];
	__u8 icmp[2];

	if (ip4->ihl != 5 || (ip4->frag_off & bpf_htons(0x3fff)))
		return -1;
	if (ip4->protocol == IPPROTO_ICMP_) {
		/* Type, code, checksum, identifier. */
		if (bpf_skb_load_bytes(skb, L4_OFF, icmp, sizeof(icmp)) < 0 || icmp[1] != 0 ||
		    (icmp[0] != ICMP_ECHO_ && icmp[0] != ICMP_ECHOREPLY_))
			return -1;
		if (bpf_skb_load_bytes(skb, ICMP_ID_OFF, &ports[0], sizeof(ports[0])) < 0)
			return -1;
		ports[1] = 0;
		if (icmp[0] == ICMP_ECHOREPLY_) {
			ports[1] = ports[0];
			ports[0] = 0;
		}
	} else if (ip4->protocol == IPPROTO_TCP_ || ip4->protocol == IPPROTO_UDP_) {
		if (bpf_skb_load_bytes(skb, L4_OFF, ports, sizeof(ports)) < 0)
			return -1;
		if (ip4->protocol == IPPROTO_TCP_ &&
		    bpf_skb_load_bytes(skb, L4_OFF + 13, tcp_flags, 1) < 0)
			return -1;
	} else {
		return -1;
	}
	t->saddr = ip4->saddr;
	t->daddr = ip4->daddr;
	t->sport = ports[0];
	t->dport = ports[1];
	t->proto = ip4->protocol;
	return 0;
}

/*
 * Forwards an IPv4 packet arriving on `skb->ingress_ifindex`: load-balancing NAT first
 * (replies of tracked flows, NodePorts and external frontends), then to a local pod, or out of
 * the FIB's device. `from_pod` is true on a pod's veth (the FIB is used for every
 * destination), false on the node's device (only pods and translated flows are forwarded
 * here). Returns a tc verdict; TC_ACT_OK leaves the packet to the host stack.
 */
static __noinline int fwd_ip4(struct __sk_buff *skb, __u32 dir, bool from_pod)
{
	struct bpf_fib_lookup *p = NULL;
	__u32 zero = 0;
	const struct endpoint_info *ep;
	struct iphdr *ip4 = pkt_ip4(skb);
	struct ct4_key t = {}, frontend = {}, pt;
	const struct node_config *cfg;
	const struct tunnel_info *tun;
	__u8 tcp_flags = 0, tos, proto;
	bool tracked = false, dsr = false;
	__u32 pflags;
	__u16 tot_len;
	long rc = 0;
	int nat = 0;
	__u8 ttl;

	if (!ip4)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	if (ip4->ihl < 5 || ip4->version != 4)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	ttl = ip4->ttl;
	tos = ip4->tos;
	proto = ip4->protocol;
	tot_len = bpf_ntohs(ip4->tot_len);
	if (ip4_is_local_scope(ip4->daddr))
		return count(skb, dir, REASON_PASS_NOT_IP, TC_ACT_OK);
	if (!from_pod && proto == IPPROTO_IPIP_ && ip4->ihl == 5 && node_addr4(ip4->daddr)) {
		/* DSR from another node: the frontend is in the outer header. */
		nat = dsr4_decap(skb, ip4->saddr, ip4->id);
		if (nat < 0)
			return count(skb, dir, -nat, TC_ACT_SHOT);
		if (nat > 0) {
			ip4 = pkt_ip4(skb);
			if (!ip4)
				return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
			ttl = ip4->ttl;
			tos = ip4->tos;
			proto = ip4->protocol;
			tot_len = bpf_ntohs(ip4->tot_len);
			nat = NAT_NONE;
			dsr = true; /* its reply entry names the frontend: a translation */
		}
	}
	if (ttl <= 1)
		return count(skb, dir, REASON_PASS_TTL, TC_ACT_OK);
	if (pkt_ip4_tuple(skb, ip4, &t, &tcp_flags) == 0) {
		tracked = true;
		frontend = t;
		nat = lb4_nat(skb, &t, tcp_flags, skb->len, from_pod);
		if (nat < 0)
			return count(skb, dir, -nat, TC_ACT_SHOT);
	} else {
		t.saddr = ip4->saddr;
		t.daddr = ip4->daddr;
		if (proto == IPPROTO_ICMP_ && ip4->ihl == 5 &&
		    !(ip4->frag_off & bpf_htons(0x3fff))) {
			nat = icmp4_error_nat(skb, &t);
			if (nat < 0)
				return count(skb, dir, -nat, TC_ACT_SHOT);
		}
	}
	ep = endpoint4(t.daddr);
	if (from_pod || ep) {
		/* NetworkPolicy, on the real addresses: the backend a Service's DNAT chose, the
		 * client before any SNAT (a reply: before its reverse DNAT, after reverse SNAT). A
		 * pod delivered through the host stack is judged in to_pod. */
		pt = t;
		pflags = tcp_flags;
		if (!tracked) {
			ip4 = pkt_ip4(skb);
			if (!ip4)
				return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
			pflags = policy4_other_tuple(skb, ip4, &pt);
		} else if (nat) {
			pt.saddr = frontend.saddr;
			pt.sport = frontend.sport;
		}
		rc = policy4(skb, &pt, pflags, from_pod ? skb->ingress_ifindex : 0,
			     policy_dst_ifindex(ep));
		if (rc < 0)
			return count(skb, dir, -rc, TC_ACT_SHOT);
		rc = 0;
	}
	if (!ep && !from_pod && !nat)
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (ep && (ep->flags & WEIR_EP_HOST_STACK))
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (ep && !from_pod && nat == NAT_NONE && t.proto && masq_mode() &&
	    masq4_outside(t.saddr)) {
		/* From outside the cluster, straight to a pod: its answers are not masqueraded. */
		nat = masq4_inbound(skb, &t, skb->len);
		if (nat < 0)
			return count(skb, dir, -nat, TC_ACT_SHOT);
	}
	if (!ep && nat != NAT_DSR && (cfg = tunnel_mode()) && (tun = tunnel4(t.daddr))) {
		/* Another node's pod, in VXLAN mode. */
		if (pkt_ip4_dec_ttl(skb, ttl) < 0)
			return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
		return fwd_tunnel(skb, dir, cfg, tun->node);
	}
	if (!ep) {
		/* Only forwarding through the FIB needs the query (not a local pod). */
		p = bpf_map_lookup_elem(&weir_fib_scratch, &zero);
		if (!p)
			return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
		__builtin_memset(p, 0, sizeof(*p));
		p->family = AF_INET_;
		p->tos = tos;
		p->l4_protocol = proto;
		/* A DSR packet grows by the outer header: the MTU check must count it. */
		p->tot_len = tot_len + (nat == NAT_DSR ? sizeof(struct iphdr) : 0);
		p->ipv4_src = t.saddr;
		p->ipv4_dst = t.daddr;
		p->ifindex = skb->ingress_ifindex;
		/* Ask first, rewrite after: a packet left to the stack keeps its TTL. */
		rc = bpf_fib_lookup(skb, p, sizeof(*p), 0);
		if (!fib_forwardable(rc)) {
			/* A translated packet must not reach the stack half-done (no reverse NAT
			 * would meet its reply): fail closed. */
			if (nat)
				return count(skb, dir, DROP_NO_ROUTE, TC_ACT_SHOT);
			return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
		}
		/* A flow a pod opens to a destination outside the cluster: masquerade. */
		if (from_pod && nat == NAT_NONE && t.proto && (cfg = masq_mode()) &&
		    masq4_outside(t.daddr) && masq4_opens(&t, tcp_flags)) {
			nat = masq4_new(skb, cfg, &t, tcp_flags, skb->len);
			if (nat < 0)
				return count(skb, dir, -nat, TC_ACT_SHOT);
		}
	}
	if (pkt_ip4_dec_ttl(skb, ttl) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	/* Neither translated here nor DSR: the summary need not look for a translation. */
	if (ep)
		return fwd_to_endpoint(skb, dir, ep, nat != NAT_NONE || dsr);
	/* DSR: to the backend's node (the FIB's next hop), the frontend in the outer header. */
	if (nat == NAT_DSR && dsr4_encap(skb, frontend.daddr, frontend.dport, p->ipv4_dst) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	return fwd_fib(skb, dir, p, rc, nat != NAT_NONE || dsr);
}

/* IPv6 counterpart of fwd_ip4 (load-balancing NAT: nodeport6.h). */
static __noinline int fwd_ip6(struct __sk_buff *skb, __u32 dir, bool from_pod)
{
	const struct endpoint_info *ep;
	struct ipv6hdr *ip6 = pkt_ip6(skb);
	struct bpf_fib_lookup *p = NULL;
	__u32 zero = 0;
	struct in6_addr saddr, daddr;
	const struct node_config *cfg;
	const struct tunnel_info *tun;
	struct ct6_key t = {};
	__be32 psaddr[4];
	__be16 psport = 0;
	__u8 tcp_flags = 0;
	bool tracked = false;
	__u32 pflags;
	long rc = 0;
	int nat = 0;
	__u8 hlim;

	if (!ip6 || ip6->version != 6)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	__builtin_memcpy(&daddr, &ip6->daddr, sizeof(daddr));
	__builtin_memcpy(&saddr, &ip6->saddr, sizeof(saddr));
	hlim = ip6->hop_limit;
	if (ip6_is_local_scope(&daddr))
		return count(skb, dir, REASON_PASS_NOT_IP, TC_ACT_OK);
	if (hlim > 1 && pkt_ip6_tuple(skb, ip6, &t, &tcp_flags) == 0) {
		tracked = true;
		__builtin_memcpy(psaddr, t.saddr, sizeof(psaddr));
		psport = t.sport;
		nat = lb6_nat(skb, &t, tcp_flags, skb->len, from_pod);
		if (nat < 0)
			return count(skb, dir, -nat, TC_ACT_SHOT);
		if (nat) {
			__builtin_memcpy(&saddr, t.saddr, sizeof(saddr));
			__builtin_memcpy(&daddr, t.daddr, sizeof(daddr));
			ip6 = pkt_ip6(skb); /* the rewrite invalidated packet pointers */
			if (!ip6)
				return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
		}
	}
	ep = endpoint6(&daddr);
	if (from_pod || ep) {
		/* NetworkPolicy on the real addresses, as for IPv4 (t is not needed after this). */
		pflags = tcp_flags;
		if (!tracked) {
			ip6 = pkt_ip6(skb);
			if (!ip6)
				return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
			pflags = policy6_other_tuple(skb, ip6, &t);
		} else if (nat) {
			__builtin_memcpy(t.saddr, psaddr, sizeof(t.saddr));
			t.sport = psport;
		}
		if (pflags != POLICY_PASS) {
			rc = policy6(skb, &t, pflags, from_pod ? skb->ingress_ifindex : 0,
				     policy_dst_ifindex(ep));
			if (rc < 0)
				return count(skb, dir, -rc, TC_ACT_SHOT);
			rc = 0;
		}
	}
	if (!ep && !from_pod && !nat)
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (ep && (ep->flags & WEIR_EP_HOST_STACK))
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (hlim <= 1)
		return count(skb, dir, REASON_PASS_TTL, TC_ACT_OK);
	if (!ep && (cfg = tunnel_mode()) && (tun = tunnel6(&daddr))) {
		if (pkt_ip6_dec_hlim(skb, hlim) < 0)
			return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
		return fwd_tunnel(skb, dir, cfg, tun->node);
	}
	if (!ep) {
		/* Only forwarding through the FIB needs the query (not a local pod). */
		p = bpf_map_lookup_elem(&weir_fib_scratch, &zero);
		if (!p)
			return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
		__builtin_memset(p, 0, sizeof(*p));
		p->family = AF_INET6_;
		p->flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
		p->l4_protocol = ip6->nexthdr;
		p->tot_len = bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr);
		__builtin_memcpy(p->ipv6_src, &saddr, sizeof(p->ipv6_src));
		__builtin_memcpy(p->ipv6_dst, &daddr, sizeof(p->ipv6_dst));
		p->ifindex = skb->ingress_ifindex;
		rc = bpf_fib_lookup(skb, p, sizeof(*p), 0);
		if (!fib_forwardable(rc)) {
			if (nat) /* fail closed, as for IPv4 */
				return count(skb, dir, DROP_NO_ROUTE, TC_ACT_SHOT);
			return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
		}
	}
	if (pkt_ip6_dec_hlim(skb, hlim) < 0)
		return count(skb, dir, DROP_HEADER_WRITE, TC_ACT_SHOT);
	if (ep)
		return fwd_to_endpoint(skb, dir, ep, nat != NAT_NONE);
	return fwd_fib(skb, dir, p, rc, nat != NAT_NONE);
}

/*
 * NetworkPolicy for what the host stack delivers to the pod on `skb->ifindex` (from the node
 * itself, from VXLAN, or what from_pod/from_netdev left to the stack). Returns 0, or -DROP_*.
 */
static __always_inline int policy_to_pod(struct __sk_buff *skb)
{
	__be16 proto = pkt_proto(skb);
	__u8 tcp_flags = 0;
	__u32 flags;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip4 = pkt_ip4(skb);
		struct ct4_key t = {};

		if (!ip4 || ip4->version != 4 || ip4_is_local_scope(ip4->daddr))
			return 0;
		if (pkt_ip4_tuple(skb, ip4, &t, &tcp_flags) == 0)
			flags = tcp_flags;
		else
			flags = policy4_other_tuple(skb, ip4, &t);
		return policy4(skb, &t, flags, 0, skb->ifindex);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = pkt_ip6(skb);
		struct ct6_key t = {};

		if (!ip6 || ip6->version != 6 || ip6_is_local_scope(&ip6->daddr))
			return 0;
		if (pkt_ip6_tuple(skb, ip6, &t, &tcp_flags) == 0)
			flags = tcp_flags;
		else
			flags = policy6_other_tuple(skb, ip6, &t);
		if (flags == POLICY_PASS)
			return 0;
		return policy6(skb, &t, flags, 0, skb->ifindex);
	}
	return 0;
}

/* Forwards an IP packet, or leaves anything else to the stack. */
/* Whether the programs stay on only for DSR flows a switch to netfilter left (drain). */
static __always_inline bool drain_mode(void)
{
	__u32 zero = 0;
	const struct node_config *cfg = bpf_map_lookup_elem(&weir_config, &zero);

	return cfg && (cfg->flags & WEIR_CFG_DRAIN);
}

/*
 * Drain (WEIR_CFG_DRAIN): after a switch to a netfilter dataplane, the DSR flows established
 * before it keep the programs, which netfilter cannot stand in for (it has no state for
 * them, their packets never passed it, and it cannot tunnel them). True for a packet of such
 * a flow: tunnelled to this node (the backend's), or with a live DSR entry (the frontend's
 * original one, the backend's reply one). Every other packet is the host stack's, untouched.
 * Not inlined: its stack is not added to the forwarding path's.
 */
static __noinline int drain_keeps(struct __sk_buff *skb, bool from_pod)
{
	struct ct4_key t = {};
	struct ct4_entry *e;
	struct iphdr *ip4;
	__u8 tcp_flags = 0;

	if (pkt_proto(skb) != bpf_htons(ETH_P_IP))
		return false;
	ip4 = pkt_ip4(skb);
	if (!ip4 || ip4->ihl < 5 || ip4->version != 4)
		return false;
	if (!from_pod && ip4->protocol == IPPROTO_IPIP_ && ip4->ihl == 5 &&
	    node_addr4(ip4->daddr))
		return true;
	if (pkt_ip4_tuple(skb, ip4, &t, &tcp_flags) < 0)
		return false;
	e = bpf_map_lookup_elem(&weir_ct4, &t);
	return e && (e->flags & CT_F_DSR) && !ct_expired(e);
}

static __always_inline int fwd(struct __sk_buff *skb, __u32 dir, bool from_pod)
{
	__be16 proto = pkt_proto(skb);

	if (drain_mode() && !drain_keeps(skb, from_pod))
		return count(skb, dir, REASON_PASS_STACK, TC_ACT_OK);
	if (proto == bpf_htons(ETH_P_IP))
		return fwd_ip4(skb, dir, from_pod);
	if (proto == bpf_htons(ETH_P_IPV6))
		return fwd_ip6(skb, dir, from_pod);
	if (proto == 0)
		return count(skb, dir, DROP_INVALID_PACKET, TC_ACT_SHOT);
	return count(skb, dir, REASON_PASS_NOT_IP, TC_ACT_OK);
}

#endif /* WEIR_LIB_FWD_H */
