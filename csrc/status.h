/*
 * status.h - error codes and the per-thread error message.
 *
 * Every core function that can fail returns an hkv_status.  On failure it
 * also leaves a human-readable message in a thread-local buffer, so the
 * Python binding can raise an exception that says what to change.  The
 * message belongs to the calling thread: a worker thread's failure never
 * overwrites the caller's message.
 */
#ifndef HKV_STATUS_H
#define HKV_STATUS_H

#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum hkv_status {
    HKV_OK = 0,
    HKV_EINVAL = 1,     /* bad argument: value, shape, dtype, device      */
    HKV_ENOMEM = 2,     /* host allocation failed                         */
    HKV_EFULL = 3,      /* page pool cannot hold the request              */
    HKV_ESTATE = 4,     /* call not valid in the current state            */
    HKV_ECUDA = 5,      /* a CUDA runtime call failed                     */
    HKV_ENODEV = 6,     /* no CUDA support built, or no usable GPU        */
    HKV_ESTALE = 7,     /* a lookup result no longer matches the cache    */
    HKV_EBUSY = 8       /* a resource is held by unfinished work          */
} hkv_status;

/* Record a formatted message for the current thread and return `code`. */
hkv_status hkv_error(hkv_status code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* The message of the last failure on this thread ("" if none). */
const char *hkv_last_error(void);

/* Clear this thread's message. */
void hkv_clear_error(void);

/* Short name of a status code, for messages and tests. */
const char *hkv_status_name(hkv_status code);

#ifdef __cplusplus
}
#endif

#endif /* HKV_STATUS_H */
