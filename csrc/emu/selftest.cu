// Small kernels that pin down the CUDA semantics the emulator must reproduce, and their launchers
// (declared in selftest.h, bound as the submodule `selftest` by selftest_bindings.cpp). Compiled
// into both fastbone._emu and fastbone._C, so tests/test_emu_semantics.py runs the same checks on
// the host emulator and, where there is a GPU, on the real device.
// No pybind11 here: nvcc would parse its headers once per target architecture.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../kernels/mma.cuh"
#include "../launch.h"
#include "selftest.h"

#ifndef FASTBONE_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fb_selftest {

// Tree reduction of each block's slice through shared memory; every level needs the barrier.
template <int BLOCK>
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ partial, long long n) {
  __shared__ float buf[BLOCK];
  const int t = threadIdx.x;
  const long long i = (long long)blockIdx.x * BLOCK + t;
  buf[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int stride = BLOCK / 2; stride > 0; stride /= 2) {
    if (t < stride) buf[t] += buf[t + stride];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = buf[0];
}

// Reverses each block's slice of x through shared memory: thread t reads what thread count-1-t
// wrote, so a barrier that does not wait for every thread gives wrong values. With EARLY_EXIT the
// threads past the end return before the barrier (emulator-only test: exited threads count as
// arrived there).
template <int BLOCK, bool EARLY_EXIT>
__global__ void reverse_kernel(const float* __restrict__ x, float* __restrict__ y, long long n) {
  __shared__ float buf[BLOCK];
  const int t = threadIdx.x;
  const long long base = (long long)blockIdx.x * BLOCK;
  const int count = (int)(n - base < BLOCK ? n - base : BLOCK);
  if (EARLY_EXIT && t >= count) return;
  if (t < count) buf[t] = x[base + t];
  __syncthreads();
  if (t < count) y[base + t] = buf[count - 1 - t];
}

// The same through dynamic shared memory (FB_DYNAMIC_SMEM), with the block size chosen at launch.
__global__ void reverse_dynamic_kernel(const float* __restrict__ x, float* __restrict__ y, long long n) {
  FB_DYNAMIC_SMEM(float, buf);
  const int t = threadIdx.x, block = blockDim.x;
  const long long base = (long long)blockIdx.x * block;
  const int count = (int)(n - base < block ? n - base : block);
  if (t < count) buf[t] = x[base + t];
  __syncthreads();
  if (t < count) y[base + t] = buf[count - 1 - t];
}

// Warp-level exchanges; all lanes participate (values past n are 0).
//   kXorSum: every lane gets its warp's total -> out[i]
//   kDownSum: lane 0 gets the total -> out[i / 32]
//   kUpScan: inclusive prefix sum within the warp -> out[i]
//   kIndexGather: lane l reads lane (7 l + 3) mod 32 -> out[i]
template <int MODE>
__global__ void warp_kernel(const float* __restrict__ x, float* __restrict__ out, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  float v = i < n ? x[i] : 0.0f;
  if (MODE == kXorSum) {
    for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  } else if (MODE == kDownSum) {
    for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xffffffffu, v, d);
  } else if (MODE == kUpScan) {
    for (int d = 1; d < 32; d *= 2) {
      const float up = __shfl_up_sync(0xffffffffu, v, d);
      if (lane >= d) v += up;
    }
  } else {
    v = __shfl_sync(0xffffffffu, v, (7 * lane + 3) % 32);
  }
  if (MODE == kDownSum) {
    if (lane == 0 && i < n) out[i / 32] = v;
  } else if (i < n) {
    out[i] = v;
  }
}

