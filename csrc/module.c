/*
 * module.c - the CPython extension hstu_kvcache._C.
 *
 * A thin layer: it converts arguments (buffers of int64 ids and lengths,
 * DLPack capsules for tensors), releases the GIL around core calls, turns
 * error codes into the package's exceptions and exports memory as DLPack
 * capsules.  All policy lives in the C core; all friendliness in Python.
 *
 * Small host arrays come in through the buffer protocol (NumPy arrays):
 * this needs no NumPy headers at build time and ties the extension to no
 * NumPy ABI version.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "async_queue.h"
#include "cache.h"
#include "cuda_rt.h"
#include "dlpack.h"
#include "strip.h"

/* Status code -> exception class, installed by hstu_kvcache.errors. */
static PyObject *error_types = NULL;

static PyObject *raise_status(hkv_status st)
{
    PyObject *type = NULL;
    if (error_types != NULL) {
        PyObject *key = PyLong_FromLong((long)st);
        if (key != NULL) {
            type = PyDict_GetItemWithError(error_types, key);
            Py_DECREF(key);
        }
    }
    if (type == NULL && !PyErr_Occurred())
        type = PyExc_RuntimeError;
    if (type != NULL) {
        const char *msg = hkv_last_error();
        PyErr_SetString(type, msg[0] ? msg : hkv_status_name(st));
    }
    return NULL;
}

/* Raise the exception of HKV_EINVAL with a formatted message. */
static PyObject *raise_einval(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    PyOS_vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return raise_status(hkv_error(HKV_EINVAL, "%s", msg));
}

/* None on success, else the status's exception. */
static PyObject *none_or_raise(hkv_status st)
{
    if (st != HKV_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *set_error_types(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyDict_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "expected a dict");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(error_types, arg);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* int64 buffers                                                       */

typedef struct {
    Py_buffer view;
    int held;
} int_buffer;

/* Borrow a 1-D C-contiguous buffer of 8-byte integers (None -> NULL). */
static int get_int64s(PyObject *obj, const char *name, int_buffer *b,
                      Py_ssize_t expect, int writable, int allow_none)
{
    b->held = 0;
    if (obj == Py_None) {
        if (allow_none)
            return 0;
        raise_einval("%s must not be None", name);
        return -1;
    }
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) != 0)
        return -1;
    b->held = 1;
    const char *f = b->view.format ? b->view.format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int integer = strchr("qQlL", *f) != NULL && f[1] == '\0';
    if (b->view.ndim != 1 || b->view.itemsize != 8 || !integer) {
        raise_einval("%s must be a 1-D array of 64-bit integers", name);
        return -1;
    }
    if (expect >= 0 && b->view.shape[0] != expect) {
        raise_einval("%s has %zd entries, expected %zd", name, b->view.shape[0],
                     expect);
        return -1;
    }
    return 0;
}

static void put_buffer(int_buffer *b)
{
    if (b->held)
        PyBuffer_Release(&b->view);
    b->held = 0;
}

static void *int_ptr(int_buffer *b)
{
    return b->held ? b->view.buf : NULL;
}

static Py_ssize_t int_len(int_buffer *b)
{
    return b->held ? b->view.shape[0] : 0;
}

static int get_stream(PyObject *obj, void **stream)
{
    *stream = NULL;
    if (obj == NULL || obj == Py_None)
        return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *stream = (void *)(uintptr_t)v;
    return 0;
}

/* ------------------------------------------------------------------ */
/* DLPack import                                                       */

typedef struct {
    PyObject *capsule;
    hkv_dl_managed_tensor *mt;
    hkv_tensor t;
} imported;

/* Read a "dltensor" capsule into an hkv_tensor; the producer's memory stays
 * owned by the capsule until release_import. */
static int import_tensor(PyObject *capsule, const char *name, imported *im)
{
    im->capsule = NULL;
    im->mt = NULL;
    if (!PyCapsule_IsValid(capsule, "dltensor")) {
        raise_einval("%s: expected an unused DLPack capsule", name);
        return -1;
    }
    hkv_dl_managed_tensor *mt = PyCapsule_GetPointer(capsule, "dltensor");
    if (mt == NULL)
        return -1;
    const hkv_dl_tensor *d = &mt->dl_tensor;
    if (d->ndim < 0 || d->ndim > 6 || d->dtype.lanes != 1) {
        raise_einval("%s: tensors of rank 0..6 with one lane only", name);
        return -1;
    }
    hkv_tensor *t = &im->t;
    t->data = (char *)d->data + d->byte_offset;
    switch (d->device.device_type) {
    case HKV_DL_CPU:
    case HKV_DL_CUDA_HOST:
        t->device_kind = HKV_DEVICE_CPU;
        t->device_index = 0;
        break;
    case HKV_DL_CUDA:
        t->device_kind = HKV_DEVICE_CUDA;
        t->device_index = d->device.device_id;
        break;
    default:
        t->device_kind = -1;
        t->device_index = d->device.device_id;
    }
    t->dtype_code = d->dtype.code;
    t->dtype_bits = d->dtype.bits;
    t->ndim = d->ndim;
    int64_t stride = 1;
    for (int i = d->ndim - 1; i >= 0; i--) {
        t->shape[i] = d->shape[i];
        t->strides[i] = d->strides ? d->strides[i] : stride;
        stride *= d->shape[i];
    }
    im->capsule = capsule;
    im->mt = mt;
    return 0;
}

/* Done with an imported tensor: mark the capsule used, tell the producer. */
static void release_import(imported *im)
{
    if (im->mt == NULL)
        return;
    PyCapsule_SetName(im->capsule, "used_dltensor");
    if (im->mt->deleter != NULL)
        im->mt->deleter(im->mt);
    im->mt = NULL;
}

/* ------------------------------------------------------------------ */
/* DLPack export                                                       */

