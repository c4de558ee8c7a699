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
// __syncthreads, float32 FMAs) for float32 and GPUs before sm_80; the tensor-core one (float16 /
// bfloat16: a multi-stage cp.async pipeline feeding ldmatrix + mma.sync, kernels/mma.cuh), which the
// launchers pick on sm_80+ GPUs. Both compile in all three builds: the emulator runs the tensor-core
// variant too (FASTBONE_CUDA_CONV_MMA, csrc/ops.cu), so CI checks its indexing and pipelining.
#pragma once

#include "common.cuh"
#include "mma.cuh"

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
      int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, float eps, float slope, long long ssn,     \
      int residual_after_act
#define FB_CONV_PROBLEM(T)                                                                                  \
  ConvProblem<T> {                                                                                         \
    x, w, ChannelAffine{bias, bn_weight, bn_bias, bn_mean, bn_var, eps}, res, out, M, H, W, C_in_g, OH, OW, \
        C_out_g, KH, KW, sxn, sxc, sxh, sxw, swo, swc, swh, sww, srn, src, srh, srw, son, soc, soh, sow,    \
        out_c_offset, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope, in_scale, ssn,                 \
        residual_after_act                                                                                 \
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
  // Nonzero: out = act(v) + residual (torchvision's FusedMBConv without expansion adds its input after
  // the SiLU); zero: act(v + residual). Last, so kernels that build a ConvProblem without it get 0.
  int residual_after_act;
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
    load_a(p, k0, put_a);
    load_b(p, k0, put_b);
  }

  // This thread's reduction column k0 + k_col decoded: (input channel c, tap kh, kw); ok false past K.
  struct KTap {
    bool ok;
    int c, kh, kw;
  };
  __device__ __forceinline__ KTap k_tap(const ConvProblem<T>& p, int k0) const {
    const int k = k0 + k_col;
    const bool ok = k < p.C_in_g * p.KH * p.KW;
    const int c = ok ? k % p.C_in_g : 0;
    const int tap = ok ? k / p.C_in_g : 0;
    return KTap{ok, c, tap / p.KW, tap % p.KW};
  }

  // The A tile alone (the tensor-core variant stages B with asynchronous copies where it can).
  template <typename PutA>
  __device__ __forceinline__ void load_a(const ConvProblem<T>& p, int k0, PutA put_a) const {
    const T zero = from_float<T>(0.0f);
    const KTap t = k_tap(p, k0);
    const bool k_ok = t.ok;
    const int c = t.c;
    const int dh = t.kh * p.dil_h, dw = t.kw * p.dil_w;
    const long long x_koff = c * p.sxc;
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
  }

  // The B tile alone.
  template <typename PutB>
  __device__ __forceinline__ void load_b(const ConvProblem<T>& p, int k0, PutB put_b) const {
    const T zero = from_float<T>(0.0f);
    const KTap t = k_tap(p, k0);
    const bool k_ok = t.ok;
    const long long w_koff = t.c * p.swc + t.kh * p.swh + t.kw * p.sww;
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

// out[m, n] of group g = act(acc * scale + shift (+ residual)), or act(acc * scale + shift) + residual
// with p.residual_after_act, rounded to T, stored into the channel slice; `c` = conv_coeffs(p, g, n).
template <typename T, int ACT>
__device__ __forceinline__ void conv_store(const ConvProblem<T>& p, int g, int m, int n, float acc,
                                           ChannelAffine::Coeffs c) {
  if (m >= p.M || n >= p.C_out_g) return;
  const int ow = m % p.OW, oh = (m / p.OW) % p.OH, nb = m / (p.OW * p.OH);
  const int oc = g * p.C_out_g + n;
  float v = c.apply(acc);
  const float r = p.res != nullptr ? to_float(p.res[nb * p.srn + oh * p.srh + ow * p.srw + oc * p.src]) : 0.0f;
  v = p.residual_after_act ? activate<ACT>(v, p.slope) + r : activate<ACT>(v + r, p.slope);
  p.out[nb * p.son + oh * p.soh + ow * p.sow + (long long)(p.out_c_offset + oc) * p.soc] = from_float<T>(v);
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

// --- the tensor-core variant (float16 / bfloat16, sm_80+) -----------------------------------
// A BM x BN block tile over (BM / 2) x 32 warp tiles (2 x BN / 32 warps), reduction steps of BK = 32
// staged through kStages buffers of dynamic shared memory: while the warps multiply step kt (ldmatrix
// + mma.sync m16n8k16, float32 accumulators in registers), the copies of steps kt + 1 .. kt + kStages - 1
// are in flight. Shared layout: A as [m][k] and B as [n][k] (k contiguous in both, as an NHWC input and
// a channels_last / 1x1 weight hold them), so every operand is a plain (non-transposed) ldmatrix; rows
// padded by 8 elements (80 bytes) so the 8 row addresses of one 8x8 ldmatrix fall in 8 distinct 4-bank
// groups, and every 16-byte chunk stays 16-byte aligned for cp.async.
// Staging, decided per launch at run time (one instantiation serves both; the branch is uniform):
//   A: 16-byte cp.async of 8 input channels when the input's channel stride is 1, C_in_g % 8 == 0, the
//      pointer and the other strides are 16-byte multiples, and there is no in_scale (a copy cannot
//      scale); zero-filled where the window leaves the image, past M or past K.
//   B: likewise when the weight's input-channel stride is 1 (channels_last weights, 1x1 convs).
//   Otherwise ConvTileLoader gathers that operand element by element and stores the stage directly
//   (synchronously; same pipeline, same barriers).
// The epilogue writes the accumulators (d[0..3] of each m16n8 fragment: rows g and g + 8, columns 2t and
// 2t + 1) to shared memory, then stores through conv_coeffs / conv_store, as the plain variant does.
template <int BM_, int BN_>
struct ConvMmaTile {
  static constexpr int BM = BM_, BN = BN_, BK = 32;
  static constexpr int kWarpsM = 2, kWarpsN = BN / 32;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kStages = 4;
  static constexpr int kLd = BK + 8;  // shared row pitch in elements (see above)
  static constexpr int kSmemBytes = kStages * (BM + BN) * kLd * 2;
  static_assert(BM % 32 == 0 && BN % 32 == 0, "warp tiles are (BM / 2) x 32");
  static_assert((BM * BK / 8) % kThreads == 0 && (BN * BK / 8) % kThreads == 0, "16-byte chunks split evenly");
};
// The launchers (csrc/ops.cu, NvrtcRuntime in fastbone/cuda/ops.py) take the large tile where C_out per
// group fills it and the large tiles still give kConvMmaLargeMinBlocks blocks (two waves of a 132-SM
// GPU at two blocks per SM), the small one otherwise.
using ConvMmaLarge = ConvMmaTile<128, 128>;
using ConvMmaSmall = ConvMmaTile<64, 64>;
constexpr int kConvMmaLargeMinCout = 128;
constexpr int kConvMmaLargeMinBlocks = 264;
constexpr int kConvMmaMinCC = FB_MMA_MIN_CC;

template <typename P>
__device__ __forceinline__ bool aligned16(const P* ptr) {
  return (reinterpret_cast<unsigned long long>(ptr) & 15ull) == 0;
}

template <typename T, int ACT, int BM, int BN>
__global__ void __launch_bounds__((ConvMmaTile<BM, BN>::kThreads)) conv_bn_act_mma_kernel(FB_CONV_PARAMS(T)) {
#ifdef FB_MMA_UNSUPPORTED
  __trap();  // compiled for a GPU before sm_80 (FASTBONE_CUDA_ARCHS): never launched there
#else
  using Tile = ConvMmaTile<BM, BN>;
  constexpr int BK = Tile::BK, LD = Tile::kLd, S = Tile::kStages, kThreads = Tile::kThreads;
  constexpr int kWarpM = BM / Tile::kWarpsM, kWarpN = BN / Tile::kWarpsN;
  constexpr int MT = kWarpM / 16, NT = kWarpN / 8;  // m16 x n8 fragments per warp
  constexpr int kChunkCols = BK / 8;                 // 16-byte chunks per shared row
  constexpr int kRowStep = kThreads / kChunkCols;    // rows between one thread's chunks
  constexpr int kAChunks = BM / kRowStep, kBChunks = BN / kRowStep;
  constexpr int kBand = kThreads / BK;               // rows of one pass of the element gather
  const ConvProblem<T> p = FB_CONV_PROBLEM(T);
  FB_KERNEL_DYNAMIC_SMEM_FLOAT(smem);
  T* const a_smem = reinterpret_cast<T*>(smem);  // [S][BM][LD]
  T* const b_smem = a_smem + S * BM * LD;        // [S][BN][LD]

  const int g = blockIdx.z;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int K = C_in_g * KH * KW, k_tiles = (K + BK - 1) / BK;
  // 8 consecutive k are 8 input channels of one tap when C_in_g % 8 == 0 (k0 steps by 32). The stride of a
  // size-1 dimension never multiplies a non-zero index (a 1x1 OIHW weight has swh = sww = 1): not checked.
  const bool a_vec = C_in_g % 8 == 0 && sxc == 1 && in_scale == nullptr && aligned16(x) && sxn % 8 == 0 &&
                     (H == 1 || sxh % 8 == 0) && (W == 1 || sxw % 8 == 0);
  const bool b_vec = C_in_g % 8 == 0 && swc == 1 && aligned16(w) && swo % 8 == 0 && (KH == 1 || swh % 8 == 0) &&
                     (KW == 1 || sww % 8 == 0);

  // This thread's 16-byte chunks: column chunk_col of rows chunk_row + i * kRowStep (A and B alike).
  const int chunk_col = threadIdx.x % kChunkCols, chunk_row = threadIdx.x / kChunkCols;
  long long a_off[kAChunks];
  int a_ih0[kAChunks], a_iw0[kAChunks];
  FB_UNROLL
  for (int i = 0; i < kAChunks; ++i) {
    const int m = m0 + chunk_row + i * kRowStep;
    const bool ok = m < M;
    const int mm = ok ? m : 0;
    const int ow = mm % OW, oh = (mm / OW) % OH, nb = mm / (OW * OH);
    a_off[i] = nb * sxn + (long long)g * C_in_g;  // sxc == 1 wherever it is used
    // A row past M gets a window corner far outside the input: every tap reads as padding.
    a_ih0[i] = ok ? oh * stride_h - pad_h : ConvTileLoader<T, BM, BN, BK, kThreads>::kOutside;
    a_iw0[i] = ok ? ow * stride_w - pad_w : ConvTileLoader<T, BM, BN, BK, kThreads>::kOutside;
  }
  long long b_off[kBChunks];
  bool b_ok[kBChunks];
  FB_UNROLL
  for (int i = 0; i < kBChunks; ++i) {
    const int n = n0 + chunk_row + i * kRowStep;
    b_ok[i] = n < C_out_g;
    b_off[i] = (long long)(g * C_out_g + (b_ok[i] ? n : 0)) * swo;
  }

  // Stages reduction step kt into buffer `stage`: copies issued (not waited for), or stored directly.
  auto load_stage = [&](int kt, int stage) {
    T* const as = a_smem + stage * BM * LD;
    T* const bs = b_smem + stage * BN * LD;
    const int k0 = kt * BK;
    const int k = k0 + chunk_col * 8;
    const bool k_ok = k < K;
    const int c = k_ok ? k % C_in_g : 0, tap = k_ok ? k / C_in_g : 0;
    const int kw = tap % KW, kh = tap / KW;
    if (a_vec) {
      FB_UNROLL
      for (int i = 0; i < kAChunks; ++i) {
        const int ih = a_ih0[i] + kh * dil_h, iw = a_iw0[i] + kw * dil_w;
        const bool ok = k_ok && ih >= 0 && ih < H && iw >= 0 && iw < W;
        const T* src = ok ? x + a_off[i] + ih * sxh + iw * sxw + c : x;
        cp_async_16(as + (chunk_row + i * kRowStep) * LD + chunk_col * 8, src, ok);
      }
    }
    if (b_vec) {
      const long long w_koff = c + kh * swh + kw * sww;
      FB_UNROLL
      for (int i = 0; i < kBChunks; ++i) {
        const bool ok = k_ok && b_ok[i];
        cp_async_16(bs + (chunk_row + i * kRowStep) * LD + chunk_col * 8, ok ? w + b_off[i] + w_koff : w, ok);
      }
    }
    // The gather, one band of kBand rows (one element per thread) at a time: a loader per band keeps
    // its per-row state out of the registers the accumulators need, and the loop is not unrolled, so
    // the fallback costs little code (compile time) in each of the kernel's instantiations.
    using Band = ConvTileLoader<T, kBand, kBand, BK, kThreads>;
    if (!a_vec) {
FB_UNROLL_BY(1)
      for (int r = 0; r < BM; r += kBand)
        Band(p, g, m0 + r, 0).load_a(p, k0, [&](int m, int kk, T v) { as[(r + m) * LD + kk] = v; });
    }
    if (!b_vec) {
FB_UNROLL_BY(1)
      for (int r = 0; r < BN; r += kBand)
        Band(p, g, 0, n0 + r).load_b(p, k0, [&](int kk, int n, T v) { bs[(r + n) * LD + kk] = v; });
    }
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m0 = (warp / Tile::kWarpsN) * kWarpM, warp_n0 = (warp % Tile::kWarpsN) * kWarpN;
  float acc[MT][NT][4];
  FB_UNROLL
  for (int i = 0; i < MT; ++i)
    FB_UNROLL
    for (int j = 0; j < NT; ++j)
      FB_UNROLL
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // Prologue: steps 0 .. S - 2 in flight, one commit group each (empty groups past the end keep the
  // group count, and so the wait below, uniform).
  FB_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // Step kt's group is complete once at most S - 2 newer ones are pending; the barrier then makes
    // every thread's copies (and direct stores) visible, and guarantees that every warp has finished
    // step kt - 1, whose buffer the prefetch below overwrites.
    cp_async_wait<S - 2>();
    __syncthreads();
    if (kt + S - 1 < k_tiles) load_stage(kt + S - 1, (kt + S - 1) % S);
    cp_async_commit();

    const T* const as = a_smem + (kt % S) * BM * LD;
    const T* const bs = b_smem + (kt % S) * BN * LD;
    FB_UNROLL
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned af[MT][4], bf[NT][2];
      // A: matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a[0..3]; lane l gives
      // row l % 16 at k offset 8 (l / 16).
      FB_UNROLL
      for (int i = 0; i < MT; ++i)
        ldmatrix_x4(af[i], as + (warp_m0 + i * 16 + lane % 16) * LD + kk + (lane / 16) * 8);
      // B, two n8 fragments per ldmatrix: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
      // (n 8-15, k 8-15) = b[0], b[1] of fragment j and of fragment j + 1.
      FB_UNROLL
      for (int j = 0; j < NT; j += 2) {
        unsigned r[4];
        ldmatrix_x4(r, bs + (warp_n0 + j * 8 + lane % 8 + (lane / 16) * 8) * LD + kk + ((lane / 8) % 2) * 8);
        bf[j][0] = r[0], bf[j][1] = r[1], bf[j + 1][0] = r[2], bf[j + 1][1] = r[3];
      }
      FB_UNROLL
      for (int i = 0; i < MT; ++i)
        FB_UNROLL
        for (int j = 0; j < NT; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();  // nothing is left in flight (the trailing groups are empty)
  __syncthreads();     // every warp is done with the stages: the accumulators reuse that memory

  // The accumulators go through shared memory (BM x (BN + 4) float32, within the stages' bytes), so the
  // epilogue is one compact loop in which consecutive threads store consecutive output channels
  // (contiguous in NHWC) and each thread keeps one column: its coefficients are computed once.
  constexpr int LDC = BN + 4;
  static_assert(BM * LDC * 4 <= Tile::kSmemBytes, "the accumulator tile fits the pipeline's shared memory");
  static_assert(kThreads % BN == 0, "each thread stores a single output column");
  float* const c_tile = smem;
  const int lg = lane / 4, lt = lane % 4;  // groupID, threadID_in_group
  FB_UNROLL
  for (int i = 0; i < MT; ++i)
    FB_UNROLL
    for (int j = 0; j < NT; ++j)
      FB_UNROLL
      for (int e = 0; e < 4; ++e)
        c_tile[(warp_m0 + i * 16 + lg + (e / 2) * 8) * LDC + warp_n0 + j * 8 + 2 * lt + e % 2] = acc[i][j][e];
  __syncthreads();
  const int col = threadIdx.x % BN;
  const ChannelAffine::Coeffs c = conv_coeffs(p, g, n0 + col);
FB_UNROLL_BY(4)
  for (int row = threadIdx.x / BN; row < BM; row += kThreads / BN)
    conv_store<T, ACT>(p, g, m0 + row, n0 + col, c_tile[row * LDC + col], c);
#endif  // FB_MMA_UNSUPPORTED
}

}  // namespace fb