// Votes: per thread its warp's ballot/any/all and its block's __syncthreads_count/and/or.
__global__ void vote_kernel(const int* __restrict__ pred, int* __restrict__ out, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int p = i < n ? pred[i] : 0;
  const unsigned ballot = __ballot_sync(0xffffffffu, p);
  const int any = __any_sync(0xffffffffu, p);
  const int all = __all_sync(0xffffffffu, p);
  const int count = __syncthreads_count(p);
  const int block_and = __syncthreads_and(p);
  const int block_or = __syncthreads_or(p);
  if (i < n) {
    out[i * 6 + 0] = (int)ballot;
    out[i * 6 + 1] = any;
    out[i * 6 + 2] = all;
    out[i * 6 + 3] = count;
    out[i * 6 + 4] = block_and;
    out[i * 6 + 5] = block_or;
  }
}

// Atomics from every block (grid-stride loop): a counter, max/min, a histogram, an exact float sum
// (small integers) and a float max built from atomicCAS.
__global__ void atomics_kernel(const int* __restrict__ v, long long n, int bins, int* counter, int* vmax,
                               int* vmin, int* hist, float* fsum, float* fmax_out) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const int value = v[i];
    atomicAdd(counter, 1);
    atomicMax(vmax, value);
    atomicMin(vmin, value);
    atomicAdd(&hist[((value % bins) + bins) % bins], 1);
    atomicAdd(fsum, (float)value);
    const float f = (float)value * 0.5f;
    int* as_int = reinterpret_cast<int*>(fmax_out);
    int old = *as_int;
    while (__int_as_float(old) < f) {
      const int seen = atomicCAS(as_int, old, __float_as_int(f));
      if (seen == old) break;
      old = seen;
    }
  }
}

// The usual out-of-range guard with an early return; y past n must stay untouched.
__global__ void axpb_kernel(const float* __restrict__ x, float* __restrict__ y, long long n, float a, float b) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = a * x[i] + b;
}

// Records each thread's built-in indices (3-D grids and blocks).
__global__ void index_kernel(int* __restrict__ out) {
  const long long block = ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const long long thread = ((long long)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const long long g = block * (blockDim.x * blockDim.y * blockDim.z) + thread;
  out[g * 6 + 0] = threadIdx.x;
  out[g * 6 + 1] = threadIdx.y;
  out[g * 6 + 2] = threadIdx.z;
  out[g * 6 + 3] = blockIdx.x;
  out[g * 6 + 4] = blockIdx.y;
  out[g * 6 + 5] = blockIdx.z;
}

// float -> half / bfloat16 (bits and value back), the conversions every kernel's stores use.
__global__ void convert_kernel(const float* __restrict__ x, unsigned short* __restrict__ half_bits,
                               unsigned short* __restrict__ bf16_bits, float* __restrict__ half_back,
                               float* __restrict__ bf16_back, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half h = __float2half_rn(x[i]);
  const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
  half_bits[i] = __half_as_ushort(h);
  bf16_bits[i] = __bfloat16_as_ushort(b);
  half_back[i] = __half2float(h);
  bf16_back[i] = __bfloat162float(b);
}

// Emulator-only failure paths: a thread that traps while the others wait at a barrier, and a
// barrier that half a warp reaches while the other half waits at __syncwarp.
__global__ void trap_kernel(int trap_thread) {
  __syncthreads();
  if ((int)threadIdx.x == trap_thread) __trap();
  __syncthreads();
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) __syncthreads();
  else __syncwarp();
}

}  // namespace fb_selftest

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

unsigned blocks_for(long long n, int block) { return (unsigned)((n + block - 1) / block); }

// Calls f(std::integral_constant<int, B>) for the power-of-two block sizes the templates support.
template <typename F>
void dispatch_block(int block, F&& f) {
  switch (block) {
    case 32: f(std::integral_constant<int, 32>{}); return;
    case 64: f(std::integral_constant<int, 64>{}); return;
    case 128: f(std::integral_constant<int, 128>{}); return;
    case 256: f(std::integral_constant<int, 256>{}); return;
    case 512: f(std::integral_constant<int, 512>{}); return;
    case 1024: f(std::integral_constant<int, 1024>{}); return;
  }
  throw std::invalid_argument("selftest block size must be a power of two in [32, 1024], got " +
                              std::to_string(block));
}

}  // namespace

