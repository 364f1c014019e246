/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Outlier detection: the TCP connects to a backend of a frontend with WEIR_SVC_OUTLIER are
 * watched to their first outcome, at the socket layer from connect() (sockops), and for
 * flows translated at tc through their conntrack entries (nodeport.h). An answer (the
 * handshake completes) resets the backend's failure streak; a reset, an ICMP unreachable or a
 * SYN left unanswered until its first retransmission (the initial RTO, 1 s) is a failure.
 * After `threshold` consecutive failures the backend is ejected for base x ejections (at most
 * 300 s, or the base): new connections at the socket layer pass over it at once, and the
 * agent, told through a ring buffer, counts it unhealthy in the shares (which the kernel does
 * not compute) until the ejection ends. The agent owns weir_lb_outlier (settings) and makes
 * each weir_lb_health entry once, zeroed; the datapath alone updates the counts, so neither
 * undoes the other's writes.
 */
#ifndef WEIR_LIB_OUTLIER_H
#define WEIR_LIB_OUTLIER_H

#include <bpf/bpf_core_read.h>

#include "lb.h"

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lb_outlier_sock);
} weir_lb_outlier_sock SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__type(key, __u32);
	__type(value, struct lb_outlier);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb_outlier SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__type(key, __u32);
	__type(value, struct lb_health);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb_health SEC(".maps");

/* The longest ejection (Envoy's max_ejection_time default), unless the base is longer. */
#define OUTLIER_MAX_EJECTION_NS (300ULL * NSEC_PER_SEC)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} weir_lb_events SEC(".maps");

/* Keeps struct lb_ejection_event in the object's BTF (a ring buffer has no value type), so
 * that Rust gets the type. */
const volatile struct lb_ejection_event weir_lb_ejection_event_btf = {};

/* The kernel's struct sock, as far as we read it (CO-RE relocates the offset). */
struct sock___weir {
	int sk_err;
} __attribute__((preserve_access_index));

/* Picks of a new connection's slot while they land on ejected backends. */
#define OUTLIER_PICK_TRIES 4

/*
 * Whether backend `id` of `svc` was just ejected: ejected now, and the agent has not yet
 * scheduled around it (once it has, a backend still in the slots is one it keeps on purpose,
 * under maxEjectionPercent).
 */
static __always_inline bool outlier_ejected(const struct lb_service *svc, __u32 id)
{
	const struct lb_outlier *cfg;
	const struct lb_health *h;

	if (!(svc->flags & WEIR_SVC_OUTLIER))
		return false;
	h = bpf_map_lookup_elem(&weir_lb_health, &id);
	if (!h || h->ejected_until <= bpf_ktime_get_boot_ns())
		return false;
	cfg = bpf_map_lookup_elem(&weir_lb_outlier, &id);
	return cfg && h->ejections > cfg->acked;
}

/* Starts watching a TCP connect to backend `id` of `svc` (from the connect hook). */
static __always_inline void outlier_watch(const struct lb_service *svc, struct bpf_sock *sk,
					  __u32 proto, __u32 id)
{
	struct lb_outlier_sock *o;

	if (!(svc->flags & WEIR_SVC_OUTLIER) || proto != IPPROTO_TCP_ || !sk)
		return;
	o = bpf_sk_storage_get(&weir_lb_outlier_sock, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return;
	o->backend_id = id;
	o->done = 0;
}

/* Counts one connect outcome of backend `id`; ejects it after the threshold. A function of
 * its own (not inlined), so that its locals do not weigh on its callers' stack frames. */
static __noinline void outlier_count(__u32 id, bool ok)
{
	const struct lb_outlier *cfg = bpf_map_lookup_elem(&weir_lb_outlier, &id);
	struct lb_ejection_event *ev;
	struct lb_health *h;
	__u64 now, base, dur;

	if (!cfg)
		return; /* not (or no longer) under outlier detection */
	/* The agent makes the entry (zeroed, never overwritten) with the settings. */
	h = bpf_map_lookup_elem(&weir_lb_health, &id);
	if (!h)
		return;
	now = bpf_ktime_get_boot_ns();
	base = (__u64)cfg->base_ms * 1000000ULL;
	if (ok) {
		lb_count(LB_STAT_CONNECT_OK);
		__sync_fetch_and_add(&h->successes_total, 1);
		h->failures = 0;
		/* Healthy a base time after an ejection ended: one ejection off the multiplier
		 * (the mark moves on, so the next one takes another base time). */
		if (h->ejections > 0 && now >= h->ejected_until + base) {
			h->ejections -= 1;
			h->ejected_until += base;
		}
		return;
	}
	lb_count(LB_STAT_CONNECT_FAIL);
	__sync_fetch_and_add(&h->failures_total, 1);
	/* Connects begun before an ejection do not extend it. */
	if (h->ejected_until > now)
		return;
	/* Not atomic: two CPUs failing at once may count one failure less. */
	h->failures += 1;
	if (cfg->threshold == 0 || h->failures < cfg->threshold)
		return;
	h->failures = 0;
	h->ejections += 1;
	dur = base * h->ejections;
	if (dur > OUTLIER_MAX_EJECTION_NS && dur > base)
		dur = base > OUTLIER_MAX_EJECTION_NS ? base : OUTLIER_MAX_EJECTION_NS;
	h->ejected_until = now + dur;
	lb_count(LB_STAT_EJECTION);
	ev = bpf_ringbuf_reserve(&weir_lb_events, sizeof(*ev), 0);
	if (!ev)
		return; /* the agent also re-reads the map every minute */
	ev->until = h->ejected_until;
	ev->backend_id = id;
	ev->ejections = h->ejections;
	bpf_ringbuf_submit(ev, 0);
}

/* Counts the outcome of a watched connect, once. */
static __always_inline void outlier_outcome(struct lb_outlier_sock *o, bool ok)
{
	if (o->done)
		return;
	o->done = 1;
	outlier_count(o->backend_id, ok);
}

/* The socket's pending error (ECONNREFUSED after a reset, EHOSTUNREACH, ...), or 0. */
static __always_inline int outlier_sock_error(struct bpf_sock *sk)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);

	if (!tp)
		return 0;
	return ((struct sock___weir *)tp)->sk_err;
}

/* The sockops callbacks of a watched connect. */
static __always_inline void outlier_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct lb_outlier_sock *o;
	__u32 watch = BPF_SOCK_OPS_RTO_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_RTO_CB:
	case BPF_SOCK_OPS_STATE_CB:
		break;
	default:
		return; /* every other callback of every socket: nothing to look up */
	}
	if (!sk)
		return;
	o = bpf_sk_storage_get(&weir_lb_outlier_sock, sk, 0, 0);
	if (!o)
		return;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | watch);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		outlier_outcome(o, true);
		/* Nothing more to watch for the connection's life. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~watch);
		break;
	case BPF_SOCK_OPS_RTO_CB:
		if (skops->state == BPF_TCP_SYN_SENT)
			outlier_outcome(o, false);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* A reset or hard ICMP error closes a connecting socket with sk_err set; the
		 * application's own close() leaves it 0. */
		if (skops->args[0] == BPF_TCP_SYN_SENT && skops->args[1] == BPF_TCP_CLOSE &&
		    outlier_sock_error(sk) != 0)
			outlier_outcome(o, false);
		break;
	}
}

#endif /* WEIR_LIB_OUTLIER_H */
