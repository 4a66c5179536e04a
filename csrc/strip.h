/*
 * strip.h - remove cached tokens from jagged feature tensors, so the caller
 * embeds only the new tokens.  Validates tensors, then runs the CPU loop or
 * the CUDA kernel of kernels.h (hkv_strip_args).
 */
#ifndef HKV_STRIP_H
#define HKV_STRIP_H

#include "cache.h"

/*
 * values: [total, ...] contiguous; offsets: int32 or int64 [batch+1];
 * num_drop: int32 [batch]; out_values: [out_total, ...] like values;
 * out_lengths: [batch] and out_offsets: [batch+1] of the offsets' dtype.
 * All on one device.  out_total is the caller's count of rows kept.
 */
hkv_status hkv_strip_tensors(const hkv_tensor *values, const hkv_tensor *offsets,
                             const hkv_tensor *num_drop,
                             const hkv_tensor *out_values,
                             const hkv_tensor *out_lengths,
                             const hkv_tensor *out_offsets, void *stream);

#endif /* HKV_STRIP_H */