namespace fb_selftest {

void block_sum(uintptr_t x, uintptr_t partial, long long n, int block, uintptr_t stream) {
  dispatch_block(block, [&](auto b) {
    constexpr int B = decltype(b)::value;
    FB_LAUNCH((block_sum_kernel<B>), dim3(blocks_for(n, B)), dim3(B), 0, FB_STREAM(stream), ptr<const float>(x),
              ptr<float>(partial), n);
  });
}

void reverse(uintptr_t x, uintptr_t y, long long n, int block, bool early_exit, uintptr_t stream) {
  dispatch_block(block, [&](auto b) {
    constexpr int B = decltype(b)::value;
    if (early_exit)
      FB_LAUNCH((reverse_kernel<B, true>), dim3(blocks_for(n, B)), dim3(B), 0, FB_STREAM(stream),
                ptr<const float>(x), ptr<float>(y), n);
    else
      FB_LAUNCH((reverse_kernel<B, false>), dim3(blocks_for(n, B)), dim3(B), 0, FB_STREAM(stream),
                ptr<const float>(x), ptr<float>(y), n);
  });
}

void reverse_dynamic(uintptr_t x, uintptr_t y, long long n, int block, uintptr_t stream) {
  FB_LAUNCH(reverse_dynamic_kernel, dim3(blocks_for(n, block)), dim3(block), block * sizeof(float), FB_STREAM(stream),
            ptr<const float>(x), ptr<float>(y), n);
}

void warp(int mode, uintptr_t x, uintptr_t out, long long n, int block, uintptr_t stream) {
  const dim3 grid(blocks_for(n, block));
  auto run = [&](auto m) {
    FB_LAUNCH((warp_kernel<decltype(m)::value>), grid, dim3(block), 0, FB_STREAM(stream), ptr<const float>(x),
              ptr<float>(out), n);
  };
  switch (mode) {
    case kXorSum: return run(std::integral_constant<int, kXorSum>{});
    case kDownSum: return run(std::integral_constant<int, kDownSum>{});
    case kUpScan: return run(std::integral_constant<int, kUpScan>{});
    case kIndexGather: return run(std::integral_constant<int, kIndexGather>{});
  }
  throw std::invalid_argument("warp mode must be 0 (xor sum), 1 (down sum), 2 (up scan) or 3 (index gather)");
}

void vote(uintptr_t pred, uintptr_t out, long long n, int block, uintptr_t stream) {
  FB_LAUNCH(vote_kernel, dim3(blocks_for(n, block)), dim3(block), 0, FB_STREAM(stream), ptr<const int>(pred),
            ptr<int>(out), n);
}

void atomics(uintptr_t v, long long n, int bins, uintptr_t counter, uintptr_t vmax, uintptr_t vmin, uintptr_t hist,
             uintptr_t fsum, uintptr_t fmax, int grid, int block, uintptr_t stream) {
  FB_LAUNCH(atomics_kernel, dim3(grid), dim3(block), 0, FB_STREAM(stream), ptr<const int>(v), n, bins,
            ptr<int>(counter), ptr<int>(vmax), ptr<int>(vmin), ptr<int>(hist), ptr<float>(fsum), ptr<float>(fmax));
}

void axpb(uintptr_t x, uintptr_t y, long long n, float a, float b, int block, uintptr_t stream) {
  FB_LAUNCH(axpb_kernel, dim3(blocks_for(n, block)), dim3(block), 0, FB_STREAM(stream), ptr<const float>(x),
            ptr<float>(y), n, a, b);
}

void index(uintptr_t out, const unsigned grid[3], const unsigned block[3], uintptr_t stream) {
  FB_LAUNCH(index_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0,
            FB_STREAM(stream), ptr<int>(out));
}

void convert(uintptr_t x, uintptr_t half_bits, uintptr_t bf16_bits, uintptr_t half_back, uintptr_t bf16_back,
             long long n, uintptr_t stream) {
  FB_LAUNCH(convert_kernel, dim3(blocks_for(n, 128)), dim3(128), 0, FB_STREAM(stream), ptr<const float>(x),
            ptr<unsigned short>(half_bits), ptr<unsigned short>(bf16_bits), ptr<float>(half_back),
            ptr<float>(bf16_back), n);
}

#ifdef FASTBONE_EMU
void trap(int threads, int trap_thread) { FB_LAUNCH(trap_kernel, dim3(2), dim3(threads), 0, 0, trap_thread); }
void divergent_barrier() { FB_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(32), 0, 0); }
#endif

}  // namespace fb_selftest

