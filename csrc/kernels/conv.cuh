// conv2d + BatchNorm (inference) / bias + activation (+ residual, + channel-slice output) as a
// tiled implicit GEMM.
//
// GEMM view, per group g (the CUDA counterpart of kernels/conv.py):
//   out[m, n] = sum_k A[m, k] * B[k, n]
//   m = (batch, oh, ow) output pixel, n = output channel of group g,
//   k = (kh, kw, c) with c an input channel of group g (c fastest: contiguous in NHWC).
// A is gathered from the input on the fly (no im2col buffer), B is the weight (logical
// OIHW, any strides, as the module holds it: BatchNorm is never folded into it). Each block
// stages a BM x BK tile of A and a BK x BN tile of B in shared memory as float32 and every
// thread accumulates a TM x TN sub-tile in float32 registers. Every tensor is addressed through its strides, so the input may be NCHW or
// NHWC and the output may be a channel slice of a larger tensor.
//
// The epilogue applies, per output channel in float32, v = acc * scale + shift from the conv bias
// and the BatchNorm tensors (ChannelAffine in common.cuh; each thread computes the coefficients of
// the columns it owns once), then adds the residual and applies the activation.
//
// Two variants share the tile loader and the epilogue: the plain one (shared memory +
// __syncthreads, float32 FMAs) runs under the host emulator and on any GPU; the tensor-core
// one (WMMA, float16 / bfloat16) is compiled and picked only for GPUs.
#pragma once

#include "common.cuh"

#ifndef FASTBONE_EMU
#include <mma.h>
#endif

namespace fb {

// Block tile shapes. The launchers (csrc/ops.cu and NvrtcRuntime in fastbone/cuda/ops.py)
// pick kConvWide for ordinary layers and kConvNarrow where a group has few output
// channels (depthwise / small grouped convs), so idle columns do not waste the block.
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct ConvTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
};
using ConvWide = ConvTile<64, 64, 16, 4, 4>;
using ConvNarrow = ConvTile<128, 16, 16, 8, 1>;
constexpr int kConvNarrowMaxCout = 16;  // C_out per group at or below which ConvNarrow is used

// The kernels' parameters, flat so NVRTC launches pass plain scalars; each kernel packs them
// into a ConvProblem for the shared loader and epilogue.
// bias, bn_*: float32 per output channel or nullptr (ChannelAffine); res: nullptr for no residual.
#define FB_CONV_PARAMS(T)                                                                                  \
  const T *__restrict__ x, const T *__restrict__ w, const float *__restrict__ bias,                         \
      const float *__restrict__ bn_weight, const float *__restrict__ bn_bias,                               \
      const float *__restrict__ bn_mean, const float *__restrict__ bn_var, const T *__restrict__ res,       \
      T *__restrict__ out, const float *__restrict__ in_scale, int M, int H, int W, int C_in_g, int OH, int OW, int C_out_g, int KH, int KW,    \
      long long sxn, long long sxc, long long sxh, long long sxw, long long swo, long long swc,             \
      long long swh, long long sww, long long srn, long long src, long long srh, long long srw,             \
      long long son, long long soc, long long soh, long long sow, int out_c_offset, int stride_h,           \
      int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, float eps, float slope, long long ssn
#define FB_CONV_PROBLEM(T)                                                                                  \
  ConvProblem<T> {                                                                                         \
    x, w, ChannelAffine{bias, bn_weight, bn_bias, bn_mean, bn_var, eps}, res, out, M, H, W, C_in_g, OH, OW, \
        C_out_g, KH, KW, sxn, sxc, sxh, sxw, swo, swc, swh, sww, srn, src, srh, srw, son, soc, soh, sow,    \
        out_c_offset, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope, in_scale, ssn                  \
  }

