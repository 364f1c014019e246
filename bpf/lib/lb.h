/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service load balancing: the maps the agent programs and the backend selection used by the
 * socket hooks. A service frontend is a master slot (count, flags) plus one slot per backend,
 * as in Cilium's lb4_services_v2; backends live in their own map so that several services can
 * share one.
 */
#ifndef WEIR_LIB_LB_H
#define WEIR_LIB_LB_H

#include "common.h"
#include "weir/api/lb.h"

#define LB_SVC_MAP_SIZE 262144
#define LB_BACKEND_MAP_SIZE 262144
#define LB_REVNAT_MAP_SIZE 262144
#define LB_AFFINITY_MAP_SIZE 65536
#define LB_MAGLEV_OUTER_SIZE 65536
#define LB_SRC_RANGE_MAP_SIZE 65536

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_SVC_MAP_SIZE);
	__type(key, struct lb4_key);
	__type(value, struct lb_service);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb4_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_SVC_MAP_SIZE);
	__type(key, struct lb6_key);
	__type(value, struct lb_service);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb6_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__type(key, __u32);
	__type(value, struct lb6_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb6_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_REVNAT_MAP_SIZE);
	__type(key, struct lb4_revnat_key);
	__type(value, struct lb4_revnat);
} weir_lb4_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_REVNAT_MAP_SIZE);
	__type(key, struct lb6_revnat_key);
	__type(value, struct lb6_revnat);
} weir_lb6_revnat SEC(".maps");

#include "lb_sock.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity);
} weir_lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__type(key, struct lb_affinity_match);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb_affinity_match SEC(".maps");

/* Shares of frontends with WEIR_SVC_WEIGHTED, by svc_id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAGLEV_OUTER_SIZE);
	__type(key, __u32);
	__type(value, struct lb_groups);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb_groups SEC(".maps");

/* Allowed client prefixes of frontends with WEIR_SVC_SOURCE_RANGES. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, LB_SRC_RANGE_MAP_SIZE);
	__type(key, struct lb4_src_range_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} weir_lb4_src_range SEC(".maps");

/* Whether `saddr` may use frontend `svc` (loadBalancerSourceRanges). */
static __always_inline bool lb4_src_allowed(const struct lb_service *svc, __be32 saddr)
{
	struct lb4_src_range_key k = { .prefixlen = 64, .svc_id = svc->svc_id, .addr = saddr };

	if (!(svc->flags & WEIR_SVC_SOURCE_RANGES))
		return true;
	return bpf_map_lookup_elem(&weir_lb4_src_range, &k) != NULL;
}

/* Inner template of the Maglev tables: each service gets an array of its own size. */
struct maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(map_flags, BPF_F_INNER_MAP);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, LB_MAGLEV_OUTER_SIZE);
	__type(key, __u32);
	__array(values, struct maglev_inner);
} weir_lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_STAT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} weir_lb_counters SEC(".maps");

static __always_inline void lb_count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&weir_lb_counters, &stat);

	if (v)
		*v += 1;
}

static __always_inline __u64 lb_now_sec(void)
{
	return bpf_ktime_get_boot_ns() / NSEC_PER_SEC;
}

/*
 * Session affinity: the backend this client was last sent to, if the entry is fresh and the
 * backend still belongs to the service.
 * Returns: a backend id, or 0.
 */
static __always_inline __u32 lb_affinity_backend(const struct lb_service *svc, __u64 client)
{
	struct lb_affinity_key ak = { .client = client, .svc_id = svc->svc_id };
	struct lb_affinity_match m = { .svc_id = svc->svc_id };
	struct lb_affinity *a;
	__u64 now;

	if (!(svc->flags & WEIR_SVC_AFFINITY))
		return 0;
	now = lb_now_sec();
	a = bpf_map_lookup_elem(&weir_lb_affinity, &ak);
	if (!a || now - a->last_used > svc->affinity_timeout)
		return 0;
	m.backend_id = a->backend_id;
	if (!bpf_map_lookup_elem(&weir_lb_affinity_match, &m))
		return 0;
	a->last_used = now;
	lb_count(LB_STAT_AFFINITY_HIT);
	return m.backend_id;
}

static __always_inline void lb_affinity_remember(const struct lb_service *svc, __u64 client,
						 __u32 backend_id)
{
	struct lb_affinity_key ak = { .client = client, .svc_id = svc->svc_id };
	struct lb_affinity a = { .backend_id = backend_id };

	if (!(svc->flags & WEIR_SVC_AFFINITY))
		return;
	a.last_used = lb_now_sec();
	bpf_map_update_elem(&weir_lb_affinity, &ak, &a, BPF_ANY);
}

/*
 * Maglev: the backend at hash(flow) in the service's table (its size is in the master
 * slot's backend_id).
 * Returns: a backend id, or 0.
 */
static __always_inline __u32 lb_maglev_backend(const struct lb_service *svc, __u64 flow)
{
	__u32 sid = svc->svc_id;
	__u32 size = svc->backend_id;
	__u32 idx, *bid;
	void *table;

	if (!(svc->flags & WEIR_SVC_MAGLEV) || size == 0)
		return 0;
	table = bpf_map_lookup_elem(&weir_lb_maglev, &sid);
	if (!table)
		return 0;
	idx = hash64(flow) % size;
	bid = bpf_map_lookup_elem(table, &idx);
	if (!bid || !*bid)
		return 0;
	lb_count(LB_STAT_MAGLEV);
	return *bid;
}

/* A uniformly random slot in 1..count. */
static __always_inline __u16 lb_random_slot(const struct lb_service *svc)
{
	return (bpf_get_prandom_u32() % svc->count) + 1;
}

/*
 * The slot of a new connection: by group share for a weighted frontend (a group by share,
 * then a slot of it uniformly), else uniformly.
 */
static __always_inline __u16 lb_pick_slot(const struct lb_service *svc)
{
	const struct lb_groups *gs;
	__u32 sid = svc->svc_id;
	__u32 r, i;

	if (!(svc->flags & WEIR_SVC_WEIGHTED))
		return lb_random_slot(svc);
	gs = bpf_map_lookup_elem(&weir_lb_groups, &sid);
	if (!gs || gs->total == 0)
		return lb_random_slot(svc);
	r = bpf_get_prandom_u32() % gs->total;
	for (i = 0; i < WEIR_LB_MAX_GROUPS; i++) {
		const struct lb_group *g = &gs->g[i];

		if (i >= gs->n)
			break;
		if (r < g->upto && g->count > 0) {
			lb_count(LB_STAT_WEIGHTED);
			return g->first + bpf_get_prandom_u32() % g->count;
		}
	}
	return lb_random_slot(svc);
}

#endif /* WEIR_LIB_LB_H */
