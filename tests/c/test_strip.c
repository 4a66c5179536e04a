/*
 * test_strip.c - stripping cached tokens from jagged features
 * (strip.h: hkv_strip_tensors and, under it, hkv_cpu_strip).
 *
 * Output buffers are malloc'ed at exactly their declared size, so a write
 * one row too far is an AddressSanitizer error, not a silent overwrite.
 */
#include <stdlib.h>

#include "cache_util.h"
#include "strip.h"

/* The jagged input of most cases: 3 users of 3, 0 and 4 tokens, rows of
 * 3 floats whose values say where they came from (row * 10 + column). */
enum { S_BATCH = 3, S_TOTAL = 7, S_COLS = 3 };

static float *s_values(void)
{
    float *v = malloc(S_TOTAL * S_COLS * sizeof *v);
    for (int i = 0; v != NULL && i < S_TOTAL * S_COLS; i++)
        v[i] = (float)((i / S_COLS) * 10 + i % S_COLS);
    return v;
}

/*
 * Strip with offsets of 32 or 64 bits: drop (1, 5, -2) of lengths
 * (3, 0, 4) keeps (2, 0, 4) tokens: rows 1, 2 and 3..6.
 */
static int strip_case(int bits)
{
    float *values = s_values();
    float *out = malloc(6 * S_COLS * sizeof *out);
    void *off = malloc(4 * (size_t)(bits / 8));
    void *olen = malloc(3 * (size_t)(bits / 8));
    void *ooff = malloc(4 * (size_t)(bits / 8));
    int32_t drop[3] = {1, 5, -2};
    HCHECK(values && out && off && olen && ooff);
    const int64_t offs[4] = {0, 3, 3, 7};
    for (int i = 0; i < 4; i++) {
        if (bits == 64)
            ((int64_t *)off)[i] = offs[i];
        else
            ((int32_t *)off)[i] = (int32_t)offs[i];
    }
    hkv_tensor tv = t_f32(values, S_TOTAL, S_COLS), to = t_f32(out, 6, S_COLS);
    hkv_tensor toff, tlen, tooff;
    if (bits == 64) {
        toff = t_i64(off, 4), tlen = t_i64(olen, 3), tooff = t_i64(ooff, 4);
    } else {
        toff = t_i32(off, 4), tlen = t_i32(olen, 3), tooff = t_i32(ooff, 4);
    }
    hkv_tensor td = t_i32(drop, 3);
    hkv_status st = hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL);
    int bad = st != HKV_OK;
    const int64_t want_len[3] = {2, 0, 4}, want_off[4] = {0, 2, 2, 6};
    const int rows[6] = {1, 2, 3, 4, 5, 6};
    for (int i = 0; !bad && i < 3; i++)
        bad |= (bits == 64 ? ((int64_t *)olen)[i] : ((int32_t *)olen)[i]) !=
               want_len[i];
    for (int i = 0; !bad && i < 4; i++)
        bad |= (bits == 64 ? ((int64_t *)ooff)[i] : ((int32_t *)ooff)[i]) !=
               want_off[i];
    for (int r = 0; !bad && r < 6; r++)
        for (int j = 0; j < S_COLS; j++)
            bad |= out[r * S_COLS + j] != (float)(rows[r] * 10 + j);
    free(values), free(out), free(off), free(olen), free(ooff);
    HCHECK_ST(st, HKV_OK);
    HCHECK(!bad);
    return 0;
}

static void test_strip_int32_and_int64_offsets(void)
{
    CHECK(strip_case(32) == 0);
    CHECK(strip_case(64) == 0);
}

/* Everything cached: nothing left, empty output; and an empty batch. */
static void test_strip_all_dropped_and_empty(void)
{
    float *values = s_values();
    float *out = malloc(1);                       /* zero rows */
    int32_t off[4] = {0, 3, 3, 7}, drop[3] = {3, 0, 9}, olen[3], ooff[4];
    CHECK(values && out);
    hkv_tensor tv = t_f32(values, S_TOTAL, S_COLS), to = t_f32(out, 0, S_COLS);
    hkv_tensor toff = t_i32(off, 4), td = t_i32(drop, 3);
    hkv_tensor tlen = t_i32(olen, 3), tooff = t_i32(ooff, 4);
    CHECK_OK(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL));
    CHECK(!check_i32("out_lengths", olen, (const int32_t[]){0, 0, 0}, 3));
    CHECK(!check_i32("out_offsets", ooff, (const int32_t[]){0, 0, 0, 0}, 4));

    /* batch 0: offsets = {0}; the output offsets are {0} */
    int32_t off0[1] = {0}, ooff0[1] = {-1};
    hkv_tensor t0 = t_i32(off0, 1), d0 = t_i32(drop, 0), l0 = t_i32(olen, 0);
    hkv_tensor oo0 = t_i32(ooff0, 1);
    CHECK_OK(hkv_strip_tensors(&tv, &t0, &d0, &to, &l0, &oo0, NULL));
    CHECK_EQ(ooff0[0], 0);
    free(values), free(out);
}

