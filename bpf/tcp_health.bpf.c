// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TCP health per pod, from tracepoints (BTF-typed, tp_btf): retransmits (tcp_retransmit_skb),
 * resets sent and received (tcp_send_reset, tcp_receive_reset), connects, failed connects,
 * connect time and smoothed RTT (inet_sock_set_state). Counters are kept per watched network
 * namespace (the node's and each local pod's: weir_tcp_netns, kept by the agent); sockets
 * elsewhere are ignored. A watched namespace's client sockets (those that connected) are
 * recorded from SYN_SENT on (weir_tcp_clients: the slot, the peer, the connect's start) and
 * counted per peer too (weir_tcp_peers: the address and port they connected to, and the
 * frontend the socket layer translated that from) until they leave ESTABLISHED.
 *
 * The tracepoints' arguments are typed by the kernel's BTF, so the programs read the socket's
 * fields with plain loads, which the verifier checks against the kernel's types; the field
 * offsets are CO-RE relocations (the local structures below name only the fields read, and
 * libbpf finds them in the running kernel's BTF at load time). The TCP state numbers are the
 * kernel's ABI (include/net/tcp_states.h, reported as-is by inet_diag).
 * Minimum kernel: 5.12 (bpf_get_socket_cookie in tracing programs). A reset sent without a
 * socket is counted only where the kernel lists tcp_send_reset's socket among the tracepoint
 * arguments that may be NULL (raw_tp_null_args, as 6.18 does): elsewhere the verifier takes
 * it for a valid socket and drops that branch.
 */
#include "lib/common.h"
#include "weir/api/tcp_health.h"
/* The socket layer's translations (weir_lb{4,6}_sock, shared through their pins when the
 * loader is given them; else empty): the frontend a client asked for. */
#include "lib/lb_sock.h"

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_	 2
#define TCP_CLOSE_	 7
#define AF_INET6_	 10

#define __core __attribute__((preserve_access_index))

/* What the programs read of the kernel's structures (CO-RE: matched by name at load). */
struct ns_common___weir {
	unsigned int inum;
} __core;

struct net___weir {
	struct ns_common___weir ns;
} __core;

struct possible_net___weir {
	struct net___weir *net;
} __core;

struct in6_addr___weir {
	union {
		__be32 u6_addr32[4];
	} in6_u;
} __core;

struct sock_common___weir {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	unsigned char skc_state;
	struct possible_net___weir skc_net;
	struct in6_addr___weir skc_v6_daddr;
	struct {
		__s64 counter;
	} skc_cookie; /* 0 until a cookie is asked for (bpf_get_socket_cookie, sock_diag) */
} __core;

struct sock___weir {
	struct sock_common___weir __sk_common;
} __core;

struct tcp_sock___weir {
	__u32 srtt_us; /* smoothed RTT, in 1/8 us */
} __core;

struct net_device___weir {
	struct possible_net___weir nd_net;
} __core;

struct sk_buff___weir {
	struct net_device___weir *dev;
} __core;

/* Network namespace inode -> slot of weir_tcp_counters. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TCP_HEALTH_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} weir_tcp_netns SEC(".maps");

/* The same, first looked for at the inode's low bits (see TCP_NETNS_FAST). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TCP_NETNS_FAST);
	__type(key, __u32);
	__type(value, struct tcp_netns_slot);
} weir_tcp_netns_fast SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCP_HEALTH_SLOTS);
	__type(key, __u32);
	__type(value, struct tcp_counters);
} weir_tcp_counters SEC(".maps");

/*
 * A watched client socket's record: the socket (its cookie; 0: a free record), when it
 * entered SYN_SENT (0 once established), and its peer (slot: its namespace's).
 */
struct client {
	__u64 cookie;
	__u64 since; /* boot clock, ns */
	struct tcp_peer_key peer;
};
_Static_assert(sizeof(struct client) == 64, "a record is one cache line, a pair two");

/* Powers of two: 4,096 pairs where connects start, 65,536 where long-lived sockets go. */
#define TCP_CLIENTS_NEW	 8192
#define TCP_CLIENTS_HELD 131072

/*
 * The records of watched client sockets, from SYN_SENT until they leave ESTABLISHED, in one
 * of the two records of the pair their socket's cookie names (record_at): no allocation and no lock
 * on the connect path. Two regions: a connect takes a record of its pair among the first
 * TCP_CLIENTS_NEW (512 KiB, which stays in cache while short connections come and go: the
 * whole 8 MiB as one region cost the connection rate about 1.5% in misses), a free one, else
 * one established, which first moves to its pair in the held region (TCP_CLIENTS_HELD
 * records after them; a socket is looked for in both), else the older of two still
 * connecting (that connect is counted nowhere). A held record is displaced only when both of
 * its pair's are taken: the socket that had it is no longer watched (it counts on for its
 * namespace, not for its peer). A record is taken
 * with its cookie cleared and given with it set (atomic exchanges, so that the fields between
 * are ordered), and read as a copy whose cookie is checked again after (client_of), so that
 * a record taken over as it is read is not counted for the wrong socket.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TCP_CLIENTS_NEW + TCP_CLIENTS_HELD);
	__uint(map_flags, BPF_F_MMAPABLE); /* page-aligned: a pair is two cache lines */
	__type(key, __u32);
	__type(value, struct client);
} weir_tcp_clients SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, TCP_HEALTH_PEERS);
	__type(key, struct tcp_peer_key);
	__type(value, struct tcp_counters);
} weir_tcp_peers SEC(".maps");

