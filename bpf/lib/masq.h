/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Masquerading (agent --masquerade, IPv4): a flow a pod opens to a destination outside every
 * node's pod CIDR leaves the node with the node's address and a source port (an ICMP echo: an
 * identifier) of the SNAT range, as iptables' MASQUERADE and Cilium's BPF masquerading do.
 * Its conntrack entries are the load balancer's (CT_F_MASQ, no backend): the reply entry
 * brings answers back to the pod in from_netdev, ICMP errors about the flow included.
 *
 * Only a packet that opens a flow is masqueraded (a TCP SYN, a UDP datagram, an ICMP echo
 * request). A pod answering a client outside the cluster that reached it directly must keep
 * its own address: TCP answers carry no lone SYN, and UDP datagrams and echo requests that
 * arrive from outside leave a reply-direction entry (CT_F_REPLY | CT_F_MASQ, no translation)
 * that the pod's answers match first.
 */
#ifndef WEIR_LIB_MASQ_H
#define WEIR_LIB_MASQ_H

#include "nodeport.h"

/* Every node's pod CIDR (IPv4): destinations pods reach with their own address. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct tunnel_key4);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_nomasq4 SEC(".maps");

/* The node config when masquerading is on (with an address to masquerade to), else NULL. */
static __always_inline const struct node_config *masq_mode(void)
{
	__u32 zero = 0;
	const struct node_config *cfg = bpf_map_lookup_elem(&weir_config, &zero);

	if (!cfg || !(cfg->flags & WEIR_CFG_MASQUERADE) || !cfg->snat4)
		return NULL;
	return cfg;
}

/* Whether `addr` is outside the cluster's pod CIDRs and not this node's. */
static __always_inline bool masq4_outside(__be32 addr)
{
	struct tunnel_key4 k = { .prefixlen = 32, .addr = addr };

	return !bpf_map_lookup_elem(&weir_nomasq4, &k) && !node_addr4(addr);
}

/* Whether a packet of tuple `t` opens a flow (see above). */
static __always_inline bool masq4_opens(const struct ct4_key *t, __u8 tcp_flags)
{
	if (t->proto == IPPROTO_TCP_)
		return (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	if (t->proto == IPPROTO_ICMP_)
		return t->dport == 0; /* an echo request */
	return true;
}

/*
 * A new flow from a pod (tuple `t`, untranslated, bound outside the cluster): creates its
 * entries (original: the node's address and port as the new source; reply: the pod as the
 * new destination) and translates the packet and `t`. Returns NAT_DONE, or -reason.
 */
static __noinline int masq4_new(struct __sk_buff *skb, const struct node_config *cfg,
				     struct ct4_key *t, __u8 tcp_flags, __u32 len)
{
	__u16 state = ct_next_flags(0, t->proto, tcp_flags, false);
	struct ct4_entry fe = {}, re = {};
	struct ct4_key rk = {
		.saddr = t->daddr,
		.sport = t->dport,
		.daddr = cfg->snat4,
		.proto = t->proto,
	};

	fe.expires = ct_now() + ct_lifetime(state, t->proto);
	fe.flags = CT_F_MASQ | CT_F_SNAT | state;
	fe.packets = 1;
	fe.bytes = len;
	fe.nat_addr = t->daddr; /* the destination stays */
	fe.nat_port = t->dport;
	fe.snat_addr = cfg->snat4;
	re.expires = fe.expires;
	re.flags = CT_F_REPLY | CT_F_MASQ | CT_F_SNAT | state;
	re.nat_addr = t->daddr; /* the source of replies stays */
	re.nat_port = t->dport;
	re.snat_addr = t->saddr; /* the pod */
	re.snat_port = t->sport;
	if (explaining(skb)) {
		/* `weir explain`: the first port a new flow would try. */
		fe.snat_port = bpf_htons(cfg->snat_port_min);
		return nat4_apply_fwd(skb, t, &fe);
	}
	if (snat4_claim(&rk, &re, cfg) < 0)
		return -DROP_NAT_NO_PORT;
	fe.snat_port = rk.dport;
	if (bpf_map_update_elem(&weir_ct4, t, &fe, BPF_ANY) < 0) {
		bpf_map_delete_elem(&weir_ct4, &rk);
		return -DROP_CT_CREATE_FAILED;
	}
	return nat4_apply_fwd(skb, t, &fe);
}

/*
 * A UDP datagram or ICMP echo request from outside the cluster to a local pod (tuple `t`, not
 * translated): records (or refreshes) the flow's reply-direction entry, so that the pod's
 * answers are recognised as such and leave with the pod's address. Returns 0, or -reason.
 */
static __always_inline int masq4_inbound(struct __sk_buff *skb, const struct ct4_key *t,
					 __u32 len)
{
	struct ct4_entry *e, ne = {};
	struct ct4_key rk;

	if (explaining(skb) || (t->proto != IPPROTO_UDP_ && t->proto != IPPROTO_ICMP_))
		return 0;
	if (t->proto == IPPROTO_ICMP_ && t->dport != 0)
		return 0; /* an echo reply to a pod: its request was masqueraded */
	ct4_reverse(&rk, t);
	e = bpf_map_lookup_elem(&weir_ct4, &rk);
	if (e && !ct_expired(e)) {
		/* Ours, or another flow's reply entry (DSR's, made from the tunnel header) that
		 * already says what the answers become. */
		if ((e->flags & CT_F_KIND) == (CT_F_REPLY | CT_F_MASQ))
			ct_touch(e, NULL, t->proto, 0, false, len);
		return 0;
	}
	ne.expires = ct_now() + CT_LIFETIME_OTHER;
	ne.flags = CT_F_REPLY | CT_F_MASQ;
	ne.nat_addr = t->daddr; /* the pod's answers keep their source */
	ne.nat_port = t->dport;
	if (bpf_map_update_elem(&weir_ct4, &rk, &ne, BPF_ANY) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

#endif /* WEIR_LIB_MASQ_H */
