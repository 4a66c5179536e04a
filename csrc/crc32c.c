/*
 * crc32c.c - CRC-32C, slicing-by-8 in software, SSE4.2 where the CPU has it.
 *
 * The tables are built once, on first use, under pthread_once: a static
 * 8 KiB table literal would be faster to load but is unreadable and easy
 * to get subtly wrong; building it from the polynomial is 20 lines.
 *
 * The SSE4.2 path is compiled with a per-function target attribute, so the
 * rest of the extension keeps the baseline ISA, and chosen at run time
 * (__builtin_cpu_supports), so a wheel built here runs on any x86-64.
 */
#define _POSIX_C_SOURCE 200809L
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#define POLY 0x82F63B78u  /* CRC-32C, reflected */

static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;
static int use_hw;

static void build_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++)
            table[t][n] = (table[t - 1][n] >> 8) ^ table[0][table[t - 1][n] & 0xFF];
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    use_hw = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

static void init(void)
{
    pthread_once(&table_once, build_tables);
}

/* The core loop on a pre-inverted crc. */
static uint32_t sw_raw(uint32_t crc, const unsigned char *p, size_t len)
{
    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
        len--;
    }
    while (len >= 8) {
        /* little-endian load of 8 bytes; memcpy keeps it defined under
         * strict aliasing and compiles to one load */
        uint64_t w;
        memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        w ^= crc;
        crc = table[7][w & 0xFF] ^ table[6][(w >> 8) & 0xFF] ^
              table[5][(w >> 16) & 0xFF] ^ table[4][(w >> 24) & 0xFF] ^
              table[3][(w >> 32) & 0xFF] ^ table[2][(w >> 40) & 0xFF] ^
              table[1][(w >> 48) & 0xFF] ^ table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len-- > 0)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

uint32_t hkv_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    init();
    return ~sw_raw(~crc, buf, len);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>

__attribute__((target("sse4.2")))
static uint32_t hw_raw(uint32_t crc, const unsigned char *p, size_t len)
{
    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        crc = _mm_crc32_u8(crc, *p++);
        len--;
    }
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        len -= 8;
    }
    crc = (uint32_t)c;
    while (len-- > 0)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

uint32_t hkv_crc32c(uint32_t crc, const void *buf, size_t len)
{
    init();
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_hw)
        return ~hw_raw(~crc, buf, len);
#endif
    return ~sw_raw(~crc, buf, len);
}

int hkv_crc32c_hw(void)
{
    init();
    return use_hw;
}
