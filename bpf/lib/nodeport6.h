/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south load balancing at tc for IPv6: the IPv4 design of nodeport.h (conntrack with
 * original and reply entries, DNAT to a local backend keeping the client's address, DNAT +
 * SNAT to the node's IPv6 address and a port of the SNAT range for a backend on another node,
 * replies translated back; ClusterIPs from pods when the socket layer did not translate), in
 * weir_ct6. Not for IPv6 (yet): DSR (such Services are SNATed), XDP, ICMPv6 errors,
 * masquerading, loadBalancerSourceRanges (a frontend that has some refuses every flow: fail
 * closed).
 */
#ifndef WEIR_LIB_NODEPORT6_H
#define WEIR_LIB_NODEPORT6_H

#include "nodeport.h"

#define CT6_MAP_SIZE 65536

#define L4_OFF6	       (sizeof(struct ethhdr) + sizeof(struct ipv6hdr)) /* no extension headers */
#define IP6_SADDR_OFF  (sizeof(struct ethhdr) + __builtin_offsetof(struct ipv6hdr, saddr))
#define IP6_DADDR_OFF  (sizeof(struct ethhdr) + __builtin_offsetof(struct ipv6hdr, daddr))
#define TCP6_CSUM_OFF  (L4_OFF6 + 16)
#define UDP6_CSUM_OFF  (L4_OFF6 + 6)

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT6_MAP_SIZE);
	__type(key, struct ct6_key);
	__type(value, struct ct6_entry);
} weir_ct6 SEC(".maps");

/* The node's IPv6 address flows to backends on other nodes are SNATed to. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_addr6);
} weir_snat6 SEC(".maps");

static __always_inline bool addr6_eq(const __be32 *a, const __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void addr6_copy(__be32 *d, const __be32 *s)
{
	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
	d[3] = s[3];
}

static __always_inline bool node_addr6(const __be32 *addr)
{
	struct endpoint_key k = { .family = WEIR_AF_INET6 };

	addr6_copy(k.addr, addr);
	return bpf_map_lookup_elem(&weir_node_addrs, &k) != NULL;
}

/* ct_touch for weir_ct6 entries. */
static __always_inline void ct6_touch(struct ct6_entry *e, struct ct6_entry *other, __u8 proto,
				      __u8 tcp_flags, bool reply, __u32 len)
{
	CT_TOUCH_BODY(e, other, proto, tcp_flags, reply, len);
}

/*
 * Reads the addresses and ports (and TCP flags) of an IPv6 TCP/UDP packet without extension
 * headers into `t`. Returns 0, or -1 when the packet is not one the NAT handles.
 */
static __always_inline int pkt_ip6_tuple(struct __sk_buff *skb, const struct ipv6hdr *ip6,
					 struct ct6_key *t, __u8 *tcp_flags)
{
	__be16 ports[2];

	if (ip6->nexthdr != IPPROTO_TCP_ && ip6->nexthdr != IPPROTO_UDP_)
		return -1;
	if (bpf_skb_load_bytes(skb, L4_OFF6, ports, sizeof(ports)) < 0)
		return -1;
	if (ip6->nexthdr == IPPROTO_TCP_ &&
	    bpf_skb_load_bytes(skb, L4_OFF6 + 13, tcp_flags, 1) < 0)
		return -1;
	__builtin_memcpy(t->saddr, &ip6->saddr, 16);
	__builtin_memcpy(t->daddr, &ip6->daddr, 16);
	t->sport = ports[0];
	t->dport = ports[1];
	t->proto = ip6->nexthdr;
	return 0;
}

/*
 * Rewrites the source (`src`) or destination address and port of an IPv6 TCP/UDP packet,
 * fixing the L4 checksum incrementally (IPv6 has no header checksum). Returns 0, or <0.
 */
