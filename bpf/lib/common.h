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

/*
 * The flags to submit a ring buffer record of `size` bytes with when the reader drains the
 * ring on a timer: a wakeup only for the record with which the unread data crosses a multiple
 * of `bytes` (a power of two), none for the others. One per record would cost the reader a
 * context switch each; one for every record past the threshold cost the producers an
 * interrupt each (the ring's irq_work) until the reader came round, about 0.4 us a record.
 * `unread`: the ring's unread data, read after the record's reservation or, `pending`, before
 * it (the record's own bytes then added).
 */
static __always_inline __u64 lazy_wakeup_flags(__u64 unread, __u64 bytes, __u64 size, bool pending)
{
	__u64 rec = (size + 8 + 7) & ~7ULL; /* with its header, 8-byte aligned */
	__u64 avail = unread + (pending ? rec : 0);

	return avail >= bytes && avail / bytes != (avail - rec) / bytes ? BPF_RB_FORCE_WAKEUP :
									   BPF_RB_NO_WAKEUP;
}

/* lazy_wakeup_flags for a record of `size` bytes already reserved in ring `rb`. */
static __always_inline __u64 ringbuf_lazy_wakeup(void *rb, __u64 bytes, __u64 size)
{
	return lazy_wakeup_flags(bpf_ringbuf_query(rb, BPF_RB_AVAIL_DATA), bytes, size, false);
}

/*
 * lazy_wakeup_flags for a record of `size` bytes about to be reserved in ring `rb`. A record
 * another CPU reserves in between can make it miss a crossing: the reader then wakes at the
 * next one, or on its timer.
 */
static __always_inline __u64 ringbuf_lazy_wakeup_next(void *rb, __u64 bytes, __u64 size)
{
	return lazy_wakeup_flags(bpf_ringbuf_query(rb, BPF_RB_AVAIL_DATA), bytes, size, true);
}

/* The kernel pointer at `base + off` (tracing programs), or NULL. */
static __always_inline void *read_ptr(const void *base, __u32 off)
{
	void *p = NULL;

	bpf_probe_read_kernel(&p, sizeof(p), base + off);
	return p;
}

/*
 * Argument `i` (1..5, known at load time only) of a raw tracepoint. The verifier refuses a
 * context access at a variable offset, and the compiler would fold a switch of constant ones
 * into one: each position is a load written out with its own constant offset.
 */
#define RAW_TP_ARG_LOAD(ctx, off)                                                               \
	({                                                                                     \
		__u64 v_;                                                                      \
		asm volatile("%0 = *(u64 *)(%1 + " #off ")" : "=r"(v_) : "r"(ctx));            \
		v_;                                                                            \
	})

static __always_inline __u64 raw_tp_arg(struct bpf_raw_tracepoint_args *ctx, __u32 i)
{
	switch (i) {
	case 1:
		return RAW_TP_ARG_LOAD(ctx, 8);
	case 2:
		return RAW_TP_ARG_LOAD(ctx, 16);
	case 3:
		return RAW_TP_ARG_LOAD(ctx, 24);
	case 4:
		return RAW_TP_ARG_LOAD(ctx, 32);
	case 5:
		return RAW_TP_ARG_LOAD(ctx, 40);
	default:
		return 0;
	}
}

#endif /* WEIR_LIB_COMMON_H */
