// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tc programs on each pod's host-side veth (tcx links, pinned):
 *   from_pod: ingress, what the pod sends. Local pods are reached with bpf_redirect_peer,
 *             other destinations the node routes leave through the FIB's device; neither
 *             passes through the host stack or netfilter.
 *   to_pod:   egress, what the host stack delivers to the pod (from the node itself, or
 *             packets the shortcut left to the stack).
 * Minimum kernel: 6.6 (tcx).
 */
#include "lib/fwd.h"

SEC("tcx/ingress")
int from_pod(struct __sk_buff *skb)
{
	return fwd(skb, WEIR_DIR_INGRESS, true);
}

SEC("tcx/egress")
int to_pod(struct __sk_buff *skb)
{
	int r;

	/* Drain: NetworkPolicy is netfilter's now. */
	if (drain_mode())
		return count(skb, WEIR_DIR_EGRESS, REASON_TO_POD, TC_ACT_OK);
	r = policy_to_pod(skb);
	if (r < 0)
		return count(skb, WEIR_DIR_EGRESS, -r, TC_ACT_SHOT);
	return count(skb, WEIR_DIR_EGRESS, REASON_TO_POD, TC_ACT_OK);
}

char _license[] SEC("license") = "Dual BSD/GPL";
