/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NetworkPolicy, enforced once per flow. A pod some policy selects has an entry in
 * weir_policy_eps (keyed by its host-side ifindex); every flow into or out of such a pod is
 * tracked in weir_pct4/weir_pct6. The first packet of a flow is judged (egress of the source
 * pod, ingress of the destination pod, each when the pod is isolated for that direction) and
 * the verdict kept; later packets in either direction only find the entry. A policy change
 * bumps weir_policy_rev, and each flow's next packet is judged again: a flow the new policy
 * forbids is cut there.
 *
 * Judging: the peer address gives an identity and a namespace class (weir_ipcache: pods and
 * nodes; nothing found is world) and a CIDR identity (weir_policy_cidrs, the ipBlocks'
 * prefixes); weir_policy, an LPM trie over (pod, peer, direction, protocol, port), is asked
 * for each of them and for the classes "any" and "every pod": at most five lookups, whatever
 * the number of rules, port ranges included (they are port prefixes).
 */
#ifndef WEIR_LIB_POLICY_H
#define WEIR_LIB_POLICY_H

#include "ct.h"
#include "endpoint.h"

#define IPPROTO_SCTP_	 132
#define IPPROTO_ICMPV6_	 58
#define POLICY_MAP_SIZE	 262144
#define IPCACHE_MAP_SIZE 131072
#define PCT4_MAP_SIZE	 262144
#define PCT6_MAP_SIZE	 65536
#define POLICY_EPS_SIZE	 65536

/* Bits of the policy lookups' key after prefixlen: ep, peer, dir (72), proto (8), port (16). */
#define POLICY_FULL_PREFIX 96

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, IPCACHE_MAP_SIZE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_info);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, IPCACHE_MAP_SIZE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_info);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_policy_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, POLICY_MAP_SIZE);
	__type(key, struct policy_key);
	__type(value, struct policy_entry);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, POLICY_EPS_SIZE);
	__type(key, __u32);
	__type(value, struct ep_policy);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_policy_eps SEC(".maps");

/* [0]: the policy revision verdicts are kept for (bumped by the agent on every change). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} weir_policy_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PCT4_MAP_SIZE);
	__type(key, struct ct4_key);
	__type(value, struct pct_entry);
} weir_pct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PCT6_MAP_SIZE);
	__type(key, struct ct6_key);
	__type(value, struct pct_entry);
} weir_pct6 SEC(".maps");

/* Policy verdicts for `weir observe` (struct flow_event). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} weir_events SEC(".maps");

/* Keeps struct flow_event in the object's BTF (a ring buffer has no value type), so that
 * Rust gets its layout from the skeleton. */
const volatile struct flow_event weir_flow_event_btf = {};

/* A flow being judged, either family (IPv4 addresses in [0]). */
struct policy_flow {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 family;
	__u8 proto;
	__u8 pad[2];
};

/* The identities of a peer address that the policy lookups try. */
struct peer_ids {
	__u32 id;
	__u32 ns_class;
	__u32 cidr;
};

/* What the judging of a flow found, per direction (WEIR_DIR_*), for its verdict event. */
struct policy_hit {
	__u32 origin[2];
	__u8 match[2];
	__u8 judged; /* 1 << WEIR_DIR_* */
	__u8 pad;
};

/*
 * Per-CPU room for the judging, whose call chain (from_pod -> fwd_ip4 -> policy4 ->
 * policy_decide) must fit the 512-byte BPF stack.
 */
struct policy_scratch {
	struct policy_flow f;
	struct pct_entry ne;
	struct ipcache_key ik;
	struct policy_key pk;
	struct peer_ids p;
	struct policy_hit hit;
	struct ct6_key rk6;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct policy_scratch);
} weir_policy_scratch SEC(".maps");

static __always_inline struct policy_scratch *policy_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&weir_policy_scratch, &zero);
}

/* Flags of policy4/policy6 over the TCP flags: judge this packet alone (no ports to track
 * the flow by); an ICMP error whose tuple is its quoted flow's reply (RELATED: passes with
 * that flow, or else is judged alone as ICMP). */
#define POLICY_NO_CT   (1 << 8)
#define POLICY_RELATED (1 << 9)
/* policy6_other_tuple: neighbour discovery, which policy never stops. */
#define POLICY_PASS    (1 << 10)

static __always_inline __u32 policy_revision(void)
{
	__u32 zero = 0, *rev = bpf_map_lookup_elem(&weir_policy_rev, &zero);

	return rev ? *rev : 0;
}

