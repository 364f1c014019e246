/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Kernel drops (kdrop.bpf.c): packets the kernel frees with a drop reason (tracepoint
 * skb:kfree_skb), in the network namespaces the loader watches (weir_kdrop_netns: the
 * node's and its pods'). Shared with userspace (crates/weir-bpf/src/kdrop.rs reads the
 * types from the object's BTF).
 */
#ifndef WEIR_API_KDROP_H
#define WEIR_API_KDROP_H

#include <linux/types.h>

/* Network namespaces watched at most (the node's and its pods'). */
#define KDROP_NETNS_MAX 4096

/* One drop (weir_kdrop_events ring buffer). */
struct kdrop_event {
	__u64 ts;	 /* boot clock, nanoseconds */
	__u64 location;	 /* the kernel address that freed the packet */
	__u32 reason;	 /* enum skb_drop_reason of the running kernel */
	__u32 ifindex;	 /* the packet's device, in its own namespace (0: none) */
	__be32 saddr[4]; /* network order; IPv4 in [0] */
	__be32 daddr[4];
	__be16 sport;	 /* network order; 0 without ports */
	__be16 dport;
	__u8 family;	 /* 4, 6, or 0 when not IP */
	__u8 proto;	 /* IP protocol */
	__u16 pad;
	__u32 netns;	 /* the inode of the network namespace it was dropped in */
	__u32 pad2;
};
_Static_assert(sizeof(struct kdrop_event) == 72 &&
		       __builtin_offsetof(struct kdrop_event, netns) == 64,
	       "kdrop_event's layout: kdrop.rs decode reads these offsets");

/*
 * Where the loader found things in the running kernel (its BTF), written into the program's
 * read-only data before it is loaded: no offset or reason value is compiled in.
 */
struct kdrop_layout {
	__u32 arg_reason;	  /* the reason's position among the tracepoint's arguments */
	__u32 reason_min;	  /* reasons below it are not drops (not dropped, consumed, unspecified) */
	__u32 skb_dev;		  /* struct sk_buff: dev */
	__u32 skb_sk;		  /* sk */
	__u32 skb_head;		  /* head */
	__u32 skb_network_header; /* network_header (u16) */
	__u32 skb_transport_header; /* transport_header (u16) */
	__u32 skb_protocol;	  /* protocol (__be16) */
	__u32 dev_net;		  /* struct net_device: nd_net.net */
	__u32 dev_ifindex;	  /* ifindex */
	__u32 sk_net;		  /* struct sock: __sk_common.skc_net.net */
	__u32 net_inum;		  /* struct net: ns.inum */
};

#endif /* WEIR_API_KDROP_H */
