/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Forwarding summaries: what the tc and XDP programs let through is reported per flow and
 * observation point (device and hook), not per packet, as Cilium's trace aggregation does: on
 * the flow's first packet there, on TCP flags (SYN, FIN, RST) new for it there, on a change of
 * reason, and otherwise at most every TRACE_INTERVAL_NS, each summary carrying the packets and
 * bytes since the previous one. A translated flow's summary names its addresses before the
 * translation (from the conntrack entry of the other direction). Off unless the agent sets
 * WEIR_CFG_TRACE; drops are reported one by one elsewhere (endpoint.h). An IPv4 flow's
 * summary is a struct trace_event4 (64 bytes), an IPv6 flow's a struct trace_event. What the
 * full ring refuses is counted per reason in weir_trace_lost.
 */
#ifndef WEIR_LIB_TRACE_H
#define WEIR_LIB_TRACE_H

#include "ct.h"
#include "nodeport.h"
#include "nodeport6.h"

#define TRACE_INTERVAL_NS (5ULL * NSEC_PER_SEC)
#define TRACE_TCP_FLAGS	  (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)
/* The flow table: TRACE_SETS sets of TRACE_WAYS records (a power of two). */
#define TRACE_SETS 4096
#define TRACE_WAYS 4
/*
 * The records' clock: jiffies, read with one load (the verifier inlines bpf_jiffies64), where
 * bpf_ktime_get_coarse_ns was a helper call and a seqcount read at every packet (about 10%
 * of trace_flow's time). Their rate is the kernel's CONFIG_HZ, which libbpf reads from the
 * kernel's config at load; without one (0), the coarse clock in units of 2^20 ns (about a
 * millisecond).
 */
extern unsigned int CONFIG_HZ __kconfig __weak;
#define TRACE_CLOCK_SHIFT 20

/* The records' clock now. */
static __always_inline __u32 trace_now(void)
{
	if (CONFIG_HZ)
		return (__u32)bpf_jiffies64();
	return bpf_ktime_get_coarse_ns() >> TRACE_CLOCK_SHIFT;
}

/* TRACE_INTERVAL_NS in the records' clock. */
static __always_inline __u32 trace_interval(void)
{
	if (CONFIG_HZ)
		return (__u32)(TRACE_INTERVAL_NS / NSEC_PER_SEC) * CONFIG_HZ;
	return (__u32)(TRACE_INTERVAL_NS >> TRACE_CLOCK_SHIFT);
}
/* The agent drains the summaries on a timer; it is woken at each multiple of this waiting. */
#define TRACE_WAKEUP_BYTES (256 << 10)

/* A flow at one observation point. */
struct trace_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u32 ifindex;
	__u8 family;
	__u8 proto;
	__u8 dir;
	__u8 pad;
};

/* A flow, what was last reported of it and what came since: one cache line. */
struct trace_rec {
	struct trace_key k; /* family 0: an empty record */
	__u32 packets;
	__u64 bytes;
	__u32 last; /* the last summary (trace_now) */
	__u8 reason;
	__u8 seen;  /* TRACE_TCP_FLAGS seen */
	__u8 reply; /* TCP: its first packet here was a SYN-ACK */
	__u8 plain; /* the last look found no translation: summaries look no more (until a
		     * new connection on the tuple) */
};

struct trace_set {
	struct trace_rec way[TRACE_WAYS];
};
_Static_assert(sizeof(struct trace_rec) == 64, "a flow's record is one cache line");

/* Room for a summary's work: the programs calling it have little stack left. */
struct trace_scratch {
	struct trace_key k;
	bool xlate; /* the packet may have been translated (else none is looked for) */
	/* trace_flow's map keys: here rather than on its stack, which the verifier tells
	 * apart state by state (fewer states to walk) */
	__u32 set;
	__u32 lost;
	struct ct6_key r6;
	union {
		struct iphdr ip;
		struct ipv6hdr ip6;
	} h;
	__u8 l4[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct trace_scratch);
} weir_trace_scratch SEC(".maps");