/* Item-id features: 1-D int64 values, and multi-dimensional rows. */
static void test_strip_row_shapes(void)
{
    int64_t ids[S_TOTAL] = {10, 11, 12, 20, 21, 22, 23};
    int64_t *out = malloc(4 * sizeof *out);
    int64_t off[4] = {0, 3, 3, 7}, olen[3], ooff[4];
    int32_t drop[3] = {2, 0, 1};
    CHECK(out != NULL);
    hkv_tensor tv = t_i64(ids, S_TOTAL), to = t_i64(out, 4);
    hkv_tensor toff = t_i64(off, 4), td = t_i32(drop, 3);
    hkv_tensor tlen = t_i64(olen, 3), tooff = t_i64(ooff, 4);
    CHECK_OK(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL));
    CHECK(out[0] == 12 && out[1] == 21 && out[2] == 22 && out[3] == 23);
    CHECK(olen[0] == 1 && olen[1] == 0 && olen[2] == 3);
    CHECK(ooff[3] == 4);
    free(out);

    /* rows of [2, 2] floats: 4 floats per token */
    float vals[S_TOTAL * 4], *o = malloc(4 * 4 * sizeof *o);
    for (int i = 0; i < S_TOTAL * 4; i++)
        vals[i] = (float)i;
    CHECK(o != NULL);
    hkv_tensor v3 = tv;
    v3.data = vals, v3.dtype_code = 2, v3.dtype_bits = 32, v3.ndim = 3;
    v3.shape[0] = S_TOTAL, v3.shape[1] = 2, v3.shape[2] = 2;
    v3.strides[0] = 4, v3.strides[1] = 2, v3.strides[2] = 1;
    hkv_tensor o3 = v3;
    o3.data = o, o3.shape[0] = 4;
    int64_t ooff2[4], olen2[3];
    tlen = t_i64(olen2, 3), tooff = t_i64(ooff2, 4);
    CHECK_OK(hkv_strip_tensors(&v3, &toff, &td, &o3, &tlen, &tooff, NULL));
    for (int i = 0; i < 4; i++)
        CHECK(o[i] == (float)(2 * 4 + i));          /* token 2 */
    for (int i = 4; i < 16; i++)
        CHECK(o[i] == (float)(4 * 4 + i - 4));      /* tokens 4..6 */
    free(o);
}

