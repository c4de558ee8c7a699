// Warp-level tensor-core and asynchronous-copy primitives (sm_80+), one spelling for the three builds
// (registers are `unsigned`: 32 bits in all three, and NVRTC has no <cstdint>):
//   cp_async_16(smem, gmem, valid)   16-byte global -> shared copy (cp.async.cg); !valid: 16 zero bytes,
//                                    gmem not read (src-size 0)
//   cp_async_commit()                closes this thread's current group of copies
//   cp_async_wait<N>()               waits until at most the N most recent groups are pending
//   ldmatrix_x4 / ldmatrix_x2(r, row) four / two 8x8 b16 matrices from shared memory; lane l gives the
//                                    address of row l % 8 of matrix l / 8 (x2: lanes 0-15 count)
//   mma_m16n8k16<T>(d, a, b)         d (16x8 f32) += a (16x16, row-major fragments) * b (16x8, "col")
//                                    for T = __half / __nv_bfloat16, float32 accumulators
// nvcc / NVRTC: inline PTX. The emulator (FASTBONE_EMU): the same semantics on the host, following the
// PTX ISA's fragment layouts exactly (so CI proves a kernel's fragment indexing, not just its loads):
//   groupID = lane >> 2, threadID_in_group = lane % 4;
//   ldmatrix: lane l receives, for matrix i, the 32-bit word at row l / 4, columns 2 (l % 4) .. + 1;
//   A (16x16): a[0] = (row g, cols 2t, 2t+1), a[1] = (g + 8, 2t..), a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..);
//   B (16x8):  b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t + 8, 2t + 9, col g);
//   C / D:     d[0], d[1] = (row g, cols 2t, 2t+1), d[2], d[3] = (row g + 8, cols 2t, 2t+1);
// the lower-indexed element of a pair in the low 16 bits. Products are exact in float (11- / 8-bit
// significands), summed in float32 (the hardware's internal order is not specified; the tests bound the
// difference). cp.async in the emulator: see csrc/emu/cuda_emu.h (copies happen at the wait).
#pragma once

#include "common.cuh"

// Tensor-core kernels need sm_80 (bfloat16 mma.sync, cp.async, ldmatrix); the launchers check the
// device's compute capability against this, and an older -arch compiles the wrappers to a trap.
#define FB_MMA_MIN_CC 80

#if !defined(FASTBONE_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < FB_MMA_MIN_CC * 10
#define FB_MMA_UNSUPPORTED 1
#endif

namespace fb {

#ifndef FASTBONE_EMU
// Shared-memory address of a generic pointer, as the PTX shared state space wants it.
__device__ __forceinline__ unsigned smem_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(FASTBONE_EMU)
  ::fb_emu::cp_async(smem, gmem, 16, valid ? 16 : 0);
#elif defined(FB_MMA_UNSUPPORTED)
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(FASTBONE_EMU)
  ::fb_emu::cp_async_commit();
#elif defined(FB_MMA_UNSUPPORTED)
  __trap();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FASTBONE_EMU)
  ::fb_emu::cp_async_wait(N);
#elif defined(FB_MMA_UNSUPPORTED)
  __trap();
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

#ifdef FASTBONE_EMU
namespace mma_emu {
// The 32-bit word lane `lane` receives from matrix `i` of an ldmatrix whose row addresses are `rows`.
inline unsigned ldmatrix_word(const uintptr_t (&rows)[32], int i, int lane) {
  unsigned word;
  std::memcpy(&word, reinterpret_cast<const unsigned char*>(rows[8 * i + lane / 4]) + 4 * (lane % 4), 4);
  return word;
}

template <typename T>
inline float element(unsigned word, int high) {
  const unsigned short bits = (unsigned short)(high ? word >> 16 : word & 0xffffu);
  T v;
  std::memcpy(&v, &bits, 2);
  return to_float(v);
}

// Every lane's A and B registers (gathered) -> A[r][c] and B[k][n] by the PTX layouts above.
struct Fragments {
  unsigned a[4], b[2];
};
template <typename T>
inline float a_at(const Fragments (&f)[32], int r, int c) {
  const int lane = (r % 8) * 4 + (c % 8) / 2, reg = (r >= 8 ? 1 : 0) + (c >= 8 ? 2 : 0);
  return element<T>(f[lane].a[reg], c % 2);
}
template <typename T>
inline float b_at(const Fragments (&f)[32], int k, int n) {
  const int lane = n * 4 + (k % 8) / 2, reg = k >= 8 ? 1 : 0;
  return element<T>(f[lane].b[reg], k % 2);
}
}  // namespace mma_emu
#endif

template <int COUNT>
__device__ __forceinline__ void ldmatrix(unsigned (&r)[COUNT], const void* smem_row) {
  static_assert(COUNT == 1 || COUNT == 2 || COUNT == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(FASTBONE_EMU)
  const uintptr_t mine = reinterpret_cast<uintptr_t>(smem_row);
  uintptr_t rows[32];
  ::fb_emu::warp_all_gather(&mine, rows, sizeof(mine));
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < COUNT; ++i) r[i] = mma_emu::ldmatrix_word(rows, i, lane);
#elif defined(FB_MMA_UNSUPPORTED)
  (void)smem_row;
  for (int i = 0; i < COUNT; ++i) r[i] = 0;
  __trap();
#else
  if constexpr (COUNT == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(smem_row)));
  else if constexpr (COUNT == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_address(smem_row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_address(smem_row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) { ldmatrix<4>(r, smem_row); }
__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* smem_row) { ldmatrix<2>(r, smem_row); }

template <typename T>
struct MmaIsBf16 {
  static constexpr bool value = false;
};
template <>
struct MmaIsBf16<__nv_bfloat16> {
  static constexpr bool value = true;
};

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(FASTBONE_EMU)
  mma_emu::Fragments mine, all[32];
  for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
  for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
  ::fb_emu::warp_all_gather(&mine, all, sizeof(mine));
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += mma_emu::a_at<T>(all, row, k) * mma_emu::b_at<T>(all, k, col);
    d[i] = acc;
  }
#elif defined(FB_MMA_UNSUPPORTED)
  (void)a, (void)b, (void)d;
  __trap();
#else
  static_assert(sizeof(T) == 2, "mma_m16n8k16 takes __half or __nv_bfloat16");
  if constexpr (MmaIsBf16<T>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

}  // namespace fb
