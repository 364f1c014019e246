// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * XDP on the node's device (agent --xdp): NodePort and external-frontend flows that this node
 * SNATs to a backend on another node are completed here, before an skb exists: the original
 * direction is translated and sent back out (XDP_TX, or XDP_REDIRECT to another device), and
 * so are the backend's replies to the client. The conntrack, backend selection and SNAT port
 * allocation are the tc programs' own (shared maps, shared code), so both give the same
 * answers. Everything else (local backends, DSR, VXLAN, pod traffic, the node's own) is passed
 * on to tc. Minimum kernel: 5.18 (bpf_fib_lookup from XDP with these flags).
 *
 * Both programs start with the prefilter (lib/prefilter.h): xdp_prefilter alone is what a
 * node's devices get with the prefilter but without XDP load balancing.
 */
#include "lib/fwd.h"
#include "lib/prefilter.h"

/* The reason an XDP verdict is counted under (direction ingress). */
static __always_inline int xdp_count(struct xdp_md *ctx, __u32 reason, int verdict)
{
	__u32 idx = WEIR_DIR_INGRESS * WEIR_METRICS_STRIDE + reason;
	struct metrics_value *m = bpf_map_lookup_elem(&weir_metrics, &idx);

	if (m) {
		m->packets += 1;
		m->bytes += ctx->data_end - ctx->data;
	}
	if (verdict == XDP_TX || verdict == XDP_REDIRECT)
		trace_xdp(ctx, reason);
	return verdict;
}

SEC("xdp")
int xdp_prefilter(struct xdp_md *ctx)
{
	if (prefilter(ctx) == XDP_DROP)
		return xdp_count(ctx, DROP_PREFILTER, XDP_DROP);
	return XDP_PASS;
}

SEC("xdp")
int xdp_nodeport(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);
	__be16 *l4 = data + sizeof(*eth) + sizeof(*ip4);
	struct ct4_key t = {}, rk = {}, fk = {};
	struct bpf_fib_lookup p = {};
	struct ct4_entry fe = {}, *e;
	__be32 old[3], new[3];
	__u8 tcp_flags = 0;
	__u16 *csum;
	__u32 len = end - data;
	int r;

	if (prefilter(ctx) == XDP_DROP)
		return xdp_count(ctx, DROP_PREFILTER, XDP_DROP);
	if ((void *)(ip4 + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	if (ip4->ihl != 5 || (ip4->frag_off & bpf_htons(0x3fff)) || ip4->ttl <= 1)
		return XDP_PASS;
	if (ip4->protocol == IPPROTO_TCP_) {
		if ((void *)l4 + 20 > end)
			return XDP_PASS;
		tcp_flags = ((__u8 *)l4)[13];
		csum = (__u16 *)((void *)l4 + 16);
	} else if (ip4->protocol == IPPROTO_UDP_) {
		if ((void *)l4 + 8 > end)
			return XDP_PASS;
		csum = (__u16 *)((void *)l4 + 6);
	} else {
		return XDP_PASS;
	}
	t.saddr = ip4->saddr;
	t.daddr = ip4->daddr;
	t.sport = l4[0];
	t.dport = l4[1];
	t.proto = ip4->protocol;

	e = bpf_map_lookup_elem(&weir_ct4, &t);
	if (e && !ct_expired(e)) {
		/* Only SNATed load-balanced flows are XDP's; DSR, local backends and masqueraded
		 * pods' flows stay with tc. */
		if (!(e->flags & CT_F_SNAT) || (e->flags & (CT_F_DSR | CT_F_MASQ)))
			return XDP_PASS;
		if (e->flags & CT_F_REPLY) {
			/* The backend's reply: back to the client, from the frontend. */
			ct4_original_key(&fk, &t, e);
			ct_touch(e, bpf_map_lookup_elem(&weir_ct4, &fk), t.proto, tcp_flags, true, len);
			fe.nat_addr = e->snat_addr; /* new destination */
			fe.nat_port = e->snat_port;
			fe.snat_addr = e->nat_addr; /* new source */
			fe.snat_port = e->nat_port;
		} else {
			/* A flow starting over is tc's to do. */
			if (ct4_restart(e, tcp_flags))
				return XDP_PASS;
			ct4_reply_key(&rk, &t, e);
			ct_touch(e, bpf_map_lookup_elem(&weir_ct4, &rk), t.proto, tcp_flags, false, len);
			fe = *e;
		}
	} else {
		r = ct4_new_flow(&t, tcp_flags, len, false, false, true, &fe);
		if (r < 0)
			return xdp_count(ctx, -r, XDP_DROP);
		if (r != NAT_DONE || !(fe.flags & CT_F_SNAT))
			return XDP_PASS;
	}

	/* Where the translated packet goes; anything but a resolved neighbour is tc's to do
	 * (it finds the conntrack entries made here). */
	p.family = AF_INET_;
	p.tos = ip4->tos;
	p.l4_protocol = ip4->protocol;
	p.tot_len = bpf_ntohs(ip4->tot_len);
	p.ipv4_src = fe.snat_addr;
	p.ipv4_dst = fe.nat_addr;
	p.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &p, sizeof(p), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;

	/* Rewrite: addresses and ports, TTL, checksums (the L4 one incrementally over the
	 * pseudo-header and ports; a zero UDP checksum stays zero). */
	old[0] = ip4->saddr;
	old[1] = ip4->daddr;
	old[2] = *(__be32 *)l4;
	new[0] = fe.snat_addr;
	new[1] = fe.nat_addr;
	new[2] = ((__u32)fe.nat_port << 16) | fe.snat_port;
	if (ip4->protocol == IPPROTO_TCP_ || *csum) {
		__u16 c = csum_fold32(bpf_csum_diff(old, sizeof(old), new, sizeof(new),
						    (__u16)~*csum));

		*csum = (ip4->protocol == IPPROTO_UDP_ && !c) ? 0xffff : c;
	}
	ip4->saddr = fe.snat_addr;
	ip4->daddr = fe.nat_addr;
	l4[0] = fe.snat_port;
	l4[1] = fe.nat_port;
	ip4->ttl -= 1;
	ip4->check = 0;
	ip4->check = csum_fold32(bpf_csum_diff(0, 0, (__be32 *)ip4, sizeof(*ip4), 0));
	__builtin_memcpy(eth->h_dest, p.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p.smac, ETH_ALEN);
	if (p.ifindex == ctx->ingress_ifindex)
		return xdp_count(ctx, REASON_XDP_TX, XDP_TX);
	return xdp_count(ctx, REASON_XDP_REDIRECT, bpf_redirect(p.ifindex, 0));
}

char _license[] SEC("license") = "Dual BSD/GPL";
