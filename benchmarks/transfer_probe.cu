// transfer_probe.cu - how fast can pages move between pinned host memory and
// the GPU, by which mechanism?  Measurements that choose the host tier's
// transfer design (issue: host tier and async engine):
//
//   1. cudaMemcpyAsync of 1 GiB cut into pieces of 32 KiB .. 64 MiB (H2D, D2H):
//      GB/s and host microseconds per call.
//   2. cudaMemcpyBatchAsync: the same pages scattered (random permutation) in
//      one call.
//   3. a zero-copy kernel moving scattered pages straight between mapped
//      pinned host memory and device pages, with a limited number of blocks
//      (SMs taken from the model's work).
//   4. H2D and D2H at the same time on two streams (both copy engines).
//
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90 -o /tmp/probe benchmarks/transfer_probe.cu && /tmp/probe
// Prints one JSON object per line.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#define CHECK(x)                                                              \
    do {                                                                      \
        cudaError_t e_ = (x);                                                 \
        if (e_ != cudaSuccess) {                                              \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,         \
                    cudaGetErrorString(e_));                                  \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

static const size_t TOTAL = 1ull << 30;

static double now_us()
{
    return std::chrono::duration<double, std::micro>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Copy n pages of page_bytes: dst[dst_ids[i]] = src[src_ids[i]], 16 bytes per
// lane, a block per page-chunk, grid-stride over pages.
__global__ void page_copy(const uint4 *__restrict__ src, uint4 *__restrict__ dst,
                          const int *__restrict__ src_ids, const int *__restrict__ dst_ids,
                          int n, size_t page_vecs)
{
    for (int p = blockIdx.x; p < n; p += gridDim.x) {
        const uint4 *s = src + (size_t)src_ids[p] * page_vecs;
        uint4 *d = dst + (size_t)dst_ids[p] * page_vecs;
        for (size_t i = threadIdx.x; i < page_vecs; i += blockDim.x)
            d[i] = s[i];
    }
}

int main()
{
    char *host, *dev, *dev2;
    CHECK(cudaHostAlloc(&host, TOTAL, cudaHostAllocDefault));
    CHECK(cudaMalloc(&dev, TOTAL));
    CHECK(cudaMalloc(&dev2, TOTAL));
    memset(host, 1, TOTAL);
    CHECK(cudaMemset(dev, 2, TOTAL));
    cudaStream_t s1, s2;
    CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("{\"device\": \"%s\", \"sms\": %d, \"async_engines\": %d}\n", prop.name,
           prop.multiProcessorCount, prop.asyncEngineCount);

    // 1. plain copies, various piece sizes
    for (int dir = 0; dir < 2; dir++) {
        for (size_t piece : {32ull << 10, 128ull << 10, 512ull << 10, 2ull << 20, 8ull << 20,
                             64ull << 20}) {
            size_t n = TOTAL / piece;
            for (int rep = 0; rep < 2; rep++) {  // first rep warms up
                CHECK(cudaEventRecord(a, s1));
                double t0 = now_us();
                for (size_t i = 0; i < n; i++) {
                    if (dir == 0)
                        CHECK(cudaMemcpyAsync(dev + i * piece, host + i * piece, piece,
                                              cudaMemcpyHostToDevice, s1));
                    else
                        CHECK(cudaMemcpyAsync(host + i * piece, dev + i * piece, piece,
                                              cudaMemcpyDeviceToHost, s1));
                }
                double host_us = now_us() - t0;
                CHECK(cudaEventRecord(b, s1));
                CHECK(cudaEventSynchronize(b));
                float ms;
                CHECK(cudaEventElapsedTime(&ms, a, b));
                if (rep)
                    printf("{\"test\": \"memcpy\", \"dir\": \"%s\", \"piece_kib\": %zu, "
                           "\"GBps\": %.1f, \"host_us_per_call\": %.2f}\n",
                           dir ? "d2h" : "h2d", piece >> 10, TOTAL / (ms * 1e-3) / 1e9,
                           host_us / n);
            }
        }
    }

    // 2. batched scattered copies of pages, one call
    std::mt19937 rng(1);
    for (size_t page : {32ull << 10, 128ull << 10, 512ull << 10}) {
        size_t n = TOTAL / page;
        std::vector<int> perm(n);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int dir = 0; dir < 2; dir++) {
            std::vector<void *> dsts(n);
            std::vector<const void *> srcs(n);
            std::vector<size_t> sizes(n, page);
            for (size_t i = 0; i < n; i++) {
                char *h = host + (size_t)perm[i] * page, *d = dev + i * page;
                dsts[i] = dir ? (void *)h : (void *)d;
                srcs[i] = dir ? (const void *)d : (const void *)h;
            }
            cudaMemcpyAttributes attr = {};
            attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
            size_t idx = 0;
            for (int rep = 0; rep < 2; rep++) {
                CHECK(cudaEventRecord(a, s1));
                double t0 = now_us();
                CHECK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), n, &attr,
                                           &idx, 1, s1));
                double host_us = now_us() - t0;
                CHECK(cudaEventRecord(b, s1));
                CHECK(cudaEventSynchronize(b));
                float ms;
                CHECK(cudaEventElapsedTime(&ms, a, b));
                if (rep)
                    printf("{\"test\": \"memcpy_batch\", \"dir\": \"%s\", \"page_kib\": %zu, "
                           "\"pages\": %zu, \"GBps\": %.1f, \"host_us_per_call\": %.1f}\n",
                           dir ? "d2h" : "h2d", page >> 10, n, TOTAL / (ms * 1e-3) / 1e9,
                           host_us);
            }
        }
    }

    // 3. zero-copy kernel over mapped pinned memory, scattered pages
    char *host_dev;
    CHECK(cudaHostGetDevicePointer((void **)&host_dev, host, 0));
    for (size_t page : {32ull << 10, 128ull << 10}) {
        int n = (int)(TOTAL / page);
        std::vector<int> perm(n), ident(n);
        std::iota(perm.begin(), perm.end(), 0);
        std::iota(ident.begin(), ident.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        int *d_perm, *d_ident;
        CHECK(cudaMalloc(&d_perm, n * sizeof(int)));
        CHECK(cudaMalloc(&d_ident, n * sizeof(int)));
        CHECK(cudaMemcpy(d_perm, perm.data(), n * sizeof(int), cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(d_ident, ident.data(), n * sizeof(int), cudaMemcpyHostToDevice));
        for (int dir = 0; dir < 2; dir++) {
            for (int blocks : {8, 16, 32, 66, 132, 264}) {
                for (int rep = 0; rep < 2; rep++) {
                    CHECK(cudaEventRecord(a, s1));
                    if (dir == 0)
                        page_copy<<<blocks, 512, 0, s1>>>((const uint4 *)host_dev, (uint4 *)dev,
                                                          d_perm, d_ident, n, page / 16);
                    else
                        page_copy<<<blocks, 512, 0, s1>>>((const uint4 *)dev, (uint4 *)host_dev,
                                                          d_ident, d_perm, n, page / 16);
                    CHECK(cudaGetLastError());
                    CHECK(cudaEventRecord(b, s1));
                    CHECK(cudaEventSynchronize(b));
                    float ms;
                    CHECK(cudaEventElapsedTime(&ms, a, b));
                    if (rep)
                        printf("{\"test\": \"zero_copy_kernel\", \"dir\": \"%s\", "
                               "\"page_kib\": %zu, \"blocks\": %d, \"GBps\": %.1f}\n",
                               dir ? "d2h" : "h2d", page >> 10, blocks,
                               TOTAL / (ms * 1e-3) / 1e9);
                }
            }
        }
        CHECK(cudaFree(d_perm));
        CHECK(cudaFree(d_ident));
    }

    // 4. both directions at once, 2 MiB pieces, two streams
    {
        size_t piece = 2ull << 20, n = TOTAL / 2 / piece;
        for (int rep = 0; rep < 2; rep++) {
            CHECK(cudaDeviceSynchronize());
            double t0 = now_us();
            for (size_t i = 0; i < n; i++) {
                CHECK(cudaMemcpyAsync(dev + i * piece, host + i * piece, piece,
                                      cudaMemcpyHostToDevice, s1));
                CHECK(cudaMemcpyAsync(host + TOTAL / 2 + i * piece, dev2 + i * piece, piece,
                                      cudaMemcpyDeviceToHost, s2));
            }
            CHECK(cudaDeviceSynchronize());
            double us = now_us() - t0;
            if (rep)
                printf("{\"test\": \"bidirectional\", \"piece_kib\": %zu, \"GBps_total\": %.1f}\n",
                       piece >> 10, TOTAL / (us * 1e-6) / 1e9);
        }
    }
    CHECK(cudaFreeHost(host));
    CHECK(cudaFree(dev));
    CHECK(cudaFree(dev2));
    return 0;
}
