/*
 * emu.cc - runs CUDA kernels on the host for the emulated runtime of
 * cuda_runtime.h.
 *
 * Blocks run one after another; the threads of a block are cooperative
 * fibers (ucontext) driven round-robin by a scheduler.  A thread runs
 * until it finishes or waits at a barrier (__syncthreads, or the warp
 * exchange inside __shfl_up_sync); the last thread to arrive releases the
 * others.  Kernels without barriers therefore run each thread straight
 * through, and kernels with them get CUDA's semantics for convergent code.
 * A pass in which no thread makes progress is a deadlock (a barrier not
 * reached by every thread) and aborts.
 *
 * Works under AddressSanitizer (the fiber switches are annotated), which
 * is the point: every access of a kernel is then bounds-checked.
 */
#include "cuda_runtime.h"

#include <stdio.h>
#include <ucontext.h>

#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace emu {

cudaError_t last_error = cudaSuccess;
int current_device = 0;

namespace {

const size_t kStackBytes = 256 * 1024;
enum { kMaxWarps = kMaxThreads / 32 };

struct Fiber {
    ucontext_t ctx;
    char *stack = nullptr;
    uint3 tid;
    bool done = false;
    void *fake_stack = nullptr;     /* ASan's bookkeeping while switched out */
};

ucontext_t sched_ctx;
std::vector<Fiber> fibers;
Fiber *cur;
const std::function<void()> *body;
int live;                       /* threads of the block not finished */
bool progress;

uint64_t block_gen;
int block_arrived;
uint64_t warp_gen[kMaxWarps];
int warp_arrived[kMaxWarps], warp_live[kMaxWarps];
uint64_t slots[kMaxWarps][32];

#ifdef EMU_ASAN
const void *sched_bottom;
size_t sched_size;
#endif

int linear_tid()
{
    return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

/* Fiber side: give control back to the scheduler. */
void yield()
{
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&cur->fake_stack, sched_bottom, sched_size);
#endif
    swapcontext(&cur->ctx, &sched_ctx);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(cur->fake_stack, &sched_bottom, &sched_size);
#endif
}

void release_if_complete()
{
    if (block_arrived > 0 && block_arrived == live) {
        block_arrived = 0;
        block_gen++;
    }
    for (int w = 0; w < kMaxWarps; w++)
        if (warp_arrived[w] > 0 && warp_arrived[w] == warp_live[w]) {
            warp_arrived[w] = 0;
            warp_gen[w]++;
        }
}

void warp_barrier(int w)
{
    const uint64_t g = warp_gen[w];
    progress = true;
    if (++warp_arrived[w] == warp_live[w]) {
        warp_arrived[w] = 0;
        warp_gen[w]++;
        return;
    }
    while (warp_gen[w] == g)
        yield();
}

void fiber_entry()
{
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &sched_bottom, &sched_size);
#endif
    (*body)();
    cur->done = true;
    live--;
    warp_live[linear_tid() / 32]--;
    progress = true;
    release_if_complete();
#ifdef EMU_ASAN
    /* This fiber's stack is dead from here: no fake stack to save. */
    __sanitizer_start_switch_fiber(nullptr, sched_bottom, sched_size);
#endif
    /* Returning resumes uc_link, the scheduler. */
}

void init_fiber(Fiber &f, int i)
{
    f.done = false;
    f.tid.x = i % blockDim.x;
    f.tid.y = (i / blockDim.x) % blockDim.y;
    f.tid.z = i / (blockDim.x * blockDim.y);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &sched_ctx;
    makecontext(&f.ctx, fiber_entry, 0);
}

void run_block(int nthreads)
{
    live = nthreads;
    block_arrived = 0;
    for (int w = 0; w < kMaxWarps; w++) {
        warp_arrived[w] = 0;
        warp_live[w] = std::max(0, std::min(32, nthreads - 32 * w));
    }
    for (int i = 0; i < nthreads; i++)
        init_fiber(fibers[i], i);
    while (live > 0) {
        progress = false;
        /* volatile: swapcontext returns like setjmp does */
        for (volatile int i = 0; i < nthreads; i++) {
            Fiber &f = fibers[i];
            if (f.done)
                continue;
            cur = &f;
            threadIdx = f.tid;
#ifdef EMU_ASAN
            void *fake = nullptr;
            __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
            swapcontext(&sched_ctx, &f.ctx);
#ifdef EMU_ASAN
            __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        }
        if (!progress) {
            fprintf(stderr, "emu: deadlock in block (%u,%u,%u): %d threads wait "
                    "at a barrier not every thread reaches\n",
                    blockIdx.x, blockIdx.y, blockIdx.z, live);
            abort();
        }
    }
}

}  // namespace

void launch(std::function<void()> fn, dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream)
{
    (void)smem;
    (void)stream;
    const long nthreads = (long)block.x * block.y * block.z;
    if (nthreads <= 0 || nthreads > kMaxThreads || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    if (fibers.empty()) {
        fibers.resize(kMaxThreads);
        for (Fiber &f : fibers)
            f.stack = (char *)malloc(kStackBytes);
    }
    body = &fn;
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx.x = x;
                blockIdx.y = y;
                blockIdx.z = z;
                run_block((int)nthreads);
            }
}

void syncthreads()
{
    const uint64_t g = block_gen;
    progress = true;
    if (++block_arrived == live) {
        block_arrived = 0;
        block_gen++;
        return;
    }
    while (block_gen == g)
        yield();
}

uint64_t shfl_up(uint64_t v, unsigned delta)
{
    const int t = linear_tid(), w = t / 32, lane = t % 32;
    slots[w][lane] = v;
    warp_barrier(w);                /* every lane has published */
    const uint64_t r = lane >= (int)delta ? slots[w][lane - delta] : v;
    warp_barrier(w);                /* every lane has read */
    return r;
}

uint64_t shfl_idx(uint64_t v, int src_lane)
{
    const int t = linear_tid(), w = t / 32, lane = t % 32;
    slots[w][lane] = v;
    warp_barrier(w);
    const uint64_t r = slots[w][src_lane & 31];
    warp_barrier(w);
    return r;
}

}  // namespace emu
