/*
 * strip.c - argument checks for stripping cached tokens.
 */
#include "strip.h"

static int contiguous(const hkv_tensor *t)
{
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != expect)
            return 0;
        expect *= t->shape[i];
    }
    return 1;
}

static hkv_status check_vector(const hkv_tensor *t, const char *name, int bits,
                               int64_t n, const hkv_tensor *like)
{
    if (t->device_kind != like->device_kind || t->device_index != like->device_index)
        return hkv_error(HKV_EINVAL, "%s is on another device than values", name);
    if (t->dtype_code != 0 || t->dtype_bits != bits || t->ndim != 1 ||
        t->shape[0] != n || !contiguous(t))
        return hkv_error(HKV_EINVAL, "%s must be a contiguous int%d vector of %lld "
                         "entries", name, bits, (long long)n);
    return HKV_OK;
}

hkv_status hkv_strip_tensors(const hkv_tensor *values, const hkv_tensor *offsets,
                             const hkv_tensor *num_drop,
                             const hkv_tensor *out_values,
                             const hkv_tensor *out_lengths,
                             const hkv_tensor *out_offsets, void *stream)
{
    if (values->device_kind != HKV_DEVICE_CPU &&
        values->device_kind != HKV_DEVICE_CUDA)
        return hkv_error(HKV_EINVAL, "values must be on the CPU or a CUDA device");
    if (values->ndim < 1 || !contiguous(values))
        return hkv_error(HKV_EINVAL, "values must be a contiguous tensor with "
                         "tokens along dimension 0");
    if (offsets->ndim != 1 || offsets->shape[0] < 1 ||
        (offsets->dtype_bits != 32 && offsets->dtype_bits != 64))
        return hkv_error(HKV_EINVAL, "offsets must be an int32 or int64 vector of "
                         "batch+1 entries");
    int64_t batch = offsets->shape[0] - 1;
    hkv_status st = check_vector(offsets, "offsets", offsets->dtype_bits, batch + 1,
                                 values);
    if (st == HKV_OK)
        st = check_vector(num_drop, "num_cached", 32, batch, values);
    if (st == HKV_OK)
        st = check_vector(out_lengths, "out_lengths", offsets->dtype_bits, batch,
                          values);
    if (st == HKV_OK)
        st = check_vector(out_offsets, "out_offsets", offsets->dtype_bits, batch + 1,
                          values);
    if (st != HKV_OK)
        return st;
    int64_t row_elems = 1;
    for (int i = 1; i < values->ndim; i++)
        row_elems *= values->shape[i];
    int same_rows = out_values->ndim == values->ndim &&
                    out_values->dtype_code == values->dtype_code &&
                    out_values->dtype_bits == values->dtype_bits &&
                    out_values->device_kind == values->device_kind &&
                    out_values->device_index == values->device_index &&
                    contiguous(out_values);
    for (int i = 1; same_rows && i < values->ndim; i++)
        same_rows = out_values->shape[i] == values->shape[i];
    if (!same_rows)
        return hkv_error(HKV_EINVAL, "out_values must be contiguous, with the dtype, "
                         "device and row shape of values");
    if (batch > INT32_MAX)
        return hkv_error(HKV_EINVAL, "batch too large");
    if (values->device_kind == HKV_DEVICE_CPU) {
        /* Host memory: the offsets can be checked cheaply, so a bad one is an
         * exception instead of a wild read.  (On the GPU that would need a
         * synchronization; the Python layer builds offsets itself.) */
        int64_t prev = 0, kept = 0;
        for (int64_t b = 0; b <= batch; b++) {
            int64_t o = offsets->dtype_bits == 64 ? ((const int64_t *)offsets->data)[b]
                                                  : ((const int32_t *)offsets->data)[b];
            if (o < prev || (b == 0 && o != 0) || o > values->shape[0])
                return hkv_error(HKV_EINVAL, "offsets must start at 0, never "
                                 "decrease and end within values' %lld rows",
                                 (long long)values->shape[0]);
            if (b > 0) {
                int64_t d = ((const int32_t *)num_drop->data)[b - 1];
                int64_t len = o - prev;
                kept += len - (d < 0 ? 0 : d > len ? len : d);
            }
            prev = o;
        }
        if (kept != out_values->shape[0])
            return hkv_error(HKV_EINVAL, "out_values has %lld rows but %lld tokens "
                             "remain after stripping", (long long)out_values->shape[0],
                             (long long)kept);
    }
    hkv_strip_args a = {
        .values = values->data,
        .row_bytes = row_elems * (values->dtype_bits / 8),
        .offsets = offsets->data,
        .index_int64 = offsets->dtype_bits == 64,
        .num_drop = num_drop->data,
        .batch = (int32_t)batch,
        .out_values = out_values->data,
        .out_lengths = out_lengths->data,
        .out_offsets = out_offsets->data,
        .out_total = out_values->shape[0],
    };
    return hkv_strip(values->device_kind, values->device_index, &a, stream);
}
