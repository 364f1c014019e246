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
	REASON_FORWARD_TUNNEL = 7, /* sent to another node's pod through the VXLAN device */
	REASON_XDP_TX = 8,	  /* translated and sent back out of the receiving device (XDP) */
	REASON_XDP_REDIRECT = 9,  /* translated and sent out of another device (XDP) */
	REASON_POLICY_ALLOWED = 10, /* events only: a new flow a pod's policy allowed */
	REASON_EVENT_LOST = 11,	    /* not a packet: a verdict event the full weir_events refused */
	DROP_INVALID_PACKET = 130, /* truncated or malformed headers */
	DROP_HEADER_WRITE = 131,   /* a header or checksum could not be rewritten */
	DROP_NO_SERVICE_BACKEND = 132, /* a NodePort/external frontend without usable backend */
	DROP_BACKEND_MISSING = 133,    /* a frontend slot named a backend not in the map */
	DROP_CT_CREATE_FAILED = 134,   /* the conntrack map refused a new entry */
	DROP_NAT_NO_PORT = 135,	       /* no free SNAT source port after several tries */
	DROP_SOURCE_RANGE = 136,       /* client outside the loadBalancerSourceRanges */
	DROP_NO_ROUTE = 137,	       /* a translated packet the FIB will not forward (route, MTU) */
	DROP_POLICY_DENIED = 138,      /* no rule of the pod's NetworkPolicies allows the flow */
	DROP_POLICY_FAILED = 139,      /* the pod's policy could not be programmed: fail closed */
	DROP_PREFILTER = 140,	       /* source in the XDP prefilter's deny list */
	REASON_MAX = 141,
};

/*
 * skb->mark of the synthetic packets `weir explain` runs through the programs with
 * BPF_PROG_TEST_RUN: nothing is written to conntrack or affinity, no counter moves, and the
 * reason the packet would be counted under is left in skb->cb[0] (plus one).
 */
#define WEIR_MARK_EXPLAIN 0x77656972 /* "weir" */

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

/*
 * Key of weir_ct4: a flow as the node sees a packet of it (source, destination, ports,
 * protocol). A load-balanced flow has two entries: the original direction (client to
 * frontend) and the reply direction (backend to client, or to the SNAT address and port).
 * ICMP echo: the identifier is the source port of a request and the destination port of a
 * reply (the other port is 0), so that a reply's key is its request's reversed.
 */
struct ct4_key {
	__be32 saddr;  /* network order */
	__be32 daddr;  /* network order */
	__be16 sport;  /* network order */
	__be16 dport;  /* network order */
	__u8 proto;
	__u8 pad[3];
};
_Static_assert(sizeof(struct ct4_key) == 16, "ct4_key size");

/* ct4_entry.flags */
#define CT_F_REPLY	 (1 << 0) /* keyed by the reply direction */
#define CT_F_SNAT	 (1 << 1) /* the flow is source-NATed to the node */
#define CT_F_SEEN_REPLY	 (1 << 2) /* a reply was seen */
#define CT_F_ESTABLISHED (1 << 3) /* TCP: the client acknowledged the reply */
#define CT_F_CLOSING	 (1 << 4) /* TCP: FIN or RST seen */
#define CT_F_DSR	 (1 << 5) /* direct server return: tunnelled to the backend's node */
#define CT_F_MASQ	 (1 << 6) /* a pod's flow out of the cluster, masqueraded (no backend) */
#define CT_F_FIN_CLIENT	 (1 << 7) /* TCP: the client sent a FIN */
#define CT_F_TIME_WAIT	 (1 << 8) /* TCP: the backend closed first, so it holds TIME_WAIT */
#define CT_F_RST	 (1 << 9) /* TCP: RST seen (no TIME_WAIT is left on either side) */
#define CT_F_WATCH	 (1 << 10) /* TCP: the backend is under outlier detection */
#define CT_F_COUNTED	 (1 << 11) /* TCP: the connect's outcome was counted */
#define CT_F_TAKEN	 (1 << 12) /* taken over from the kernel's conntrack at a switch */
/* The flags that say what an entry is (the others are the flow's state). */
#define CT_F_KIND	 (CT_F_REPLY | CT_F_SNAT | CT_F_DSR | CT_F_MASQ)

