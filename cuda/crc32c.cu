/*
 * crc32c.cu - CRC-32C of device memory (crc32c.h's convention), so a disk
 * record read straight into GPU pages (GPUDirect Storage) can be checked
 * where it landed, without a copy back to the host.
 *
 * One thread per 4 KiB chunk computes the chunk's raw CRC register from
 * zero with a byte table in shared memory; one thread then chains the
 * chunks: reg(A || B) = reg(A) * x^(8|B|) mod P  xor  reg0(B), the same
 * combine crc32c.c uses between its interleaved streams.  A 1 MiB record
 * is 256 chunks: a few tens of microseconds, next to a millisecond of I/O.
 */
#include "common.cuh"

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  /* CRC-32C, bit-reflected */
constexpr int64_t kChunk = 4096;

/* a(x) * b(x) mod P(x), bit-reflected */
__device__ uint32_t multmodp(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
    }
    return p;
}

/* x^(8 n) mod P: moves a CRC register past n bytes */
__device__ uint32_t x8nmodp(int64_t n)
{
    uint32_t sq = 1u << 30, p = 1u << 31;
    uint64_t bits = (uint64_t)n * 8;
    while (bits != 0) {
        if (bits & 1)
            p = multmodp(sq, p);
        sq = multmodp(sq, sq);
        bits >>= 1;
    }
    return p;
}

__global__ void __launch_bounds__(hkv::kBlockThreads)
crc_chunks_kernel(const uint8_t *data, int64_t len, uint32_t *chunk_crc)
{
    __shared__ uint32_t table[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        uint32_t c = (uint32_t)i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
        table[i] = c;
    }
    __syncthreads();
    const int64_t chunks = (len + kChunk - 1) / kChunk;
    for (int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; ch < chunks;
         ch += (int64_t)gridDim.x * blockDim.x) {
        const uint8_t *p = data + ch * kChunk;
        const int64_t n = len - ch * kChunk < kChunk ? len - ch * kChunk : kChunk;
        uint32_t c = 0;
        for (int64_t i = 0; i < n; i++)
            c = table[(c ^ p[i]) & 0xffu] ^ (c >> 8);
        chunk_crc[ch] = c;
    }
}

__global__ void crc_combine_kernel(const uint32_t *chunk_crc, int64_t len, uint32_t crc,
                                   uint32_t *out)
{
    if (blockIdx.x != 0 || threadIdx.x != 0)
        return;
    const int64_t chunks = (len + kChunk - 1) / kChunk;
    const uint32_t full = x8nmodp(kChunk);
    uint32_t reg = ~crc;
    for (int64_t ch = 0; ch < chunks; ch++) {
        const int64_t n = len - ch * kChunk < kChunk ? len - ch * kChunk : kChunk;
        reg = multmodp(n == kChunk ? full : x8nmodp(n), reg) ^ chunk_crc[ch];
    }
    *out = ~reg;
}

}  // namespace

extern "C" int64_t hkv_cuda_crc32c_scratch_words(int64_t len)
{
    return len > 0 ? hkv::div_up(len, kChunk) : 1;
}

extern "C" hkv_status hkv_cuda_crc32c(const void *data, int64_t len, uint32_t crc,
                                      uint32_t *scratch, uint32_t *out, int device,
                                      void *stream)
{
    HKV_TRY(hkv::launch_begin(device));
    if (len < 0)
        return hkv_error(HKV_EINVAL, "hkv_cuda_crc32c: negative length %lld", (long long)len);
    cudaStream_t s = (cudaStream_t)stream;
    const int64_t chunks = hkv::div_up(len, kChunk);
    if (chunks > 0) {
        int64_t blocks = hkv::div_up(chunks, hkv::kBlockThreads);
        if (blocks > 1024)
            blocks = 1024;
        crc_chunks_kernel<<<(unsigned)blocks, hkv::kBlockThreads, 0, s>>>(
            (const uint8_t *)data, len, scratch);
        HKV_TRY(hkv::launch_check("crc_chunks_kernel"));
    }
    crc_combine_kernel<<<1, 1, 0, s>>>(scratch, len, crc, out);
    return hkv::launch_check("crc_combine_kernel");
}