/*
 * The flows, set-associative: a flow's set is that of its connection (trace_set_of), so
 * that an untranslated connection's two ways, at one point each or at two, share four
 * records. A flow missing from its set takes an empty record, else one whose connection
 * ended (FIN or RST), else one with nothing
 * unreported, else the one reported longest ago. Small enough to stay in cache (an LRU hash
 * of 65,536 records missed the cache and TLB at every new connection). A record taken from a
 * live flow loses the packets since its last summary (as an LRU's eviction did), and the flow
 * is reported again at its next packet (a non-TCP one as new). Records are read and written
 * without locks: two CPUs racing on one set can count a packet in the wrong summary or report
 * a flow twice. The authoritative counts are weir_metrics'.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TRACE_SETS);
	__uint(map_flags, BPF_F_MMAPABLE); /* its records page-aligned: a set is four lines */
	__type(key, __u32);
	__type(value, struct trace_set);
} weir_trace_flows SEC(".maps");

/*
 * Forwarding summaries (struct trace_event4 of IPv4 flows, struct trace_event of IPv6), in
 * one of TRACE_RINGS rings by CPU (the CPU number modulo TRACE_RINGS; CPUs 0, 4, 8... share
 * one): CPUs writing to one shared ring took turns at its lock and producer position, each
 * reservation moving those cache lines from the CPU that wrote last (about 100 ns a
 * reservation on two CPUs; about 25 with a ring each). The agent reads the rings together
 * (datapath.rs TRACE_RINGS names them). The first keeps the name of the single ring before
 * them, so that programs of the version before, attached until replaced, write where the
 * reader reads. On fewer than TRACE_RINGS CPUs, the rings of the missing ones stay empty.
 */
#define TRACE_RINGS 4
_Static_assert(TRACE_RINGS == 4, "trace_reserve's cases and datapath.rs's TRACE_RINGS name four rings");
struct trace_ring {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
};
struct trace_ring weir_trace_events SEC(".maps");
struct trace_ring weir_trace_events_1 SEC(".maps");
struct trace_ring weir_trace_events_2 SEC(".maps");
struct trace_ring weir_trace_events_3 SEC(".maps");

/*
 * A record of `size` bytes in this CPU's ring, or NULL, with `*wakeup` the flags to submit it
 * with (the wakeup worked out before the reservation, so that nothing after it depends on
 * which ring it came from).
 */
static __always_inline void *trace_reserve(__u64 size, __u64 *wakeup)
{
	switch (bpf_get_smp_processor_id() & (TRACE_RINGS - 1)) {
	case 0:
		*wakeup = ringbuf_lazy_wakeup_next(&weir_trace_events, TRACE_WAKEUP_BYTES, size);
		return bpf_ringbuf_reserve(&weir_trace_events, size, 0);
	case 1:
		*wakeup = ringbuf_lazy_wakeup_next(&weir_trace_events_1, TRACE_WAKEUP_BYTES, size);
		return bpf_ringbuf_reserve(&weir_trace_events_1, size, 0);
	case 2:
		*wakeup = ringbuf_lazy_wakeup_next(&weir_trace_events_2, TRACE_WAKEUP_BYTES, size);
		return bpf_ringbuf_reserve(&weir_trace_events_2, size, 0);
	default:
		*wakeup = ringbuf_lazy_wakeup_next(&weir_trace_events_3, TRACE_WAKEUP_BYTES, size);
		return bpf_ringbuf_reserve(&weir_trace_events_3, size, 0);
	}
}

/* Summaries the full rings refused, per reason (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_METRICS_STRIDE);
	__type(key, __u32);
	__type(value, __u64);
} weir_trace_lost SEC(".maps");

/* The scratch space, when summaries are on (WEIR_CFG_TRACE). */
static __always_inline struct trace_scratch *trace_scratch(void)
{
	__u32 zero = 0;
	const struct node_config *cfg = bpf_map_lookup_elem(&weir_config, &zero);
	struct trace_scratch *s;

	if (!cfg || !(cfg->flags & WEIR_CFG_TRACE))
		return NULL;
	s = bpf_map_lookup_elem(&weir_trace_scratch, &zero);
	if (s)
		__builtin_memset(&s->k, 0, sizeof(s->k));
	return s;
}