static __always_inline int nat6_rewrite(struct __sk_buff *skb, __u8 proto, bool src,
					const __be32 *old_addr, const __be32 *new_addr,
					__be16 old_port, __be16 new_port)
{
	__u32 csum_off = proto == IPPROTO_TCP_ ? TCP6_CSUM_OFF : UDP6_CSUM_OFF;
	__u32 addr_off = src ? IP6_SADDR_OFF : IP6_DADDR_OFF;
	__u32 port_off = src ? L4_OFF6 : L4_OFF6 + 2;
	__be32 o[4], n[4];
	__s64 diff;

	if (!addr6_eq(old_addr, new_addr)) {
		addr6_copy(o, old_addr);
		addr6_copy(n, new_addr);
		diff = bpf_csum_diff(o, sizeof(o), n, sizeof(n), 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, n, sizeof(n), 0) < 0)
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* The reply-direction key of a flow whose original entry is `fe` and tuple `t`. */
static __always_inline void ct6_reply_key(struct ct6_key *rk, const struct ct6_key *t,
					  const struct ct6_entry *fe)
{
	addr6_copy(rk->saddr, fe->nat_addr);
	rk->sport = fe->nat_port;
	rk->proto = t->proto;
	if (fe->flags & CT_F_SNAT) {
		addr6_copy(rk->daddr, fe->snat_addr);
		rk->dport = fe->snat_port;
	} else {
		addr6_copy(rk->daddr, t->saddr);
		rk->dport = t->sport;
	}
}

/* The original-direction key of a flow whose reply entry is `re` and reply tuple `t`. */
static __always_inline void ct6_original_key(struct ct6_key *fk, const struct ct6_key *t,
					     const struct ct6_entry *re)
{
	addr6_copy(fk->daddr, re->nat_addr);
	fk->dport = re->nat_port;
	fk->proto = t->proto;
	if (re->flags & CT_F_SNAT) {
		addr6_copy(fk->saddr, re->snat_addr);
		fk->sport = re->snat_port;
	} else {
		addr6_copy(fk->saddr, t->daddr);
		fk->sport = t->dport;
	}
}

/* ct4_restart for weir_ct6 entries. */
static __always_inline bool ct6_restart(const struct ct6_entry *e, __u8 tcp_flags)
{
	__u32 bid = e->backend_id;

	if ((e->flags & CT_F_CLOSING) && (tcp_flags & TCP_FLAG_SYN) && !(tcp_flags & TCP_FLAG_ACK))
		return true;
	return !bpf_map_lookup_elem(&weir_lb6_backends, &bid);
}

/* Applies an original-direction entry to the packet and to `t`. Returns NAT_DONE, or -reason. */
static __always_inline int nat6_apply_fwd(struct __sk_buff *skb, struct ct6_key *t,
					  const struct ct6_entry *fe)
{
	if (nat6_rewrite(skb, t->proto, false, t->daddr, fe->nat_addr, t->dport, fe->nat_port) < 0)
		return -DROP_HEADER_WRITE;
	addr6_copy(t->daddr, fe->nat_addr);
	t->dport = fe->nat_port;
	if (fe->flags & CT_F_SNAT) {
		if (nat6_rewrite(skb, t->proto, true, t->saddr, fe->snat_addr, t->sport,
				 fe->snat_port) < 0)
			return -DROP_HEADER_WRITE;
		addr6_copy(t->saddr, fe->snat_addr);
		t->sport = fe->snat_port;
	}
	return NAT_DONE;
}

/* A reply: the frontend becomes the source again, and the client the destination. */
static __always_inline int nat6_reply(struct __sk_buff *skb, struct ct6_key *t,
				      struct ct6_entry *re, __u8 tcp_flags, __u32 len)
{
	struct ct6_key fk = {};

	ct6_original_key(&fk, t, re);
	if (!explaining(skb)) {
		struct ct6_entry *fe = bpf_map_lookup_elem(&weir_ct6, &fk);

		outlier_ct_answer(&re->flags, fe ? &fe->flags : NULL, re->backend_id, tcp_flags);
		ct6_touch(re, fe, t->proto, tcp_flags, true, len);
	}
	if (nat6_rewrite(skb, t->proto, true, t->saddr, re->nat_addr, t->sport, re->nat_port) < 0)
		return -DROP_HEADER_WRITE;
	addr6_copy(t->saddr, re->nat_addr);
	t->sport = re->nat_port;
	if (re->flags & CT_F_SNAT) {
		if (nat6_rewrite(skb, t->proto, false, t->daddr, re->snat_addr, t->dport,
				 re->snat_port) < 0)
			return -DROP_HEADER_WRITE;
		addr6_copy(t->daddr, re->snat_addr);
		t->dport = re->snat_port;
	}
	return NAT_DONE;
}

/* An address folded to 64 bits (for hashes). */
static __always_inline __u64 addr6_fold(const __be32 *a)
{
	return ((__u64)a[0] << 32 | a[1]) ^ ((__u64)a[2] << 32 | a[3]);
}

/* The flow hash Maglev uses north-south: the same on every node for the same packet. */
static __always_inline __u64 ct6_hash(const struct ct6_key *t)
{
	return hash64(addr6_fold(t->saddr) ^ hash64(addr6_fold(t->daddr)) ^
		      ((__u64)t->sport << 48 | (__u64)t->dport << 32 | t->proto));
}

/* snat4_claim for weir_ct6. */
static __always_inline int snat6_claim(struct ct6_key *rk, const struct ct6_entry *re,
				       const struct node_config *cfg)
{
	SNAT_CLAIM_BODY(&weir_ct6, rk, re, cfg);
}

/* ct6_new_flow's `how`: the packet's TCP flags in the low byte, and these. */
#define CT6_NEW_FROM_POD (1 << 8)
#define CT6_NEW_DRY	 (1 << 9) /* write nothing (`weir explain`) */

/* ct6_new_flow's working space: IPv6 entries are too big for the stack of the call chain. */
struct nat6_scratch {
	struct ct6_entry fe; /* the new flow's original-direction entry: the result */
	struct ct6_entry re;
	struct ct6_key rk;
	struct lb6_key key;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nat6_scratch);
} weir_nat6_scratch SEC(".maps");

