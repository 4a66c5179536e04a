/*
 * gds.c - GPUDirect Storage for the disk tier: cuFile, loaded at run
 * time, reads a record's data straight into the GPU pages it is meant
 * for, and the data is checked there.
 *
 * The store (disk_tier.c) still reads and checks a record's 4 KiB header
 * block itself.  This reader gets the data's pieces (one per layer, each a
 * GPU page's piece in the layer-major table) and:
 *
 *   1. reads the whole record's data with one cuFileRead into the lane's
 *      GPU staging buffer (synchronous: the bytes are in GPU memory when
 *      it returns, or it failed).  One 1 MiB request, not a request per
 *      128 KiB layer piece: drives and cuFile's bounce path both want
 *      large I/O;
 *   2. computes its CRC-32C on the GPU (hkv_cuda_crc32c, cuda/crc32c.cu),
 *      result in pinned memory, and chains it onto the header's CRC
 *      (hkv_crc32c_combine);
 *   3. only if that matches the header's CRC, copies the pieces into the
 *      pages (device to device, microseconds): a page never holds bytes
 *      that failed the check.
 *
 * The store compares the CRC again and completes the read as verified.
 * A lane (stream, staging buffer, CRC scratch and result word) per I/O
 * thread, picked by the thread's index, keeps concurrent reads apart.
 *
 * We declare the handful of cuFile types ourselves (their layout is the
 * documented C ABI of cufile.h) so building needs no cuFile headers, and
 * running needs libcufile only when GPUDirect Storage is asked for.
 */
#define _GNU_SOURCE
#include "gds.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "crc32c.h"
#include "cuda_rt.h"
#include "kernels.h"

/* cufile.h's CUfileError_t, CUfileDescr_t and handle type. */
typedef struct cufile_error {
    int err;      /* CUfileOpError: 0 is success */
    int cu_err;   /* CUresult, when err names a CUDA failure */
} cufile_error;

typedef struct cufile_descr {
    int type;                           /* 1: CU_FILE_HANDLE_TYPE_OPAQUE_FD */
    union {
        int fd;
        void *handle;
    } handle;
    const void *fs_ops;                 /* NULL for a POSIX descriptor */
} cufile_descr;

enum { CUFILE_HANDLE_TYPE_OPAQUE_FD = 1 };

typedef struct cufile_api {
    cufile_error (*driver_open)(void);
    cufile_error (*driver_close)(void);
    cufile_error (*handle_register)(void **fh, cufile_descr *descr);
    void (*handle_deregister)(void *fh);
    cufile_error (*buf_register)(const void *base, size_t length, int flags);
    cufile_error (*buf_deregister)(const void *base);
    ssize_t (*read)(void *fh, void *base, size_t size, off_t file_offset,
                    off_t buf_offset);
    const char *(*error_string)(int err);  /* cufileop_status_error; optional */
} cufile_api;

typedef struct gds_lane {
    void *stream;
    char *stage;            /* device: one record's data                  */
    int registered;         /* stage is a registered cuFile buffer        */
    uint32_t *scratch;      /* device: CRC scratch for the stage          */
    uint32_t *crc_host;     /* pinned: the stage's CRC                    */
    uint32_t *crc_dev;      /* the device's address of crc_host           */
} gds_lane;

struct hkv_gds {
    int device;
    void *file;             /* CUfileHandle_t of the store's descriptor   */
    int direct;             /* nvidia-fs is loaded                        */
    int max_pieces;
    size_t stage_bytes;     /* largest record data                        */
    gds_lane *lanes;        /* one per I/O thread of the store            */
    int num_lanes;
    hkv_disk_device_reader reader;
};

/* The library and its driver are process-wide: loaded once, the driver
 * opened while any reader exists (several caches may share it). */
static pthread_mutex_t api_lock = PTHREAD_MUTEX_INITIALIZER;
static cufile_api api;
static void *api_lib;
static char api_path[4096];   /* what api_lib was loaded as */
static int driver_users;

/* dlopen libcufile: HSTU_KVCACHE_CUFILE_LIB when set (and only it),
 * else the loader's path, then CUDA's usual places. */
