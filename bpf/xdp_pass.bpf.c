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

/*
 * Sends every frame back out of the device it came in on. Run with BPF_PROG_TEST_RUN in
 * live-frame mode (BPF_F_TEST_XDP_LIVE_FRAMES) it is a packet generator: the frame given is
 * transmitted out of the ctx's ingress device `repeat` times, without an skb (the benchmarks'
 * traffic source, as xdp-trafficgen), paced by `tx_spin`.
 */
/* Iterations of an empty loop xdp_tx runs before each frame: a generator sets it to pace itself. */
__u32 tx_spin;

static long spin_step(__u32 index, void *data)
{
	return 0;
}

SEC("xdp")
int xdp_tx(struct xdp_md *ctx)
{
	if (tx_spin)
		bpf_loop(tx_spin, spin_step, NULL, 0);
	return XDP_TX;
}

char _license[] SEC("license") = "Dual BSD/GPL";