/*
 * The addresses of a translated flow's packet `k` before the translation, from the conntrack
 * entry of the other direction: a request's partner is the reply entry (its nat_* the
 * frontend, its snat_* the client when SNATed), a reply's is the original entry (its nat_* the
 * backend, its snat_* the node's address and port when SNATed).
 */
static __always_inline void trace_xlate4(struct trace_event4 *ev, const struct trace_key *k)
{
	struct ct4_key r = {
		.saddr = k->daddr[0],
		.daddr = k->saddr[0],
		.sport = k->dport,
		.dport = k->sport,
		.proto = k->proto,
	};
	const struct ct4_entry *e = bpf_map_lookup_elem(&weir_ct4, &r);
	bool reply;

	if (!e || ct_expired(e))
		return;
	reply = !(e->flags & CT_F_REPLY);
	ev->orig_saddr = k->saddr[0];
	ev->orig_daddr = k->daddr[0];
	ev->orig_sport = k->sport;
	ev->orig_dport = k->dport;
	if (!reply) {
		ev->orig_daddr = e->nat_addr;
		ev->orig_dport = e->nat_port;
		if (e->flags & CT_F_SNAT) {
			ev->orig_saddr = e->snat_addr;
			ev->orig_sport = e->snat_port;
		}
	} else {
		ev->orig_saddr = e->nat_addr;
		ev->orig_sport = e->nat_port;
		if (e->flags & CT_F_SNAT) {
			ev->orig_daddr = e->snat_addr;
			ev->orig_dport = e->snat_port;
		}
	}
	if (ev->orig_saddr == k->saddr[0] && ev->orig_daddr == k->daddr[0] &&
	    ev->orig_sport == k->sport && ev->orig_dport == k->dport)
		return;
	ev->svc_id = e->svc_id;
	ev->flags |= TRACE_F_XLATE | (reply ? TRACE_F_REPLY : 0);
}

/* trace_xlate4 for IPv6 flows (weir_ct6). */
static __always_inline void trace_xlate6(struct trace_event *ev, const struct trace_key *k,
					 struct ct6_key *r)
{
	const struct ct6_entry *e;
	bool reply;

	__builtin_memset(r, 0, sizeof(*r));
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
	__builtin_memcpy(r->saddr, k->daddr, sizeof(r->saddr));
	__builtin_memcpy(r->daddr, k->saddr, sizeof(r->daddr));
	e = bpf_map_lookup_elem(&weir_ct6, r);
	if (!e || e->expires < ct_now())
		return;
	reply = !(e->flags & CT_F_REPLY);
	__builtin_memcpy(ev->orig_saddr, k->saddr, sizeof(ev->orig_saddr));
	__builtin_memcpy(ev->orig_daddr, k->daddr, sizeof(ev->orig_daddr));
	ev->orig_sport = k->sport;
	ev->orig_dport = k->dport;
	if (!reply) {
		__builtin_memcpy(ev->orig_daddr, e->nat_addr, sizeof(ev->orig_daddr));
		ev->orig_dport = e->nat_port;
		if (e->flags & CT_F_SNAT) {
			__builtin_memcpy(ev->orig_saddr, e->snat_addr, sizeof(ev->orig_saddr));
			ev->orig_sport = e->snat_port;
		}
	} else {
		__builtin_memcpy(ev->orig_saddr, e->nat_addr, sizeof(ev->orig_saddr));
		ev->orig_sport = e->nat_port;
		if (e->flags & CT_F_SNAT) {
			__builtin_memcpy(ev->orig_daddr, e->snat_addr, sizeof(ev->orig_daddr));
			ev->orig_dport = e->snat_port;
		}
	}
	ev->svc_id = e->svc_id;
	ev->flags |= TRACE_F_XLATE | (reply ? TRACE_F_REPLY : 0);
}

/* One end of a flow as a number: its address (folded to 32 bits) and port. */
static __always_inline __u64 trace_end(const __be32 *addr, __be16 port)
{
	return (__u64)(addr[0] ^ addr[1] ^ addr[2] ^ addr[3]) << 16 | port;
}