/* The slot of the namespace `net` into `*slot`; false when it is not watched. */
static __always_inline bool slot_of_net(const struct net___weir *net, __u32 *slot)
{
	__u32 inum, idx, *s;
	struct tcp_netns_slot *f;
	union {
		__u64 word;
		struct tcp_netns_slot e;
	} v;

	if (!net)
		return false;
	inum = net->ns.inum;
	idx = inum & (TCP_NETNS_FAST - 1);
	f = bpf_map_lookup_elem(&weir_tcp_netns_fast, &idx);
	if (f) {
		/* One load: an entry the agent rewrites meanwhile is read old or new, not half. */
		v.word = *(volatile __u64 *)f;
		if (v.e.inum == inum && inum) {
			*slot = v.e.slot;
			return true;
		}
	}
	s = bpf_map_lookup_elem(&weir_tcp_netns, &inum);
	if (!s)
		return false;
	*slot = *s;
	return true;
}

/* The counters of the namespace `net`, or NULL when it is not watched. */
static __always_inline struct tcp_counters *counters_of_net(const struct net___weir *net)
{
	__u32 slot;

	return slot_of_net(net, &slot) ? bpf_map_lookup_elem(&weir_tcp_counters, &slot) : NULL;
}

/* The counters of a client socket's peer (made on first use), or NULL. */
static __always_inline struct tcp_counters *counters_of_peer(const struct tcp_peer_key *peer)
{
	struct tcp_counters *c = bpf_map_lookup_elem(&weir_tcp_peers, peer), zero = {};

	if (c)
		return c;
	bpf_map_update_elem(&weir_tcp_peers, peer, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&weir_tcp_peers, peer);
}

/* Fills `peer` with the address and port socket `sk` connects to. */
static __always_inline void peer_of(const struct sock___weir *sk, struct tcp_peer_key *peer)
{
	const struct sock_common___weir *c = &sk->__sk_common;

	peer->family = c->skc_family;
	peer->port = c->skc_dport;
	if (peer->family == AF_INET6_) {
		peer->addr[0] = c->skc_v6_daddr.in6_u.u6_addr32[0];
		peer->addr[1] = c->skc_v6_daddr.in6_u.u6_addr32[1];
		peer->addr[2] = c->skc_v6_daddr.in6_u.u6_addr32[2];
		peer->addr[3] = c->skc_v6_daddr.in6_u.u6_addr32[3];
	} else {
		peer->addr[0] = c->skc_daddr;
		peer->addr[1] = peer->addr[2] = peer->addr[3] = 0;
	}
}