/*
 * Value of weir_ct4. Original direction: nat_addr/nat_port are the backend (new
 * destination), snat_addr/snat_port the node's address and port (new source) or 0. Reply
 * direction: nat_addr/nat_port are the frontend (new source), snat_addr/snat_port the client
 * (new destination) when the flow is SNATed, else 0. With DSR the receiving node holds the
 * original entry and the backend's node the reply entry.
 */
struct ct4_entry {
	__u64 expires;	  /* boot clock, seconds */
	__u64 packets;	  /* in this entry's direction */
	__u64 bytes;
	__be32 nat_addr;  /* network order */
	__be32 snat_addr; /* network order */
	__be16 nat_port;  /* network order */
	__be16 snat_port; /* network order */
	__u32 svc_id;	  /* the frontend */
	__u32 backend_id;
	__u16 flags;	  /* CT_F_* */
	__u16 pad;
};
_Static_assert(sizeof(struct ct4_entry) == 48, "ct4_entry size");

/* Key of weir_ct6: the IPv6 counterpart of ct4_key. */
struct ct6_key {
	__be32 saddr[4]; /* network order */
	__be32 daddr[4]; /* network order */
	__be16 sport;	 /* network order */
	__be16 dport;	 /* network order */
	__u8 proto;
	__u8 pad[3];
};
_Static_assert(sizeof(struct ct6_key) == 40, "ct6_key size");

/* Value of weir_ct6: the IPv6 counterpart of ct4_entry (same fields, same meaning). */
struct ct6_entry {
	__u64 expires;	     /* boot clock, seconds */
	__u64 packets;
	__u64 bytes;
	__be32 nat_addr[4];  /* network order */
	__be32 snat_addr[4]; /* network order */
	__be16 nat_port;     /* network order */
	__be16 snat_port;    /* network order */
	__u32 svc_id;
	__u32 backend_id;
	__u16 flags;	     /* CT_F_* */
	__u16 pad;
};
_Static_assert(sizeof(struct ct6_entry) == 72, "ct6_entry size");

/* Value of weir_snat6[0]: the node's IPv6 address for SNAT (all zero: none). */
struct node_addr6 {
	__be32 addr[4]; /* network order */
};
_Static_assert(sizeof(struct node_addr6) == 16, "node_addr6 size");

/* Conntrack lifetimes in seconds (Cilium's defaults). */
#define CT_LIFETIME_TCP_SYN	    60
#define CT_LIFETIME_TCP_ESTABLISHED 21600
#define CT_LIFETIME_TCP_CLOSING	    10
/* A flow the backend closed first (CT_F_TIME_WAIT): as long as Linux's TIME_WAIT
 * (TCP_TIMEWAIT_LEN, 60 s), so that its SNAT port is not given to a new flow to the same
 * backend while the backend still holds the old one (the new SYN would meet a challenge ACK
 * instead of a SYN-ACK; netfilter keeps TIME_WAIT entries 120 s for the same reason). */
#define CT_LIFETIME_TCP_TIME_WAIT   60
#define CT_LIFETIME_OTHER	    60

/* node_config.flags */
#define WEIR_CFG_VXLAN	    (1 << 0) /* other nodes' pods are reached through tunnel_ifindex */
#define WEIR_CFG_MASQUERADE (1 << 1) /* pods' flows leaving the cluster are SNATed to snat4 */
#define WEIR_CFG_DRAIN	    (1 << 2) /* under a netfilter dataplane: DSR flows alone (drain) */
#define WEIR_CFG_TRACE	    (1 << 3) /* forwarding summaries (bpf/lib/trace.h) */

/* The VXLAN network identifier of pod traffic between nodes. */
#define WEIR_VXLAN_VNI 2

/* Value of weir_config[0]: node-wide settings written by the agent. */
struct node_config {
	__be32 snat4;	     /* the node's IPv4 address for SNAT (network order); 0: none */
	__u16 snat_port_min; /* host order, inclusive */
	__u16 snat_port_max; /* host order, inclusive */
	__u32 flags;	     /* WEIR_CFG_* */
	__u32 tunnel_ifindex; /* the collect-metadata VXLAN device */
};