typedef struct {
    hkv_dl_managed_tensor mt;
    hkv_buffer *buffer;      /* one reference held while the tensor lives */
    int64_t shape[6];
    int64_t strides[6];
} exported;

/* Touches no Python object: may run on any thread, without the GIL. */
static void export_deleter(hkv_dl_managed_tensor *mt)
{
    exported *e = mt->manager_ctx;
    hkv_buffer_unref(e->buffer);
    free(e);
}

static void export_capsule_destructor(PyObject *capsule)
{
    if (!PyCapsule_IsValid(capsule, "dltensor"))
        return;  /* consumed: the consumer calls the deleter */
    hkv_dl_managed_tensor *mt = PyCapsule_GetPointer(capsule, "dltensor");
    if (mt != NULL && mt->deleter != NULL)
        mt->deleter(mt);
}

/* A capsule viewing `buffer` (+ byte offset) as a C-contiguous tensor. */
static PyObject *export_tensor(hkv_buffer *buffer, size_t byte_offset, int ndim,
                               const int64_t *shape, uint8_t code, uint8_t bits)
{
    exported *e = calloc(1, sizeof *e);
    if (e == NULL)
        return PyErr_NoMemory();
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        e->shape[i] = shape[i];
        e->strides[i] = stride;
        stride *= shape[i];
    }
    hkv_dl_tensor *d = &e->mt.dl_tensor;
    d->data = buffer->ptr;
    d->byte_offset = byte_offset;
    if (buffer->kind == HKV_MEM_DEVICE) {
        d->device.device_type = HKV_DL_CUDA;
        d->device.device_id = buffer->device;
    } else {
        d->device.device_type = HKV_DL_CPU;
        d->device.device_id = 0;
    }
    d->ndim = ndim;
    d->dtype.code = code;
    d->dtype.bits = bits;
    d->dtype.lanes = 1;
    d->shape = e->shape;
    d->strides = e->strides;
    e->mt.manager_ctx = e;
    e->mt.deleter = export_deleter;
    e->buffer = buffer;
    hkv_buffer_ref(buffer);
    PyObject *cap = PyCapsule_New(&e->mt, "dltensor", export_capsule_destructor);
    if (cap == NULL)
        export_deleter(&e->mt);
    return cap;
}

/* ------------------------------------------------------------------ */
/* Cache type                                                          */

typedef struct {
    PyObject_HEAD
    hkv_cache *cache;
    int busy;          /* calls running without the GIL */
} CacheObject;

typedef struct {
    PyObject_HEAD
    hkv_batch *batch;
    PyObject *owner;   /* the CacheObject, kept alive while the batch is */
} BatchObject;

typedef struct {
    PyObject_HEAD
    hkv_prepare_job *job;
    PyObject *owner;   /* the CacheObject */
} PrepareObject;

static PyTypeObject CacheType;
static PyTypeObject BatchType;
static PyTypeObject PrepareType;

static int cache_ready(CacheObject *self)
{
    if (self->cache == NULL) {
        raise_status(hkv_error(HKV_ESTATE, "the cache was closed"));
        return 0;
    }
    return 1;
}

/* Run a core call without the GIL while keeping the cache from closing. */
#define WITHOUT_GIL(self, stmt)                 \
    do {                                        \
        (self)->busy++;                         \
        Py_BEGIN_ALLOW_THREADS                  \
        stmt;                                   \
        Py_END_ALLOW_THREADS                    \
        (self)->busy--;                         \
    } while (0)

static int Cache_init(CacheObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"num_layers", "num_heads", "head_dim", "page_size",
                             "num_pages", "dtype_code", "dtype_bits", "device_kind",
                             "device_index", "max_batch_size", "max_seq_len",
                             "max_batch_tokens", "verify_tokens",
                             "max_open_batches", "host_pages", "offload_mode",
                             "max_offload_bytes", "event_capacity", "early_reuse",
                             "kernel_copies", "disk_dir", "disk_capacity_bytes",
                             "disk_persist", "disk_admit_after", "disk_gds",
                             "disk_io_threads", NULL};
    hkv_config cfg;
    memset(&cfg, 0, sizeof cfg);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiiiiiiiiLLpi|iiLippzLpiii", kwlist,
                                     &cfg.num_layers, &cfg.num_heads, &cfg.head_dim,
                                     &cfg.page_size, &cfg.num_pages,
                                     &cfg.dtype_code, &cfg.dtype_bits,
                                     &cfg.device_kind, &cfg.device_index,
                                     &cfg.max_batch_size, &cfg.max_seq_len,
                                     &cfg.max_batch_tokens, &cfg.verify_tokens,
                                     &cfg.max_open_batches, &cfg.host_pages,
                                     &cfg.offload_mode, &cfg.max_offload_bytes,
                                     &cfg.event_capacity, &cfg.early_reuse,
                                     &cfg.kernel_copies, &cfg.disk_dir,
                                     &cfg.disk_capacity_bytes, &cfg.disk_persist,
                                     &cfg.disk_admit_after, &cfg.disk_gds,
                                     &cfg.disk_io_threads))
        return -1;
    if (self->cache != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cache already initialised");
        return -1;
    }
    hkv_status st;
    hkv_cache *c = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = hkv_cache_create(&cfg, &c);
    Py_END_ALLOW_THREADS
    if (st != HKV_OK) {
        raise_status(st);
        return -1;
    }
    self->cache = c;
    return 0;
}