/*
 * The pod a forwarded packet enters here, for its ingress policy: the endpoint it is handed
 * to directly, or 0 (none, or delivered through the host stack, where to_pod judges it).
 */
static __always_inline __u32 policy_dst_ifindex(const struct endpoint_info *ep)
{
	return ep && !(ep->flags & WEIR_EP_HOST_STACK) ? ep->ifindex : 0;
}

/* The pod's EP_POLICY_PEER_* hints: all of them when its value carries none. */
static __always_inline __u32 policy_hints(const struct ep_policy *pol)
{
	return (pol->flags & EP_POLICY_HINTS) ? pol->flags : ~0u;
}

static __always_inline const struct ep_policy *policy_ep(__u32 ifindex)
{
	return ifindex ? bpf_map_lookup_elem(&weir_policy_eps, &ifindex) : NULL;
}

/*
 * Fills s->p with the identities of address `addr` (family of s->f); its CIDR identity only
 * for a pod whose entries name some (`pol`, may be NULL).
 */
static __always_inline void policy_peer(struct policy_scratch *s, const __be32 *addr,
					const struct ep_policy *pol)
{
	__u32 hints = pol ? policy_hints(pol) : 0;
	struct ipcache_key *k = &s->ik;
	const struct ipcache_info *i;

	k->family = s->f.family;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
	k->addr[0] = addr[0];
	if (s->f.family == WEIR_AF_INET) {
		k->prefixlen = 32 + 32;
		k->addr[1] = k->addr[2] = k->addr[3] = 0;
	} else {
		k->prefixlen = 32 + 128;
		k->addr[1] = addr[1];
		k->addr[2] = addr[2];
		k->addr[3] = addr[3];
	}
	i = bpf_map_lookup_elem(&weir_ipcache, k);
	s->p.id = i ? i->identity : WEIR_ID_WORLD;
	s->p.ns_class = i ? i->ns_class : 0;
	s->p.cidr = 0;
	if (hints & EP_POLICY_PEER_CIDR) {
		i = bpf_map_lookup_elem(&weir_policy_cidrs, k);
		s->p.cidr = i ? i->identity : 0;
	}
}

/*
 * Whether weir_policy allows `peer` for the pod and direction already in s->pk; the entry
 * found is noted in s->hit.
 */
static __always_inline bool policy_has(struct policy_scratch *s, __u32 peer)
{
	const struct policy_entry *e;
	__u8 dir = s->pk.dir & 1;

	s->pk.peer = peer;
	e = bpf_map_lookup_elem(&weir_policy, &s->pk);
	if (!e)
		return false;
	s->hit.origin[dir] = e->origin;
	s->hit.match[dir] = e->match;
	return true;
}

/*
 * One direction of one pod: whether its entries allow the peer. Returns 0, or
 * -DROP_POLICY_DENIED / -DROP_POLICY_FAILED.
 */
static __always_inline int policy_judge(struct policy_scratch *s, __u32 ep,
					const struct ep_policy *pol, __u8 dir)
{
	s->hit.judged |= 1 << dir;
	if (pol->flags & EP_POLICY_DENY)
		return -DROP_POLICY_FAILED;
	/* The node's own traffic to its pods (kubelet probes) is always allowed. */
	if (dir == WEIR_DIR_INGRESS && s->p.id == WEIR_ID_HOST)
		return 0;
	s->pk.prefixlen = POLICY_FULL_PREFIX;
	s->pk.ep = ep;
	s->pk.dir = dir;
	s->pk.proto = s->f.proto;
	s->pk.dport = s->f.dport;
	if ((policy_hints(pol) & EP_POLICY_PEER_ANY) && policy_has(s, WEIR_ID_ANY))
		return 0;
	if (policy_has(s, s->p.id))
		return 0;
	if ((policy_hints(pol) & EP_POLICY_PEER_CLASS) && s->p.ns_class &&
	    (policy_has(s, s->p.ns_class) || policy_has(s, WEIR_ID_CLUSTER)))
		return 0;
	if (s->p.cidr && policy_has(s, s->p.cidr))
		return 0;
	return -DROP_POLICY_DENIED;
}