static void *load_library(char *why, size_t n)
{
    const char *env = getenv("HSTU_KVCACHE_CUFILE_LIB");
    const char *home = getenv("CUDA_HOME");
    char in_home[4096];
    snprintf(in_home, sizeof in_home, "%s/lib64/libcufile.so.0", home ? home : "");
    const char *names[] = {
        "libcufile.so.0", "libcufile.so", home ? in_home : NULL,
        "/usr/local/cuda/lib64/libcufile.so.0",
        "/usr/local/cuda/targets/x86_64-linux/lib/libcufile.so.0",
        "/usr/local/cuda/targets/sbsa-linux/lib/libcufile.so.0",
    };
    if (env != NULL && env[0] != '\0') {
        names[0] = env;
        names[1] = names[2] = names[3] = names[4] = names[5] = NULL;
    }
    why[0] = '\0';
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (names[i] == NULL)
            continue;
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (lib != NULL) {
            snprintf(api_path, sizeof api_path, "%s", names[i]);
            return lib;
        }
        const char *e = dlerror();
        if (why[0] == '\0')
            snprintf(why, n, "%s", e ? e : "dlopen failed");
    }
    return NULL;
}

/* cuFile's words for an error code, when the library has them. */
static const char *op_error(int err)
{
    const char *s = api.error_string != NULL ? api.error_string(err) : NULL;
    return s != NULL ? s : "no description";
}

/* Load libcufile and open its driver (once per process).  Lock held. */
static hkv_status api_acquire(void)
{
    const char *env = getenv("HSTU_KVCACHE_CUFILE_LIB");
    if (api_lib != NULL && env != NULL && env[0] != '\0' && strcmp(env, api_path) != 0) {
        /* loaded already; the variable names a library: it must be that one */
        void *lib = dlopen(env, RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) {
            const char *e = dlerror();
            return hkv_error(HKV_ENODEV, "GPUDirect Storage: libcufile could not be "
                             "loaded (%s) from HSTU_KVCACHE_CUFILE_LIB", e ? e : "?");
        }
        int same = lib == api_lib;
        dlclose(lib);
        if (!same)
            return hkv_error(HKV_ENODEV, "GPUDirect Storage: HSTU_KVCACHE_CUFILE_LIB "
                             "names another libcufile than the one this process "
                             "loaded (%s)", api_path);
    }
    if (api_lib == NULL) {
        char why[512] = "";
        void *lib = load_library(why, sizeof why);
        if (lib == NULL)
            return hkv_error(HKV_ENODEV, "GPUDirect Storage: libcufile could not be "
                             "loaded (%s); install CUDA's GDS package (libcufile) or set "
                             "HSTU_KVCACHE_CUFILE_LIB to its path", why);
        cufile_api a;
        memset(&a, 0, sizeof a);
        /* function pointers from dlsym: the POSIX way (void * -> function) */
        *(void **)&a.driver_open = dlsym(lib, "cuFileDriverOpen");
        *(void **)&a.driver_close = dlsym(lib, "cuFileDriverClose_v2");
        if (a.driver_close == NULL)
            *(void **)&a.driver_close = dlsym(lib, "cuFileDriverClose");
        *(void **)&a.handle_register = dlsym(lib, "cuFileHandleRegister");
        *(void **)&a.handle_deregister = dlsym(lib, "cuFileHandleDeregister");
        *(void **)&a.buf_register = dlsym(lib, "cuFileBufRegister");
        *(void **)&a.buf_deregister = dlsym(lib, "cuFileBufDeregister");
        *(void **)&a.read = dlsym(lib, "cuFileRead");
        *(void **)&a.error_string = dlsym(lib, "cufileop_status_error");
        if (!a.driver_open || !a.driver_close || !a.handle_register ||
            !a.handle_deregister || !a.buf_register || !a.buf_deregister || !a.read) {
            dlclose(lib);
            return hkv_error(HKV_ENODEV, "GPUDirect Storage: libcufile lacks the cuFile "
                             "entry points this package uses (too old?)");
        }
        api = a;
        api_lib = lib;  /* kept loaded: cuFile starts threads of its own */
    }
    if (driver_users == 0) {
        cufile_error e = api.driver_open();
        if (e.err != 0)
            return hkv_error(HKV_ENODEV, "GPUDirect Storage: cuFileDriverOpen failed: "
                             "%s (cuFile error %d, CUDA error %d); check /etc/cufile.json "
                             "(allow_compat_mode) and the nvidia-fs module",
                             op_error(e.err), e.err, e.cu_err);
    }
    driver_users++;
    return HKV_OK;
}