static void Cache_dealloc(CacheObject *self)
{
    if (self->cache != NULL)
        hkv_cache_destroy(self->cache);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Cache_close(CacheObject *self, PyObject *unused)
{
    (void)unused;
    if (self->busy > 0)
        return raise_status(hkv_error(HKV_EBUSY, "the cache is in use by another "
                                      "thread; close it when that call returns"));
    if (self->cache != NULL) {
        hkv_cache *c = self->cache;
        self->cache = NULL;
        Py_BEGIN_ALLOW_THREADS
        hkv_cache_destroy(c);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *Cache_lookup(CacheObject *self, PyObject *args)
{
    PyObject *ids_o, *len_o, *keys_o, *cached_o, *epochs_o;
    if (!PyArg_ParseTuple(args, "OOOOO", &ids_o, &len_o, &keys_o, &cached_o,
                          &epochs_o) || !cache_ready(self))
        return NULL;
    int_buffer ids, lens, keys, cached, epochs;
    keys.held = lens.held = cached.held = epochs.held = 0;
    PyObject *ret = NULL;
    if (get_int64s(ids_o, "user_ids", &ids, -1, 0, 0) ||
        get_int64s(len_o, "history_lengths", &lens, int_len(&ids), 0, 0) ||
        get_int64s(keys_o, "token_keys", &keys, -1, 0, 1) ||
        get_int64s(cached_o, "cached_lengths", &cached, int_len(&ids), 1, 0) ||
        get_int64s(epochs_o, "epochs", &epochs, int_len(&ids), 1, 0))
        goto out;
    if (int_len(&ids) > INT32_MAX) {
        raise_einval("batch too large");
        goto out;
    }
    hkv_status st;
    WITHOUT_GIL(self, st = hkv_cache_lookup(self->cache, (int32_t)int_len(&ids),
                                            int_ptr(&ids), int_ptr(&lens),
                                            int_ptr(&keys), int_len(&keys),
                                            int_ptr(&cached), int_ptr(&epochs)));
    ret = none_or_raise(st);
out:
    put_buffer(&ids);
    put_buffer(&lens);
    put_buffer(&keys);
    put_buffer(&cached);
    put_buffer(&epochs);
    return ret;
}

/* The arguments of an allocation (synchronous or on the worker). */
typedef struct {
    int_buffer ids, lens, cached, epochs, keys, cand;
    void *stream;
} alloc_args;

static void put_alloc_args(alloc_args *a)
{
    put_buffer(&a->ids);
    put_buffer(&a->lens);
    put_buffer(&a->cached);
    put_buffer(&a->epochs);
    put_buffer(&a->keys);
    put_buffer(&a->cand);
}

static int get_alloc_args(PyObject *args, alloc_args *a)
{
    PyObject *ids_o, *len_o, *cached_o, *epochs_o, *keys_o, *cand_o, *stream_o;
    a->ids.held = a->lens.held = a->cached.held = a->epochs.held = 0;
    a->keys.held = a->cand.held = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &ids_o, &len_o, &cached_o, &epochs_o,
                          &keys_o, &cand_o, &stream_o))
        return -1;
    if (get_int64s(ids_o, "user_ids", &a->ids, -1, 0, 0) ||
        get_int64s(len_o, "history_lengths", &a->lens, int_len(&a->ids), 0, 0) ||
        get_int64s(cached_o, "cached_lengths", &a->cached, int_len(&a->ids), 0, 0) ||
        get_int64s(epochs_o, "epochs", &a->epochs, int_len(&a->ids), 0, 0) ||
        get_int64s(keys_o, "token_keys", &a->keys, -1, 0, 1) ||
        get_int64s(cand_o, "num_candidates", &a->cand, int_len(&a->ids), 0, 1) ||
        get_stream(stream_o, &a->stream))
        return -1;
    if (int_len(&a->ids) > INT32_MAX) {
        raise_einval("batch too large");
        return -1;
    }
    return 0;
}

static PyObject *Cache_allocate(CacheObject *self, PyObject *args)
{
    alloc_args a;
    memset(&a, 0, sizeof a);
    PyObject *ret = NULL;
    if (!cache_ready(self) || get_alloc_args(args, &a))
        goto out;
    hkv_status st;
    hkv_batch *bt = NULL;
    WITHOUT_GIL(self, st = hkv_cache_allocate(self->cache, (int32_t)int_len(&a.ids),
                                              int_ptr(&a.ids), int_ptr(&a.lens),
                                              int_ptr(&a.cached), int_ptr(&a.epochs),
                                              int_ptr(&a.keys), int_len(&a.keys),
                                              int_ptr(&a.cand), a.stream, &bt));
    if (st != HKV_OK) {
        raise_status(st);
        goto out;
    }
    BatchObject *bo = PyObject_New(BatchObject, &BatchType);
    if (bo == NULL) {
        hkv_batch_free(bt);
        goto out;
    }
    bo->batch = bt;
    bo->owner = (PyObject *)self;
    Py_INCREF(self);
    ret = (PyObject *)bo;
out:
    put_alloc_args(&a);
    return ret;
}

static PyObject *Cache_prepare_async(CacheObject *self, PyObject *args)
{
    alloc_args a;
    memset(&a, 0, sizeof a);
    PyObject *ret = NULL;
    if (!cache_ready(self) || get_alloc_args(args, &a))
        goto out;
    hkv_status st;
    hkv_prepare_job *job = NULL;
    WITHOUT_GIL(self, st = hkv_cache_prepare_async(self->cache, (int32_t)int_len(&a.ids),
                                                   int_ptr(&a.ids), int_ptr(&a.lens),
                                                   int_ptr(&a.cached), int_ptr(&a.epochs),
                                                   int_ptr(&a.keys), int_len(&a.keys),
                                                   int_ptr(&a.cand), a.stream, &job));
    if (st != HKV_OK) {
        raise_status(st);
        goto out;
    }
    PrepareObject *po = PyObject_New(PrepareObject, &PrepareType);
    if (po == NULL) {
        hkv_prepare_free(job);
        goto out;
    }
    po->job = job;
    po->owner = (PyObject *)self;
    Py_INCREF(self);
    ret = (PyObject *)po;
out:
    put_alloc_args(&a);
    return ret;
}

static PyObject *Cache_meta_offsets(CacheObject *self, PyObject *unused)
{
    (void)unused;
    if (!cache_ready(self))
        return NULL;
    const int64_t *off = hkv_cache_meta_offsets(self->cache);
    PyObject *t = PyTuple_New(HKV_META_NUM_FIELDS);
    if (t == NULL)
        return NULL;
    for (int i = 0; i < HKV_META_NUM_FIELDS; i++)
        PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(off[i]));
    return t;
}