static __always_inline void policy_event(const struct policy_scratch *s, __u8 dir, __u32 reason,
					 __u32 ifindex, __u32 src_id, __u32 dst_id)
{
	const struct policy_flow *f = &s->f;
	struct flow_event *ev = bpf_ringbuf_reserve(&weir_events, sizeof(*ev), 0);

	if (!ev) {
		__u32 idx = dir * WEIR_METRICS_STRIDE + REASON_EVENT_LOST;
		struct metrics_value *m = bpf_map_lookup_elem(&weir_metrics, &idx);

		if (m)
			m->packets += 1;
		return;
	}
	ev->ts = bpf_ktime_get_boot_ns();
	__builtin_memcpy(ev->saddr, f->saddr, sizeof(ev->saddr));
	__builtin_memcpy(ev->daddr, f->daddr, sizeof(ev->daddr));
	ev->sport = f->sport;
	ev->dport = f->dport;
	ev->family = f->family;
	ev->proto = f->proto;
	ev->dir = dir;
	ev->judged = s->hit.judged;
	ev->reason = reason;
	ev->ifindex = ifindex;
	ev->src_identity = src_id;
	ev->dst_identity = dst_id;
	ev->origin[0] = s->hit.origin[0];
	ev->origin[1] = s->hit.origin[1];
	ev->match[0] = s->hit.match[0];
	ev->match[1] = s->hit.match[1];
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	/* The agent drains the ring on a timer: woken at each quarter of it that waits. */
	bpf_ringbuf_submit(ev, ringbuf_lazy_wakeup(&weir_events, 256 << 10, sizeof(*ev)));
}

/*
 * Judges flow `f` (original direction) for the egress of the pod at `src_if` and the ingress
 * of the pod at `dst_if` (0: not a local pod), each when isolated; emits the verdict event.
 * Returns 0, or -DROP_POLICY_*.
 */
static __noinline int policy_decide(struct __sk_buff *skb, struct policy_scratch *s,
				    __u32 src_if, __u32 dst_if)
{
	const struct ep_policy *sp = policy_ep(src_if), *dp = policy_ep(dst_if);
	__u32 src_id = sp ? sp->identity : 0, dst_id = dp ? dp->identity : 0;
	__u8 dir = WEIR_DIR_INGRESS;
	__u32 ifindex = dst_if;
	int r = 0;

	__builtin_memset(&s->hit, 0, sizeof(s->hit));
	if (sp && (sp->flags & EP_POLICY_EGRESS)) {
		policy_peer(s, s->f.daddr, sp);
		dst_id = dp ? dst_id : s->p.id;
		dir = WEIR_DIR_EGRESS;
		ifindex = src_if;
		r = policy_judge(s, src_if, sp, WEIR_DIR_EGRESS);
	}
	if (r == 0 && dp && (dp->flags & EP_POLICY_INGRESS)) {
		policy_peer(s, s->f.saddr, dp);
		src_id = sp ? src_id : s->p.id;
		dir = WEIR_DIR_INGRESS;
		ifindex = dst_if;
		r = policy_judge(s, dst_if, dp, WEIR_DIR_INGRESS);
	}
	/* A flow no isolated direction judged (the source isolated for ingress only, say) had
	 * no verdict to report. */
	if (!explaining(skb) && s->hit.judged)
		policy_event(s, dir, r < 0 ? -r : REASON_POLICY_ALLOWED, ifindex, src_id, dst_id);
	return r;
}

static __always_inline void pct_touch(struct pct_entry *e, __u8 proto, __u8 tcp_flags, bool reply,
				      __u32 len)
{
	CT_TOUCH_BODY(e, (struct pct_entry *)0, proto, tcp_flags, reply, len);
}

static __always_inline bool pct_expired(const struct pct_entry *e)
{
	return e->expires < ct_now();
}