static void api_release(void)
{
    if (--driver_users == 0)
        (void)api.driver_close();
}

/* nvidia-fs (the kernel module behind true direct DMA) is loaded. */
static int nvfs_loaded(void)
{
    FILE *f = fopen("/proc/modules", "r");
    if (f == NULL)
        return 0;
    char line[512];
    int found = 0;
    while (!found && fgets(line, sizeof line, f) != NULL)
        found = strncmp(line, "nvidia_fs ", 10) == 0;
    fclose(f);
    return found;
}

/* The store's device reader (see the top of this file and disk_tier.h). */
static int gds_read(void *ctx, int worker, int fd, int64_t off, const struct iovec *pieces,
                    int n, uint32_t crc, uint32_t expect, uint32_t *crc_out)
{
    hkv_gds *g = ctx;
    (void)fd;  /* registered at open */
    size_t total = 0;
    for (int k = 0; k < n; k++)
        total += pieces[k].iov_len;
    if (worker < 0 || worker >= g->num_lanes || n < 0 || n > g->max_pieces ||
        total > g->stage_bytes)
        return EINVAL;
    if (hkv_cuda_set_device(g->device) != HKV_OK)
        return EIO;
    gds_lane *lane = &g->lanes[worker];
    int err = 0;
    ssize_t got = total > 0 ? api.read(g->file, lane->stage, total, (off_t)off, 0) : 0;
    if (got < 0)
        err = got == -1 && errno != 0 ? errno : EIO;  /* -1: errno; else cuFile's */
    else if ((size_t)got < total)
        err = ENODATA;  /* the file ends inside the record */
    hkv_status st = HKV_OK;
    if (err == 0)
        st = hkv_cuda_crc32c(lane->stage, (int64_t)total, 0, lane->scratch, lane->crc_dev,
                             g->device, lane->stream);
    if (err == 0 && st == HKV_OK)
        st = hkv_cuda_stream_sync(g->device, lane->stream);
    if (err == 0 && st == HKV_OK) {
        crc = hkv_crc32c_combine(crc, *lane->crc_host, total);
        *crc_out = crc;
        size_t at = 0;
        for (int k = 0; crc == expect && st == HKV_OK && k < n; k++) {
            st = hkv_cuda_memcpy_async(g->device, pieces[k].iov_base, lane->stage + at,
                                       pieces[k].iov_len, lane->stream);
            at += pieces[k].iov_len;
        }
        if (crc == expect && st == HKV_OK)
            st = hkv_cuda_stream_sync(g->device, lane->stream);
    }
    if (err == 0 && st != HKV_OK)
        err = EIO;
    return err;
}

void hkv_gds_close(hkv_gds *g)
{
    if (g == NULL)
        return;
    for (int i = 0; i < g->num_lanes; i++) {
        gds_lane *lane = &g->lanes[i];
        if (lane->registered)
            (void)api.buf_deregister(lane->stage);
        if (lane->stream != NULL)
            (void)hkv_cuda_stream_destroy(g->device, lane->stream);
        if (lane->stage != NULL)
            (void)hkv_cuda_free(g->device, lane->stage);
        if (lane->scratch != NULL)
            (void)hkv_cuda_free(g->device, lane->scratch);
        if (lane->crc_host != NULL)
            (void)hkv_cuda_host_free(lane->crc_host);
    }
    free(g->lanes);
    pthread_mutex_lock(&api_lock);
    if (g->file != NULL)
        api.handle_deregister(g->file);
    api_release();  /* every hkv_gds holds the driver */
    pthread_mutex_unlock(&api_lock);
    free(g);
}

