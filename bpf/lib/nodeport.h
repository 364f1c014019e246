/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south load balancing at tc (IPv4): packets for a NodePort (any address of this node),
 * an externalIP or a LoadBalancer IP are DNATed to a backend chosen once per flow and kept in
 * conntrack. A local backend gets the packet with the client's address (no SNAT); a remote one
 * gets it from the node's address and a port of the SNAT range, so that its reply comes back
 * through this node. Replies are matched by their conntrack entry and translated back.
 */
#ifndef WEIR_LIB_NODEPORT_H
#define WEIR_LIB_NODEPORT_H

#include "endpoint.h"
#include "ct.h"
#include "lb.h"
#include "outlier.h"

#define L4_OFF	      (sizeof(struct ethhdr) + sizeof(struct iphdr)) /* IHL 5 only */
#define IP4_SADDR_OFF (sizeof(struct ethhdr) + __builtin_offsetof(struct iphdr, saddr))
#define IP4_DADDR_OFF (sizeof(struct ethhdr) + __builtin_offsetof(struct iphdr, daddr))
#define TCP_CSUM_OFF  (L4_OFF + 16)
#define UDP_CSUM_OFF  (L4_OFF + 6)

#define SNAT_TRIES 32
#define IPPROTO_ICMP_ 1
#define IPPROTO_IPIP_ 4
#define IP_DF	      0x4000

#define ICMP_ECHOREPLY_ 0
#define ICMP_ECHO_	8
#define ICMP_CSUM_OFF	(L4_OFF + 2)
#define ICMP_ID_OFF	(L4_OFF + 4) /* an echo's identifier: its "port" */

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* kernel 6.3 */
#endif

/* lb4_nat's results. */
#define NAT_NONE 0 /* not load-balanced traffic */
#define NAT_DONE 1 /* translated */
#define NAT_DSR	 2 /* translated; to be tunnelled to the backend's node (DSR) */

/* Node-wide settings (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
} weir_config SEC(".maps");

/* This node's own addresses: a NodePort answers on any of them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct endpoint_key);
	__type(value, __u32);
} weir_node_addrs SEC(".maps");

static __always_inline bool node_addr4(__be32 addr)
{
	struct endpoint_key k = { .addr = { addr }, .family = WEIR_AF_INET };

	return bpf_map_lookup_elem(&weir_node_addrs, &k) != NULL;
}

/*
 * Rewrites the source (`src`) or destination address and port of an IPv4 TCP/UDP packet,
 * fixing the IP and L4 checksums incrementally (a zero UDP checksum stays zero). For an ICMP
 * echo the port is the identifier (the ICMP checksum has no pseudo-header).
 * Returns 0, or <0 on failure.
 */