/*
 * Keys of weir_tunnel4 / weir_tunnel6 (LPM tries): another node's pod CIDR. weir_nomasq4
 * (destinations pods reach with their own address: every node's pod CIDR) has the IPv4 one.
 */
struct tunnel_key4 {
	__u32 prefixlen;
	__be32 addr; /* network order */
};
_Static_assert(sizeof(struct tunnel_key4) == 8, "tunnel_key4 size");

struct tunnel_key6 {
	__u32 prefixlen;
	__be32 addr[4]; /* network order */
};
_Static_assert(sizeof(struct tunnel_key6) == 20, "tunnel_key6 size");

/* Value of weir_tunnel4 / weir_tunnel6: the node that has those pods. */
struct tunnel_info {
	__be32 node; /* its underlay IPv4 address, network order */
	__u32 pad;
};
_Static_assert(sizeof(struct tunnel_info) == 8, "tunnel_info size");
_Static_assert(sizeof(struct node_config) == 16, "node_config size");

/*
 * NetworkPolicy (bpf/lib/policy.h). Identities and classes as weir-control's policy::id:
 * pod identities from 256, node-local CIDR identities from 1 << 24, namespace classes from
 * 2 << 24.
 */
#define WEIR_ID_ANY	    0 /* a rule without peers */
#define WEIR_ID_HOST	    1 /* the node itself */
#define WEIR_ID_WORLD	    2 /* no entry in the ipcache */
#define WEIR_ID_REMOTE_NODE 3
#define WEIR_ID_CLUSTER	    4 /* class: every pod */

/*
 * Key of weir_ipcache and weir_policy_cidrs (LPM tries, both families): prefixlen counts the
 * family byte and its padding (32 bits) plus the address prefix.
 */
struct ipcache_key {
	__u32 prefixlen;
	__u8 family; /* WEIR_AF_INET or WEIR_AF_INET6 */
	__u8 pad[3];
	__be32 addr[4]; /* network order; IPv4 in addr[0] */
};
_Static_assert(sizeof(struct ipcache_key) == 24, "ipcache_key size");

/* Value of weir_ipcache (and of weir_policy_cidrs, ns_class 0). */
struct ipcache_info {
	__u32 identity;
	__u32 ns_class; /* a pod's namespace class; 0 for anything else */
};
_Static_assert(sizeof(struct ipcache_info) == 8, "ipcache_info size");

/*
 * Key of weir_policy (LPM trie): what a local pod allows in one direction. Entries cover ep,
 * peer and dir (72 bits), then optionally the protocol (80) and a prefix of the port (up to
 * 96); lookups give all 96.
 */
struct policy_key {
	__u32 prefixlen;
	__u32 ep;    /* the pod's host-side ifindex */
	__u32 peer;  /* identity or class of the other end */
	__u8 dir;    /* WEIR_DIR_INGRESS: into the pod, WEIR_DIR_EGRESS: out of it */
	__u8 proto;  /* IP protocol */
	__be16 dport; /* network order */
};
_Static_assert(sizeof(struct policy_key) == 16, "policy_key size");

/*
 * Kinds of entry a policy verdict matched (policy_entry.match, flow_event.match), numbered
 * as Cilium's policy verdict events number them: none (denied, or the node's own traffic),
 * a peer without ports, a peer with ports, ports of any peer, anything.
 */
#define POLICY_MATCH_NONE    0
#define POLICY_MATCH_L3_ONLY 1
#define POLICY_MATCH_L3_L4   2
#define POLICY_MATCH_L4_ONLY 3
#define POLICY_MATCH_ALL     4

/*
 * Value of weir_policy: an entry allows. `origin` names the NetworkPolicies the entry comes
 * from (a number the agent keeps a table of; 0: unknown), so that a verdict can say which
 * policies allowed a flow.
 */
struct policy_entry {
	__u8 match; /* POLICY_MATCH_* of the entry's key */
	__u8 pad[3];
	__u32 origin;
};
_Static_assert(sizeof(struct policy_entry) == 8, "policy_entry size");