hkv_status hkv_gds_open(int device, int fd, int lanes, int max_pieces,
                        int64_t max_piece_bytes, hkv_gds **out)
{
    *out = NULL;
    if (!hkv_cuda_built())
        return hkv_error(HKV_ENODEV, "GPUDirect Storage: this build of hstu_kvcache has "
                         "no CUDA support");
    if (lanes < 1 || max_pieces < 1 || max_piece_bytes < 1)
        return hkv_error(HKV_EINVAL, "hkv_gds_open: lanes, max_pieces and "
                         "max_piece_bytes must be positive");
    hkv_status st = hkv_cuda_set_device(device);
    if (st != HKV_OK)
        return st;
    pthread_mutex_lock(&api_lock);
    st = api_acquire();
    if (st != HKV_OK) {
        pthread_mutex_unlock(&api_lock);
        return st;
    }
    hkv_gds *g = calloc(1, sizeof *g);
    if (g == NULL) {
        api_release();
        pthread_mutex_unlock(&api_lock);
        return hkv_error(HKV_ENOMEM, "out of host memory");
    }
    g->device = device;
    g->max_pieces = max_pieces;
    g->stage_bytes = (size_t)max_pieces * (size_t)max_piece_bytes;
    g->direct = nvfs_loaded();
    cufile_descr descr;
    memset(&descr, 0, sizeof descr);
    descr.type = CUFILE_HANDLE_TYPE_OPAQUE_FD;
    descr.handle.fd = fd;
    cufile_error e = api.handle_register(&g->file, &descr);
    if (e.err != 0) {
        g->file = NULL;
        pthread_mutex_unlock(&api_lock);
        hkv_gds_close(g);
        return hkv_error(HKV_ENODEV, "GPUDirect Storage: cuFileHandleRegister of the "
                         "disk tier's file failed: %s (cuFile error %d, CUDA error %d); "
                         "cufile.log says why.  Without the nvidia-fs driver cuFile "
                         "needs allow_compat_mode in its cufile.json; in a container "
                         "without a udev database it cannot tell the filesystem (see "
                         "docs/disk-tier-design.md)",
                         op_error(e.err), e.err, e.cu_err);
    }
    pthread_mutex_unlock(&api_lock);

    g->lanes = calloc((size_t)lanes, sizeof *g->lanes);
    if (g->lanes == NULL) {
        hkv_gds_close(g);
        return hkv_error(HKV_ENOMEM, "out of host memory");
    }
    g->num_lanes = lanes;
    for (int i = 0; st == HKV_OK && i < lanes; i++) {
        gds_lane *lane = &g->lanes[i];
        st = hkv_cuda_stream_create(device, &lane->stream);
        if (st == HKV_OK)
            st = hkv_cuda_malloc(device, g->stage_bytes, (void **)&lane->stage);
        if (st == HKV_OK)
            st = hkv_cuda_malloc(device,
                                 (size_t)hkv_cuda_crc32c_scratch_words(
                                     (int64_t)g->stage_bytes) * sizeof(uint32_t),
                                 (void **)&lane->scratch);
        if (st == HKV_OK)
            st = hkv_cuda_host_alloc(sizeof(uint32_t), (void **)&lane->crc_host);
        if (st == HKV_OK)
            st = hkv_cuda_host_device_pointer(lane->crc_host, (void **)&lane->crc_dev);
        /* registered, the stage takes DMA from the drive (with nvidia-fs);
         * unregistered, cuFile bounces through its own buffers */
        if (st == HKV_OK)
            lane->registered = api.buf_register(lane->stage, g->stage_bytes, 0).err == 0;
    }
    if (st != HKV_OK) {
        hkv_gds_close(g);
        return st;
    }
    g->reader.read = gds_read;
    g->reader.ctx = g;
    *out = g;
    return HKV_OK;
}

const hkv_disk_device_reader *hkv_gds_reader(const hkv_gds *g)
{
    return &g->reader;
}

const char *hkv_gds_mode(const hkv_gds *g)
{
    return g->direct ? "direct" : "compat";
}
