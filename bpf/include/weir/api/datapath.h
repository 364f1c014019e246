/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Per-packet datapath structs shared between the tc/XDP programs and Rust (which gets them
 * from the skeletons' BTF). Fixed-width types, byte order in the comment, explicit padding,
 * size asserted. A layout change gets a new map name.
 */
#ifndef WEIR_API_DATAPATH_H
#define WEIR_API_DATAPATH_H

#include <linux/types.h>

/* endpoint_key.family */
#define WEIR_AF_INET  4
#define WEIR_AF_INET6 6

/*
 * Key of weir_endpoints: a local pod address. IPv4 addresses use addr[0] only, the rest is
 * zero.
 */
struct endpoint_key {
	__be32 addr[4]; /* network order */
	__u8 family;	/* WEIR_AF_INET or WEIR_AF_INET6 */
	__u8 pad[3];
};
_Static_assert(sizeof(struct endpoint_key) == 20, "endpoint_key size");

/* endpoint_info.flags */
#define WEIR_EP_HOST_STACK (1 << 0) /* deliver through the host stack, no shortcut */

/*
 * Value of weir_endpoints: where a local pod is and how to hand it a packet directly
 * (bpf_redirect_peer into the pod's namespace, with the L2 header a router would write).
 */
struct endpoint_info {
	__u32 ifindex;	  /* the pod's host-side veth, in the node's namespace */
	__u32 flags;	  /* WEIR_EP_* */
	__u8 mac[6];	  /* the pod's eth0 */
	__u8 node_mac[6]; /* the host-side veth */
	__u32 pad;
};
_Static_assert(sizeof(struct endpoint_info) == 24, "endpoint_info size");

/*
 * What happened to a packet: 0-127 are verdicts that let it go on, 130 and up are drops
 * (as in Cilium). Every program counts each packet under one reason in weir_metrics.
 */
enum weir_reason {
	REASON_FORWARD_PEER = 0,  /* handed to a local pod with bpf_redirect_peer */
	REASON_FORWARD_FIB = 1,	  /* sent out of the FIB's device, neighbour resolved */
	REASON_FORWARD_NEIGH = 2, /* sent out with bpf_redirect_neigh (neighbour unresolved) */
	REASON_PASS_STACK = 3,	  /* left to the host stack (for the node, or not forwardable) */
	REASON_PASS_NOT_IP = 4,	  /* not IPv4/IPv6 (ARP...) or link-local/multicast */
	REASON_PASS_TTL = 5,	  /* TTL/hop limit expiring: the stack sends the ICMP error */
	REASON_TO_POD = 6,	  /* delivered to a pod through the host stack */
	DROP_INVALID_PACKET = 130, /* truncated or malformed headers */
	DROP_HEADER_WRITE = 131,   /* a header or checksum could not be rewritten */
	REASON_MAX = 132,
};

/* Directions of weir_metrics. */
#define WEIR_DIR_INGRESS 0
#define WEIR_DIR_EGRESS	 1

/* weir_metrics (per-CPU array) is indexed by dir * WEIR_METRICS_STRIDE + reason. */
#define WEIR_METRICS_STRIDE 256
#define WEIR_METRICS_SIZE   512

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};
_Static_assert(sizeof(struct metrics_value) == 16, "metrics_value size");

#endif /* WEIR_API_DATAPATH_H */
