/*
 * status.c - thread-local error messages.
 */
#include "status.h"

#include <stdio.h>

#define HKV_ERRMSG_SIZE 512

static _Thread_local char errmsg[HKV_ERRMSG_SIZE];

hkv_status hkv_error(hkv_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errmsg, sizeof errmsg, fmt, ap);
    va_end(ap);
    return code;
}

const char *hkv_last_error(void)
{
    return errmsg;
}

void hkv_clear_error(void)
{
    errmsg[0] = '\0';
}

const char *hkv_status_name(hkv_status code)
{
    switch (code) {
    case HKV_OK: return "ok";
    case HKV_EINVAL: return "invalid argument";
    case HKV_ENOMEM: return "out of host memory";
    case HKV_EFULL: return "page pool full";
    case HKV_ESTATE: return "invalid state";
    case HKV_ECUDA: return "CUDA error";
    case HKV_ENODEV: return "no CUDA device";
    case HKV_ESTALE: return "stale lookup";
    case HKV_EBUSY: return "busy";
    }
    return "unknown error";
}