/* Records an allowed new flow under `key` in `map` (weir_pct4 or weir_pct6). */
static __always_inline int pct_create(void *map, const void *key, struct policy_scratch *s,
				      __u32 rev, __u8 tcp_flags, __u32 len)
{
	struct pct_entry *ne = &s->ne;

	ne->revision = rev;
	ne->flags = ct_next_flags(0, s->f.proto, tcp_flags, false);
	ne->expires = ct_now() + ct_lifetime(ne->flags, s->f.proto);
	ne->packets = 1;
	ne->bytes = len;
	ne->pad = 0;
	if (bpf_map_update_elem(map, key, ne, BPF_ANY) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

/* The flow being judged, from a tuple of either family. */
static __always_inline void policy_flow4(struct policy_flow *f, const struct ct4_key *k)
{
	__builtin_memset(f, 0, sizeof(*f));
	f->family = WEIR_AF_INET;
	f->saddr[0] = k->saddr;
	f->daddr[0] = k->daddr;
	f->sport = k->sport;
	f->dport = k->dport;
	f->proto = k->proto;
}

static __always_inline void policy_flow6(struct policy_flow *f, const struct ct6_key *k)
{
	__builtin_memset(f, 0, sizeof(*f));
	f->family = WEIR_AF_INET6;
	__builtin_memcpy(f->saddr, k->saddr, sizeof(f->saddr));
	__builtin_memcpy(f->daddr, k->daddr, sizeof(f->daddr));
	f->sport = k->sport;
	f->dport = k->dport;
	f->proto = k->proto;
}

/*
 * One body for policy4 and policy6 (weir_pct4 / weir_pct6, their key types): `rk` is room
 * for the reversed key (it may name the body's scratch, `s_`: evaluated only once that is
 * looked up, after the cheap "is any pod here policed" test), `reverse` and `flow_from` the
 * family's helpers.
 */
#define POLICY_CT_BODY(skb, map, t, rk, reverse, flow_from, flags, src_if, dst_if)              \
	do {                                                                                   \
		struct policy_scratch *s_;                                                     \
		const typeof(*(t)) *key_ = (t);                                                \
		__u8 tcp_flags_ = (flags) & 0xff;                                              \
		struct pct_entry *e_;                                                          \
		bool reply_ = false;                                                           \
		__u32 rev_;                                                                    \
		int r_;                                                                        \
                                                                                               \
		if (!policy_ep(src_if) && !policy_ep(dst_if))                                  \
			return 0;                                                              \
		s_ = policy_scratch();                                                         \
		if (!s_)                                                                       \
			return -DROP_POLICY_FAILED;                                            \
		if ((flags) & POLICY_NO_CT) {                                                  \
			flow_from(&s_->f, t);                                                  \
			return policy_decide(skb, s_, src_if, dst_if);                         \
		}                                                                              \
		rev_ = policy_revision();                                                      \
		e_ = bpf_map_lookup_elem(map, t);                                              \
		if (!e_ || pct_expired(e_)) {                                                  \
			reverse(rk, t);                                                        \
			e_ = bpf_map_lookup_elem(map, rk);                                     \
			if (e_ && !pct_expired(e_)) {                                          \
				reply_ = true;                                                 \
				key_ = rk;                                                     \
			} else {                                                               \
				e_ = NULL;                                                     \
			}                                                                      \
		}                                                                              \
		if (e_ && e_->revision == rev_) {                                              \
			if (!explaining(skb))                                                  \
				pct_touch(e_, (t)->proto, tcp_flags_, reply_, (skb)->len);     \
			return 0;                                                              \
		}                                                                              \
		if ((flags) & POLICY_RELATED) {                                                \
			/* No flow of its own: judged alone, as ICMP. */                       \
			flow_from(&s_->f, t);                                                  \
			s_->f.proto = IPPROTO_ICMP_;                                           \
			s_->f.sport = s_->f.dport = 0;                                         \
			return policy_decide(skb, s_, src_if, dst_if);                         \
		}                                                                              \
		/* A new flow, or a verdict made under an older policy: judge the original    \
		 * direction. */                                                               \
		flow_from(&s_->f, key_);                                                       \
		r_ = reply_ ? policy_decide(skb, s_, dst_if, src_if)                           \
			    : policy_decide(skb, s_, src_if, dst_if);                          \
		if (explaining(skb))                                                           \
			return r_;                                                             \
		if (r_ < 0) {                                                                  \
			if (e_)                                                                \
				bpf_map_delete_elem(map, key_);                                \
			return r_;                                                             \
		}                                                                              \
		if (e_) {                                                                      \
			e_->revision = rev_;                                                   \
			pct_touch(e_, (t)->proto, tcp_flags_, reply_, (skb)->len);             \
			return 0;                                                              \
		}                                                                              \
		return pct_create(map, t, s_, rev_, tcp_flags_, (skb)->len);                   \
	} while (0)

/*
 * The policy verdict of an IPv4 packet with tuple `t` (addresses after a Service's DNAT,
 * before SNAT), leaving pod `src_if` and/or entering pod `dst_if` (0: none). `flags`: the TCP
 * flags, plus POLICY_NO_CT for a packet without ports (judged alone) or POLICY_RELATED.
 * Returns 0, or -DROP_*.
 */
static __noinline int policy4(struct __sk_buff *skb, const struct ct4_key *t, __u32 flags,
			      __u32 src_if, __u32 dst_if)
{
	struct ct4_key rk = {};

	POLICY_CT_BODY(skb, &weir_pct4, t, &rk, ct4_reverse, policy_flow4, flags, src_if, dst_if);
}

/* The IPv6 counterpart of policy4 (weir_pct6; the reversed key lives in the body's scratch). */
static __noinline int policy6(struct __sk_buff *skb, const struct ct6_key *t, __u32 flags,
			      __u32 src_if, __u32 dst_if)
{
	POLICY_CT_BODY(skb, &weir_pct6, t, &s_->rk6, ct6_reverse, policy_flow6, flags, src_if,
		       dst_if);
}

/*
 * The tuple policy tracks an IPv4 packet by that conntrack's own parser does not give: SCTP
 * (ports, no NAT). Anything else gets the protocol only and POLICY_NO_CT, except ICMP
 * errors, which are judged by the flow they quote (RELATED): their tuple is the quoted
 * packet's, reversed, so that they pass exactly when that flow's answers would.
 * Returns the flags for policy4.
 */
static __always_inline __u32 policy4_other_tuple(struct __sk_buff *skb, const struct iphdr *ip4,
						 struct ct4_key *t)
{
	struct iphdr inner;
	__be16 ports[2];
	__u8 type;

	t->saddr = ip4->saddr;
	t->daddr = ip4->daddr;
	t->sport = 0;
	t->dport = 0;
	t->proto = ip4->protocol;
	if (ip4->ihl != 5 || (ip4->frag_off & bpf_htons(0x3fff)))
		return POLICY_NO_CT;
	if (ip4->protocol == IPPROTO_SCTP_) {
		if (bpf_skb_load_bytes(skb, L4_OFF, ports, sizeof(ports)) < 0)
			return POLICY_NO_CT;
		t->sport = ports[0];
		t->dport = ports[1];
		return 0;
	}
	if (ip4->protocol != IPPROTO_ICMP_ || bpf_skb_load_bytes(skb, L4_OFF, &type, 1) < 0 ||
	    (type != 3 && type != 11 && type != 12))
		return POLICY_NO_CT;
	if (bpf_skb_load_bytes(skb, L4_OFF + 8, &inner, sizeof(inner)) < 0 || inner.ihl != 5 ||
	    bpf_skb_load_bytes(skb, L4_OFF + 8 + sizeof(inner), ports, sizeof(ports)) < 0)
		return POLICY_NO_CT;
	if (inner.protocol != IPPROTO_TCP_ && inner.protocol != IPPROTO_UDP_ &&
	    inner.protocol != IPPROTO_SCTP_)
		return POLICY_NO_CT;
	/* The quoted packet went from inner.saddr to inner.daddr; the error travels back. */
	t->saddr = inner.daddr;
	t->daddr = inner.saddr;
	t->sport = ports[1];
	t->dport = ports[0];
	t->proto = inner.protocol;
	return POLICY_RELATED;
}

/*
 * The IPv6 counterpart of policy4_other_tuple: SCTP without extension headers is tracked by
 * its ports; an echo request or reply (ICMPv6 128/129) by its identifier, as conntrack does
 * for IPv4 (the source port of a request, the destination port of a reply, so that a reply's
 * tuple is its request's reversed); neighbour discovery (ICMPv6 133-137) passes
 * (POLICY_PASS); anything else is judged alone by protocol. Returns the flags for policy6.
 */
static __always_inline __u32 policy6_other_tuple(struct __sk_buff *skb, const struct ipv6hdr *ip6,
						 struct ct6_key *t)
{
	__be16 ports[2];
	__u8 type;

	__builtin_memcpy(t->saddr, &ip6->saddr, sizeof(t->saddr));
	__builtin_memcpy(t->daddr, &ip6->daddr, sizeof(t->daddr));
	t->sport = 0;
	t->dport = 0;
	t->proto = ip6->nexthdr;
	if (ip6->nexthdr == IPPROTO_ICMPV6_) {
		__be16 id;

		if (bpf_skb_load_bytes(skb, L4_OFF6, &type, 1) < 0)
			return POLICY_NO_CT;
		if (type >= 133 && type <= 137)
			return POLICY_PASS;
		if ((type != 128 && type != 129) ||
		    bpf_skb_load_bytes(skb, L4_OFF6 + 4, &id, sizeof(id)) < 0)
			return POLICY_NO_CT;
		if (type == 128)
			t->sport = id;
		else
			t->dport = id;
		return 0;
	}
	if (ip6->nexthdr == IPPROTO_SCTP_ &&
	    bpf_skb_load_bytes(skb, L4_OFF6, ports, sizeof(ports)) == 0) {
		t->sport = ports[0];
		t->dport = ports[1];
		return 0;
	}
	return POLICY_NO_CT;
}

#endif /* WEIR_LIB_POLICY_H */
