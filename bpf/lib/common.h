/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef WEIR_LIB_COMMON_H
#define WEIR_LIB_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef __cplusplus
typedef _Bool bool;
#define true 1
#define false 0
#endif

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define ECONNREFUSED_ 111
#define NSEC_PER_SEC 1000000000ULL

/* murmur3's 64-bit finaliser: a cheap, well-mixing hash for table indexes. */
static __always_inline __u64 hash64(__u64 k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	k *= 0xc4ceb9fe1a85ec53ULL;
	k ^= k >> 33;
	return k;
}

#endif /* WEIR_LIB_COMMON_H */