static PyObject *Cache_export_table(CacheObject *self, PyObject *args)
{
    int layer;
    if (!PyArg_ParseTuple(args, "i", &layer) || !cache_ready(self))
        return NULL;
    const hkv_config *cfg = hkv_cache_config(self->cache);
    if (layer < -1 || layer >= cfg->num_layers)
        return raise_status(hkv_error(HKV_EINVAL, "layer %d is outside 0..%d",
                                      layer, (int)cfg->num_layers - 1));
    int64_t shape[6] = {cfg->num_layers, cfg->num_pages, 2, cfg->page_size,
                        cfg->num_heads, cfg->head_dim};
    size_t es = (size_t)cfg->dtype_bits / 8;
    size_t layer_bytes = (size_t)cfg->num_pages * 2 * (size_t)cfg->page_size *
                         (size_t)cfg->num_heads * (size_t)cfg->head_dim * es;
    hkv_buffer *buf = hkv_cache_table(self->cache);
    PyObject *cap = layer < 0
        ? export_tensor(buf, 0, 6, shape, (uint8_t)cfg->dtype_code,
                        (uint8_t)cfg->dtype_bits)
        : export_tensor(buf, (size_t)layer * layer_bytes, 5, shape + 1,
                        (uint8_t)cfg->dtype_code, (uint8_t)cfg->dtype_bits);
    hkv_buffer_unref(buf);
    return cap;
}

static PyObject *Cache_user_length(CacheObject *self, PyObject *args)
{
    long long uid;
    if (!PyArg_ParseTuple(args, "L", &uid) || !cache_ready(self))
        return NULL;
    int64_t len;
    hkv_status st = hkv_cache_user_length(self->cache, uid, &len);
    if (st != HKV_OK)
        return raise_status(st);
    return PyLong_FromLongLong(len);
}

static PyObject *Cache_read_user(CacheObject *self, PyObject *args)
{
    long long uid;
    int layer;
    PyObject *k_o, *v_o, *stream_o;
    if (!PyArg_ParseTuple(args, "LiOOO", &uid, &layer, &k_o, &v_o, &stream_o) ||
        !cache_ready(self))
        return NULL;
    imported k, v;
    v.mt = NULL;
    void *stream;
    PyObject *ret = NULL;
    if (import_tensor(k_o, "k", &k) || import_tensor(v_o, "v", &v) ||
        get_stream(stream_o, &stream))
        goto out;
    hkv_status st;
    int64_t len = 0;
    WITHOUT_GIL(self, st = hkv_cache_read_user(self->cache, uid, layer, &k.t, &v.t,
                                               stream, &len));
    if (st != HKV_OK)
        raise_status(st);
    else
        ret = PyLong_FromLongLong(len);
out:
    release_import(&k);
    release_import(&v);
    return ret;
}

static PyObject *Cache_copy_pages(CacheObject *self, PyObject *args)
{
    int to_staging, first, count;
    PyObject *ids_o, *staging_o, *stream_o;
    if (!PyArg_ParseTuple(args, "piiOOO", &to_staging, &first, &count, &ids_o,
                          &staging_o, &stream_o) || !cache_ready(self))
        return NULL;
    imported ids, staging;
    staging.mt = NULL;
    void *stream;
    PyObject *ret = NULL;
    if (import_tensor(ids_o, "page_ids", &ids) ||
        import_tensor(staging_o, "staging", &staging) || get_stream(stream_o, &stream))
        goto out;
    hkv_status st;
    WITHOUT_GIL(self, st = hkv_cache_copy_pages(self->cache, to_staging, first, count,
                                                &ids.t, &staging.t, stream));
    ret = none_or_raise(st);
out:
    release_import(&ids);
    release_import(&staging);
    return ret;
}

