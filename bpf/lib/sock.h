/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level load balancing: service addresses are rewritten to a backend once, when a
 * socket connects (TCP, connected UDP) or sends (unconnected UDP), so no packet is ever
 * NATed; recvmsg and getpeername show the service address back to the application.
 */
#ifndef WEIR_LIB_SOCK_H
#define WEIR_LIB_SOCK_H

#include "lb.h"
#include "outlier.h"
#include "weir/api/datapath.h"

/* The flow identity used for Maglev at the socket layer: the socket itself. */
static __always_inline __u64 sock_flow(struct bpf_sock_addr *ctx)
{
	return bpf_get_socket_cookie(ctx);
}

/* Translations (struct sock_event), when the agent asks for them (SOCK_CFG_EVENTS). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} weir_sock_events SEC(".maps");

/* Events the full weir_sock_events refused, per SOCK_XLATE_* point (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} weir_sock_lost SEC(".maps");

/* Node-wide settings of the socket layer (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sock_config);
} weir_sock_config SEC(".maps");

static __always_inline bool sock_events_on(void)
{
	__u32 zero = 0;
	const struct sock_config *c = bpf_map_lookup_elem(&weir_sock_config, &zero);

	return c && (c->flags & SOCK_CFG_EVENTS);
}

/* Hands `e` (family, addresses, ports, point, service, reason filled in) to the agent. */
static __noinline int sock_emit(struct bpf_sock_addr *ctx, struct sock_event *e)
{
	__u32 point = e->point & 3;
	struct sock_event *ev;

	e->ts = bpf_ktime_get_boot_ns();
	e->cookie = bpf_get_socket_cookie(ctx);
	e->netns = bpf_get_netns_cookie(ctx);
	e->proto = (__u8)ctx->protocol;
	ev = bpf_ringbuf_reserve(&weir_sock_events, sizeof(*ev), 0);
	if (!ev) {
		__u64 *n = bpf_map_lookup_elem(&weir_sock_lost, &point);

		if (n)
			*n += 1;
		return 0;
	}
	__builtin_memcpy(ev, e, sizeof(*ev));
	/* The agent drains them on a timer: woken at each quarter of the ring that waits. */
	bpf_ringbuf_submit(ev, ringbuf_lazy_wakeup(&weir_sock_events, 64 << 10, sizeof(*ev)));
	return 0;
}

/*
 * The service address the socket asked for (still in the context), into `e`: `n` words (4
 * in an IPv6 program, which alone may read user_ip6; 1 in an IPv4 one).
 */
static __always_inline void sock_event_vip(struct bpf_sock_addr *ctx, struct sock_event *e, int n)
{
	if (n == 4) {
		e->family = WEIR_AF_INET6;
		e->vip[0] = ctx->user_ip6[0];
		e->vip[1] = ctx->user_ip6[1];
		e->vip[2] = ctx->user_ip6[2];
		e->vip[3] = ctx->user_ip6[3];
	} else {
		e->family = WEIR_AF_INET;
		e->vip[0] = ctx->user_ip4;
	}
	e->vport = (__be16)ctx->user_port;
}

/*
 * Reports the translation of the socket's service address at `point` to `be` (n words), or
 * its refusal (`be` NULL, `reason` the drop's).
 */
static __always_inline void sock_report(struct bpf_sock_addr *ctx, __u32 point, __u32 svc_id,
					const __be32 *be, __be16 bport, int n, __u32 reason)
{
	struct sock_event e = {
		.point = point, .svc_id = svc_id, .bport = bport, .reason = reason
	};

	if (!sock_events_on())
		return;
	sock_event_vip(ctx, &e, n);
	if (!be) {
		sock_emit(ctx, &e);
		return;
	}
	e.backend[0] = be[0];
	if (n == 4) {
		e.backend[1] = be[1];
		e.backend[2] = be[2];
		e.backend[3] = be[3];
	}
	sock_emit(ctx, &e);
}

/* Refuses a connect() or sendmsg() to a service (`reason`), and reports it. */
static __always_inline int sock_refuse(struct bpf_sock_addr *ctx, __u32 point, __u32 svc_id,
				       __u32 reason, int n)
{
	/* connect()/sendmsg() fail at once with ECONNREFUSED instead of timing out. */
	bpf_set_retval(-ECONNREFUSED_);
	lb_count(LB_STAT_NO_BACKEND);
	sock_report(ctx, point, svc_id, NULL, 0, n, reason);
	return 0;
}

/*
 * Whether the (socket, backend) pair `rk` already maps to `rv`: then it is left as it is, its
 * flags (LB_REVNAT_F_REPORTED) with it.
 */