static __always_inline int nat4_rewrite(struct __sk_buff *skb, __u8 proto, bool src,
					__be32 old_addr, __be32 new_addr, __be16 old_port,
					__be16 new_port)
{
	__u32 csum_off = proto == IPPROTO_TCP_ ? TCP_CSUM_OFF :
			 proto == IPPROTO_UDP_ ? UDP_CSUM_OFF : ICMP_CSUM_OFF;
	__u64 mangled = proto == IPPROTO_UDP_ ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 addr_off = src ? IP4_SADDR_OFF : IP4_DADDR_OFF;
	__u32 port_off = proto == IPPROTO_ICMP_ ? ICMP_ID_OFF : src ? L4_OFF : L4_OFF + 2;

	if (old_addr != new_addr) {
		if (proto != IPPROTO_ICMP_ &&
		    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
					mangled | BPF_F_PSEUDO_HDR | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old_addr, new_addr, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* The reply-direction key of a flow whose original entry is `fe` and tuple `t`. */
static __always_inline void ct4_reply_key(struct ct4_key *rk, const struct ct4_key *t,
					  const struct ct4_entry *fe)
{
	rk->saddr = fe->nat_addr;
	rk->sport = fe->nat_port;
	rk->proto = t->proto;
	if (fe->flags & CT_F_SNAT) {
		rk->daddr = fe->snat_addr;
		rk->dport = fe->snat_port;
	} else {
		rk->daddr = t->saddr;
		rk->dport = t->sport;
	}
}

/* The original-direction key of a flow whose reply entry is `re` and reply tuple `t`. */
static __always_inline void ct4_original_key(struct ct4_key *fk, const struct ct4_key *t,
					     const struct ct4_entry *re)
{
	fk->daddr = re->nat_addr;
	fk->dport = re->nat_port;
	fk->proto = t->proto;
	if (re->flags & CT_F_SNAT) {
		fk->saddr = re->snat_addr;
		fk->sport = re->snat_port;
	} else {
		fk->saddr = t->daddr;
		fk->sport = t->dport;
	}
}

/*
 * Inserts the reply entry `re` of a flow SNATed to `rk->daddr` (the node's address) into
 * conntrack map `map` under a free port of the configured range, written to `rk->dport`. A
 * port in use by another flow to the same peer is a collision; one whose entry expired (the
 * collector has not come by yet), or whose flow has been closing for 2 s (FIN/RST seen; stray
 * late packets are the risk conntrack takes too) without the backend holding its TIME_WAIT, is
 * free. A flow the backend closed first keeps its port for CT_LIFETIME_TCP_TIME_WAIT. Returns
 * 0, or -DROP_NAT_NO_PORT after SNAT_TRIES tries. One body for both families (snat4_claim,
 * snat6_claim).
 */
#define SNAT_CLAIM_BODY(map, rk, re, cfg)                                                      \
	do {                                                                                   \
		__u32 range_ = (__u32)(cfg)->snat_port_max - (cfg)->snat_port_min + 1;         \
		typeof(*(re)) *old_;                                                           \
		__u32 i_;                                                                      \
                                                                                               \
		if ((cfg)->snat_port_max < (cfg)->snat_port_min)                               \
			return -DROP_NAT_NO_PORT;                                              \
		for (i_ = 0; i_ < SNAT_TRIES; i_++) {                                          \
			(rk)->dport = bpf_htons((cfg)->snat_port_min +                         \
						(bpf_get_prandom_u32() % range_));             \
			if (bpf_map_update_elem(map, rk, re, BPF_NOEXIST) == 0)                \
				return 0;                                                      \
			old_ = bpf_map_lookup_elem(map, rk);                                   \
			if (old_ &&                                                            \
			    (old_->expires < ct_now() ||                                       \
			     ((old_->flags & CT_F_CLOSING) &&                                  \
			      (old_->flags & (CT_F_TIME_WAIT | CT_F_RST)) != CT_F_TIME_WAIT && \
			      old_->expires <= ct_now() + CT_LIFETIME_TCP_CLOSING - 2)) &&     \
			    bpf_map_update_elem(map, rk, re, BPF_EXIST) == 0)                  \
				return 0;                                                      \
		}                                                                              \
		return -DROP_NAT_NO_PORT;                                                      \
	} while (0)

static __always_inline int snat4_claim(struct ct4_key *rk, const struct ct4_entry *re,
				       const struct node_config *cfg)
{
	SNAT_CLAIM_BODY(&weir_ct4, rk, re, cfg);
}

/*
 * Whether a packet of the flow of original entry `e` starts it over: a new SYN on a closing
 * flow (the client reuses its port), or a flow whose backend left the map.
 */
static __always_inline bool ct4_restart(const struct ct4_entry *e, __u8 tcp_flags)
{
	__u32 bid = e->backend_id;

	if ((e->flags & CT_F_CLOSING) && (tcp_flags & TCP_FLAG_SYN) && !(tcp_flags & TCP_FLAG_ACK))
		return true;
	if (e->flags & CT_F_MASQ)
		return false; /* no backend */
	return !bpf_map_lookup_elem(&weir_lb4_backends, &bid);
}

/*
 * Outlier detection of a tc flow (CT_F_WATCH): its first answer counts, a SYN-ACK as an
 * answered connect and a reset as a failed one. `rflags` are the flags of the entry the
 * answer matched, `fflags` (if any) the other entry's.
 */
static __always_inline void outlier_ct_answer(__u16 *rflags, __u16 *fflags, __u32 backend_id,
					      __u8 tcp_flags)
{
	if ((*rflags & (CT_F_WATCH | CT_F_COUNTED)) != CT_F_WATCH)
		return;
	if (tcp_flags & TCP_FLAG_RST)
		outlier_count(backend_id, false);
	else if ((tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == (TCP_FLAG_SYN | TCP_FLAG_ACK))
		outlier_count(backend_id, true);
	else
		return;
	*rflags |= CT_F_COUNTED;
	if (fflags)
		*fflags |= CT_F_COUNTED;
}

/* A watched flow's SYN sent again before any answer: the first one went unanswered for its
 * retransmission timeout (1 s), a failure. */
static __always_inline void outlier_ct_resend(__u16 *flags, __u32 backend_id, __u8 tcp_flags)
{
	if ((*flags & (CT_F_WATCH | CT_F_COUNTED | CT_F_SEEN_REPLY)) != CT_F_WATCH)
		return;
	if (!(tcp_flags & TCP_FLAG_SYN) || (tcp_flags & TCP_FLAG_ACK))
		return;
	outlier_count(backend_id, false);
	*flags |= CT_F_COUNTED;
}

/* Applies an original-direction entry to the packet and to `t`. Returns 1, or -reason. */
static __always_inline int nat4_apply_fwd(struct __sk_buff *skb, struct ct4_key *t,
					  const struct ct4_entry *fe)
{
	if (nat4_rewrite(skb, t->proto, false, t->daddr, fe->nat_addr, t->dport, fe->nat_port) < 0)
		return -DROP_HEADER_WRITE;
	t->daddr = fe->nat_addr;
	t->dport = fe->nat_port;
	if (fe->flags & CT_F_SNAT) {
		if (nat4_rewrite(skb, t->proto, true, t->saddr, fe->snat_addr, t->sport,
				 fe->snat_port) < 0)
			return -DROP_HEADER_WRITE;
		t->saddr = fe->snat_addr;
		t->sport = fe->snat_port;
	}
	return (fe->flags & CT_F_DSR) ? NAT_DSR : NAT_DONE;
}

/* A reply: the frontend becomes the source again, and the client the destination. */
static __always_inline int nat4_reply(struct __sk_buff *skb, struct ct4_key *t,
				      struct ct4_entry *re, __u8 tcp_flags, __u32 len)
{
	struct ct4_key fk = {};
	struct ct4_entry *fe;

	ct4_original_key(&fk, t, re);
	fe = bpf_map_lookup_elem(&weir_ct4, &fk);
	if (!explaining(skb)) {
		outlier_ct_answer(&re->flags, fe ? &fe->flags : NULL, re->backend_id, tcp_flags);
		ct_touch(re, fe, t->proto, tcp_flags, true, len);
	}
	if (nat4_rewrite(skb, t->proto, true, t->saddr, re->nat_addr, t->sport, re->nat_port) < 0)
		return -DROP_HEADER_WRITE;
	t->saddr = re->nat_addr;
	t->sport = re->nat_port;
	if (re->flags & CT_F_SNAT) {
		if (nat4_rewrite(skb, t->proto, false, t->daddr, re->snat_addr, t->dport,
				 re->snat_port) < 0)
			return -DROP_HEADER_WRITE;
		t->daddr = re->snat_addr;
		t->dport = re->snat_port;
	}
	return 1;
}

/* The flow hash Maglev uses north-south: the same on every node for the same packet. */
static __always_inline __u64 ct4_hash(const struct ct4_key *t)
{
	return hash64(((__u64)t->saddr << 32 | t->daddr) ^
		      ((__u64)t->sport << 48 | (__u64)t->dport << 32 | t->proto));
}

/*
 * A new flow to a frontend: choose a backend and create the conntrack entries (with an SNAT
 * port when an external flow's backend is on another node); `out` gets the original-direction
 * entry to apply. `dry`: write nothing (`weir explain`). `xdp`: only a flow XDP completes by
 * itself (SNAT to a backend on another node over the underlay); for anything else nothing is
 * written and NAT_NONE returned, for tc. `from_pod`:
 * a pod's packet, matched against ClusterIPs (and externalIPs/LoadBalancer IPs, cluster-wide)
 * when the socket layer did not translate it; pods' flows are never SNATed (pod addresses are
 * routable, the reply comes back to the client's node). A NodePort is matched on any of this
 * node's addresses, from pods and from outside.
 * Returns NAT_DONE or NAT_DSR when translated, NAT_NONE when the packet is for no frontend, or
 * -reason.
 */
static __always_inline int ct4_new_flow(const struct ct4_key *t, __u8 tcp_flags, __u32 len,
					bool from_pod, bool dry, bool xdp, struct ct4_entry *out)
{
	struct lb4_key key = {
		.address = t->daddr,
		.dport = t->dport,
		.proto = t->proto,
		.scope = from_pod ? WEIR_SCOPE_CLUSTER : WEIR_SCOPE_EXTERNAL,
	};
	struct ct4_entry fe = {}, re = {};
	struct ct4_key rk = {};
	const struct lb_service *svc, *slot;
	const struct lb4_backend *be;
	const struct node_config *cfg;
	__u32 zero = 0, id = 0;
	bool cluster;
	__u64 client = 0;
	__u16 state;

	if (node_addr4(t->daddr)) {
		key.address = 0; /* NodePort: any address of this node */
		key.scope = WEIR_SCOPE_EXTERNAL;
	}
	cluster = key.scope == WEIR_SCOPE_CLUSTER;
	svc = bpf_map_lookup_elem(&weir_lb4_svc, &key);
	if (!svc)
		return 0;
	if (!lb4_src_allowed(svc, t->saddr))
		return -DROP_SOURCE_RANGE;
	if (svc->count == 0)
		return -DROP_NO_SERVICE_BACKEND;
	if (svc->flags & WEIR_SVC_AFFINITY)
		client = (1ULL << 63) | t->saddr; /* never a network namespace cookie */
	id = lb_affinity_backend(svc, client);
	if (!id && (svc->flags & WEIR_SVC_MAGLEV))
		id = lb_maglev_backend(svc, ct4_hash(t));
	if (!id) {
		key.slot = lb_pick_slot(svc);
		slot = bpf_map_lookup_elem(&weir_lb4_svc, &key);
		if (!slot)
			return -DROP_BACKEND_MISSING;
		id = slot->backend_id;
	}
	be = bpf_map_lookup_elem(&weir_lb4_backends, &id);
	if (!be)
		return -DROP_BACKEND_MISSING;
	state = ct_next_flags(0, t->proto, tcp_flags, false);
	if ((svc->flags & WEIR_SVC_OUTLIER) && t->proto == IPPROTO_TCP_)
		state |= CT_F_WATCH;
	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	/* XDP completes only SNATed flows to another node over the underlay; the rest is tc's. */
	if (xdp && (cluster || endpoint4(be->address) || (svc->flags & WEIR_SVC_DSR) ||
		    (cfg && (cfg->flags & WEIR_CFG_VXLAN))))
		return NAT_NONE;
	/* DSR needs the underlay to route to the backend's node: with VXLAN, SNAT instead. */
	if (!cluster && (svc->flags & WEIR_SVC_DSR) && !endpoint4(be->address) &&
	    !(cfg && (cfg->flags & WEIR_CFG_VXLAN))) {
		/* DSR: only the original entry lives here; the backend's node keeps the reply
		 * entry, made from the tunnel header, and answers the client itself. */
		fe.expires = ct_now() + ct_lifetime(state, t->proto);
		fe.flags = state | CT_F_DSR;
		fe.packets = 1;
		fe.bytes = len;
		fe.nat_addr = be->address;
		fe.nat_port = be->port;
		fe.svc_id = svc->svc_id;
		fe.backend_id = id;
		if (!dry) {
			lb_affinity_remember(svc, client, id);
			if (bpf_map_update_elem(&weir_ct4, t, &fe, BPF_ANY) < 0)
				return -DROP_CT_CREATE_FAILED;
		}
		*out = fe;
		return NAT_DSR;
	}
	if (dry)
		goto translate;
	lb_affinity_remember(svc, client, id);

	fe.expires = ct_now() + ct_lifetime(state, t->proto);
	fe.flags = state;
	fe.packets = 1;
	fe.bytes = len;
	fe.nat_addr = be->address;
	fe.nat_port = be->port;
	fe.svc_id = svc->svc_id;
	fe.backend_id = id;
	re.expires = fe.expires;
	re.flags = CT_F_REPLY | state;
	re.nat_addr = t->daddr;
	re.nat_port = t->dport;
	re.svc_id = svc->svc_id;
	re.backend_id = id;
	rk.saddr = be->address;
	rk.sport = be->port;
	rk.proto = t->proto;
	if (cluster || endpoint4(be->address)) {
		/* A backend on this node, or any backend of a pod's flow, sees the client's own
		 * address. */
		rk.daddr = t->saddr;
		rk.dport = t->sport;
		if (bpf_map_update_elem(&weir_ct4, &rk, &re, BPF_ANY) < 0)
			return -DROP_CT_CREATE_FAILED;
	} else {
		cfg = bpf_map_lookup_elem(&weir_config, &zero);
		if (!cfg || !cfg->snat4)
			return -DROP_NAT_NO_PORT;
		fe.flags |= CT_F_SNAT;
		fe.snat_addr = cfg->snat4;
		re.flags |= CT_F_SNAT;
		re.snat_addr = t->saddr;
		re.snat_port = t->sport;
		rk.daddr = cfg->snat4;
		if (snat4_claim(&rk, &re, cfg) < 0)
			return -DROP_NAT_NO_PORT;
		fe.snat_port = rk.dport;
	}
	if (bpf_map_update_elem(&weir_ct4, t, &fe, BPF_ANY) < 0) {
		bpf_map_delete_elem(&weir_ct4, &rk);
		return -DROP_CT_CREATE_FAILED;
	}
	*out = fe;
	return NAT_DONE;
translate:
	/* `weir explain`: the translation a new flow would get, with the first SNAT port tried. */
	fe.nat_addr = be->address;
	fe.nat_port = be->port;
	if (!cluster && !endpoint4(be->address)) {
		cfg = bpf_map_lookup_elem(&weir_config, &zero);
		if (!cfg || !cfg->snat4)
			return -DROP_NAT_NO_PORT;
		fe.flags = CT_F_SNAT;
		fe.snat_addr = cfg->snat4;
		fe.snat_port = bpf_htons(cfg->snat_port_min);
	}
	*out = fe;
	return NAT_DONE;
}

/* A new flow at tc: ct4_new_flow, then the translation applied to the packet. */
static __always_inline int nat4_new(struct __sk_buff *skb, struct ct4_key *t, __u8 tcp_flags,
				    __u32 len, bool from_pod)
{
	struct ct4_entry fe = {};
	int r = ct4_new_flow(t, tcp_flags, len, from_pod, explaining(skb), false, &fe);

	if (r <= 0)
		return r;
	return nat4_apply_fwd(skb, t, &fe);
}

static __always_inline __u16 csum_fold32(__u64 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/*
 * DSR: wraps the (translated) packet in an outer IPv4 header to the backend's node. The
 * frontend travels in the outer header: its address as the source, its port as the
 * identification (so the outer packet must not be fragmented: DF). Returns 0, or <0.
 */
static __always_inline int dsr4_encap(struct __sk_buff *skb, __be32 frontend, __be16 fport,
				      __be32 node)
{
	struct iphdr outer = {
		.version = 4,
		.ihl = 5,
		.ttl = 64,
		.protocol = IPPROTO_IPIP_,
		.id = fport,
		.frag_off = bpf_htons(IP_DF),
		.saddr = frontend,
		.daddr = node,
	};

	outer.tot_len = bpf_htons(skb->len - sizeof(struct ethhdr) + sizeof(struct iphdr));
	outer.check = csum_fold32(bpf_csum_diff(0, 0, (__be32 *)&outer, sizeof(outer), 0));
	if (bpf_skb_adjust_room(skb, sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &outer, sizeof(outer), 0);
}

/*
 * DSR on the backend's node: an IPIP packet to this node whose inner packet is for a local
 * pod. Records (or refreshes) the flow's reply entry from the outer header, so that the pod's
 * reply leaves with the frontend as its source, and strips the outer header.
 * Returns 1 when decapsulated, 0 when the packet is not a weir DSR packet, or -reason.
 */
static __always_inline int dsr4_decap(struct __sk_buff *skb, __be32 frontend, __be16 fport)
{
	const __u32 inner_off = sizeof(struct ethhdr) + sizeof(struct iphdr);
	struct ct4_key rk = {};
	struct ct4_entry *re;
	struct iphdr inner;
	__be16 ports[2];
	__u8 tcp_flags = 0;

	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0)
		return 0;
	if (inner.ihl != 5 || (inner.protocol != IPPROTO_TCP_ && inner.protocol != IPPROTO_UDP_))
		return 0;
	if (!endpoint4(inner.daddr))
		return 0;
	if (bpf_skb_load_bytes(skb, inner_off + sizeof(inner), ports, sizeof(ports)) < 0)
		return 0;
	if (inner.protocol == IPPROTO_TCP_ &&
	    bpf_skb_load_bytes(skb, inner_off + sizeof(inner) + 13, &tcp_flags, 1) < 0)
		return 0;
	rk.saddr = inner.daddr;
	rk.daddr = inner.saddr;
	rk.sport = ports[1];
	rk.dport = ports[0];
	rk.proto = inner.protocol;
	if (!explaining(skb)) {
		re = bpf_map_lookup_elem(&weir_ct4, &rk);
		if (re && (re->flags & CT_F_DSR) && re->nat_addr == frontend &&
		    re->nat_port == fport) {
			ct_touch(re, NULL, inner.protocol, tcp_flags, false, skb->len);
		} else {
			struct ct4_entry ne = {
				.flags = CT_F_REPLY | CT_F_DSR |
					 ct_next_flags(0, inner.protocol, tcp_flags, false),
				.nat_addr = frontend,
				.nat_port = fport,
			};

			ne.expires = ct_now() + ct_lifetime(ne.flags & ~CT_F_KIND, inner.protocol);
			if (bpf_map_update_elem(&weir_ct4, &rk, &ne, BPF_ANY) < 0)
				return -DROP_CT_CREATE_FAILED;
		}
	}
	if (bpf_skb_adjust_room(skb, -(__s32)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_DECAP_L3_IPV4) < 0)
		return -DROP_HEADER_WRITE;
	return 1;
}

#define ICMP_INNER_OFF (L4_OFF + 8)		 /* the offending packet's IP header */
#define ICMP_INNER_L4  (ICMP_INNER_OFF + 20) /* its first 8 bytes of L4 (IHL 5 only) */

/*
 * An ICMP error (destination unreachable, time exceeded, parameter problem) about a packet of
 * a tracked flow, on its way back: the quoted packet is the translated one (to the backend,
 * perhaps from the SNAT address), so it is translated back as the flow's replies are (the
 * client and the frontend), the ICMP and quoted IP checksums following; the outer destination
 * becomes the client when the flow is SNATed, and an error sent by the backend itself comes
 * from the frontend. `t` holds the outer addresses and is updated.
 * Returns NAT_DONE when translated, NAT_NONE when not an error about a tracked flow, or
 * -reason.
 */
static __always_inline int icmp4_error_nat(struct __sk_buff *skb, struct ct4_key *t)
{
	__u8 type, q[28], n[28];
	struct iphdr *qip = (struct iphdr *)q, *nip = (struct iphdr *)n;
	struct ct4_key rk = {};
	struct ct4_entry *re;
	__be32 new_src = t->saddr, new_dst = t->daddr;
	__be16 *qports = (__be16 *)(q + 20), *nports = (__be16 *)(n + 20);
	__s64 diff;

	if (bpf_skb_load_bytes(skb, L4_OFF, &type, 1) < 0)
		return NAT_NONE;
	if (type != 3 && type != 11 && type != 12)
		return NAT_NONE;
	if (bpf_skb_load_bytes(skb, ICMP_INNER_OFF, q, sizeof(q)) < 0)
		return NAT_NONE;
	if (qip->ihl != 5 || (qip->protocol != IPPROTO_TCP_ && qip->protocol != IPPROTO_UDP_))
		return NAT_NONE;
	/* The quoted packet went client (or SNAT address) -> backend: its reply entry. */
	rk.saddr = qip->daddr;
	rk.daddr = qip->saddr;
	rk.sport = qports[1];
	rk.dport = qports[0];
	rk.proto = qip->protocol;
	re = bpf_map_lookup_elem(&weir_ct4, &rk);
	if (!re || !(re->flags & CT_F_REPLY) || (re->flags & CT_F_DSR) || ct_expired(re))
		return NAT_NONE;
	if (type == 3 && !explaining(skb) &&
	    (re->flags & (CT_F_WATCH | CT_F_COUNTED | CT_F_SEEN_REPLY)) == CT_F_WATCH) {
		/* Destination unreachable before any answer: a failed connect, counted once (on
		 * both entries: a packet of either direction copies its entry's state over).
		 * `rk` becomes the original entry's key in place (the stack is full here). */
		struct ct4_entry *fe;

		rk.saddr = (re->flags & CT_F_SNAT) ? re->snat_addr : rk.daddr;
		rk.sport = (re->flags & CT_F_SNAT) ? re->snat_port : rk.dport;
		rk.daddr = re->nat_addr;
		rk.dport = re->nat_port;
		outlier_count(re->backend_id, false);
		re->flags |= CT_F_COUNTED;
		fe = bpf_map_lookup_elem(&weir_ct4, &rk);
		if (fe)
			fe->flags |= CT_F_COUNTED;
	}
	__builtin_memcpy(n, q, sizeof(n));
	nip->daddr = re->nat_addr;
	nports[1] = re->nat_port;
	if (re->flags & CT_F_SNAT) {
		nip->saddr = re->snat_addr;
		nports[0] = re->snat_port;
		new_dst = re->snat_addr;
	}
	if (t->saddr == qip->daddr)
		new_src = re->nat_addr;
	nip->check = 0;
	nip->check = csum_fold32(bpf_csum_diff(0, 0, (__be32 *)n, 20, 0));
	if (qip->protocol == IPPROTO_UDP_) {
		__u16 *qc = (__u16 *)(q + 26), *nc = (__u16 *)(n + 26);

		/* The quoted UDP checksum covers the addresses and ports (a zero one stays). */
		if (*qc) {
			__u16 c = csum_fold32(bpf_csum_diff((__be32 *)(q + 12), 12,
							    (__be32 *)(n + 12), 12,
							    (__u16)~*qc));
			*nc = c ? c : 0xffff;
		}
	}
	diff = bpf_csum_diff((__be32 *)q, sizeof(q), (__be32 *)n, sizeof(n), 0);
	if (bpf_skb_store_bytes(skb, ICMP_INNER_OFF, n, sizeof(n), 0) < 0 ||
	    bpf_l4_csum_replace(skb, ICMP_CSUM_OFF, 0, diff, 0) < 0)
		return -DROP_HEADER_WRITE;
	if (new_src != t->saddr) {
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, t->saddr, new_src, 4) < 0 ||
		    bpf_skb_store_bytes(skb, IP4_SADDR_OFF, &new_src, 4, 0) < 0)
			return -DROP_HEADER_WRITE;
		t->saddr = new_src;
	}
	if (new_dst != t->daddr) {
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, t->daddr, new_dst, 4) < 0 ||
		    bpf_skb_store_bytes(skb, IP4_DADDR_OFF, &new_dst, 4, 0) < 0)
			return -DROP_HEADER_WRITE;
		t->daddr = new_dst;
	}
	return NAT_DONE;
}

/*
 * Load-balancing NAT for one IPv4 TCP/UDP packet with tuple `t` (updated to the translated
 * tuple). Replies of tracked flows are translated back; packets of tracked flows follow their
 * entry; new flows to frontends get a backend (see nat4_new).
 * Returns NAT_DONE or NAT_DSR when translated, NAT_NONE when not load-balanced traffic, or
 * -reason to drop.
 */
static __noinline int lb4_nat(struct __sk_buff *skb, struct ct4_key *t, __u8 tcp_flags,
				   __u32 len, bool from_pod)
{
	struct ct4_entry *e = bpf_map_lookup_elem(&weir_ct4, t);
	struct ct4_key rk = {};

	if (e && !ct_expired(e)) {
		if (e->flags & CT_F_REPLY)
			return nat4_reply(skb, t, e, tcp_flags, len);
		if (!ct4_restart(e, tcp_flags)) {
			ct4_reply_key(&rk, t, e);
			if (!explaining(skb)) {
				outlier_ct_resend(&e->flags, e->backend_id, tcp_flags);
				ct_touch(e, bpf_map_lookup_elem(&weir_ct4, &rk), t->proto, tcp_flags,
					 false, len);
			}
			return nat4_apply_fwd(skb, t, e);
		}
	}
	return nat4_new(skb, t, tcp_flags, len, from_pod);
}

#endif /* WEIR_LIB_NODEPORT_H */