/*
 * The record `i` of the pair of the socket with `cookie` (whoever holds it) in the new
 * region, or with `held` in the held one; or NULL. The kernel hands a CPU's sockets their
 * cookies in runs of 4,096 consecutive numbers (a run per CPU at a time): a run's connects
 * take consecutive pairs, which the CPU's prefetcher brings in ahead of them (hashed, each
 * connect's pair was a cache miss: a quarter of sock_set_state's time). Each run starts at a
 * pair of its own (a hash of the run's number), so that two CPUs going through runs at the
 * same pace do not take the same pairs one after the other.
 */
static __always_inline struct client *record_at(__u64 cookie, bool held, __u32 i)
{
	__u64 pair = (cookie + hash64((cookie - 1) >> 12)) << 1; /* runs: 1..4096, 4097.. */
	__u32 idx = held ? TCP_CLIENTS_NEW + (pair & (TCP_CLIENTS_HELD - 2)) + i :
			   (pair & (TCP_CLIENTS_NEW - 2)) + i;

	return bpf_map_lookup_elem(&weir_tcp_clients, &idx);
}

/* The record holding `cookie` in its pair of one region, or NULL. */
static __always_inline struct client *record_of(__u64 cookie, bool held)
{
	struct client *cl = record_at(cookie, held, 0);

	if (cl && cl->cookie != cookie)
		cl = record_at(cookie, held, 1);
	return cl && cl->cookie == cookie ? cl : NULL;
}

/*
 * Whether record `cl` still holds the socket with `cookie` (a compare-and-swap that changes
 * nothing: a read ordered after those before it).
 */
static __always_inline bool holds(struct client *cl, __u64 cookie)
{
	return __sync_val_compare_and_swap(&cl->cookie, cookie, cookie) == cookie;
}

/* Takes record `cl` from whoever holds it (its cookie cleared: they read it no more); false
 * when another CPU changed it first. */
static __always_inline bool take(struct client *cl)
{
	__u64 had = cl->cookie;

	return __sync_val_compare_and_swap(&cl->cookie, had, 0) == had;
}

/* Gives the record `cl`, filled while taken, to the socket with `cookie`. */
static __always_inline void give(struct client *cl, __u64 cookie)
{
	__sync_lock_test_and_set(&cl->cookie, cookie);
}

/* Frees record `cl` if it still holds the socket with `cookie`. */
static __always_inline void release(struct client *cl, __u64 cookie)
{
	__sync_val_compare_and_swap(&cl->cookie, cookie, 0);
}

/*
 * The record of `sk` when it is a watched client socket, or NULL, with `*snap` a copy of it
 * that was the socket's as a whole. The cookie is read, not asked for: a recorded socket has
 * one (given when it was recorded), and asking would give every other socket one too.
 */
static __always_inline struct client *client_of(const struct sock___weir *sk,
						struct client *snap)
{
	__u64 cookie = sk->__sk_common.skc_cookie.counter;
	__u8 state = sk->__sk_common.skc_state;
	struct client *cl;

	/* Records are of sockets connecting or established (released as they leave): a closed
	 * socket's reset, say, is not looked for (nor in the held region, which is cold). */
	if (!cookie || (state != TCP_SYN_SENT_ && state != TCP_ESTABLISHED_))
		return NULL;
	cl = record_of(cookie, false);
	if (!cl)
		cl = record_of(cookie, true);
	if (!cl)
		return NULL;
	*snap = *cl;
	/* Still the socket's after the copy? */
	return holds(cl, cookie) ? cl : NULL;
}