static __always_inline bool sock4_revnat_same(const struct lb4_revnat_key *rk,
					      const struct lb4_revnat *rv)
{
	const struct lb4_revnat *cur = bpf_map_lookup_elem(&weir_lb4_revnat, rk);

	return cur && cur->address == rv->address && cur->port == rv->port &&
	       cur->svc_id == rv->svc_id;
}

static __always_inline bool sock6_revnat_same(const struct lb6_revnat_key *rk,
					      const struct lb6_revnat *rv)
{
	const struct lb6_revnat *cur = bpf_map_lookup_elem(&weir_lb6_revnat, rk);

	return cur && cur->address[0] == rv->address[0] && cur->address[1] == rv->address[1] &&
	       cur->address[2] == rv->address[2] && cur->address[3] == rv->address[3] &&
	       cur->port == rv->port && cur->svc_id == rv->svc_id;
}

/* The SOCK_XLATE_* point of a forward translation. */
static __always_inline __u32 sock_point(bool connected)
{
	return connected ? SOCK_XLATE_CONNECT : SOCK_XLATE_SENDMSG;
}

/*
 * Translates an IPv4 service destination to a backend.
 * Returns: 1 to let the call proceed (translated or not a service), 0 to refuse it.
 */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx, __u32 stat, bool connected)
{
	struct lb4_key key = {
		.address = ctx->user_ip4,
		.dport = (__be16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
	};
	struct lb4_revnat_key rk = {};
	struct lb4_revnat rv = {};
	const struct lb_service *svc, *slot;
	const struct lb4_backend *be;
	__u64 client;
	__u32 id, tries;

	if (key.proto != IPPROTO_TCP_ && key.proto != IPPROTO_UDP_)
		return 1;
	svc = bpf_map_lookup_elem(&weir_lb4_svc, &key);
	if (!svc)
		return 1;
	if (svc->count == 0)
		return sock_refuse(ctx, sock_point(connected), svc->svc_id, DROP_NO_SERVICE_BACKEND, 1);
	client = (svc->flags & WEIR_SVC_AFFINITY) ? bpf_get_netns_cookie(ctx) : 0;
	id = lb_affinity_backend(svc, client);
	if (!id && (svc->flags & WEIR_SVC_MAGLEV))
		id = lb_maglev_backend(svc, sock_flow(ctx));
	/* A backend the datapath has just ejected is passed over (a few tries) until the
	 * agent has taken it out of the slots. */
	for (tries = 0; !id && tries < OUTLIER_PICK_TRIES; tries++) {
		key.slot = lb_pick_slot(svc);
		slot = bpf_map_lookup_elem(&weir_lb4_svc, &key);
		if (!slot)
			goto missing;
		id = slot->backend_id;
		if (tries + 1 < OUTLIER_PICK_TRIES && outlier_ejected(svc, id))
			id = 0;
	}
	be = bpf_map_lookup_elem(&weir_lb4_backends, &id);
	if (!be)
		goto missing;
	lb_affinity_remember(svc, client, id);

	if (connected) {
		/* One peer for the socket's life: keep it on the socket itself. */
		struct lb4_sock *st = bpf_sk_storage_get(&weir_lb4_sock, ctx->sk, 0,
							 BPF_SK_STORAGE_GET_F_CREATE);

		if (st) {
			st->vip = ctx->user_ip4;
			st->vport = (__be16)ctx->user_port;
			st->backend = be->address;
			st->bport = be->port;
			st->svc_id = svc->svc_id;
		} else {
			lb_count(LB_STAT_REVNAT_UPDATE_FAIL);
		}
		outlier_watch(svc, ctx->sk, key.proto, id);
		sock_report(ctx, SOCK_XLATE_CONNECT, svc->svc_id, &be->address, be->port, 1, 0);
	} else {
		/* Unconnected UDP talks to many peers: remember each (socket, backend), and
		 * report the pair's first datagram. */
		rk.cookie = bpf_get_socket_cookie(ctx);
		rk.address = be->address;
		rk.port = be->port;
		rv.address = ctx->user_ip4;
		rv.port = (__be16)ctx->user_port;
		rv.svc_id = svc->svc_id;
		if (bpf_map_update_elem(&weir_lb4_revnat, &rk, &rv, BPF_NOEXIST) == 0)
			sock_report(ctx, SOCK_XLATE_SENDMSG, svc->svc_id, &be->address, be->port, 1, 0);
		else if (!sock4_revnat_same(&rk, &rv) &&
			 bpf_map_update_elem(&weir_lb4_revnat, &rk, &rv, BPF_ANY) < 0)
			lb_count(LB_STAT_REVNAT_UPDATE_FAIL);
	}

	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	lb_count(stat);
	return 1;
missing:
	/* The control plane writes backends before the slots that name them; a miss is a bug or
	 * a race with a removal. Refuse rather than send to the VIP. */
	lb_count(LB_STAT_BACKEND_MISSING);
	return sock_refuse(ctx, sock_point(connected), svc->svc_id, DROP_BACKEND_MISSING, 1);
}

/*
 * Reports a reply of unconnected UDP (recvmsg) from the backend still in the socket address
 * to the service address `vip` (n words), which the application is about to see.
 */
static __always_inline void sock_report_rev(struct bpf_sock_addr *ctx, __u32 svc_id,
					    const __be32 *vip, __be16 vport, int n)
{
	struct sock_event e = { .point = SOCK_XLATE_RECVMSG, .svc_id = svc_id, .vport = vport };

	if (!sock_events_on())
		return;
	if (n == 4) {
		e.family = WEIR_AF_INET6;
		e.backend[0] = ctx->user_ip6[0];
		e.backend[1] = ctx->user_ip6[1];
		e.backend[2] = ctx->user_ip6[2];
		e.backend[3] = ctx->user_ip6[3];
		e.vip[1] = vip[1];
		e.vip[2] = vip[2];
		e.vip[3] = vip[3];
	} else {
		e.family = WEIR_AF_INET;
		e.backend[0] = ctx->user_ip4;
	}
	e.vip[0] = vip[0];
	e.bport = (__be16)ctx->user_port;
	sock_emit(ctx, &e);
}

/*
 * Shows the service address instead of the backend's (recvmsg, getpeername). A recvmsg
 * (`recv`) of unconnected UDP reports a (socket, backend) pair's first reply.
 */
static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx, bool recv)
{
	struct lb4_sock *st = bpf_sk_storage_get(&weir_lb4_sock, ctx->sk, 0, 0);

	if (st && st->backend == ctx->user_ip4 && st->bport == (__be16)ctx->user_port) {
		ctx->user_ip4 = st->vip;
		ctx->user_port = (__u32)st->vport;
		lb_count(LB_STAT_XLATE_REV);
		return;
	}
	struct lb4_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct lb4_revnat *rv = bpf_map_lookup_elem(&weir_lb4_revnat, &rk);

	if (!rv)
		return;
	if (recv && !(rv->flags & LB_REVNAT_F_REPORTED)) {
		rv->flags |= LB_REVNAT_F_REPORTED;
		sock_report_rev(ctx, rv->svc_id, &rv->address, rv->port, 1);
	}
	ctx->user_ip4 = rv->address;
	ctx->user_port = (__u32)rv->port;
	lb_count(LB_STAT_XLATE_REV);
}