// --- tensor-core primitives (kernels/mma.cuh): ldmatrix, mma.sync, cp.async ----------------------
// The emulator implements them from the PTX ISA's fragment layouts; these kernels let
// tests/test_cuda_mma.py check the layouts from outside (and, on an sm_80+ GPU, against the hardware).

namespace fb_selftest {

// One warp. A 32 x 8 b16 matrix (bits) goes to shared memory row by row; lane l passes the address of
// row rows[l] to ldmatrix (x4: matrices i = 0..3 from lanes 8i..8i+7; x2: lanes 0..15 count).
// out[l * COUNT + i] = lane l's register i.
template <int COUNT>
__global__ void ldmatrix_kernel(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                unsigned* __restrict__ out) {
  __shared__ __align__(16) unsigned short tile[32 * 8];
  const int lane = threadIdx.x;
  for (int e = 0; e < 8; ++e) tile[lane * 8 + e] = src[lane * 8 + e];
  __syncthreads();
  unsigned r[COUNT];
  fb::ldmatrix<COUNT>(r, &tile[rows[lane] * 8]);
  for (int i = 0; i < COUNT; ++i) out[lane * COUNT + i] = r[i];
}

// One warp: d (16 x 8, float32) = a (16 x 16) * b (16 x 8) + c, a and b as b16 bits of T, row-major.
// FROM_SHARED = false: each lane builds its fragments by the PTX layout (threadID_in_group t, groupID g);
// true: a goes to shared memory as [m][k], b as [n][k], and ldmatrix_x4 loads the fragments with the
// conv kernel's lane-to-row mapping. d is stored back by the accumulator layout.
template <typename T, bool FROM_SHARED>
__global__ void mma_kernel(const unsigned short* __restrict__ a, const unsigned short* __restrict__ b,
                           const float* __restrict__ c, float* __restrict__ d) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto pair = [](unsigned short lo, unsigned short hi) { return (unsigned)lo | ((unsigned)hi << 16); };
  unsigned af[4], bf[2];
  if (FROM_SHARED) {
    __shared__ __align__(16) unsigned short as[16 * 16];  // [m][k]
    __shared__ __align__(16) unsigned short bs[8 * 16];   // [n][k]
    for (int e = lane; e < 256; e += 32) as[e] = a[e];
    for (int e = lane; e < 128; e += 32) bs[(e % 8) * 16 + e / 8] = b[e];  // b[k][n] -> bs[n][k]
    __syncthreads();
    fb::ldmatrix_x4(af, &as[(lane % 16) * 16 + (lane / 16) * 8]);
    // x2: matrices (n 0-7, k 0-7) and (n 0-7, k 8-15) from lanes 0-15 (the other lanes' addresses are
    // ignored; they pass valid ones anyway).
    fb::ldmatrix_x2(bf, &bs[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
  } else {
    af[0] = pair(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
    af[1] = pair(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
    af[2] = pair(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
    af[3] = pair(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
    bf[0] = pair(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]);
    bf[1] = pair(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
  }
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  fb::mma_m16n8k16<T>(acc, af, bf);
  d[g * 8 + 2 * t] = acc[0], d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2], d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// One block of `threads`: each thread owns 16 bytes (4 floats) in two shared buffers, fills them with
// old[t], then copies new1[t] -> buf1 (group 0) and new2[t] -> buf2 (group 1; zero fill for threads
// t % 3 == 0), and records what it reads: out[0] buf1 before any wait, out[1] buf1 after wait_group 1,
// out[2] buf2 after wait_group 1, out[3] buf2 after wait_group 0 (each threads x 4 floats). On a GPU
// out[0] and out[2] race with the copies (undefined); the emulator performs copies at the wait.
__global__ void cp_async_kernel(const float* __restrict__ old_values, const float* __restrict__ new1,
                                const float* __restrict__ new2, float* __restrict__ out) {
  FB_KERNEL_DYNAMIC_SMEM_FLOAT(smem);  // 2 x threads x 4 floats
  const int t = threadIdx.x, n = blockDim.x;
  float* buf1 = smem + t * 4;
  float* buf2 = smem + (n + t) * 4;
  for (int e = 0; e < 4; ++e) buf1[e] = buf2[e] = old_values[t * 4 + e];
  fb::cp_async_16(buf1, new1 + t * 4, true);
  fb::cp_async_commit();
  fb::cp_async_16(buf2, new2 + t * 4, t % 3 != 0);
  fb::cp_async_commit();
  auto record = [&](int slot, const float* from) {
    for (int e = 0; e < 4; ++e) out[(slot * n + t) * 4 + e] = from[e];
  };
  record(0, buf1);
  fb::cp_async_wait<1>();
  record(1, buf1);
  record(2, buf2);
  fb::cp_async_wait<0>();
  record(3, buf2);
}

void ldmatrix(int count, uintptr_t src, uintptr_t rows, uintptr_t out, uintptr_t stream) {
  const auto* s = ptr<const unsigned short>(src);
  const auto* r = ptr<const int>(rows);
  auto* o = ptr<unsigned>(out);
  if (count == 4) FB_LAUNCH((ldmatrix_kernel<4>), dim3(1), dim3(32), 0, FB_STREAM(stream), s, r, o);
  else if (count == 2) FB_LAUNCH((ldmatrix_kernel<2>), dim3(1), dim3(32), 0, FB_STREAM(stream), s, r, o);
  else if (count == 1) FB_LAUNCH((ldmatrix_kernel<1>), dim3(1), dim3(32), 0, FB_STREAM(stream), s, r, o);
  else throw std::invalid_argument("ldmatrix count must be 1, 2 or 4");
}

void mma(int dtype, bool from_shared, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, uintptr_t stream) {
  const auto* pa = ptr<const unsigned short>(a);
  const auto* pb = ptr<const unsigned short>(b);
  const auto* pc = ptr<const float>(c);
  auto* pd = ptr<float>(d);
  auto run = [&](auto tag, auto shared) {
    using T = typename decltype(tag)::type;
    FB_LAUNCH((mma_kernel<T, decltype(shared)::value>), dim3(1), dim3(32), 0, FB_STREAM(stream), pa, pb, pc, pd);
  };
  struct Half { using type = __half; };
  struct Bf16 { using type = __nv_bfloat16; };
  using Yes = std::integral_constant<bool, true>;
  using No = std::integral_constant<bool, false>;
  if (dtype == 1) from_shared ? run(Half{}, Yes{}) : run(Half{}, No{});
  else if (dtype == 2) from_shared ? run(Bf16{}, Yes{}) : run(Bf16{}, No{});
  else throw std::invalid_argument("mma dtype code must be 1 (float16) or 2 (bfloat16)");
}

void cp_async(uintptr_t old_values, uintptr_t new1, uintptr_t new2, uintptr_t out, int threads, uintptr_t stream) {
  FB_LAUNCH(cp_async_kernel, dim3(1), dim3(threads), 2 * threads * 4 * sizeof(float), FB_STREAM(stream),
            ptr<const float>(old_values), ptr<const float>(new1), ptr<const float>(new2), ptr<float>(out));
}

}  // namespace fb_selftest
