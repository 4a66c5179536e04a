/*
 * crc32c.h - CRC-32C (Castagnoli), the checksum of disk-tier records.
 *
 * CRC-32C rather than the zlib CRC-32 because x86 (SSE4.2) and ARMv8 have
 * an instruction for it, its error detection on long records is better,
 * and it is what ext4, iSCSI and RocksDB use, so its check values are easy
 * to cross-check.  The software path (slicing-by-8) is used where the CPU
 * has no instruction; both give the same value (tested).
 *
 * Convention: the usual one (initial value and final xor 0xFFFFFFFF), so
 * hkv_crc32c(0, "123456789", 9) == 0xE3069283, and a running checksum is
 * continued by passing the previous result as `crc`.
 */
#ifndef HKV_CRC32C_H
#define HKV_CRC32C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CRC-32C of buf[0..len), continuing from `crc` (0 to start). */
uint32_t hkv_crc32c(uint32_t crc, const void *buf, size_t len);

/* The CRC of A followed by B, from crc_a = CRC(A), crc_b = CRC(B) (each
 * started from 0) and B's length: how the checksums of pieces computed
 * apart (on the GPU, say) are chained. */
uint32_t hkv_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

/* The portable slicing-by-8 path, whatever the CPU has (for tests). */
uint32_t hkv_crc32c_sw(uint32_t crc, const void *buf, size_t len);

/* 1 if hkv_crc32c uses a CPU instruction. */
int hkv_crc32c_hw(void);

#ifdef __cplusplus
}
#endif

#endif /* HKV_CRC32C_H */
