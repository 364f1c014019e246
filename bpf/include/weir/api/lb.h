/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Load-balancing structs shared between the eBPF programs and Rust (which gets them from the
 * skeleton's BTF-generated types). Fixed-width types, byte order in the type and the
 * comment, explicit padding, size asserted. A layout change gets a new map name.
 */
#ifndef WEIR_API_LB_H
#define WEIR_API_LB_H

#include <linux/types.h>

/* Slot 0 of a service is its master entry; slots 1..count hold backend ids. */
#define WEIR_LB_MASTER_SLOT 0

/* lb_service.flags */
#define WEIR_SVC_AFFINITY (1 << 0) /* sessionAffinity: ClientIP */
#define WEIR_SVC_MAGLEV   (1 << 1) /* backend chosen from the service's Maglev table */
#define WEIR_SVC_SOURCE_RANGES (1 << 2) /* clients must match weir_lb4_src_range */
#define WEIR_SVC_DSR	       (1 << 3) /* remote backends: direct server return (IPIP) */
#define WEIR_SVC_WEIGHTED      (1 << 4) /* slots picked by group share (weir_lb_groups) */
#define WEIR_SVC_OUTLIER       (1 << 5) /* TCP connect outcomes counted (weir_lb_health) */

/* lb_service.algorithm-independent limits */
#define WEIR_LB_MAX_BACKENDS 65535

/* lb4_key.scope / lb6_key.scope: which traffic a frontend serves. */
#define WEIR_SCOPE_CLUSTER  0 /* from pods, at the socket layer */
#define WEIR_SCOPE_EXTERNAL 1 /* from outside, at tc/XDP (NodePort: address 0) */

/* Key of weir_lb4_svc: a frontend (VIP, port, protocol, scope) and a slot. */
struct lb4_key {
	__be32 address;	/* network order; 0 for a NodePort (any address of the node) */
	__be16 dport;	/* network order */
	__u8 proto;	/* IPPROTO_TCP / IPPROTO_UDP */
	__u8 scope;	/* WEIR_SCOPE_* */
	__u16 slot;	/* host order; 0 = master */
	__u16 pad1;
};
_Static_assert(sizeof(struct lb4_key) == 12, "lb4_key size");

/* Key of weir_lb6_svc. */
struct lb6_key {
	__be32 address[4]; /* network order */
	__be16 dport;	   /* network order */
	__u8 proto;
	__u8 scope;	   /* WEIR_SCOPE_* */
	__u16 slot;	   /* host order */
	__u16 pad1;
};
_Static_assert(sizeof(struct lb6_key) == 24, "lb6_key size");

/*
 * Value of weir_lb{4,6}_svc. In the master slot: count, svc_id, flags and the affinity
 * timeout; count == 0 means the service has no usable endpoint and new connections are
 * refused. In slots 1..count: backend_id.
 */
struct lb_service {
	__u32 backend_id;	/* slots > 0: backend id; master: Maglev table size (0: none) */
	__u32 svc_id;		/* id of the frontend (affinity, Maglev, reverse NAT) */
	__u16 count;		/* master: number of backend slots */
	__u16 flags;		/* master: WEIR_SVC_* */
	__u32 affinity_timeout; /* master: seconds */
};
_Static_assert(sizeof(struct lb_service) == 16, "lb_service size");

/* Value of weir_lb4_backends, keyed by a __u32 backend id. */
struct lb4_backend {
	__be32 address; /* network order */
	__be16 port;	/* network order */
	__u8 proto;
	__u8 flags;
};
_Static_assert(sizeof(struct lb4_backend) == 8, "lb4_backend size");

/* Value of weir_lb6_backends. */
struct lb6_backend {
	__be32 address[4]; /* network order */
	__be16 port;	   /* network order */
	__u8 proto;
	__u8 flags;
};
_Static_assert(sizeof(struct lb6_backend) == 20, "lb6_backend size");

/*
 * Key of weir_lb{4,6}_revnat: which backend a socket was sent to, so that recvmsg and
 * getpeername can show the service address the application asked for.
 */
struct lb4_revnat_key {
	__u64 cookie;	/* socket cookie */
	__be32 address; /* backend, network order */
	__be16 port;	/* backend, network order */
	__u16 pad;
};
_Static_assert(sizeof(struct lb4_revnat_key) == 16, "lb4_revnat_key size");

/* lb{4,6}_revnat.flags */
#define LB_REVNAT_F_REPORTED (1 << 0) /* a reply was reported (sock_event, recvmsg) */

struct lb4_revnat {
	__be32 address; /* service VIP, network order */
	__be16 port;	/* service port, network order */
	__u16 flags;	/* LB_REVNAT_F_* */
	__u32 svc_id;
};
_Static_assert(sizeof(struct lb4_revnat) == 12, "lb4_revnat size");

struct lb6_revnat_key {
	__u64 cookie;
	__be32 address[4];
	__be16 port;
	__u16 pad0;
	__u32 pad1;
};
_Static_assert(sizeof(struct lb6_revnat_key) == 32, "lb6_revnat_key size");

struct lb6_revnat {
	__be32 address[4];
	__be16 port;
	__u16 flags;	/* LB_REVNAT_F_* */
	__u32 svc_id;
};
_Static_assert(sizeof(struct lb6_revnat) == 24, "lb6_revnat size");

/*
 * Value of weir_lb{4,6}_sock: per-socket storage (freed with the socket) recording the
 * translation of a connected socket (TCP, connected UDP), for getpeername and recvmsg.
 */
struct lb4_sock {
	__be32 vip;	/* network order */
	__be32 backend; /* network order */
	__be16 vport;	/* network order */
	__be16 bport;	/* network order */
	__u32 svc_id;
};
_Static_assert(sizeof(struct lb4_sock) == 16, "lb4_sock size");

struct lb6_sock {
	__be32 vip[4];
	__be32 backend[4];
	__be16 vport;
	__be16 bport;
	__u32 svc_id;
};
_Static_assert(sizeof(struct lb6_sock) == 40, "lb6_sock size");

/* Key of weir_lb_affinity: a client (its network namespace cookie) and a service. */
struct lb_affinity_key {
	__u64 client;	/* netns cookie */
	__u32 svc_id;
	__u32 pad;
};
_Static_assert(sizeof(struct lb_affinity_key) == 16, "lb_affinity_key size");

struct lb_affinity {
	__u64 last_used; /* bpf_ktime_get_boot_ns() / 1e9, seconds */
	__u32 backend_id;
	__u32 pad;
};
_Static_assert(sizeof(struct lb_affinity) == 16, "lb_affinity size");

/* Key of weir_lb_affinity_match: present while the backend belongs to the service. */
struct lb_affinity_match {
	__u32 svc_id;
	__u32 backend_id;
};
_Static_assert(sizeof(struct lb_affinity_match) == 8, "lb_affinity_match size");

/*
 * Key of weir_lb4_src_range (LPM trie): a frontend and a client prefix
 * (loadBalancerSourceRanges). prefixlen counts svc_id's 32 bits plus the prefix's.
 */
struct lb4_src_range_key {
	__u32 prefixlen;
	__u32 svc_id;
	__be32 addr; /* network order */
};
_Static_assert(sizeof(struct lb4_src_range_key) == 12, "lb4_src_range_key size");

/* Groups of a weighted frontend: at most this many distinct shares. */
#define WEIR_LB_MAX_GROUPS 64

/*
 * One group of a weighted frontend: slots first..first+count-1, whose backends share equally
 * the part [previous group's upto, upto) of the frontend's total.
 */
struct lb_group {
	__u32 upto;  /* cumulative share, in the frontend's units */
	__u16 first; /* first slot (>= 1) */
	__u16 count; /* number of slots */
};
_Static_assert(sizeof(struct lb_group) == 8, "lb_group size");

/*
 * Value of weir_lb_groups, keyed by svc_id: how new connections of a frontend with
 * WEIR_SVC_WEIGHTED are spread (GlobalTrafficPolicy shares). A random r in [0, total) picks
 * the first group with r < upto, then a slot of it uniformly.
 */
struct lb_groups {
	__u32 n;     /* groups used */
	__u32 total; /* upto of the last group */
	struct lb_group g[WEIR_LB_MAX_GROUPS];
};
_Static_assert(sizeof(struct lb_groups) == 8 + 8 * WEIR_LB_MAX_GROUPS, "lb_groups size");

/*
 * Value of weir_lb_outlier, keyed by backend id, written by the agent only: outlier detection
 * of a backend of a frontend with WEIR_SVC_OUTLIER.
 */
struct lb_outlier {
	__u32 threshold; /* consecutiveFailures (0: never eject) */
	__u32 base_ms;	 /* baseEjectionTime, milliseconds */
	__u32 acked;	 /* ejections the agent has scheduled around (see lb_health) */
	__u32 pad;
};
_Static_assert(sizeof(struct lb_outlier) == 16, "lb_outlier size");

/*
 * Value of weir_lb_health, keyed by backend id, written by the datapath only: TCP connect
 * outcomes of a backend under outlier detection. After `threshold` consecutive failures the
 * backend is ejected until now + min(base_ms x ejections, max(300 s, base_ms)); each answered
 * connect a base time after an ejection ended takes one off `ejections`. While `ejections`
 * exceeds the agent's `acked`, the connect hook passes over an ejected backend.
 */
struct lb_health {
	__u64 ejected_until;   /* bpf_ktime_get_boot_ns(); 0 or past: admitted */
	__u64 failures_total;  /* connects that failed */
	__u64 successes_total; /* connects that succeeded */
	__u32 failures;	       /* consecutive failures since the last success or ejection */
	__u32 ejections;       /* ejection multiplier */
};
_Static_assert(sizeof(struct lb_health) == 32, "lb_health size");

/* Value of weir_lb_outlier_sock (socket storage): the backend a watched connect went to. */
struct lb_outlier_sock {
	__u32 backend_id;
	__u32 done; /* the outcome was counted */
};
_Static_assert(sizeof(struct lb_outlier_sock) == 8, "lb_outlier_sock size");

/* Ring buffer record of weir_lb_events: a backend was ejected. */
struct lb_ejection_event {
	__u64 until; /* bpf_ktime_get_boot_ns() */
	__u32 backend_id;
	__u32 ejections;
};
_Static_assert(sizeof(struct lb_ejection_event) == 16, "lb_ejection_event size");

/* Indexes of weir_lb_counters (per-CPU counters). */
enum lb_stat {
	LB_STAT_XLATE_CONNECT = 0,	/* connect() to a service translated */
	LB_STAT_XLATE_SENDMSG = 1,	/* UDP sendmsg to a service translated */
	LB_STAT_XLATE_REV = 2,		/* recvmsg/getpeername shown the service */
	LB_STAT_NO_BACKEND = 3,		/* refused: service without usable endpoint */
	LB_STAT_BACKEND_MISSING = 4,	/* slot pointed at a backend not in the map */
	LB_STAT_AFFINITY_HIT = 5,	/* backend taken from session affinity */
	LB_STAT_MAGLEV = 6,		/* backend chosen from a Maglev table */
	LB_STAT_REVNAT_UPDATE_FAIL = 7, /* reverse NAT entry could not be stored */
	LB_STAT_WEIGHTED = 8,		/* slot chosen by group share */
	LB_STAT_CONNECT_OK = 9,		/* watched TCP connect answered */
	LB_STAT_CONNECT_FAIL = 10,	/* watched TCP connect refused, unreachable or unanswered */
	LB_STAT_EJECTION = 11,		/* backend ejected */
	LB_STAT_MAX = 12,
	/* Slots of weir_lb_counters: room for counters to come without a new map. */
	LB_STAT_SLOTS = 64,
};

/* sock_event.point: where the socket layer translated. */
#define SOCK_XLATE_CONNECT 1 /* connect(): TCP, connected UDP */
#define SOCK_XLATE_SENDMSG 2 /* sendmsg() of unconnected UDP: a (socket, backend) pair's first */
#define SOCK_XLATE_RECVMSG 3 /* recvmsg() of unconnected UDP: a (socket, backend) pair's first reply */

/* sock_config.flags */
#define SOCK_CFG_EVENTS (1 << 0) /* report translations (weir_sock_events) */

/* Value of weir_sock_config[0]: written by the agent. */
struct sock_config {
	__u32 flags; /* SOCK_CFG_* */
};
_Static_assert(sizeof(struct sock_config) == 4, "sock_config size");

/*
 * A socket-layer translation (weir_sock_events ring buffer), for `weir observe`: once per
 * connect, per (socket, backend) pair of unconnected UDP, and every refusal. What the full
 * ring refuses is counted per point in weir_sock_lost.
 */
struct sock_event {
	__u64 ts;	   /* boot clock, nanoseconds */
	__u64 cookie;	   /* the socket's cookie */
	__u64 netns;	   /* the socket's network namespace cookie */
	__be32 vip[4];	   /* network order; IPv4 in [0]: the service address asked for */
	__be32 backend[4]; /* the backend it became (zero when refused) */
	__be16 vport;	   /* network order */
	__be16 bport;
	__u8 family;	   /* WEIR_AF_INET or WEIR_AF_INET6 (4, 6) */
	__u8 proto;
	__u8 point;	   /* SOCK_XLATE_* */
	__u8 pad;
	__u32 svc_id;
	__u32 reason;	   /* 0: translated; else the weir_reason of a refusal (DROP_*) */
};
_Static_assert(sizeof(struct sock_event) == 72, "sock_event size");

#endif /* WEIR_API_LB_H */
