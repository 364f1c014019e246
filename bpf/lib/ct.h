/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * BPF conntrack for load-balanced flows: one LRU entry per direction, TCP state from the
 * flags seen (SYN, reply, established, FIN/RST closing) choosing the lifetime, as Cilium's
 * defaults: established 6 h, SYN 60 s, closing 10 s, other protocols 60 s. Expired entries are
 * ignored here and removed by the agent's garbage collector.
 */
#ifndef WEIR_LIB_CT_H
#define WEIR_LIB_CT_H

#include "pkt.h"
#include "weir/api/datapath.h"

#define CT_MAP_SIZE 262144

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_MAP_SIZE);
	__type(key, struct ct4_key);
	__type(value, struct ct4_entry);
} weir_ct4 SEC(".maps");

static __always_inline __u64 ct_now(void)
{
	return bpf_ktime_get_boot_ns() / NSEC_PER_SEC;
}

static __always_inline __u64 ct_lifetime(__u16 flags, __u8 proto)
{
	if (proto != IPPROTO_TCP_)
		return CT_LIFETIME_OTHER;
	if ((flags & (CT_F_TIME_WAIT | CT_F_RST)) == CT_F_TIME_WAIT)
		return CT_LIFETIME_TCP_TIME_WAIT;
	if (flags & CT_F_CLOSING)
		return CT_LIFETIME_TCP_CLOSING;
	if (flags & CT_F_ESTABLISHED)
		return CT_LIFETIME_TCP_ESTABLISHED;
	return CT_LIFETIME_TCP_SYN;
}

/* The state after a packet with `tcp_flags` in the given direction. */
static __always_inline __u16 ct_next_flags(__u16 flags, __u8 proto, __u8 tcp_flags, bool reply)
{
	if (proto == IPPROTO_TCP_) {
		if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
			flags |= CT_F_CLOSING;
		if (tcp_flags & TCP_FLAG_RST)
			flags |= CT_F_RST;
		/* The side whose FIN comes first closes actively and keeps TIME_WAIT. */
		if ((tcp_flags & TCP_FLAG_FIN) && !reply)
			flags |= CT_F_FIN_CLIENT;
		if ((tcp_flags & TCP_FLAG_FIN) && reply && !(flags & CT_F_FIN_CLIENT))
			flags |= CT_F_TIME_WAIT;
		if (reply)
			flags |= CT_F_SEEN_REPLY;
		else if ((flags & CT_F_SEEN_REPLY) && !(tcp_flags & TCP_FLAG_SYN))
			flags |= CT_F_ESTABLISHED;
	} else if (reply) {
		flags |= CT_F_SEEN_REPLY;
	}
	return flags;
}

/*
 * Records a packet on `e` and its partner `other` (the entry of the other direction, when
 * found): both carry the same state and lifetime. One body for the IPv4 and IPv6 entry types
 * (ct_touch, ct6_touch), which share these fields.
 */
#define CT_TOUCH_BODY(e, other, proto, tcp_flags, reply, len)                                  \
	do {                                                                                   \
		__u16 keep_ = (e)->flags & CT_F_KIND;                                          \
		__u16 state_ = ct_next_flags((e)->flags, proto, tcp_flags, reply) & ~CT_F_KIND; \
		__u64 expires_ = ct_now() + ct_lifetime(state_, proto);                        \
                                                                                               \
		(e)->flags = keep_ | state_;                                                   \
		(e)->expires = expires_;                                                       \
		__sync_fetch_and_add(&(e)->packets, 1);                                        \
		__sync_fetch_and_add(&(e)->bytes, len);                                        \
		if (other) {                                                                   \
			(other)->flags = ((other)->flags & CT_F_KIND) | state_;                \
			(other)->expires = expires_;                                           \
		}                                                                              \
	} while (0)

static __always_inline void ct_touch(struct ct4_entry *e, struct ct4_entry *other, __u8 proto,
				     __u8 tcp_flags, bool reply, __u32 len)
{
	CT_TOUCH_BODY(e, other, proto, tcp_flags, reply, len);
}

/* The key of the other direction of flow `t`: addresses and ports swapped. */
static __always_inline void ct4_reverse(struct ct4_key *r, const struct ct4_key *t)
{
	r->saddr = t->daddr;
	r->daddr = t->saddr;
	r->sport = t->dport;
	r->dport = t->sport;
	r->proto = t->proto;
	r->pad[0] = r->pad[1] = r->pad[2] = 0;
}

static __always_inline void ct6_reverse(struct ct6_key *r, const struct ct6_key *t)
{
	__builtin_memcpy(r->saddr, t->daddr, sizeof(r->saddr));
	__builtin_memcpy(r->daddr, t->saddr, sizeof(r->daddr));
	r->sport = t->dport;
	r->dport = t->sport;
	r->proto = t->proto;
	r->pad[0] = r->pad[1] = r->pad[2] = 0;
}

static __always_inline bool ct_expired(const struct ct4_entry *e)
{
	return e->expires < ct_now();
}

#endif /* WEIR_LIB_CT_H */