/* Fills `peer`'s frontend: what the socket layer translated `sk`'s connect from, if it did. */
static __always_inline void frontend_of(struct sock___weir *sk, struct tcp_peer_key *peer)
{
	__builtin_memset(peer->vip, 0, sizeof(peer->vip));
	peer->vport = 0;
	peer->pad2 = 0;
	if (peer->family == AF_INET6_) {
		struct lb6_sock *st = bpf_sk_storage_get(&weir_lb6_sock, sk, 0, 0);

		if (st) {
			__builtin_memcpy(peer->vip, st->vip, sizeof(peer->vip));
			peer->vport = st->vport;
		}
	} else {
		struct lb4_sock *st = bpf_sk_storage_get(&weir_lb4_sock, sk, 0, 0);

		if (st) {
			peer->vip[0] = st->vip;
			peer->vport = st->vport;
		}
	}
}

/*
 * Moves the established socket's record `from` to its pair in the held region: a free record,
 * else the first (whose socket is no longer watched). The copy is given before `from` is
 * taken, so the socket is found all along (in the new region first).
 */
static __always_inline void hold(struct client *from)
{
	struct client snap = *from, *a, *b, *to;

	if (!snap.cookie || snap.since)
		return; /* taken meanwhile, or connecting again */
	a = record_at(snap.cookie, true, 0);
	b = record_at(snap.cookie, true, 1);
	if (!a || !b)
		return;
	to = (!a->cookie || b->cookie) ? a : b;
	if (!take(to))
		return;
	to->since = 0;
	to->peer = snap.peer;
	give(to, snap.cookie);
	/* Closed as it moved (its record released meanwhile)? Then the copy goes too. */
	if (!holds(from, snap.cookie))
		release(to, snap.cookie);
}

/* Records client socket `sk` (`cookie`) of namespace `slot` as it enters SYN_SENT. */
static __always_inline void record_client(struct sock___weir *sk, __u64 cookie, __u32 slot)
{
	struct client *a = record_at(cookie, false, 0), *b = record_at(cookie, false, 1), *cl;

	if (!a || !b)
		return;
	if (!a->cookie || a->cookie == cookie)
		cl = a;
	else if (!b->cookie || b->cookie == cookie)
		cl = b;
	else if (!a->since)
		cl = a; /* an established socket's: it moves to the held region */
	else if (!b->since)
		cl = b;
	else
		cl = a->since <= b->since ? a : b; /* both connecting: the older is displaced */
	if (cl->cookie && cl->cookie != cookie && !cl->since)
		hold(cl);
	/* Taken, filled, then given to the socket. */
	if (!take(cl))
		return; /* another connect took it first */
	cl->since = bpf_ktime_get_boot_ns();
	cl->peer.slot = slot;
	cl->peer.pad = 0;
	peer_of(sk, &cl->peer);
	frontend_of(sk, &cl->peer);
	give(cl, cookie);
}

/*
 * The counters of socket `sk`'s namespace (NULL: not watched), and in `*peer` those of its
 * peer when it is a watched client socket (whose record names its slot).
 */
static __always_inline struct tcp_counters *counters_and_peer(struct sock___weir *sk,
							      struct tcp_counters **peer)
{
	struct client snap;

	*peer = NULL;
	if (!client_of(sk, &snap))
		return counters_of_net(sk->__sk_common.skc_net.net);
	*peer = counters_of_peer(&snap.peer);
	return bpf_map_lookup_elem(&weir_tcp_counters, &snap.peer.slot);
}