/* ep_policy.flags */
#define EP_POLICY_INGRESS (1 << 0) /* isolated for ingress: only weir_policy entries pass */
#define EP_POLICY_EGRESS  (1 << 1) /* isolated for egress */
#define EP_POLICY_DENY	  (1 << 2) /* programming failed: the isolated directions deny all */
/*
 * Which kinds of peer the pod's entries name (either direction), so that a new flow's judging
 * skips the lookups that cannot match: "any" (a rule without peers), the cluster or a
 * namespace class, a CIDR identity (which also spares the weir_policy_cidrs lookup). Set
 * after the entries they announce are written, cleared before those are removed. They count
 * only with EP_POLICY_HINTS: a value written by an agent that did not know them (before an
 * upgrade's first apply) makes every lookup.
 */
#define EP_POLICY_PEER_ANY   (1 << 3)
#define EP_POLICY_PEER_CLASS (1 << 4)
#define EP_POLICY_PEER_CIDR  (1 << 5)
#define EP_POLICY_HINTS	     (1 << 6)

/*
 * Value of weir_policy_eps, keyed by the pod's host-side ifindex (__u32): a pod whose flows
 * are tracked in weir_pct4/weir_pct6 (every pod some policy selects).
 */
struct ep_policy {
	__u32 flags;	/* EP_POLICY_* */
	__u32 identity; /* the pod's own */
};
_Static_assert(sizeof(struct ep_policy) == 8, "ep_policy size");

/*
 * Value of weir_pct4 / weir_pct6 (LRU, keyed by ct4_key / ct6_key in the flow's original
 * direction, addresses as the pods see them: after a Service's DNAT, before any SNAT): the
 * policy verdict of a flow, made on its first packet and kept while `revision` equals
 * weir_policy_rev[0] (a changed policy makes the next packet decide again).
 */
struct pct_entry {
	__u64 expires; /* boot clock, seconds */
	__u64 packets;
	__u64 bytes;
	__u32 revision;
	__u16 flags; /* CT_F_SEEN_REPLY, CT_F_ESTABLISHED, CT_F_CLOSING */
	__u16 pad;
};
_Static_assert(sizeof(struct pct_entry) == 32, "pct_entry size");

/* A policy verdict (weir_events ring buffer), for `weir observe`. */
struct flow_event {
	__u64 ts;	  /* boot clock, nanoseconds */
	__be32 saddr[4];  /* network order; IPv4 in [0] */
	__be32 daddr[4];
	__be16 sport;	  /* network order */
	__be16 dport;
	__u8 family;	  /* WEIR_AF_INET or WEIR_AF_INET6 */
	__u8 proto;
	__u8 dir;	  /* of the pod that decided: WEIR_DIR_INGRESS or WEIR_DIR_EGRESS */
	__u8 judged;	  /* 1 << WEIR_DIR_*: the directions judged (egress first) */
	__u32 reason;	  /* REASON_POLICY_ALLOWED, DROP_POLICY_* */
	__u32 ifindex;	  /* the pod that decided (host-side ifindex) */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 origin[2];  /* per WEIR_DIR_*: policy_entry.origin of the entry that allowed, or 0 */
	__u8 match[2];	  /* per WEIR_DIR_*: POLICY_MATCH_* of that entry */
	__u8 pad[6];
};
_Static_assert(sizeof(struct flow_event) == 80, "flow_event size");

/*
 * A packet weir's programs dropped for a reason other than policy (weir_drop_events ring
 * buffer; policy drops are reported as verdicts, struct flow_event), for `weir observe`.
 * What a full ring buffer refuses is counted per reason in weir_drop_lost.
 */
struct drop_event {
	__u64 ts;	 /* boot clock, nanoseconds */
	__be32 saddr[4]; /* network order; IPv4 in [0] (as the packet was when dropped) */
	__be32 daddr[4];
	__be16 sport;	 /* network order; 0 without ports */
	__be16 dport;
	__u8 family;	 /* WEIR_AF_INET, WEIR_AF_INET6, or 0 when not IP */
	__u8 proto;
	__u8 dir;	 /* WEIR_DIR_INGRESS or WEIR_DIR_EGRESS (of the device's hook) */
	__u8 pad;
	__u32 reason;	 /* DROP_* */
	__u32 ifindex;	 /* the device the program ran on */
	__u32 len;	 /* the packet's length */
};
_Static_assert(sizeof(struct drop_event) == 64, "drop_event size");