template <typename T>
struct ConvProblem {
  const T* x;
  const T* w;
  ChannelAffine affine;  // conv bias + BatchNorm, per output channel
  const T* res;  // nullptr: no residual
  T* out;
  int M, H, W, C_in_g, OH, OW, C_out_g, KH, KW;
  long long sxn, sxc, sxh, sxw, swo, swc, swh, sww, srn, src, srh, srw, son, soc, soh, sow;
  int out_c_offset, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  float slope;
  // nullptr, or float32 (images, C_in) with row stride ssn: the input is multiplied by it per (image,
  // input channel) as the loader reads it (the SE gate in front of a projection conv), so the scaled
  // activation never exists in memory. Last, so kernels that build a ConvProblem without it (fire.cuh)
  // get nullptr.
  const float* in_scale;
  long long ssn;
};

// Gathers the BM x BK tile of A (input windows) and the BK x BN tile of B (weights) of group g
// for reduction step k0. Thread t owns reduction column t % BK (consecutive threads read
// consecutive input channels: contiguous in NHWC) and rows t / BK + pass * kRowsPerPass.
// Values outside the input (padding), past M, past C_out_g or past K are zero.
template <typename T, int BM, int BN, int BK, int kThreads>
struct ConvTileLoader {
  static constexpr int kRowsPerPass = kThreads / BK;
  static_assert(kThreads % BK == 0, "threads must cover whole reduction columns");
  static_assert(BM % kRowsPerPass == 0 && BN % kRowsPerPass == 0, "tile rows must split evenly across passes");
  static constexpr int kAPasses = BM / kRowsPerPass;
  static constexpr int kBPasses = BN / kRowsPerPass;
  // A row past M gets a window corner so far outside the input that every tap reads as padding.
  static constexpr int kOutside = -(1 << 29);

  int k_col, row0;
  long long a_base[kAPasses];
  long long s_base[kAPasses];  // the row's first in_scale element (its image, group g)
  int a_ih0[kAPasses], a_iw0[kAPasses];
  long long b_base[kBPasses];
  bool b_ok[kBPasses];

  __device__ ConvTileLoader(const ConvProblem<T>& p, int g, int m0, int n0) {
    k_col = threadIdx.x % BK;
    row0 = threadIdx.x / BK;
    FB_UNROLL
    for (int i = 0; i < kAPasses; ++i) {
      const int m = m0 + row0 + i * kRowsPerPass;
      if (m < p.M) {
        const int ow = m % p.OW, oh = (m / p.OW) % p.OH, nb = m / (p.OW * p.OH);
        a_base[i] = nb * p.sxn + (long long)g * p.C_in_g * p.sxc;
        s_base[i] = nb * p.ssn + (long long)g * p.C_in_g;
        a_ih0[i] = oh * p.stride_h - p.pad_h;
        a_iw0[i] = ow * p.stride_w - p.pad_w;
      } else {
        a_base[i] = 0;
        s_base[i] = 0;
        a_ih0[i] = kOutside;
        a_iw0[i] = kOutside;
      }
    }
    FB_UNROLL
    for (int i = 0; i < kBPasses; ++i) {
      const int n = n0 + row0 + i * kRowsPerPass;
      b_ok[i] = n < p.C_out_g;
      b_base[i] = (long long)(g * p.C_out_g + (b_ok[i] ? n : 0)) * p.swo;
    }
  }