/*
 * Where flow `k` goes in weir_trace_flows: its set, that of its connection whichever way and
 * wherever it is seen, and in `*down` which end of the set it searches from (trace_way).
 * The set is a hash of the two addresses (added, so both orders give the same) plus the two
 * ports: a client's successive connections, whose ports go up, take sets one after the
 * other, which the CPU's prefetcher brings in ahead of them (a hash of the whole tuple put
 * each connection's first packet on a cold set: `trace_flow` 617 -> 561-566 ns per
 * connection by phase profile). A reply's first packet finds the set its request's first
 * packet just brought into the cache, where a set per direction cost a second cold set per
 * connection. A connection's two directions search from opposite ends (which end of the
 * connection is the greater number decides), so that in a set of one connection a packet
 * finds its own record first, without comparing the other direction's, which the CPU of
 * that direction's sender writes at each of its packets. The key is the packet as it
 * leaves: a translated flow's reply (a NodePort's, a masqueraded one's) has ends of its own,
 * and a set of its own.
 */
static __always_inline __u32 trace_set_of(const struct trace_key *k, bool *down)
{
	__u64 s = trace_end(k->saddr, k->sport), d = trace_end(k->daddr, k->dport);
	__u64 addrs = hash64((s >> 16) + (d >> 16) + ((__u64)k->proto << 48));

	*down = s > d;
	return (addrs + bpf_ntohs(k->sport) + bpf_ntohs(k->dport)) & (TRACE_SETS - 1);
}

/*
 * Whether flow keys `a` and `b` are the same, compared a word of eight bytes at a time (both
 * are at the start of a map value or of a record: eight-byte aligned).
 */
static __always_inline bool trace_key_eq(const struct trace_key *a, const struct trace_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	__u64 diff = ((const __u32 *)a)[10] ^ ((const __u32 *)b)[10];

#pragma unroll
	for (int i = 0; i < 5; i++)
		diff |= x[i] ^ y[i];
	return !diff;
}
_Static_assert(sizeof(struct trace_key) == 44 && __builtin_offsetof(struct trace_rec, k) == 0 &&
		       __builtin_offsetof(struct trace_scratch, k) == 0,
	       "trace_key_eq: five words and a half, at an eight-byte boundary");

/*
 * Way `i` of `set` in the order a flow searches it: from the first, or with `down` the last
 * (i ^ 3 is 3 - i: the index is arithmetic, not a choice between two, so the verifier walks
 * each way's access once).
 */
static __always_inline struct trace_rec *trace_way(struct trace_set *set, bool down, int i)
{
	return &set->way[(i ^ (-(__u32)down & (TRACE_WAYS - 1))) & (TRACE_WAYS - 1)];
}

/* The record of flow `k` in `set`, or NULL (`down`: see trace_way). */
static __always_inline struct trace_rec *trace_find(struct trace_set *set,
						    const struct trace_key *k, bool down)
{
#pragma unroll
	for (int i = 0; i < TRACE_WAYS; i++) {
		struct trace_rec *r = trace_way(set, down, i);

		if (trace_key_eq(&r->k, k))
			return r;
	}
	return NULL;
}

/* Whether record `r`'s connection ended (FIN or RST seen). */
static __always_inline bool trace_ended(const struct trace_rec *r)
{
	return r->seen & (TCP_FLAG_FIN | TCP_FLAG_RST);
}

