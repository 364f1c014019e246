// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup sock_addr hooks: east-west Service load balancing at the socket layer.
 * Attached to the node's pod cgroup subtree, with a sockops program that watches TCP connects
 * to backends under outlier detection. Minimum kernel: 5.18 (bpf_set_retval from
 * sock_addr programs); getpeername hooks need 5.8.
 */
#include "lib/sock.h"

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx, LB_STAT_XLATE_CONNECT, true);
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx, LB_STAT_XLATE_SENDMSG, false);
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx, true);
	return 1;
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx, false);
	return 1;
}

SEC("cgroup/connect6")
int sock6_connect(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_fwd(ctx, LB_STAT_XLATE_CONNECT, true);
}

SEC("cgroup/sendmsg6")
int sock6_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_fwd(ctx, LB_STAT_XLATE_SENDMSG, false);
}

SEC("cgroup/recvmsg6")
int sock6_recvmsg(struct bpf_sock_addr *ctx)
{
	sock6_xlate_rev(ctx, true);
	return 1;
}

SEC("cgroup/getpeername6")
int sock6_getpeername(struct bpf_sock_addr *ctx)
{
	sock6_xlate_rev(ctx, false);
	return 1;
}

/* Outcomes of watched TCP connects (outlier detection). */
SEC("sockops")
int sock_ops(struct bpf_sock_ops *skops)
{
	outlier_sockops(skops);
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
