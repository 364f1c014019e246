// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tc program on the node's network device (tcx link, pinned):
 *   from_netdev: ingress, what arrives from the network. Packets for local pods go straight
 *                into the pod's namespace with bpf_redirect_peer; everything else (the node's
 *                own traffic) goes on to the host stack.
 * Minimum kernel: 6.6 (tcx).
 */
#include "lib/fwd.h"

SEC("tcx/ingress")
int from_netdev(struct __sk_buff *skb)
{
	return fwd(skb, WEIR_DIR_INGRESS, false);
}

char _license[] SEC("license") = "Dual BSD/GPL";