/* Record `s` starts a flow (or a new connection on its tuple) at a packet with TCP flags `tcp`. */
static __always_inline void trace_start(struct trace_rec *s, __u8 tcp)
{
	s->packets = 0;
	s->bytes = 0;
	s->seen = 0;
	s->plain = 0; /* its translation is its own: looked for again */
	s->reply = (tcp & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == (TCP_FLAG_SYN | TCP_FLAG_ACK);
}

/*
 * The record a flow missing from `set` takes (see weir_trace_flows), at `now`: of those as
 * good, the first in the flow's order (`down`: see trace_way).
 */
static __always_inline struct trace_rec *trace_victim(struct trace_set *set, __u32 now,
						      bool down)
{
	struct trace_rec *v = trace_way(set, down, 0);
	__u32 best = 0;

#pragma unroll
	for (int i = 0; i < TRACE_WAYS; i++) {
		struct trace_rec *r = trace_way(set, down, i);
		/* Empty beats ended beats nothing unreported beats the longest since its last
		 * summary. */
		__u32 score = !r->k.family ? 0xffffffff :
			      trace_ended(r) ? 0xfffffffe :
			      !r->packets ? 0xfffffffd :
					    (now - r->last) >> 1;

		if (score > best || i == 0) {
			best = score;
			v = r;
		}
	}
	return v;
}

/*
 * Whether the summary of flow record `s` is to settle the flow's translation: a flow's
 * translation is settled by its first packet (the conntrack entry is made before the
 * summary), so it is looked for again only if the last look found one. The caller looks
 * (unless the program knows it translated nothing) and marks the flow plain when none was
 * found, until a new connection on its tuple.
 */
static __always_inline bool trace_xlate_due(const struct trace_scratch *sc,
					    const struct trace_rec *s)
{
	return (sc->k.proto == IPPROTO_TCP_ || sc->k.proto == IPPROTO_UDP_) && !s->plain;
}

/*
 * Fills what both summary layouts share from flow record `s` of flow `k`, handing its packets
 * and bytes over (the next summary counts from here). A macro: the layouts name the same
 * fields with types of their own.
 */
#define TRACE_FILL(ev, k, s, tcp, reason, flags)        \
	do {                                            \
		__builtin_memset(ev, 0, sizeof(*(ev))); \
		(ev)->ts = bpf_ktime_get_boot_ns();     \
		(ev)->packets = (s)->packets;           \
		(ev)->bytes = (s)->bytes;               \
		(s)->packets -= (ev)->packets;          \
		(s)->bytes -= (ev)->bytes;              \
		(ev)->sport = (k)->sport;               \
		(ev)->dport = (k)->dport;               \
		(ev)->proto = (k)->proto;               \
		(ev)->dir = (k)->dir;                   \
		(ev)->ifindex = (k)->ifindex;           \
		(ev)->tcp_flags = (tcp);                \
		(ev)->reason = (reason);                \
		(ev)->tcp_seen = (s)->seen;             \
		(ev)->flags = (flags);                  \
	} while (0)

/*
 * Reports IPv4 flow record `s` at a packet with TCP flags `tcp`, under `reason`, with
 * TRACE_F_* `flags`: 0, or -1 when the full ring refused it.
 */
static __always_inline int trace_emit4(struct trace_scratch *sc, struct trace_rec *s, __u8 tcp,
				       __u32 reason, __u8 flags)
{
	const struct trace_key *k = &sc->k;
	__u64 wakeup;
	struct trace_event4 *ev = trace_reserve(sizeof(*ev), &wakeup);

	if (!ev)
		return -1;
	TRACE_FILL(ev, k, s, tcp, reason, flags);
	ev->saddr = k->saddr[0];
	ev->daddr = k->daddr[0];
	if (trace_xlate_due(sc, s)) {
		if (sc->xlate)
			trace_xlate4(ev, k);
		s->plain = !(ev->flags & TRACE_F_XLATE);
	}
	bpf_ringbuf_submit(ev, wakeup);
	return 0;
}

/* trace_emit4 for IPv6 flows (struct trace_event). */
static __always_inline int trace_emit6(struct trace_scratch *sc, struct trace_rec *s, __u8 tcp,
				       __u32 reason, __u8 flags)
{
	const struct trace_key *k = &sc->k;
	__u64 wakeup;
	struct trace_event *ev = trace_reserve(sizeof(*ev), &wakeup);

	if (!ev)
		return -1;
	TRACE_FILL(ev, k, s, tcp, reason, flags);
	__builtin_memcpy(ev->saddr, k->saddr, sizeof(ev->saddr));
	__builtin_memcpy(ev->daddr, k->daddr, sizeof(ev->daddr));
	ev->family = k->family;
	if (trace_xlate_due(sc, s)) {
		if (sc->xlate)
			trace_xlate6(ev, k, &sc->r6);
		s->plain = !(ev->flags & TRACE_F_XLATE);
	}
	bpf_ringbuf_submit(ev, wakeup);
	return 0;
}

/*
 * Records a packet of flow `k` (`tcp` its TCP flags, `len` its length) that the program let
 * through under `reason`, and reports the flow when it is due (see above). Inline in its
 * callers (trace_skb, itself a subprogram, and trace_xdp): as a subprogram of its own it cost
 * a call and a return per packet, and returns are dear where the kernel guards them
 * (Safe RET): 67 -> 62 ns per packet with summaries (from_netdev, BPF_PROG_TEST_RUN), for
 * about 1,000-2,500 more instructions walked by the verifier (from_pod 388k, from_netdev
 * 462k, xdp_nodeport 49k, whose two trace_xdp calls each hold a copy).
 */
static __always_inline int trace_flow(struct trace_scratch *sc, __u8 tcp, __u32 len, __u32 reason)
{
	const struct trace_key *k = &sc->k;
	struct trace_set *set;
	bool down;
	/* A tick's resolution (no clock source read) is enough to space summaries seconds apart. */
	__u32 now = trace_now(), interval = trace_interval();
	__u8 flags = tcp & TRACE_TCP_FLAGS;
	struct trace_rec *s;
	bool first = false, restart = false;
	__u8 ev_flags = 0;

	sc->set = trace_set_of(k, &down);
	set = bpf_map_lookup_elem(&weir_trace_flows, &sc->set);
	if (!set)
		return 0;
	s = trace_find(set, k, down);
	if (!s) {
		/* Its packets so far are this event's. */
		s = trace_victim(set, now, down);
		__builtin_memcpy(&s->k, k, sizeof(s->k));
		trace_start(s, tcp);
		first = true;
	} else if ((tcp & TCP_FLAG_SYN) && trace_ended(s)) {
		/* A new connection on a tuple whose last one ended: its own flow. */
		trace_start(s, tcp);
		restart = true;
	}
	/* Plain adds: a flow's packets rarely race on two CPUs, and a summary's counts are not
	 * the authoritative ones (weir_metrics is). */
	s->packets += 1;
	s->bytes += len;
	if (!first && !(flags & ~s->seen) && s->reason == (__u8)reason &&
	    now - s->last < interval && !(s->packets >> 31))
		return 0;
	/* Due: whatever comes of the event, the next one waits for its own cause. */
	s->last = now;
	s->seen |= flags;
	s->reason = reason;
	/* New: a connection's first SYN here, or another protocol's first packet (a TCP flow
	 * whose record was taken meanwhile is reported again, not counted again). */
	if (restart || (first && (k->proto != IPPROTO_TCP_ || (tcp & TCP_FLAG_SYN))))
		ev_flags = TRACE_F_NEW;
	ev_flags |= s->reply ? TRACE_F_REPLY : 0;
	if (k->family == WEIR_AF_INET ? trace_emit4(sc, s, tcp, reason, ev_flags) :
					trace_emit6(sc, s, tcp, reason, ev_flags)) {
		__u64 *n;

		sc->lost = reason % WEIR_METRICS_STRIDE;
		n = bpf_map_lookup_elem(&weir_trace_lost, &sc->lost);

		if (n)
			*n += 1;
		/* A flow's first summary is due again at its next packet. */
		if (first)
			s->last = now - interval;
	}
	return 0;
}

/*
 * The ports of the TCP or UDP header at `off` into the key; returns TCP's flags (the header's
 * 14th byte; 0 for UDP), or -1. Loaded in place when the linear part holds them (the usual
 * case), else from a copy. Loaded as the words they are: copying the header byte by byte
 * into the scratch and reading the ports back had each two-byte load wait for the two byte
 * stores it spans (a quarter of trace_skb's samples).
 */
static __always_inline int trace_ports(struct __sk_buff *skb, struct trace_scratch *sc, __u32 off)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *p, tcp = 0;

	if (off > 128)
		return -1;
	p = data + off;
	if (sc->k.proto == IPPROTO_TCP_) {
		if ((void *)(p + 14) > end) {
			if (bpf_skb_load_bytes(skb, off, sc->l4, 14) < 0)
				return -1;
			p = sc->l4;
		}
		tcp = p[13];
	} else if ((void *)(p + 4) > end) {
		if (bpf_skb_load_bytes(skb, off, sc->l4, 4) < 0)
			return -1;
		p = sc->l4;
	}
	sc->k.sport = ((__be16 *)p)[0];
	sc->k.dport = ((__be16 *)p)[1];
	return tcp;
}