static PyObject *Cache_evict(CacheObject *self, PyObject *args)
{
    PyObject *ids_o, *stream_o;
    int tiers, offload;
    if (!PyArg_ParseTuple(args, "OipO", &ids_o, &tiers, &offload, &stream_o) ||
        !cache_ready(self))
        return NULL;
    void *stream;
    if (get_stream(stream_o, &stream))
        return NULL;
    int_buffer ids;
    if (get_int64s(ids_o, "user_ids", &ids, -1, 0, 0)) {
        put_buffer(&ids);
        return NULL;
    }
    hkv_status st = HKV_OK;
    if (int_len(&ids) > INT32_MAX)
        st = hkv_error(HKV_EINVAL, "too many users");
    else
        WITHOUT_GIL(self, st = hkv_cache_evict(self->cache, (int32_t)int_len(&ids),
                                               int_ptr(&ids), tiers, offload, stream));
    put_buffer(&ids);
    if (st != HKV_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Cache_prefetch(CacheObject *self, PyObject *args)
{
    PyObject *ids_o, *stream_o;
    if (!PyArg_ParseTuple(args, "OO", &ids_o, &stream_o) || !cache_ready(self))
        return NULL;
    void *stream;
    if (get_stream(stream_o, &stream))
        return NULL;
    int_buffer ids;
    if (get_int64s(ids_o, "user_ids", &ids, -1, 0, 0)) {
        put_buffer(&ids);
        return NULL;
    }
    hkv_status st = HKV_OK;
    int32_t started = 0;
    if (int_len(&ids) > INT32_MAX)
        st = hkv_error(HKV_EINVAL, "too many users");
    else
        WITHOUT_GIL(self, st = hkv_cache_prefetch(self->cache, (int32_t)int_len(&ids),
                                                  int_ptr(&ids), stream, &started));
    put_buffer(&ids);
    if (st != HKV_OK)
        return raise_status(st);
    return PyLong_FromLong(started);
}

static PyObject *Cache_evict_all(CacheObject *self, PyObject *args)
{
    int tiers, offload;
    PyObject *stream_o;
    if (!PyArg_ParseTuple(args, "ipO", &tiers, &offload, &stream_o) || !cache_ready(self))
        return NULL;
    void *stream;
    if (get_stream(stream_o, &stream))
        return NULL;
    if (tiers < 1 || tiers > HKV_TIER_ALL)
        return raise_status(hkv_error(HKV_EINVAL, "tiers must name the GPU tier, the "
                                      "host tier or both"));
    int64_t n;
    WITHOUT_GIL(self, n = hkv_cache_evict_all(self->cache, tiers, offload, stream));
    return PyLong_FromLongLong(n);
}

static PyObject *Cache_user_tiers(CacheObject *self, PyObject *args)
{
    long long uid;
    if (!PyArg_ParseTuple(args, "L", &uid) || !cache_ready(self))
        return NULL;
    int64_t g, h, d;
    WITHOUT_GIL(self, hkv_cache_user_tiers(self->cache, uid, &g, &h, &d));
    return Py_BuildValue("(LLL)", (long long)g, (long long)h, (long long)d);
}

static PyObject *Cache_sync_transfers(CacheObject *self, PyObject *unused)
{
    (void)unused;
    if (!cache_ready(self))
        return NULL;
    hkv_status st;
    WITHOUT_GIL(self, st = hkv_cache_sync_transfers(self->cache));
    if (st != HKV_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

/* drain_events(max) -> [(seq, kind, tier, from_tier, user_id, page_index,
 * num_pages, timestamp_ns), ...], oldest first; max < 0: every pending one. */
static PyObject *Cache_drain_events(CacheObject *self, PyObject *args)
{
    long long max;
    if (!PyArg_ParseTuple(args, "L", &max) || !cache_ready(self))
        return NULL;
    int64_t pending;
    WITHOUT_GIL(self, pending = hkv_cache_events_pending(self->cache));
    int64_t want = max < 0 || max > pending ? pending : max;
    hkv_event *buf = NULL;
    if (want > 0) {
        buf = PyMem_Malloc((size_t)want * sizeof *buf);
        if (buf == NULL)
            return PyErr_NoMemory();
    }
    hkv_status st;
    int64_t n = 0;
    WITHOUT_GIL(self, st = hkv_cache_drain_events(self->cache, buf, want, &n));
    if (st != HKV_OK) {
        PyMem_Free(buf);
        return raise_status(st);
    }
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (int64_t i = 0; list != NULL && i < n; i++) {
        const hkv_event *e = &buf[i];
        PyObject *t = Py_BuildValue("(KiiiLLiL)", (unsigned long long)e->seq, (int)e->kind,
                                    (int)e->tier, (int)e->from_tier, (long long)e->user_id,
                                    (long long)e->page_index, (int)e->num_pages,
                                    (long long)e->timestamp_ns);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    PyMem_Free(buf);
    return list;
}

static PyObject *Cache_check(CacheObject *self, PyObject *unused)
{
    (void)unused;
    if (!cache_ready(self))
        return NULL;
    hkv_status st = hkv_cache_check(self->cache);
    if (st != HKV_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

static int put_item(PyObject *d, const char *key, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int r = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return r;
}

static int put_float(PyObject *d, const char *key, double value)
{
    PyObject *v = PyFloat_FromDouble(value);
    if (v == NULL)
        return -1;
    int r = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return r;
}

/* {"buckets": [(upper bound in s, cumulative count), ..., (inf, count)],
 *  "count": n, "sum": seconds} */
static int put_histogram(PyObject *d, const char *key, const hkv_histogram *h)
{
    PyObject *buckets = PyList_New(HKV_HIST_BUCKETS);
    if (buckets == NULL)
        return -1;
    uint64_t cum = 0;
    for (int i = 0; i < HKV_HIST_BUCKETS; i++) {
        cum += h->counts[i];
        double le = i < HKV_HIST_BUCKETS - 1 ? (double)hkv_hist_bounds_ns[i] * 1e-9
                                             : Py_HUGE_VAL;
        PyObject *pair = Py_BuildValue("(dK)", le, (unsigned long long)cum);
        if (pair == NULL) {
            Py_DECREF(buckets);
            return -1;
        }
        PyList_SET_ITEM(buckets, i, pair);
    }
    PyObject *hist = Py_BuildValue("{sNsKsd}", "buckets", buckets, "count",
                                   (unsigned long long)h->count, "sum",
                                   (double)h->sum_ns * 1e-9);
    if (hist == NULL)
        return -1;
    int r = PyDict_SetItemString(d, key, hist);
    Py_DECREF(hist);
    return r;
}

static PyObject *Cache_stats(CacheObject *self, PyObject *unused)
{
    (void)unused;
    if (!cache_ready(self))
        return NULL;
    hkv_stats s;
    WITHOUT_GIL(self, hkv_cache_stats(self->cache, &s));
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
#define ITEM(name)                                              \
    if (put_item(d, #name, (long long)s.name) != 0) {           \
        Py_DECREF(d);                                           \
        return NULL;                                            \
    }
    ITEM(lookups) ITEM(lookup_users) ITEM(hit_tokens) ITEM(missed_tokens)
    ITEM(batches_allocated) ITEM(batches_committed) ITEM(batches_aborted)
    ITEM(pages_allocated) ITEM(pages_evicted) ITEM(pages_dropped)
    ITEM(users_evicted) ITEM(tokens_appended) ITEM(pages_total) ITEM(pages_free)
    ITEM(pages_used) ITEM(pages_pinned) ITEM(users_cached) ITEM(open_batches)
    ITEM(onboard_pages) ITEM(onboard_bytes) ITEM(offload_pages) ITEM(offload_bytes)
    ITEM(writeback_pages) ITEM(host_pages_evicted) ITEM(transfers)
    ITEM(transfers_failed) ITEM(host_pages_total) ITEM(host_pages_free)
    ITEM(host_pages_used) ITEM(transfers_in_flight) ITEM(offload_queued_bytes)
    ITEM(offloads_deferred) ITEM(offload_backpressure_waits) ITEM(dma_bytes)
    ITEM(kernel_bytes) ITEM(prefetch_users) ITEM(prefetch_pages) ITEM(prefetch_dropped) ITEM(events_dropped)
    ITEM(events_pending) ITEM(disk_writes) ITEM(disk_write_failures) ITEM(disk_reads)
    ITEM(disk_read_misses) ITEM(checksum_failures) ITEM(disk_io_errors)
    ITEM(disk_records) ITEM(disk_bytes_used) ITEM(disk_bytes_capacity) ITEM(disk_in_flight)
    ITEM(disk_gds_reads) ITEM(disk_gds_fallbacks) ITEM(disk_gds_active)
#undef ITEM
    if (put_float(d, "onboard_seconds", (double)s.onboard_ns * 1e-9) != 0 ||
        put_float(d, "offload_seconds", (double)s.offload_ns * 1e-9) != 0) {
        Py_DECREF(d);
        return NULL;
    }
    if (put_histogram(d, "lookup_latency", &s.lookup_latency) != 0 ||
        put_histogram(d, "allocate_latency", &s.allocate_latency) != 0 ||
        put_histogram(d, "onboard_latency", &s.onboard_latency) != 0 ||
        put_histogram(d, "offload_latency", &s.offload_latency) != 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *Cache_gds_status(CacheObject *self, PyObject *unused)
{
    (void)unused;
    if (!cache_ready(self))
        return NULL;
    return PyUnicode_FromString(hkv_cache_gds_status(self->cache));
}

static PyMethodDef Cache_methods[] = {
    {"gds_status", (PyCFunction)Cache_gds_status, METH_NOARGS,
     "How disk reads reach the GPU: off, direct, compat or unavailable: why."},
    {"close", (PyCFunction)Cache_close, METH_NOARGS, "Free the cache's memory."},
    {"lookup", (PyCFunction)Cache_lookup, METH_VARARGS,
     "lookup(user_ids, history_lengths, token_keys, cached_out, epochs_out)"},
    {"allocate", (PyCFunction)Cache_allocate, METH_VARARGS,
     "allocate(user_ids, history_lengths, cached, epochs, token_keys, "
     "num_candidates, stream) -> Batch"},
    {"prepare_async", (PyCFunction)Cache_prepare_async, METH_VARARGS,
     "prepare_async(user_ids, history_lengths, cached, epochs, token_keys, "
     "num_candidates, stream) -> Prepare (allocation on the worker thread)"},
    {"meta_offsets", (PyCFunction)Cache_meta_offsets, METH_NOARGS,
     "Offsets of the metadata fields in a batch's int32 block."},
    {"export_table", (PyCFunction)Cache_export_table, METH_VARARGS,
     "export_table(layer) -> DLPack capsule (layer -1: whole table)"},
    {"user_length", (PyCFunction)Cache_user_length, METH_VARARGS,
     "user_length(user_id) -> cached tokens"},
    {"read_user", (PyCFunction)Cache_read_user, METH_VARARGS,
     "read_user(user_id, layer, k, v, stream) -> tokens copied"},
    {"copy_pages", (PyCFunction)Cache_copy_pages, METH_VARARGS,
     "copy_pages(to_staging, first_layer, num_layers, page_ids, staging, stream)"},
    {"evict", (PyCFunction)Cache_evict, METH_VARARGS,
     "evict(user_ids, tiers, offload, stream)"},
    {"prefetch", (PyCFunction)Cache_prefetch, METH_VARARGS,
     "Start onboarding users' host pages (a hint)."},
    {"evict_all", (PyCFunction)Cache_evict_all, METH_VARARGS,
     "evict_all(tiers, offload, stream) -> users touched"},
    {"user_tiers", (PyCFunction)Cache_user_tiers, METH_VARARGS,
     "user_tiers(user_id) -> (gpu tokens, host tokens, disk tokens)"},
    {"sync_transfers", (PyCFunction)Cache_sync_transfers, METH_NOARGS,
     "Wait for every transfer in flight."},
    {"check", (PyCFunction)Cache_check, METH_NOARGS, "Check internal invariants."},
    {"drain_events", (PyCFunction)Cache_drain_events, METH_VARARGS,
     "drain_events(max) -> [(seq, kind, tier, from_tier, user_id, page_index, "
     "num_pages, timestamp_ns)] (max < 0: all)"},
    {"stats", (PyCFunction)Cache_stats, METH_NOARGS, "Counters as a dict."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hstu_kvcache._C.Cache",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C core of a KV cache (use hstu_kvcache.KVCache).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Cache_init,
    .tp_dealloc = (destructor)Cache_dealloc,
    .tp_methods = Cache_methods,
};

/* ------------------------------------------------------------------ */
/* Batch type                                                          */

static int batch_ready(BatchObject *self, CacheObject **owner)
{
    *owner = (CacheObject *)self->owner;
    if (self->batch == NULL) {
        raise_status(hkv_error(HKV_ESTATE, "the batch was freed"));
        return 0;
    }
    if ((*owner)->cache == NULL) {
        raise_status(hkv_error(HKV_ESTATE, "the cache of this batch was closed"));
        return 0;
    }
    return 1;
}

static void Batch_dealloc(BatchObject *self)
{
    if (self->batch != NULL) {
        /* free() also closes; with the cache gone it only frees memory */
        hkv_batch_free(self->batch);
    }
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static PyObject *Batch_info(BatchObject *self, PyObject *unused)
{
    (void)unused;
    if (self->batch == NULL)
        return raise_status(hkv_error(HKV_ESTATE, "the batch was freed"));
    hkv_batch_info i;
    hkv_batch_get_info(self->batch, &i);
    return Py_BuildValue("(iLLLLii)", i.batch_size, (long long)i.total_pages,
                         (long long)i.total_tokens, (long long)i.new_tokens,
                         (long long)i.num_rows, i.committed, i.closed);
}

static PyObject *Batch_export_meta(BatchObject *self, PyObject *args)
{
    int device;
    if (!PyArg_ParseTuple(args, "p", &device))
        return NULL;
    if (self->batch == NULL)
        return raise_status(hkv_error(HKV_ESTATE, "the batch was freed"));
    hkv_batch_info i;
    hkv_batch_get_info(self->batch, &i);
    hkv_buffer *buf = device ? i.device_meta : i.host_meta;
    int64_t n = (int64_t)(buf->bytes / sizeof(int32_t));
    return export_tensor(buf, 0, 1, &n, HKV_DL_INT, 32);
}

static PyObject *Batch_append(BatchObject *self, PyObject *args)
{
    int first, count;
    PyObject *k_o, *v_o, *stream_o;
    CacheObject *owner;
    if (!PyArg_ParseTuple(args, "iiOOO", &first, &count, &k_o, &v_o, &stream_o) ||
        !batch_ready(self, &owner))
        return NULL;
    imported k, v;
    v.mt = NULL;
    void *stream;
    PyObject *ret = NULL;
    if (import_tensor(k_o, "k", &k) || import_tensor(v_o, "v", &v) ||
        get_stream(stream_o, &stream))
        goto out;
    hkv_status st;
    WITHOUT_GIL(owner, st = hkv_batch_append(self->batch, first, count, &k.t, &v.t,
                                             stream));
    ret = none_or_raise(st);
out:
    release_import(&k);
    release_import(&v);
    return ret;
}

static PyObject *Batch_read(BatchObject *self, PyObject *args)
{
    int layer;
    PyObject *k_o, *v_o, *bi_o, *pos_o, *stream_o;
    CacheObject *owner;
    if (!PyArg_ParseTuple(args, "iOOOOO", &layer, &k_o, &v_o, &bi_o, &pos_o,
                          &stream_o) || !batch_ready(self, &owner))
        return NULL;
    imported k, v, bi, pos;
    v.mt = bi.mt = pos.mt = NULL;
    void *stream;
    PyObject *ret = NULL;
    if (import_tensor(k_o, "k", &k) || import_tensor(v_o, "v", &v) ||
        import_tensor(bi_o, "batch_indices", &bi) ||
        import_tensor(pos_o, "positions", &pos) || get_stream(stream_o, &stream))
        goto out;
    hkv_status st;
    WITHOUT_GIL(owner, st = hkv_batch_read(self->batch, layer, &k.t, &v.t, &bi.t,
                                           &pos.t, stream));
    ret = none_or_raise(st);
out:
    release_import(&k);
    release_import(&v);
    release_import(&bi);
    release_import(&pos);
    return ret;
}

static PyObject *Batch_wait_layer(BatchObject *self, PyObject *args)
{
    int layer;
    PyObject *stream_o;
    CacheObject *owner;
    if (!PyArg_ParseTuple(args, "iO", &layer, &stream_o) || !batch_ready(self, &owner))
        return NULL;
    void *stream;
    if (get_stream(stream_o, &stream))
        return NULL;
    hkv_status st;
    WITHOUT_GIL(owner, st = hkv_batch_wait_layer(self->batch, layer, stream));
    if (st != HKV_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Batch_close(BatchObject *self, PyObject *unused)
{
    (void)unused;
    if (self->batch != NULL) {
        CacheObject *owner = (CacheObject *)self->owner;
        if (owner->cache != NULL)
            WITHOUT_GIL(owner, hkv_batch_close(self->batch));
    }
    Py_RETURN_NONE;
}

static PyMethodDef Batch_methods[] = {
    {"info", (PyCFunction)Batch_info, METH_NOARGS,
     "(batch_size, total_pages, total_tokens, new_tokens, num_rows, committed, "
     "closed)"},
    {"export_meta", (PyCFunction)Batch_export_meta, METH_VARARGS,
     "export_meta(device) -> DLPack capsule of the int32 metadata block"},
    {"append", (PyCFunction)Batch_append, METH_VARARGS,
     "append(first_layer, num_layers, k, v, stream)"},
    {"read", (PyCFunction)Batch_read, METH_VARARGS,
     "read(layer, k, v, batch_indices, positions, stream)"},
    {"wait_layer", (PyCFunction)Batch_wait_layer, METH_VARARGS,
     "wait_layer(layer, stream): the stream waits for that layer's onboarding"},
    {"close", (PyCFunction)Batch_close, METH_NOARGS,
     "Unpin the batch's users (rolls back an unfinished batch)."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hstu_kvcache._C.Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An allocated batch (use hstu_kvcache.Batch).",
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_methods = Batch_methods,
};

/* ------------------------------------------------------------------ */
/* Prepare type: an allocation running on the worker thread            */

static void Prepare_dealloc(PrepareObject *self)
{
    if (self->job != NULL)
        hkv_prepare_free(self->job);  /* never blocks */
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static PyObject *Prepare_done(PrepareObject *self, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(hkv_prepare_done(self->job));
}

static PyObject *Prepare_wait(PrepareObject *self, PyObject *args)
{
    double timeout = -1.0;
    if (!PyArg_ParseTuple(args, "d", &timeout))
        return NULL;
    int64_t ns = timeout < 0 ? -1 : (int64_t)(timeout * 1e9);
    hkv_batch *bt = NULL;
    hkv_status st;
    /* The job outlives the cache, so no busy count: close() may proceed. */
    Py_BEGIN_ALLOW_THREADS
    st = hkv_prepare_wait(self->job, ns, &bt);
    Py_END_ALLOW_THREADS
    if (st != HKV_OK)
        return raise_status(st);
    BatchObject *bo = PyObject_New(BatchObject, &BatchType);
    if (bo == NULL) {
        hkv_batch_free(bt);
        return NULL;
    }
    bo->batch = bt;
    bo->owner = self->owner;
    Py_INCREF(self->owner);
    return (PyObject *)bo;
}

static PyMethodDef Prepare_methods[] = {
    {"done", (PyCFunction)Prepare_done, METH_NOARGS, "True once the allocation finished."},
    {"wait", (PyCFunction)Prepare_wait, METH_VARARGS,
     "wait(timeout_s) -> Batch (timeout < 0: forever)"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject PrepareType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hstu_kvcache._C.Prepare",
    .tp_basicsize = sizeof(PrepareObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An allocation in flight on the worker thread.",
    .tp_dealloc = (destructor)Prepare_dealloc,
    .tp_methods = Prepare_methods,
};

/* ------------------------------------------------------------------ */
/* module functions                                                    */

static PyObject *mod_strip(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *o[6], *stream_o;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &stream_o))
        return NULL;
    static const char *names[6] = {"values", "offsets", "num_cached", "out_values",
                                   "out_lengths", "out_offsets"};
    imported im[6];
    for (int i = 0; i < 6; i++)
        im[i].mt = NULL;
    void *stream;
    PyObject *ret = NULL;
    for (int i = 0; i < 6; i++)
        if (import_tensor(o[i], names[i], &im[i]))
            goto out;
    if (get_stream(stream_o, &stream))
        goto out;
    hkv_status st;
    Py_BEGIN_ALLOW_THREADS
    st = hkv_strip_tensors(&im[0].t, &im[1].t, &im[2].t, &im[3].t, &im[4].t,
                           &im[5].t, stream);
    Py_END_ALLOW_THREADS
    ret = none_or_raise(st);
out:
    for (int i = 0; i < 6; i++)
        release_import(&im[i]);
    return ret;
}

static PyObject *mod_cuda_built(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(hkv_cuda_built());
}

static PyObject *mod_cuda_device_count(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    int count = 0;
    hkv_status st = hkv_cuda_device_count(&count);
    if (st != HKV_OK)
        return raise_status(st);
    return PyLong_FromLong(count);
}

static PyMethodDef module_methods[] = {
    {"_set_error_types", set_error_types, METH_O,
     "Install the dict of status code -> exception class."},
    {"strip", mod_strip, METH_VARARGS,
     "strip(values, offsets, num_cached, out_values, out_lengths, out_offsets, "
     "stream)"},
    {"cuda_built", mod_cuda_built, METH_NOARGS,
     "True if compiled with CUDA support."},
    {"cuda_device_count", mod_cuda_device_count, METH_NOARGS,
     "Usable CUDA devices (0 without driver or GPU)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_C", "C core of hstu_kvcache.", -1, module_methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void)
{
    if (PyType_Ready(&CacheType) < 0 || PyType_Ready(&BatchType) < 0 ||
        PyType_Ready(&PrepareType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CacheType);
    Py_INCREF(&BatchType);
    if (PyModule_AddObject(m, "Cache", (PyObject *)&CacheType) < 0 ||
        PyModule_AddObject(m, "Batch", (PyObject *)&BatchType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    static const struct { const char *name; int value; } codes[] = {
        {"OK", HKV_OK}, {"EINVAL", HKV_EINVAL}, {"ENOMEM", HKV_ENOMEM},
        {"EFULL", HKV_EFULL}, {"ESTATE", HKV_ESTATE}, {"ECUDA", HKV_ECUDA},
        {"ENODEV", HKV_ENODEV}, {"ESTALE", HKV_ESTALE}, {"EBUSY", HKV_EBUSY},
        {"EVENT_STORED", HKV_EVENT_STORED}, {"EVENT_REMOVED", HKV_EVENT_REMOVED},
        {"EVENT_ONBOARDED", HKV_EVENT_ONBOARDED}, {"EVENT_OFFLOADED", HKV_EVENT_OFFLOADED},
        {"TIER_GPU", HKV_TIER_GPU}, {"TIER_HOST", HKV_TIER_HOST},
        {"TIER_DISK", HKV_TIER_DISK},
        {"EVENTS_MAX_CAPACITY", HKV_EVENTS_MAX_CAPACITY}};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (PyModule_AddIntConstant(m, codes[i].name, codes[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    const char *names[HKV_META_NUM_FIELDS] = {
        "kv_indptr", "kv_last_page_len", "total_history_lengths",
        "total_history_offsets", "cached_lengths", "new_history_lengths",
        "new_history_offsets", "row_offsets", "zeros", "kv_indices",
        "batch_indices", "positions"};
    PyObject *fields = PyTuple_New(HKV_META_NUM_FIELDS);
    if (fields == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < HKV_META_NUM_FIELDS; i++)
        PyTuple_SET_ITEM(fields, i, PyUnicode_FromString(names[i]));
    if (PyModule_AddObject(m, "META_FIELDS", fields) < 0) {
        Py_DECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
