/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TCP health (tcp_health.bpf.c): per-pod counters from the TCP and socket tracepoints.
 * Shared with userspace (crates/weir-bpf/src/tcp_health.rs).
 */
#ifndef WEIR_API_TCP_HEALTH_H
#define WEIR_API_TCP_HEALTH_H

#include <linux/types.h>

/* Slots of weir_tcp_counters: one per watched network namespace (weir_tcp_netns). */
#define TCP_HEALTH_SLOTS 4096

/*
 * Entries of weir_tcp_netns_fast: a watched namespace's slot is looked for first in the entry
 * its inode's low bits name (an array lookup, where weir_tcp_netns, the hash of them all, cost
 * a hash lookup at four of a connection's tracepoints). The agent puts a namespace there when
 * the entry is free; one whose entry another has is found in weir_tcp_netns alone.
 */
#define TCP_NETNS_FAST 8192

/* Value of weir_tcp_netns_fast (inum 0: free), written and read as one 8-byte word. */
struct tcp_netns_slot {
	__u32 inum;
	__u32 slot;
} __attribute__((aligned(8)));
_Static_assert(sizeof(struct tcp_netns_slot) == 8, "tcp_netns_slot size");

/* Entries of weir_tcp_peers (an LRU: the least recently counted peers go first). */
#define TCP_HEALTH_PEERS 16384

/* Value of weir_tcp_counters and weir_tcp_peers (per CPU): what the sockets of one namespace went through. */
struct tcp_counters {
	__u64 retransmits;	/* segments retransmitted (tcp:tcp_retransmit_skb) */
	__u64 resets_sent;	/* RSTs sent (tcp:tcp_send_reset) */
	__u64 resets_received;	/* RSTs received (tcp:tcp_receive_reset) */
	__u64 connects;		/* connects that reached ESTABLISHED (sock:inet_sock_set_state) */
	__u64 connect_failures; /* connects that went from SYN_SENT to CLOSE */
	__u64 connect_ns;	/* the connects' time from SYN_SENT to ESTABLISHED, summed */
	__u64 rtt_us;		/* smoothed RTTs of connections as they left ESTABLISHED, summed */
	__u64 rtt_samples;	/* how many */
};

/*
 * Key of weir_tcp_peers: what the client sockets of one watched namespace (its slot) went
 * through with one peer, the address and port they connected to (a Service's backend, when
 * the socket layer translated the connect), and the frontend they asked for then (so that a
 * backend two Services share is counted for each).
 */
struct tcp_peer_key {
	__u32 slot;
	__u8 family; /* AF_INET (2) or AF_INET6 (10), as the socket has it */
	__u8 pad;
	__be16 port;	/* network order */
	__be32 addr[4]; /* network order; IPv4 in [0] */
	__be32 vip[4];	/* the frontend (weir_lb{4,6}_sock), network order; 0: none */
	__be16 vport;	/* network order; 0: not translated by the socket layer */
	__u16 pad2;
};
_Static_assert(sizeof(struct tcp_peer_key) == 44, "tcp_peer_key size");

#endif /* WEIR_API_TCP_HEALTH_H */