/* Bad offsets or shapes: HKV_EINVAL before anything is read or written. */
static void test_strip_invalid(void)
{
    float *values = s_values();
    float out[6 * S_COLS];
    int32_t off[4], drop[3] = {1, 5, -2}, olen[3], ooff[4];
    int64_t off64[4] = {0, 3, 3, 7}, olen64[3];
    CHECK(values != NULL);
    hkv_tensor tv = t_f32(values, S_TOTAL, S_COLS), to = t_f32(out, 6, S_COLS);
    hkv_tensor toff = t_i32(off, 4), td = t_i32(drop, 3);
    hkv_tensor tlen = t_i32(olen, 3), tooff = t_i32(ooff, 4), t;

#define SET_OFF(a, b, c, d) (off[0] = (a), off[1] = (b), off[2] = (c), off[3] = (d))
    SET_OFF(1, 3, 3, 7);                                  /* not from 0 */
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "offsets") != NULL);
    SET_OFF(0, 3, 2, 7);                                  /* decreasing */
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    SET_OFF(0, 3, 3, 8);                                  /* past the rows */
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    SET_OFF(0, -3, 3, 7);
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    off64[2] = INT64_MAX;                                 /* 64-bit, huge */
    hkv_tensor toff64 = t_i64(off64, 4), tlen64 = t_i64(olen64, 3);
    hkv_tensor tooff64 = t_i64(off64, 4);
    CHECK_ST(hkv_strip_tensors(&tv, &toff64, &td, &to, &tlen64, &tooff64, NULL),
             HKV_EINVAL);
    SET_OFF(0, 3, 3, 7);
    /* out_values of the wrong size (the rows kept are 6) */
    t = t_f32(out, 5, S_COLS);
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &t, &tlen, &tooff, NULL), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "6") != NULL);
    t = t_f32(out, 6, S_COLS - 1);                        /* row shape */
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &t, &tlen, &tooff, NULL), HKV_EINVAL);
    t = to, t.dtype_bits = 64;                            /* dtype */
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &t, &tlen, &tooff, NULL), HKV_EINVAL);
    t = to, t.strides[0] = 4;                             /* not contiguous */
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &t, &tlen, &tooff, NULL), HKV_EINVAL);
    t = tv, t.strides[1] = 2;
    CHECK_ST(hkv_strip_tensors(&t, &toff, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    /* index vectors: dtypes, lengths, devices */
    t = t_i64((int64_t *)drop, 3);
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &t, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen64, &tooff, NULL),
             HKV_EINVAL);                                 /* 64-bit lengths */
    t = t_i32(ooff, 3);
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &t, NULL), HKV_EINVAL);
    t = t_i32(drop, 2);
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &t, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    t = toff, t.dtype_bits = 16;
    CHECK_ST(hkv_strip_tensors(&tv, &t, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    t = toff, t.dtype_code = 2;                           /* float offsets */
    CHECK_ST(hkv_strip_tensors(&tv, &t, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    t = toff, t.ndim = 2, t.shape[1] = 1, t.strides[1] = 1;
    CHECK_ST(hkv_strip_tensors(&tv, &t, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    t = toff, t.shape[0] = 0;
    CHECK_ST(hkv_strip_tensors(&tv, &t, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    t = td, t.device_kind = HKV_DEVICE_CUDA;
    CHECK_ST(hkv_strip_tensors(&tv, &toff, &t, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    t = tv, t.device_kind = -1;
    CHECK_ST(hkv_strip_tensors(&t, &toff, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
    t = tv, t.ndim = 0;
    CHECK_ST(hkv_strip_tensors(&t, &toff, &td, &to, &tlen, &tooff, NULL), HKV_EINVAL);
#undef SET_OFF
    /* Still works with the good arguments. */
    CHECK_OK(hkv_strip_tensors(&tv, &toff, &td, &to, &tlen, &tooff, NULL));
    CHECK_EQ(ooff[3], 6);

    /* Everything on a CUDA device, in a build without CUDA: a clear
     * error from the stub, nothing touched. */
    hkv_tensor c[6] = {tv, toff, td, to, tlen, tooff};
    for (int i = 0; i < 6; i++)
        c[i].device_kind = HKV_DEVICE_CUDA;
    CHECK_ST(hkv_strip_tensors(&c[0], &c[1], &c[2], &c[3], &c[4], &c[5], NULL),
             HKV_ENODEV);
    free(values);
}

/* Random jagged inputs against a direct computation. */
static void test_strip_random(void)
{
    test_rng r = {5};
    for (int iter = 0; iter < 200; iter++) {
        int32_t batch = (int32_t)rng_range(&r, 0, 12);
        int64_t off[13], olen[12], ooff[13], total = 0, kept = 0;
        int32_t drop[12];
        off[0] = 0;
        for (int32_t b = 0; b < batch; b++) {
            int64_t len = rng_range(&r, 0, 9);
            off[b + 1] = off[b] + len;
            drop[b] = (int32_t)rng_range(&r, -2, 11);
            int64_t d = drop[b] < 0 ? 0 : drop[b] > len ? len : drop[b];
            kept += len - d;
        }
        total = off[batch] + rng_range(&r, 0, 2);   /* spare rows at the end */
        int32_t *vals = malloc((size_t)(total + 1) * sizeof *vals);
        int32_t *out = malloc((size_t)(kept + 1) * sizeof *out);
        CHECK(vals && out);
        for (int64_t i = 0; i < total; i++)
            vals[i] = (int32_t)(i * 7 + 1);
        hkv_tensor tv = t_i32(vals, total), to = t_i32(out, kept);
        hkv_tensor toff = t_i64(off, batch + 1), td = t_i32(drop, batch);
        hkv_tensor tl = t_i64(olen, batch), too = t_i64(ooff, batch + 1);
        hkv_status st = hkv_strip_tensors(&tv, &toff, &td, &to, &tl, &too, NULL);
        int bad = st != HKV_OK;
        int64_t o = 0;
        for (int32_t b = 0; !bad && b < batch; b++) {
            int64_t len = off[b + 1] - off[b];
            int64_t d = drop[b] < 0 ? 0 : drop[b] > len ? len : drop[b];
            bad |= olen[b] != len - d || ooff[b] != o;
            for (int64_t i = d; !bad && i < len; i++, o++)
                bad |= out[o] != vals[off[b] + i];
        }
        bad |= !bad && ooff[batch] != kept;
        free(vals), free(out);
        CHECK_ST(st, HKV_OK);
        CHECK(!bad);
    }
}

void run_strip_tests(void)
{
    RUN(test_strip_int32_and_int64_offsets);
    RUN(test_strip_all_dropped_and_empty);
    RUN(test_strip_row_shapes);
    RUN(test_strip_invalid);
    RUN(test_strip_random);
}
