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
// and, built on them, the warp-level pieces of a block's tensor-core GEMM tile (the conv's and the separable
// conv's mainloops share them; see "A block's GEMM tile" below):
//   MmaBlockTile<BM, BN, BK, WARPS_M, WARPS_N>   the warp grid, the padded shared row pitch kLd, and
//       ::warp(thread) / ::zero(acc) / ::multiply(acc, a_stage, b_stage, warp) / ::store(acc, c_tile, ...)
//   MmaStageChunks<ROWS, BK, THREADS>           a thread's 16-byte cp.async chunks of a [ROWS][BK] stage
//   is_aligned16(ptr)                           whether a pointer may be a 16-byte cp.async source
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

// --- A block's GEMM tile on tensor cores, over shared-memory stages ----------------------------------
// C (BM x BN, float32) += A (BM x BK) * B (BK x BN) per reduction step, A and B staged in shared memory
// as A[m][k] and B[n][k] (k contiguous in both, as an NHWC activation and a 1x1 / channels_last weight
// hold them), so every operand is a plain (non-transposed) ldmatrix. Rows are padded by kMmaRowPad
// elements: with BK % 16 == 0 the pitch is an odd number of 16-byte units, so the 8 row addresses of one
// 8x8 ldmatrix fall in 8 distinct 4-bank groups (no conflicts), and every 16-byte chunk of a row stays
// 16-byte aligned for cp.async (given a 16-byte aligned stage).
// WARPS_M x WARPS_N warps (warp w at row w / WARPS_N, column w % WARPS_N) each own a kWarpM x kWarpN
// sub-tile of MT x NT m16n8 fragments, their accumulators in registers (Acc; each fragment's d[0..3]
// are rows g and g + 8, columns 2t and 2t + 1, g = lane / 4, t = lane % 4).
constexpr int kMmaRowPad = 8;

template <int BM_, int BN_, int BK_, int WARPS_M, int WARPS_N>
struct MmaBlockTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int kWarpsM = WARPS_M, kWarpsN = WARPS_N;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = BM / kWarpsM, kWarpN = BN / kWarpsN;  // a warp's sub-tile
  static constexpr int MT = kWarpM / 16, NT = kWarpN / 8;            // its m16 x n8 fragments
  static constexpr int kLd = BK + kMmaRowPad;                          // shared row pitch, elements
  static_assert(BM % (16 * kWarpsM) == 0, "warp sub-tiles of whole m16 fragments");
  static_assert(BN % (16 * kWarpsN) == 0, "warp sub-tiles of whole n8 fragment pairs (one ldmatrix_x4 each)");
  static_assert(BK % 16 == 0, "reduction steps of whole k16 MMAs (and an odd-unit row pitch)");

  using Acc = float[MT][NT][4];

  // This thread's warp: the first row / column of its sub-tile, and its lane.
  struct Warp {
    int m0, n0, lane;
  };
  __device__ __forceinline__ static Warp warp(int thread) {
    const int w = thread / 32;
    return Warp{(w / kWarpsN) * kWarpM, (w % kWarpsN) * kWarpN, thread % 32};
  }

  __device__ __forceinline__ static void zero(Acc& acc) {
    FB_UNROLL
    for (int i = 0; i < MT; ++i)
      FB_UNROLL
      for (int j = 0; j < NT; ++j)
        FB_UNROLL
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  // One reduction step: acc += A stage (BM x BK, [m][kLd]) x B stage (BN x BK, [n][kLd]) over this warp's
  // sub-tile. The caller's barrier must make both stages visible first (a warp-level collective: all 32
  // lanes call it together).
  template <typename T>
  __device__ __forceinline__ static void multiply(Acc& acc, const T* a_stage, const T* b_stage, const Warp& w) {
    FB_UNROLL
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned af[MT][4], bf[NT][2];
      // A: matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a[0..3]; lane l gives
      // row l % 16 at k offset 8 (l / 16).
      FB_UNROLL
      for (int i = 0; i < MT; ++i)
        ldmatrix_x4(af[i], a_stage + (w.m0 + i * 16 + w.lane % 16) * kLd + kk + (w.lane / 16) * 8);
      // B, two n8 fragments per ldmatrix: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
      // (n 8-15, k 8-15) = b[0], b[1] of fragment j and of fragment j + 1.
      FB_UNROLL
      for (int j = 0; j < NT; j += 2) {
        unsigned r[4];
        ldmatrix_x4(r, b_stage + (w.n0 + j * 8 + w.lane % 8 + (w.lane / 16) * 8) * kLd + kk + ((w.lane / 8) % 2) * 8);
        bf[j][0] = r[0], bf[j][1] = r[1], bf[j + 1][0] = r[2], bf[j + 1][1] = r[3];
      }
      FB_UNROLL
      for (int i = 0; i < MT; ++i)
        FB_UNROLL
        for (int j = 0; j < NT; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bf[j]);
    }
  }

  // The accumulators of block rows [row_begin, row_begin + rows) into c_tile[(row - row_begin) * ldc + col]
  // (float32; row_begin and rows multiples of 16: whole fragments; the defaults store the whole tile), so an
  // epilogue can read them back in any thread order. An ldc of BN + 4 keeps each fragment store free of
  // bank conflicts.
  __device__ __forceinline__ static void store(const Acc& acc, float* c_tile, int ldc, const Warp& w,
                                               int row_begin = 0, int rows = BM) {
    const int g = w.lane / 4, t = w.lane % 4;  // groupID, threadID_in_group
    FB_UNROLL
    for (int i = 0; i < MT; ++i) {
      const int r = w.m0 + i * 16 - row_begin;
      if (r < 0 || r >= rows) continue;  // uniform across the warp
      FB_UNROLL
      for (int j = 0; j < NT; ++j)
        FB_UNROLL
        for (int e = 0; e < 4; ++e) c_tile[(r + g + (e / 2) * 8) * ldc + w.n0 + j * 8 + 2 * t + e % 2] = acc[i][j][e];
    }
  }
};

// A thread's share of the 16-byte chunks (8 elements) of a [ROWS][BK] stage: chunk column `col` of rows
// row(i) = row0 + i * kRowStep, i < kPasses; consecutive threads take consecutive chunks of a row, then the
// next row. Where the chunks do not split evenly over the threads, has(i) is false for rows past ROWS.
template <int ROWS, int BK, int THREADS>
struct MmaStageChunks {
  static constexpr int kCols = BK / 8;                  // chunks per row
  static constexpr int kRowStep = THREADS / kCols;      // rows between one thread's chunks
  static constexpr int kPasses = (ROWS + kRowStep - 1) / kRowStep;
  static constexpr bool kEven = ROWS % kRowStep == 0;
  static_assert(BK % 8 == 0 && THREADS % kCols == 0, "threads cover whole rows of 16-byte chunks");
  int col, row0;
  __device__ __forceinline__ explicit MmaStageChunks(int thread) : col(thread % kCols), row0(thread / kCols) {}
  __device__ __forceinline__ int row(int i) const { return row0 + i * kRowStep; }
  __device__ __forceinline__ bool has(int i) const { return kEven || row(i) < ROWS; }
  // The chunk's first element in a stage of row pitch ld.
  __device__ __forceinline__ int offset(int i, int ld) const { return row(i) * ld + col * 8; }
};

template <typename P>
__device__ __forceinline__ bool is_aligned16(const P* ptr) {
  return (reinterpret_cast<unsigned long long>(ptr) & 15ull) == 0;
}

}  // namespace fb