  // put_a(m_in_tile, k_in_tile, value), put_b(k_in_tile, n_in_tile, value); values of type T.
  template <typename PutA, typename PutB>
  __device__ __forceinline__ void load(const ConvProblem<T>& p, int k0, PutA put_a, PutB put_b) const {
    const T zero = from_float<T>(0.0f);
    const int K = p.C_in_g * p.KH * p.KW;
    const int k = k0 + k_col;
    const bool k_ok = k < K;
    const int c = k_ok ? k % p.C_in_g : 0;
    const int tap = k_ok ? k / p.C_in_g : 0;
    const int kw = tap % p.KW, kh = tap / p.KW;
    const int dh = kh * p.dil_h, dw = kw * p.dil_w;
    const long long x_koff = c * p.sxc;
    const long long w_koff = c * p.swc + kh * p.swh + kw * p.sww;
    FB_UNROLL
    for (int i = 0; i < kAPasses; ++i) {
      const int ih = a_ih0[i] + dh, iw = a_iw0[i] + dw;
      const bool inside = k_ok && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
      T v = inside ? p.x[a_base[i] + ih * p.sxh + iw * p.sxw + x_koff] : zero;
      // Rounded back to T, as torch's x * gate in x's dtype before the conv (a run-time branch: one
      // instantiation serves both).
      if (p.in_scale != nullptr && inside) v = from_float<T>(to_float(v) * p.in_scale[s_base[i] + c]);
      put_a(row0 + i * kRowsPerPass, k_col, v);
    }
    FB_UNROLL
    for (int i = 0; i < kBPasses; ++i)
      put_b(k_col, row0 + i * kRowsPerPass, (k_ok && b_ok[i]) ? p.w[b_base[i] + w_koff] : zero);
  }
};

// The epilogue coefficients of column n of group g (an identity past C_out_g: never stored).
template <typename T>
__device__ __forceinline__ ChannelAffine::Coeffs conv_coeffs(const ConvProblem<T>& p, int g, int n) {
  return n < p.C_out_g ? p.affine.at(g * p.C_out_g + n) : ChannelAffine::Coeffs{1.0f, 0.0f};
}

// out[m, n] of group g = act(acc * scale + shift (+ residual)), rounded to T, stored into the
// channel slice; `c` = conv_coeffs(p, g, n).
template <typename T, int ACT>
__device__ __forceinline__ void conv_store(const ConvProblem<T>& p, int g, int m, int n, float acc,
                                           ChannelAffine::Coeffs c) {
  if (m >= p.M || n >= p.C_out_g) return;
  const int ow = m % p.OW, oh = (m / p.OW) % p.OH, nb = m / (p.OW * p.OH);
  const int oc = g * p.C_out_g + n;
  float v = c.apply(acc);
  if (p.res != nullptr) v += to_float(p.res[nb * p.srn + oh * p.srh + ow * p.srw + oc * p.src]);
  p.out[nb * p.son + oh * p.soh + ow * p.sow + (long long)(p.out_c_offset + oc) * p.soc] =
      from_float<T>(activate<ACT>(v, p.slope));
}

// The plain (SIMT) variant: tiles staged as float32, each thread accumulates TM x TN outputs.
template <typename T, int ACT, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN)) conv_bn_act_kernel(FB_CONV_PARAMS(T)) {
  constexpr int kThreads = (BM / TM) * (BN / TN);
  const ConvProblem<T> p = FB_CONV_PROBLEM(T);
  // +1 column: the loader writes down a column (fixed k, consecutive m), which would
  // otherwise hit one shared-memory bank.
  __shared__ float a_tile[BK][BM + 1];
  __shared__ float b_tile[BK][BN + 1];

  const int g = blockIdx.z;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const ConvTileLoader<T, BM, BN, BK, kThreads> loader(p, g, m0, n0);
  // Thread (tm, tn) owns rows tm + i * (BM / TM) and columns tn + j * (BN / TN), so
  // neighbouring threads store neighbouring output channels (contiguous in NHWC).
  const int tn = threadIdx.x % (BN / TN), tm = threadIdx.x / (BN / TN);
  float acc[TM][TN];
  FB_UNROLL
  for (int i = 0; i < TM; ++i)
    FB_UNROLL
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  const int K = C_in_g * KH * KW;
  for (int k0 = 0; k0 < K; k0 += BK) {
    loader.load(p, k0, [&](int m, int k, T v) { a_tile[k][m] = to_float(v); },
                [&](int k, int n, T v) { b_tile[k][n] = to_float(v); });
    __syncthreads();
    FB_UNROLL
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
      FB_UNROLL
      for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][tm + i * (BM / TM)];
      FB_UNROLL
      for (int j = 0; j < TN; ++j) b[j] = b_tile[kk][tn + j * (BN / TN)];
      FB_UNROLL
      for (int i = 0; i < TM; ++i)
        FB_UNROLL
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten by the next step's loads
  }
  FB_UNROLL
  for (int j = 0; j < TN; ++j) {
    const int n = n0 + tn + j * (BN / TN);
    const ChannelAffine::Coeffs c = conv_coeffs(p, g, n);  // once per owned column
    FB_UNROLL
    for (int i = 0; i < TM; ++i) conv_store<T, ACT>(p, g, m0 + tm + i * (BM / TM), n, acc[i][j], c);
  }
}