/* A tc program's packet, as it leaves the program under `reason` (`xlate`: see count_fwd). */
static __noinline int trace_skb(struct __sk_buff *skb, __u32 dir, __u32 reason, bool xlate)
{
	struct trace_scratch *sc = trace_scratch();
	void *data, *end;
	__u32 l4 = 0;
	int tcp = 0;

	if (!sc)
		return 0;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > end) {
			if (bpf_skb_load_bytes(skb, ETH_HLEN, &sc->h.ip, sizeof(sc->h.ip)) < 0)
				return 0;
			ip = &sc->h.ip;
		}
		if (ip->version != 4)
			return 0;
		sc->k.family = WEIR_AF_INET;
		sc->k.proto = ip->protocol;
		sc->k.saddr[0] = ip->saddr;
		sc->k.daddr[0] = ip->daddr;
		if (!(ip->frag_off & bpf_htons(0x1fff)))
			l4 = ETH_HLEN + ip->ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > end) {
			if (bpf_skb_load_bytes(skb, ETH_HLEN, &sc->h.ip6, sizeof(sc->h.ip6)) < 0)
				return 0;
			ip6 = &sc->h.ip6;
		}
		sc->k.family = WEIR_AF_INET6;
		sc->k.proto = ip6->nexthdr;
		__builtin_memcpy(sc->k.saddr, &ip6->saddr, sizeof(sc->k.saddr));
		__builtin_memcpy(sc->k.daddr, &ip6->daddr, sizeof(sc->k.daddr));
		l4 = ETH_HLEN + sizeof(struct ipv6hdr);
	} else {
		return 0;
	}
	/* Other protocols, and fragments after the first, have no ports (the key's are 0). */
	if (l4 && (sc->k.proto == IPPROTO_TCP_ || sc->k.proto == IPPROTO_UDP_)) {
		tcp = trace_ports(skb, sc, l4);
		if (tcp < 0)
			return 0;
	}
	sc->k.ifindex = skb->ifindex;
	sc->k.dir = dir;
	sc->xlate = xlate;
	return trace_flow(sc, tcp, skb->len, reason);
}

