/*
 * gds.h - GPUDirect Storage: disk-tier records read straight into GPU
 * pages through NVIDIA's cuFile library, as the disk store's device
 * reader (disk_tier.h, hkv_disk_read_device).
 *
 * Optional at every level: libcufile is loaded at run time (dlopen), so
 * the package neither links nor needs it.  Where the library is missing,
 * its driver does not open, or the store's file cannot be registered,
 * hkv_gds_open fails with a message saying why, and the cache keeps the
 * staged path (disk -> pinned host page -> GPU), which is also the
 * default.
 */
#ifndef HKV_GDS_H
#define HKV_GDS_H

#include <stddef.h>
#include <stdint.h>

#include "disk_tier.h"
#include "status.h"

typedef struct hkv_gds hkv_gds;

/*
 * Load cuFile, open its driver and register the store's file descriptor.
 * One lane per I/O thread of the store (`lanes`, hkv_disk_io_threads),
 * each for reads of at most `max_pieces` pieces of at most
 * `max_piece_bytes`; each lane has a GPU staging buffer of one record,
 * registered with cuFile where the driver takes it (a failure there only
 * costs speed).  HKV_ENODEV when GPUDirect Storage cannot be used here
 * (the message says why).
 */
hkv_status hkv_gds_open(int device, int fd, int lanes, int max_pieces,
                        int64_t max_piece_bytes, hkv_gds **out);

/* Deregister and free.  No read may be in flight (drain the store). */
void hkv_gds_close(hkv_gds *g);

/* The reader to install in the store (hkv_disk_set_device_reader). */
const hkv_disk_device_reader *hkv_gds_reader(const hkv_gds *g);

/* "direct" when the nvidia-fs kernel module is loaded (DMA from the drive
 * into GPU memory), "compat" otherwise (cuFile's compatibility mode: POSIX
 * reads into its own pinned bounce buffers, then a copy to the GPU). */
const char *hkv_gds_mode(const hkv_gds *g);

#endif /* HKV_GDS_H */