#ifndef FASTBONE_EMU
// The tensor-core variant for float16 / bfloat16 (WMMA 16x16x16, float32 accumulators), GPU
// only: the emulator has no tensor cores, so the emulation build never compiles it and the
// launchers pick it only in the nvcc / NVRTC builds. A 64x64 block tile over 4 warps, each
// warp owning a 32x32 quarter as 2x2 fragments; the accumulators go through shared memory so
// the epilogue is the plain variant's conv_store.
constexpr int kConvTcBM = 64, kConvTcBN = 64, kConvTcBK = 16, kConvTcThreads = 128;

// bfloat16 WMMA needs sm_80; the launchers check the device's compute capability against this.
#define FB_CONV_TC_MIN_CC 80
constexpr int kConvTcMinCC = FB_CONV_TC_MIN_CC;

template <typename T, int ACT>
__global__ void __launch_bounds__(kConvTcThreads) conv_bn_act_tc_kernel(FB_CONV_PARAMS(T)) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < FB_CONV_TC_MIN_CC * 10
  __trap();  // compiled for an older GPU (FASTBONE_CUDA_ARCHS): never launched there
#else
  using namespace nvcuda;
  constexpr int BM = kConvTcBM, BN = kConvTcBN, BK = kConvTcBK;
  // Leading dimensions: multiples of 8 elements (16-bit) / 4 (float) as WMMA requires, padded
  // off powers of two against bank conflicts; every fragment pointer stays 32-byte aligned.
  constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;
  const ConvProblem<T> p = FB_CONV_PROBLEM(T);
  __shared__ __align__(32) T a_tile[BM][LDA];
  __shared__ __align__(32) T b_tile[BK][LDB];
  __shared__ __align__(32) float c_tile[BM][LDC];

  const int g = blockIdx.z;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const ConvTileLoader<T, BM, BN, BK, kConvTcThreads> loader(p, g, m0, n0);
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  FB_UNROLL
  for (int i = 0; i < 2; ++i)
    FB_UNROLL
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int K = C_in_g * KH * KW;
  for (int k0 = 0; k0 < K; k0 += BK) {
    loader.load(p, k0, [&](int m, int k, T v) { a_tile[m][k] = v; }, [&](int k, int n, T v) { b_tile[k][n] = v; });
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
    FB_UNROLL
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &a_tile[wm * 32 + i * 16][0], LDA);
    FB_UNROLL
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &b_tile[0][wn * 32 + j * 16], LDB);
    FB_UNROLL
    for (int i = 0; i < 2; ++i)
      FB_UNROLL
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    __syncthreads();
  }
  FB_UNROLL
  for (int i = 0; i < 2; ++i)
    FB_UNROLL
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&c_tile[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  // Consecutive threads store consecutive output channels (contiguous in NHWC); each thread
  // keeps one column, so it computes that channel's coefficients once.
  static_assert(kConvTcThreads % BN == 0, "each thread stores a single output column");
  const int col = threadIdx.x % BN;
  const ChannelAffine::Coeffs c = conv_coeffs(p, g, n0 + col);
  for (int row = threadIdx.x / BN; row < BM; row += kConvTcThreads / BN)
    conv_store<T, ACT>(p, g, m0 + row, n0 + col, c_tile[row][col], c);
#endif  // __CUDA_ARCH__
}
#endif  // FASTBONE_EMU

}  // namespace fb