/* trace_event.flags */
/* A new flow at this observation point: a TCP connection's first SYN (or SYN-ACK) there, or
 * another protocol's first packet there (a TCP flow met mid-connection is not new). */
#define TRACE_F_NEW   (1 << 0)
#define TRACE_F_XLATE (1 << 1) /* translated: orig_* are its addresses before */
#define TRACE_F_REPLY (1 << 2) /* a reply: of a translated flow (its conntrack entry says), or
				* of a TCP flow whose first packet here was a SYN-ACK */

/*
 * An IPv6 flow's forwarding summary (into the summary rings, trace.h; an IPv4 flow's is the
 * smaller struct trace_event4 below, but the layout holds either family, as older programs
 * wrote IPv4 ones too), for `weir observe`: what tc or XDP did
 * with a flow's packets at one observation point (device and hook), reported on the flow's
 * first packet there, on TCP flags (SYN, FIN, RST) new for it there, on a change of reason,
 * and otherwise at most every 5 s, with the packets and bytes since the previous summary.
 * What a full ring refuses is counted per reason in weir_trace_lost (the packets
 * ride on the flow's next summary).
 */
struct trace_event {
	__u64 ts;	      /* boot clock, nanoseconds */
	__be32 saddr[4];      /* network order; IPv4 in [0] (as the packet left the program) */
	__be32 daddr[4];
	__be16 sport;	      /* network order; 0 without ports */
	__be16 dport;
	__u8 family;	      /* WEIR_AF_INET or WEIR_AF_INET6 */
	__u8 proto;
	__u8 dir;	      /* WEIR_DIR_INGRESS or WEIR_DIR_EGRESS (of the device's hook) */
	__u8 tcp_flags;	      /* this packet's */
	__u32 reason;	      /* REASON_* (what the program did) */
	__u32 ifindex;	      /* the device the program ran on */
	__u64 packets;	      /* since the flow's previous summary here, this one included */
	__u64 bytes;
	__be32 orig_saddr[4]; /* TRACE_F_XLATE: the addresses and ports before translation */
	__be32 orig_daddr[4];
	__be16 orig_sport;
	__be16 orig_dport;
	__u32 svc_id;	      /* TRACE_F_XLATE: the frontend's service id (0: masquerade) */
	__u8 flags;	      /* TRACE_F_* */
	__u8 tcp_seen;	      /* the TCP flags (SYN, FIN, RST) seen on the flow here so far */
	__u16 pad;
	__u32 pad2;
};
_Static_assert(sizeof(struct trace_event) == 120, "trace_event size");

/*
 * An IPv4 flow's forwarding summary: trace_event's fields with 4-byte addresses, in 64 bytes
 * (a ring record of 72 bytes where trace_event's takes 128: most flows are IPv4, and the
 * record's lines are most of a summary's cost). The reader tells the two apart by the
 * record's length; trace_event carries IPv6 flows.
 */
struct trace_event4 {
	__u64 ts;	    /* boot clock, nanoseconds */
	__u64 bytes;	    /* since the flow's previous summary here, this one included */
	__be32 saddr;	    /* network order (as the packet left the program) */
	__be32 daddr;
	__be16 sport;	    /* network order; 0 without ports */
	__be16 dport;
	__be32 orig_saddr;  /* TRACE_F_XLATE: the addresses and ports before translation */
	__be32 orig_daddr;
	__be16 orig_sport;
	__be16 orig_dport;
	__u32 ifindex;	    /* the device the program ran on */
	__u32 svc_id;	    /* TRACE_F_XLATE: the frontend's service id (0: masquerade) */
	__u32 packets;	    /* since the previous summary (a summary is due before 2^31) */
	__u16 reason;	    /* REASON_* (what the program did) */
	__u8 proto;
	__u8 dir;	    /* WEIR_DIR_INGRESS or WEIR_DIR_EGRESS (of the device's hook) */
	__u8 tcp_flags;	    /* this packet's */
	__u8 flags;	    /* TRACE_F_* */
	__u8 tcp_seen;	    /* the TCP flags (SYN, FIN, RST) seen on the flow here so far */
	__u8 pad[5];
};
_Static_assert(sizeof(struct trace_event4) == 64, "trace_event4 size");

#endif /* WEIR_API_DATAPATH_H */
