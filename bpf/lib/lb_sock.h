/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The socket layer's per-socket translations of connected sockets (no eviction, freed with
 * the socket): written by its connect hooks (lb.h, sock.h), read for getpeername and recvmsg,
 * and by the TCP health programs for the frontend a client asked for (tcp_health.bpf.c,
 * sharing the pinned maps).
 */
#ifndef WEIR_LIB_LB_SOCK_H
#define WEIR_LIB_LB_SOCK_H

#include "common.h"
#include "weir/api/lb.h"

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lb4_sock);
} weir_lb4_sock SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lb6_sock);
} weir_lb6_sock SEC(".maps");

#endif /* WEIR_LIB_LB_SOCK_H */