static __always_inline void lb6_key_addr(struct lb6_key *key, struct bpf_sock_addr *ctx)
{
	key->address[0] = ctx->user_ip6[0];
	key->address[1] = ctx->user_ip6[1];
	key->address[2] = ctx->user_ip6[2];
	key->address[3] = ctx->user_ip6[3];
}

/* IPv6 counterpart of sock4_xlate_fwd. */
static __always_inline int sock6_xlate_fwd(struct bpf_sock_addr *ctx, __u32 stat, bool connected)
{
	struct lb6_key key = {
		.dport = (__be16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
	};
	struct lb6_revnat_key rk = {};
	struct lb6_revnat rv = {};
	const struct lb_service *svc, *slot;
	const struct lb6_backend *be;
	__u64 client;
	__u32 id, tries;

	if (key.proto != IPPROTO_TCP_ && key.proto != IPPROTO_UDP_)
		return 1;
	lb6_key_addr(&key, ctx);
	svc = bpf_map_lookup_elem(&weir_lb6_svc, &key);
	if (!svc)
		return 1;
	if (svc->count == 0)
		return sock_refuse(ctx, sock_point(connected), svc->svc_id, DROP_NO_SERVICE_BACKEND, 4);
	client = (svc->flags & WEIR_SVC_AFFINITY) ? bpf_get_netns_cookie(ctx) : 0;
	id = lb_affinity_backend(svc, client);
	if (!id && (svc->flags & WEIR_SVC_MAGLEV))
		id = lb_maglev_backend(svc, sock_flow(ctx));
	/* A backend the datapath has just ejected is passed over (a few tries) until the
	 * agent has taken it out of the slots. */
	for (tries = 0; !id && tries < OUTLIER_PICK_TRIES; tries++) {
		key.slot = lb_pick_slot(svc);
		slot = bpf_map_lookup_elem(&weir_lb6_svc, &key);
		if (!slot)
			goto missing;
		id = slot->backend_id;
		if (tries + 1 < OUTLIER_PICK_TRIES && outlier_ejected(svc, id))
			id = 0;
	}
	be = bpf_map_lookup_elem(&weir_lb6_backends, &id);
	if (!be)
		goto missing;
	lb_affinity_remember(svc, client, id);

	if (connected) {
		struct lb6_sock *st = bpf_sk_storage_get(&weir_lb6_sock, ctx->sk, 0,
							 BPF_SK_STORAGE_GET_F_CREATE);

		if (st) {
			st->vip[0] = ctx->user_ip6[0];
			st->vip[1] = ctx->user_ip6[1];
			st->vip[2] = ctx->user_ip6[2];
			st->vip[3] = ctx->user_ip6[3];
			st->vport = (__be16)ctx->user_port;
			__builtin_memcpy(st->backend, be->address, sizeof(st->backend));
			st->bport = be->port;
			st->svc_id = svc->svc_id;
		} else {
			lb_count(LB_STAT_REVNAT_UPDATE_FAIL);
		}
		outlier_watch(svc, ctx->sk, key.proto, id);
		sock_report(ctx, SOCK_XLATE_CONNECT, svc->svc_id, be->address, be->port, 4, 0);
	} else {
		rk.cookie = bpf_get_socket_cookie(ctx);
		__builtin_memcpy(rk.address, be->address, sizeof(rk.address));
		rk.port = be->port;
		rv.address[0] = ctx->user_ip6[0];
		rv.address[1] = ctx->user_ip6[1];
		rv.address[2] = ctx->user_ip6[2];
		rv.address[3] = ctx->user_ip6[3];
		rv.port = (__be16)ctx->user_port;
		rv.svc_id = svc->svc_id;
		if (bpf_map_update_elem(&weir_lb6_revnat, &rk, &rv, BPF_NOEXIST) == 0)
			sock_report(ctx, SOCK_XLATE_SENDMSG, svc->svc_id, be->address, be->port, 4, 0);
		else if (!sock6_revnat_same(&rk, &rv) &&
			 bpf_map_update_elem(&weir_lb6_revnat, &rk, &rv, BPF_ANY) < 0)
			lb_count(LB_STAT_REVNAT_UPDATE_FAIL);
	}

	ctx->user_ip6[0] = be->address[0];
	ctx->user_ip6[1] = be->address[1];
	ctx->user_ip6[2] = be->address[2];
	ctx->user_ip6[3] = be->address[3];
	ctx->user_port = (__u32)be->port;
	lb_count(stat);
	return 1;
missing:
	lb_count(LB_STAT_BACKEND_MISSING);
	return sock_refuse(ctx, sock_point(connected), svc->svc_id, DROP_BACKEND_MISSING, 4);
}

static __always_inline void sock6_xlate_rev(struct bpf_sock_addr *ctx, bool recv)
{
	struct lb6_sock *st = bpf_sk_storage_get(&weir_lb6_sock, ctx->sk, 0, 0);

	if (st && st->backend[0] == ctx->user_ip6[0] && st->backend[1] == ctx->user_ip6[1] &&
	    st->backend[2] == ctx->user_ip6[2] && st->backend[3] == ctx->user_ip6[3] &&
	    st->bport == (__be16)ctx->user_port) {
		ctx->user_ip6[0] = st->vip[0];
		ctx->user_ip6[1] = st->vip[1];
		ctx->user_ip6[2] = st->vip[2];
		ctx->user_ip6[3] = st->vip[3];
		ctx->user_port = (__u32)st->vport;
		lb_count(LB_STAT_XLATE_REV);
		return;
	}
	struct lb6_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.port = (__be16)ctx->user_port,
	};
	struct lb6_revnat *rv;

	rk.address[0] = ctx->user_ip6[0];
	rk.address[1] = ctx->user_ip6[1];
	rk.address[2] = ctx->user_ip6[2];
	rk.address[3] = ctx->user_ip6[3];
	rv = bpf_map_lookup_elem(&weir_lb6_revnat, &rk);
	if (!rv)
		return;
	if (recv && !(rv->flags & LB_REVNAT_F_REPORTED)) {
		rv->flags |= LB_REVNAT_F_REPORTED;
		sock_report_rev(ctx, rv->svc_id, rv->address, rv->port, 4);
	}
	ctx->user_ip6[0] = rv->address[0];
	ctx->user_ip6[1] = rv->address[1];
	ctx->user_ip6[2] = rv->address[2];
	ctx->user_ip6[3] = rv->address[3];
	ctx->user_port = (__u32)rv->port;
	lb_count(LB_STAT_XLATE_REV);
}

#endif /* WEIR_LIB_SOCK_H */