/* An XDP program's IPv4 packet (it translates no other), as it leaves under `reason`. */
static __always_inline void trace_xdp(struct xdp_md *ctx, __u32 reason)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip4 = data + sizeof(struct ethhdr);
	struct trace_scratch *sc;
	__u8 *l4, tcp = 0;

	if ((void *)(ip4 + 1) > end || ip4->ihl != 5 || !(sc = trace_scratch()))
		return;
	l4 = (void *)(ip4 + 1);
	sc->k.family = WEIR_AF_INET;
	sc->k.proto = ip4->protocol;
	sc->k.saddr[0] = ip4->saddr;
	sc->k.daddr[0] = ip4->daddr;
	if (sc->k.proto == IPPROTO_TCP_ && (void *)(l4 + 14) <= end)
		tcp = l4[13];
	if ((sc->k.proto == IPPROTO_TCP_ || sc->k.proto == IPPROTO_UDP_) &&
	    (void *)(l4 + 4) <= end) {
		sc->k.sport = ((__be16 *)l4)[0];
		sc->k.dport = ((__be16 *)l4)[1];
	}
	sc->k.ifindex = ctx->ingress_ifindex;
	sc->k.dir = WEIR_DIR_INGRESS;
	sc->xlate = true;
	trace_flow(sc, tcp, (__u32)(end - data), reason);
}

#endif /* WEIR_LIB_TRACE_H */
