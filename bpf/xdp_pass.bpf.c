// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * An XDP program that passes everything. A veth delivers frames another veth sends it with
 * XDP_TX or XDP_REDIRECT only when it has an XDP program itself (that is what kicks its NAPI):
 * the lab puts this one on the fabric side of nodes' links when the nodes use XDP.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
