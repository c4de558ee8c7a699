// Launchers of the selftest kernels (csrc/emu/selftest.cu). Pointers are device (or, in the emu
// build, host) addresses as integers; stream is a cudaStream_t as an integer (0: default / CPU).
#pragma once

#include <cstdint>

namespace fb_selftest {

enum WarpMode { kXorSum = 0, kDownSum = 1, kUpScan = 2, kIndexGather = 3 };

void block_sum(uintptr_t x, uintptr_t partial, long long n, int block, uintptr_t stream);
void reverse(uintptr_t x, uintptr_t y, long long n, int block, bool early_exit, uintptr_t stream);
void reverse_dynamic(uintptr_t x, uintptr_t y, long long n, int block, uintptr_t stream);
void warp(int mode, uintptr_t x, uintptr_t out, long long n, int block, uintptr_t stream);
void vote(uintptr_t pred, uintptr_t out, long long n, int block, uintptr_t stream);
void atomics(uintptr_t v, long long n, int bins, uintptr_t counter, uintptr_t vmax, uintptr_t vmin, uintptr_t hist,
             uintptr_t fsum, uintptr_t fmax, int grid, int block, uintptr_t stream);
void axpb(uintptr_t x, uintptr_t y, long long n, float a, float b, int block, uintptr_t stream);
void index(uintptr_t out, const unsigned grid[3], const unsigned block[3], uintptr_t stream);
void convert(uintptr_t x, uintptr_t half_bits, uintptr_t bf16_bits, uintptr_t half_back, uintptr_t bf16_back,
             long long n, uintptr_t stream);
// kernels/mma.cuh (tests/test_cuda_mma.py): ldmatrix of `count` matrices; mma.sync m16n8k16 (dtype 1
// float16, 2 bfloat16; fragments built by hand or loaded with ldmatrix); cp.async groups.
void ldmatrix(int count, uintptr_t src, uintptr_t rows, uintptr_t out, uintptr_t stream);
void mma(int dtype, bool from_shared, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, uintptr_t stream);
void cp_async(uintptr_t old_values, uintptr_t new1, uintptr_t new2, uintptr_t out, int threads, uintptr_t stream);
#ifdef FASTBONE_EMU
void trap(int threads, int trap_thread);  // thread trap_thread of each block calls __trap()
void divergent_barrier();                 // half a warp at __syncthreads, half at __syncwarp
#endif

}  // namespace fb_selftest