static __always_inline struct nat6_scratch *nat6_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&weir_nat6_scratch, &zero);
}

/* fwd_ip4's and fwd_ip6's FIB query (their call chains' stack is short of room for it). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpf_fib_lookup);
} weir_fib_scratch SEC(".maps");

/*
 * A new IPv6 flow to a frontend: ct4_new_flow's counterpart (no DSR, no XDP), for a packet of
 * `len` bytes. The flow's original-direction entry is left in the scratch's `fe`. A
 * subprogram (its stack is its own). Returns NAT_DONE, NAT_NONE when the packet is for no
 * frontend, or -reason.
 */
static __noinline int ct6_new_flow(const struct ct6_key *t, __u32 how, __u32 len)
{
	__u8 tcp_flags = how & 0xff;
	bool from_pod = how & CT6_NEW_FROM_POD, dry = how & CT6_NEW_DRY;
	struct nat6_scratch *s = nat6_scratch();
	struct lb6_key *key;
	const struct lb_service *svc, *slot;
	const struct lb6_backend *be;
	const struct node_config *cfg;
	const struct node_addr6 *snat;
	struct ct6_entry *fe, *re;
	struct ct6_key *rk;
	__u32 zero = 0, id = 0;
	__u64 client = 0;
	bool cluster, local;
	__u16 state;

	if (!s)
		return -DROP_CT_CREATE_FAILED;
	__builtin_memset(s, 0, sizeof(*s));
	fe = &s->fe;
	re = &s->re;
	rk = &s->rk;
	key = &s->key;
	key->dport = t->dport;
	key->proto = t->proto;
	key->scope = from_pod ? WEIR_SCOPE_CLUSTER : WEIR_SCOPE_EXTERNAL;
	if (node_addr6(t->daddr))
		key->scope = WEIR_SCOPE_EXTERNAL; /* NodePort: any address of this node */
	else
		addr6_copy(key->address, t->daddr);
	cluster = key->scope == WEIR_SCOPE_CLUSTER;
	svc = bpf_map_lookup_elem(&weir_lb6_svc, key);
	if (!svc)
		return NAT_NONE;
	if (svc->flags & WEIR_SVC_SOURCE_RANGES)
		return -DROP_SOURCE_RANGE; /* not enforceable for IPv6 yet: fail closed */
	if (svc->count == 0)
		return -DROP_NO_SERVICE_BACKEND;
	if (svc->flags & WEIR_SVC_AFFINITY)
		client = (1ULL << 63) | (hash64(addr6_fold(t->saddr)) >> 1);
	id = lb_affinity_backend(svc, client);
	if (!id && (svc->flags & WEIR_SVC_MAGLEV))
		id = lb_maglev_backend(svc, ct6_hash(t));
	if (!id) {
		key->slot = lb_pick_slot(svc);
		slot = bpf_map_lookup_elem(&weir_lb6_svc, key);
		if (!slot)
			return -DROP_BACKEND_MISSING;
		id = slot->backend_id;
	}
	be = bpf_map_lookup_elem(&weir_lb6_backends, &id);
	if (!be)
		return -DROP_BACKEND_MISSING;
	local = cluster || endpoint6((const struct in6_addr *)be->address);
	addr6_copy(fe->nat_addr, be->address);
	fe->nat_port = be->port;
	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!local) {
		snat = bpf_map_lookup_elem(&weir_snat6, &zero);
		if (!cfg || !snat || !(snat->addr[0] | snat->addr[1] | snat->addr[2] | snat->addr[3]))
			return -DROP_NAT_NO_PORT;
		fe->flags = CT_F_SNAT;
		addr6_copy(fe->snat_addr, snat->addr);
		/* `weir explain`: the first port of the range. */
		fe->snat_port = bpf_htons(cfg->snat_port_min);
	}
	if (dry)
		return NAT_DONE;
	lb_affinity_remember(svc, client, id);
	state = ct_next_flags(0, t->proto, tcp_flags, false);
	if ((svc->flags & WEIR_SVC_OUTLIER) && t->proto == IPPROTO_TCP_)
		state |= CT_F_WATCH;
	fe->expires = ct_now() + ct_lifetime(state, t->proto);
	fe->flags |= state;
	fe->packets = 1;
	fe->bytes = len;
	fe->svc_id = svc->svc_id;
	fe->backend_id = id;
	re->expires = fe->expires;
	re->flags = CT_F_REPLY | state;
	addr6_copy(re->nat_addr, t->daddr);
	re->nat_port = t->dport;
	re->svc_id = svc->svc_id;
	re->backend_id = id;
	addr6_copy(rk->saddr, be->address);
	rk->sport = be->port;
	rk->proto = t->proto;
	if (local) {
		/* A backend on this node, or any backend of a pod's flow, sees the client. */
		addr6_copy(rk->daddr, t->saddr);
		rk->dport = t->sport;
		if (bpf_map_update_elem(&weir_ct6, rk, re, BPF_ANY) < 0)
			return -DROP_CT_CREATE_FAILED;
	} else {
		re->flags |= CT_F_SNAT;
		addr6_copy(re->snat_addr, t->saddr);
		re->snat_port = t->sport;
		addr6_copy(rk->daddr, fe->snat_addr);
		if (!cfg || snat6_claim(rk, re, cfg) < 0)
			return -DROP_NAT_NO_PORT;
		fe->snat_port = rk->dport;
	}
	if (bpf_map_update_elem(&weir_ct6, t, fe, BPF_ANY) < 0) {
		bpf_map_delete_elem(&weir_ct6, rk);
		return -DROP_CT_CREATE_FAILED;
	}
	return NAT_DONE;
}

