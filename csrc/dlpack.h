/*
 * dlpack.h - the DLPack data structures (the open, ABI-stable tensor
 * exchange format: https://dmlc.github.io/dlpack/latest/), written out here
 * so the package needs no framework headers.  Only the unversioned
 * ("dltensor" capsule) form is used: every consumer accepts it.
 */
#ifndef HKV_DLPACK_H
#define HKV_DLPACK_H

#include <stdint.h>

enum {
    HKV_DL_CPU = 1,
    HKV_DL_CUDA = 2,
    HKV_DL_CUDA_HOST = 3,   /* pinned host memory */
    HKV_DL_CUDA_MANAGED = 13
};

enum {
    HKV_DL_INT = 0,
    HKV_DL_UINT = 1,
    HKV_DL_FLOAT = 2,
    HKV_DL_BFLOAT = 4
};

typedef struct {
    int32_t device_type;
    int32_t device_id;
} hkv_dl_device;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} hkv_dl_dtype;

typedef struct {
    void *data;
    hkv_dl_device device;
    int32_t ndim;
    hkv_dl_dtype dtype;
    int64_t *shape;
    int64_t *strides;       /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} hkv_dl_tensor;

typedef struct hkv_dl_managed_tensor {
    hkv_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct hkv_dl_managed_tensor *self);
} hkv_dl_managed_tensor;

#endif /* HKV_DLPACK_H */