SEC("tp_btf/tcp_retransmit_skb")
int tcp_retransmit(__u64 *ctx)
{
	struct sock___weir *sk = (void *)ctx[0];
	struct tcp_counters *p, *c = sk ? counters_and_peer(sk, &p) : NULL;

	if (c)
		c->retransmits += 1;
	if (c && p)
		p->retransmits += 1;
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int tcp_send_reset(__u64 *ctx)
{
	struct sock___weir *sk = (void *)ctx[0];
	struct sk_buff___weir *skb = (void *)ctx[1];
	struct tcp_counters *c;

	/* Without a socket (an answer to a segment for no connection): the namespace of the
	 * device the segment came in on. */
	if (sk) {
		struct tcp_counters *p;

		c = counters_and_peer(sk, &p);
		if (c && p)
			p->resets_sent += 1;
	} else {
		const struct net_device___weir *dev = skb ? skb->dev : NULL;

		c = dev ? counters_of_net(dev->nd_net.net) : NULL;
	}
	if (c)
		c->resets_sent += 1;
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int tcp_receive_reset(__u64 *ctx)
{
	struct sock___weir *sk = (void *)ctx[0];
	struct tcp_counters *p, *c = sk ? counters_and_peer(sk, &p) : NULL;

	if (c)
		c->resets_received += 1;
	if (c && p)
		p->resets_received += 1;
	return 0;
}

/* A watched client socket's connect (its record: `cl`) ended: established, or failed. */
static __always_inline void connect_ended(struct client *cl, bool established)
{
	struct tcp_counters *c = bpf_map_lookup_elem(&weir_tcp_counters, &cl->peer.slot);
	struct tcp_counters *p = counters_of_peer(&cl->peer);
	__u64 now = bpf_ktime_get_boot_ns();
	__u64 took = now > cl->since ? now - cl->since : 0;

	if (c && established) {
		c->connects += 1;
		c->connect_ns += took;
	} else if (c) {
		c->connect_failures += 1;
	}
	if (p && established) {
		p->connects += 1;
		p->connect_ns += took;
	} else if (p) {
		p->connect_failures += 1;
	}
}

/*
 * A socket of a watched namespace left ESTABLISHED: its RTT (`cl`: a client's record, `snap`
 * its copy).
 */
static __always_inline void established_ended(struct sock___weir *sk, struct client *cl,
					      const struct client *snap)
{
	struct tcp_sock___weir *tp = (void *)bpf_skc_to_tcp_sock(sk);
	struct tcp_counters *c, *p = NULL;
	__u32 srtt = tp ? tp->srtt_us >> 3 : 0;

	if (cl) {
		release(cl, snap->cookie); /* watched no longer */
		c = bpf_map_lookup_elem(&weir_tcp_counters, &snap->peer.slot);
		p = counters_of_peer(&snap->peer);
	} else {
		c = tp ? counters_of_net(sk->__sk_common.skc_net.net) : NULL;
	}
	if (c && srtt) {
		c->rtt_us += srtt;
		c->rtt_samples += 1;
	}
	if (p && srtt) {
		p->rtt_us += srtt;
		p->rtt_samples += 1;
	}
}

SEC("tp_btf/inet_sock_set_state")
int sock_set_state(__u64 *ctx)
{
	struct sock___weir *sk = (void *)ctx[0];
	int oldstate = (int)ctx[1], newstate = (int)ctx[2];
	struct client *cl, snap;
	__u32 slot;

	/* The transitions counted: into SYN_SENT, out of SYN_SENT or ESTABLISHED. */
	if (!sk || (newstate != TCP_SYN_SENT_ && oldstate != TCP_SYN_SENT_ &&
		    oldstate != TCP_ESTABLISHED_))
		return 0;
	if (newstate == TCP_SYN_SENT_) {
		/* A TCP socket of a watched namespace starts to connect: record it. */
		if (!bpf_skc_to_tcp_sock(sk))
			return 0;
		if (!slot_of_net(sk->__sk_common.skc_net.net, &slot))
			return 0;
		record_client(sk, bpf_get_socket_cookie(sk), slot);
		return 0;
	}
	cl = client_of(sk, &snap);
	if (oldstate == TCP_SYN_SENT_) {
		/* Only watched sockets were recorded: nothing to read of the others. */
		if (!cl || !snap.since)
			return 0;
		if (newstate == TCP_ESTABLISHED_) {
			connect_ended(&snap, true);
			/* Watched on until it leaves ESTABLISHED (unless taken meanwhile). */
			__sync_val_compare_and_swap(&cl->since, snap.since, 0);
			return 0;
		}
		if (newstate == TCP_CLOSE_)
			connect_ended(&snap, false);
		release(cl, snap.cookie);
		return 0;
	}
	/* Leaving ESTABLISHED. */
	established_ended(sk, cl, &snap);
	return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