/*
 * Load-balancing NAT for one IPv6 TCP/UDP packet with tuple `t` (updated to the translated
 * tuple): lb4_nat's counterpart. Returns NAT_DONE, NAT_NONE, or -reason.
 */
static __always_inline int lb6_nat(struct __sk_buff *skb, struct ct6_key *t, __u8 tcp_flags,
				   __u32 len, bool from_pod)
{
	struct ct6_entry *e = bpf_map_lookup_elem(&weir_ct6, t);
	struct nat6_scratch *s;
	struct ct6_key rk = {};
	int r;

	if (e && e->expires >= ct_now()) {
		if (e->flags & CT_F_REPLY)
			return nat6_reply(skb, t, e, tcp_flags, len);
		if (!ct6_restart(e, tcp_flags)) {
			ct6_reply_key(&rk, t, e);
			if (!explaining(skb)) {
				outlier_ct_resend(&e->flags, e->backend_id, tcp_flags);
				ct6_touch(e, bpf_map_lookup_elem(&weir_ct6, &rk), t->proto, tcp_flags,
					  false, len);
			}
			return nat6_apply_fwd(skb, t, e);
		}
	}
	r = ct6_new_flow(t,
			 tcp_flags | (from_pod ? CT6_NEW_FROM_POD : 0) |
				 (explaining(skb) ? CT6_NEW_DRY : 0),
			 len);
	if (r <= 0)
		return r;
	s = nat6_scratch();
	if (!s)
		return -DROP_CT_CREATE_FAILED;
	return nat6_apply_fwd(skb, t, &s->fe);
}

#endif /* WEIR_LIB_NODEPORT6_H */
