// Depthwise separable convolution, fused (the CUDA counterpart of kernels/depthwise.py):
//
// 1. depthwise_conv_bn_act_kernel: act(bn(depthwise_conv2d(x, w) + bias) [+ residual]) into a
//    channel slice of `out`. Output channel oc reads input channel oc / mult (C_out = mult * C_in).
//    A block owns a work item = (image, tile_h x tile_w output pixels, cb output channels). It
//    loads the input region under the tile (the tile plus its halo) for the channels it needs into
//    shared memory once, as float32, consecutive threads reading consecutive channels (contiguous
//    in NHWC); then thread t computes output channel t % cb for the pixels t / cb, t / cb + 256 / cb,
//    ... from that tile. KS = 3 / 5 / 7 keeps a square kernel's taps in registers; KS = 0 takes any
//    KH x KW, its taps staged in shared memory. POOL (a template flag) adds the squeeze-excitation
//    pool's per-(image, tile, channel) partial sums of the stored output to the epilogue.
//
// 2. separable_conv_bn_act_kernel: the depthwise -> pointwise block in one launch,
//      out = act_pw(bn_pw(W_pw . D) [+ residual]),  D[p, k] = act_dw(bn_dw(depthwise(x))[p, order[k]])
//    A block owns (image, a tile of <= BM output pixels, pointwise group g, BN output channels).
//    Its K loop walks the group's pointwise input channels BK at a time: the block stages the input
//    region of those channels' depthwise sources in shared memory, computes their depthwise output
//    for the tile (BatchNorm and activation applied) straight into the GEMM's A tile in shared
//    memory, stages the BK x BN pointwise weights as the B tile and accumulates. The depthwise
//    output never goes to global memory. `order` (int64, nullptr for the identity) is the channel
//    order between the two convs (ShuffleNet v1's shuffle): pointwise input channel k reads
//    depthwise channel order[k]; an index outside [0, C_dw) reads as NaN (a loud answer, not a fault).
//
// Both epilogues apply BatchNorm per channel in float32 exactly as the conv does (ChannelAffine in
// common.cuh). Blocks loop over work items (grid-stride), so the grid stays within CUDA's limits
// for any N, C and image size; offsets are 64-bit. A work item is (image, r) with r < per_image, the
// items of one image (< 2^31, the launchers check): the loop steps r in 32 bits and carries into the
// image index (WorkCursor), so no 64-bit division (a called subroutine that spills) is ever needed. The depthwise input region and taps live in
// dynamic shared memory sized by the launchers (csrc/depthwise_ops.cu and DepthwiseNvrtcMixin in
// fastbone/cuda/depthwise_launch.py choose the tile so it fits kDwSmemBudget).
//
// Plain CUDA (shared memory + __syncthreads). The separable kernel also has a tensor-core variant
// (float16 / bfloat16, sm_80+: ldmatrix + mma.sync on a cp.async-fed B pipeline, kernels/mma.cuh) for its
// pointwise GEMM; all of it runs under the host emulator too (FASTBONE_CUDA_SEPARABLE_MMA=1,
// csrc/depthwise_ops.cu).
#pragma once

#include "common.cuh"
#include "mma.cuh"

// The launch's dynamic shared memory as float* (launch.h's FB_DYNAMIC_SMEM pulls in host headers,
// which NVRTC does not have; this spells the same thing for all three builds). The tensor-core
// epilogue stages float32 accumulators there (16-byte alignment would do).
#ifdef FASTBONE_EMU
#define FB_DW_DYNAMIC_SMEM(name) float* name = static_cast<float*>(::fb_emu::dynamic_smem())
#else
#define FB_DW_DYNAMIC_SMEM(name)                                      \
  extern __shared__ __align__(32) unsigned char fb_dw_dynamic_smem_[]; \
  float* name = reinterpret_cast<float*>(fb_dw_dynamic_smem_)
#endif

namespace fb {

// --- launch geometry (mirrored by fastbone/cuda/depthwise_launch.py; tests compare) ----------
constexpr int kDwThreads = 256;          // threads per block, both kernels
constexpr int kDwTilePixels = 64;        // output pixels per block tile, before shrinking to fit
constexpr int kDwTileMaxW = 8;           // ... at most this many of them along a row
constexpr int kDwSmemBudget = 32 * 1024; // dynamic shared memory per block (bytes)
constexpr int kDwMaxBlocks = 65536;      // grid cap: blocks loop over the remaining work items
constexpr int kDwMinChannelBlock = 16;   // depthwise: output channels per block, 16 / 32 / 64
constexpr int kDwMaxChannelBlock = 64;
constexpr int kSepBM = 64, kSepBK = 16, kSepTM = 4;  // separable: pixels, K step, rows per thread
// Separable kernels' __launch_bounds__ minimum blocks per SM: 2 gives each thread up to 128 registers,
// which holds the accumulators, the depthwise stage and the addressing without spilling (without the
// hint ptxas aims at 64 / 80 registers and spills; the test of spills compiles every instantiation).
constexpr int kSepMinBlocks = 2;
// Separable column tiles (output channels per block): 16, 64, 128 (TN = BN / 16 per thread).
// The tensor-core variant's epilogue stages its float32 accumulators in the dynamic shared memory, in
// bands of whole rows of pitch BN + 4 (all 64 rows of BN = 64 at once, two bands of 32 for BN = 128);
// its launch plan sizes the dynamic shared memory to at least this (in every build, so the plans the
// emulator exports match the GPU's).
constexpr int kSepTcScratchBytes = kSepBM * (64 + 4) * 4;

// The grid-stride walk over work items (image nb, item r of that image): blockIdx.x, then every
// gridDim.x-th. per_image < 2^31 and gridDim.x <= kDwMaxBlocks, so r + gridDim.x fits 32 bits.
struct WorkCursor {
  long long nb;
  unsigned r, per_image;
  __device__ __forceinline__ explicit WorkCursor(unsigned per_image_) : per_image(per_image_) {
    nb = blockIdx.x / per_image;
    r = blockIdx.x % per_image;
  }
  __device__ __forceinline__ void next() {
    r += gridDim.x;
    nb += r / per_image;
    r %= per_image;
  }
};

// (RH, RW) input rows / columns under a tile_h x tile_w output tile.
__host__ __device__ __forceinline__ int dw_region(int tile, int kernel, int stride, int dilation) {
  return (tile - 1) * stride + (kernel - 1) * dilation + 1;
}

// ============================================================================================
// 1. depthwise conv + BatchNorm / bias + activation (+ residual, + channel slice)
// ============================================================================================

// bias, bn_*: float32 per output channel or nullptr (ChannelAffine); res: nullptr for none.
// w: (C_out, 1, KH, KW) by strides; an image's work items: tiles_h * tiles_w * ceil(C_out / cb).
// POOL: the epilogue also writes the squeeze-excitation pool's partial sums, pool_sums (N, tiles_h *
// tiles_w, C_out) float32 contiguous: entry (image, tile, channel) = the sum of the channel's stored
// outputs (rounded to T, as a mean of the stored tensor adds them) over the tile. One block owns each
// entry and adds in a fixed order (per thread over its pixels, then over the threads in shared
// memory): deterministic, no atomics and no zero fill.
// POOL's launch bounds ask for 2 blocks per SM (up to 128 registers a thread): with the plain bound
// ptxas aimed at 64 / 80 registers and spilled 12-24 bytes (tests/test_cuda_spills.py).
template <typename T, int ACT, int KS, bool POOL>
__global__ void __launch_bounds__(kDwThreads, POOL ? kSepMinBlocks : 1)
depthwise_conv_bn_act_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ bias,
                             const float* __restrict__ bn_weight, const float* __restrict__ bn_bias,
                             const float* __restrict__ bn_mean, const float* __restrict__ bn_var,
                             const T* __restrict__ res, T* __restrict__ out, float* __restrict__ pool_sums,
                             int H, int W, int C_out, int OH, int OW, int KH, int KW, int mult,
                             long long sxn, long long sxc, long long sxh, long long sxw,
                             long long swo, long long swh, long long sww,
                             long long srn, long long src, long long srh, long long srw,
                             long long son, long long soc, long long soh, long long sow,
                             int out_c_offset, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h,
                             int dil_w, int tile_h, int tile_w, int cb, long long N, float eps, float slope) {
  static_assert(KS == 0 || KS == 3 || KS == 5 || KS == 7, "KS: 0 (any KH x KW) or a square 3 / 5 / 7");
  constexpr int KQ = KS > 0 ? KS : 1;  // the register taps' side (unused when KS == 0)
  __shared__ float pool_s[POOL ? kDwThreads : 1];  // POOL: the threads' partial sums, [slot][lane]
  FB_DW_DYNAMIC_SMEM(smem);
  const int RH = dw_region(tile_h, KH, stride_h, dil_h), RW = dw_region(tile_w, KW, stride_w, dil_w);
  float* const x_s = smem;                // [RH * RW][cb]: the input region, channel fastest
  float* const w_s = smem + RH * RW * cb; // [KH * KW][cb]: the taps (KS == 0 only)
  const int tiles_w = (OW + tile_w - 1) / tile_w, tiles_h = (OH + tile_h - 1) / tile_h;
  const int cblocks = (C_out + cb - 1) / cb;
  const int lane = threadIdx.x % cb, slot = threadIdx.x / cb, slots = kDwThreads / cb;
  const int taps = KH * KW;
  const ChannelAffine affine{bias, bn_weight, bn_bias, bn_mean, bn_var, eps};

  for (WorkCursor cur((unsigned)(tiles_h * tiles_w * cblocks)); cur.nb < N; cur.next()) {
    const long long nb = cur.nb;
    const int cblk = (int)(cur.r % cblocks);
    const int rest = (int)(cur.r / cblocks);
    const int tw_i = rest % tiles_w, th_i = rest / tiles_w;
    const int c0 = cblk * cb, c_end = min(c0 + cb, C_out);
    const int oh0 = th_i * tile_h, ow0 = tw_i * tile_w;
    // The input channels this block's output channels read: ic0 .. ic0 + icn - 1.
    const int ic0 = c0 / mult, icn = (c_end - 1) / mult - ic0 + 1;
    const int ih0 = oh0 * stride_h - pad_h, iw0 = ow0 * stride_w - pad_w;
    const long long x_base = nb * sxn + ic0 * sxc;
    for (int idx = threadIdx.x; idx < RH * RW * icn; idx += kDwThreads) {
      const int c = idx % icn, pix = idx / icn;
      const int ih = ih0 + pix / RW, iw = iw0 + pix % RW;
      const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
      x_s[pix * cb + c] = inside ? to_float(x[x_base + ih * sxh + iw * sxw + c * sxc]) : 0.0f;
    }
    const int oc = c0 + lane;
    const bool c_ok = oc < C_out;
    float w_r[KQ * KQ];
    if (KS == 0) {
      for (int idx = threadIdx.x; idx < taps * cb; idx += kDwThreads) {
        const int c = c0 + idx % cb, t = idx / cb;
        w_s[idx] = c < C_out ? to_float(w[c * swo + (t / KW) * swh + (t % KW) * sww]) : 0.0f;
      }
    } else if (c_ok) {  // KS > 0
      FB_UNROLL
      for (int t = 0; t < KQ * KQ; ++t) w_r[t] = to_float(w[oc * swo + (t / KQ) * swh + (t % KQ) * sww]);
    }
    __syncthreads();
    float pool_part = 0.0f;  // POOL: this thread's pixels' sum of channel oc
    if (c_ok) {
      const ChannelAffine::Coeffs coeffs = affine.at(oc);
      const float* const xc = x_s + (oc / mult - ic0);
      for (int p = slot; p < tile_h * tile_w; p += slots) {
        const int r = p / tile_w, q = p % tile_w;
        const int oh = oh0 + r, ow = ow0 + q;
        if (oh >= OH || ow >= OW) continue;
        const float* const xp = xc + (r * stride_h * RW + q * stride_w) * cb;
        float acc = 0.0f;
        if (KS > 0) {
          FB_UNROLL
          for (int kh = 0; kh < KQ; ++kh)
            FB_UNROLL
            for (int kw = 0; kw < KQ; ++kw)
              acc = fmaf(xp[(kh * dil_h * RW + kw * dil_w) * cb], w_r[kh * KQ + kw], acc);
        } else {
          for (int kh = 0; kh < KH; ++kh)
            for (int kw = 0; kw < KW; ++kw)
              acc = fmaf(xp[(kh * dil_h * RW + kw * dil_w) * cb], w_s[(kh * KW + kw) * cb + lane], acc);
        }
        float v = coeffs.apply(acc);
        if (res != nullptr) v += to_float(res[nb * srn + oh * srh + ow * srw + oc * src]);
        const T stored = from_float<T>(activate<ACT>(v, slope));
        out[nb * son + oh * soh + ow * sow + (long long)(out_c_offset + oc) * soc] = stored;
        if (POOL) pool_part += to_float(stored);
      }
    }
    if (POOL) {
      pool_s[threadIdx.x] = pool_part;  // threadIdx.x = slot * cb + lane
      __syncthreads();
      if ((int)threadIdx.x < cb && c0 + (int)threadIdx.x < C_out) {
        float total = 0.0f;
        for (int s = 0; s < slots; ++s) total += pool_s[s * cb + threadIdx.x];
        pool_sums[(nb * (tiles_h * tiles_w) + rest) * C_out + c0 + threadIdx.x] = total;  // rest: the tile
      }
    }
    __syncthreads();  // the next item overwrites the shared tiles (and pool_s)
  }
}

// ============================================================================================
// 2. fused depthwise -> pointwise (separable) conv, each with BatchNorm / bias + activation
// ============================================================================================

// The kernels' parameters, flat so NVRTC launches pass plain scalars.
//   dw_w (C_dw, 1, KH, KW), pw_w (C_out, C_dw / pw_groups, 1, 1), both by strides;
//   dw_* / pw_*: float32 per channel or nullptr (ChannelAffine); order: int64 [C_dw] or nullptr;
//   res: nullptr for none. An image's work items: tiles_h * tiles_w * pw_groups * ceil(C_out_g / BN).
#define FB_SEP_PARAMS(T)                                                                                       \
  const T *__restrict__ x, const T *__restrict__ dw_w, const float *__restrict__ dw_bias,                      \
      const float *__restrict__ dw_bn_weight, const float *__restrict__ dw_bn_bias,                            \
      const float *__restrict__ dw_bn_mean, const float *__restrict__ dw_bn_var, const T *__restrict__ pw_w,   \
      const float *__restrict__ pw_bias, const float *__restrict__ pw_bn_weight,                               \
      const float *__restrict__ pw_bn_bias, const float *__restrict__ pw_bn_mean,                              \
      const float *__restrict__ pw_bn_var, const long long *__restrict__ order, const T *__restrict__ res,      \
      T *__restrict__ out, int H, int W, int C_dw, int OH, int OW, int KH, int KW, int mult, int C_out_g,      \
      int pw_groups, long long sxn, long long sxc, long long sxh, long long sxw, long long sdo, long long sdh,  \
      long long sdw, long long spo, long long spc, long long srn, long long src, long long srh, long long srw,  \
      long long son, long long soc, long long soh, long long sow, int out_c_offset, int stride_h,              \
      int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int dw_act, int tile_h, int tile_w,            \
      long long N, float dw_eps, float dw_slope, float pw_eps, float pw_slope
#define FB_SEP_PROBLEM(T)                                                                                     \
  SepProblem<T> {                                                                                             \
    x, dw_w, ChannelAffine{dw_bias, dw_bn_weight, dw_bn_bias, dw_bn_mean, dw_bn_var, dw_eps}, pw_w,           \
        ChannelAffine{pw_bias, pw_bn_weight, pw_bn_bias, pw_bn_mean, pw_bn_var, pw_eps}, order, res, out, H, W,  \
        C_dw, OH, OW, KH, KW, mult, C_out_g, pw_groups, sxn, sxc, sxh, sxw, sdo, sdh, sdw, spo, spc, srn, src,   \
        srh, srw, son, soc, soh, sow, out_c_offset, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dw_act,     \
        tile_h, tile_w, dw_slope, pw_slope                                                                    \
  }

template <typename T>
struct SepProblem {
  const T* x;
  const T* dw_w;
  ChannelAffine dw_affine;  // per depthwise channel
  const T* pw_w;
  ChannelAffine pw_affine;  // per output channel
  const long long* order;
  const T* res;
  T* out;
  int H, W, C_dw, OH, OW, KH, KW, mult, C_out_g, pw_groups;
  long long sxn, sxc, sxh, sxw, sdo, sdh, sdw, spo, spc, srn, src, srh, srw, son, soc, soh, sow;
  int out_c_offset, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dw_act, tile_h, tile_w;
  float dw_slope, pw_slope;

  __device__ __forceinline__ int k_per_group() const { return C_dw / pw_groups; }
  __device__ __forceinline__ int tiles_h() const { return (OH + tile_h - 1) / tile_h; }
  __device__ __forceinline__ int tiles_w() const { return (OW + tile_w - 1) / tile_w; }
};

// One block's work item: image nb and its item r (column block fastest, then group, then tile).
struct SepItem {
  long long nb;
  int g, n0, oh0, ow0;
};

template <int BN>
__device__ __forceinline__ unsigned sep_items_per_image(int tiles_h, int tiles_w, int pw_groups, int C_out_g) {
  return (unsigned)(tiles_h * tiles_w * pw_groups * ((C_out_g + BN - 1) / BN));
}

template <typename T, int BN>
__device__ __forceinline__ SepItem sep_item(const SepProblem<T>& p, const WorkCursor& cur) {
  const unsigned nblocks = (p.C_out_g + BN - 1) / BN;
  unsigned r = cur.r;
  SepItem it;
  it.nb = cur.nb;
  it.n0 = (int)(r % nblocks) * BN;
  r /= nblocks;
  it.g = (int)(r % p.pw_groups);
  r /= p.pw_groups;
  const unsigned tiles_w = p.tiles_w();
  it.ow0 = (int)(r % tiles_w) * p.tile_w;
  it.oh0 = (int)(r / tiles_w) * p.tile_h;
  return it;
}

// One K step of the separable kernels, shared by the plain and the tensor-core variant.
// Thread t owns pointwise input channel k0 + t % BK of the step (kThreads is a multiple of BK, so
// every loop below keeps that channel): consecutive threads read consecutive channels.
//   stage_depthwise(): the input region of those channels' depthwise sources -> x_s [RH * RW][BK],
//                      their taps -> w_s [KH * KW][BK], their depthwise BatchNorm -> sc_s / sh_s [BK].
//   gather_b():        the BK x BN pointwise weights, element by element -> put_b(k, n, float).
//   depthwise():       put_a(pixel, k, float) = act_dw(scale * depthwise + shift) for the tile's BM
//                      pixels (after a barrier behind stage_depthwise).
// Channels past the group's K read as zero (x, taps, scale, shift and weights), so they add
// exactly nothing; a depthwise index outside [0, C_dw) from `order` reads as NaN.
template <typename T, int BM, int BN, int BK, int kThreads>
struct SepStep {
  static_assert(kThreads % BK == 0, "threads must keep one channel of the K step");
  static constexpr int kRows = kThreads / BK;
  float* x_s;
  float* w_s;
  float* sc_s;
  float* sh_s;
  int RH, RW;

  __device__ SepStep(const SepProblem<T>& p, float* smem) {
    RH = dw_region(p.tile_h, p.KH, p.stride_h, p.dil_h);
    RW = dw_region(p.tile_w, p.KW, p.stride_w, p.dil_w);
    x_s = smem;
    w_s = x_s + RH * RW * BK;
    sc_s = w_s + p.KH * p.KW * BK;
    sh_s = sc_s + BK;
  }

  __device__ __forceinline__ void stage_depthwise(const SepProblem<T>& p, const SepItem& it, int k0) const {
    const int kk = threadIdx.x % BK, row = threadIdx.x / BK;
    const int K = p.k_per_group();
    const bool k_ok = k0 + kk < K;
    const int kg = it.g * K + k0 + kk;  // the pointwise input channel (global)
    long long cd = kg;                  // ... and the depthwise channel it reads
    if (k_ok && p.order != nullptr) cd = p.order[kg];
    const bool cd_ok = cd >= 0 && cd < p.C_dw;
    const bool live = k_ok && cd_ok;
    const int ci = live ? (int)cd / p.mult : 0;  // the input channel under that depthwise channel
    const int ih0 = it.oh0 * p.stride_h - p.pad_h, iw0 = it.ow0 * p.stride_w - p.pad_w;
    const long long x_base = it.nb * p.sxn + ci * p.sxc;
    for (int pix = row; pix < RH * RW; pix += kRows) {
      const int ih = ih0 + pix / RW, iw = iw0 + pix % RW;
      const bool inside = live && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
      x_s[pix * BK + kk] = inside ? to_float(p.x[x_base + ih * p.sxh + iw * p.sxw]) : 0.0f;
    }
    const int taps = p.KH * p.KW;
    for (int t = row; t < taps; t += kRows)
      w_s[t * BK + kk] = live ? to_float(p.dw_w[cd * p.sdo + (t / p.KW) * p.sdh + (t % p.KW) * p.sdw]) : 0.0f;
    if (row == 0) {
      ChannelAffine::Coeffs c{0.0f, 0.0f};
      if (live) c = p.dw_affine.at((int)cd);
      else if (k_ok) c.shift = __int_as_float(0x7fffffff);  // a bad channel_order entry: NaN
      sc_s[kk] = c.scale;
      sh_s[kk] = c.shift;
    }
  }

  template <typename PutB>
  __device__ __forceinline__ void gather_b(const SepProblem<T>& p, const SepItem& it, int k0, PutB put_b) const {
    const int kk = threadIdx.x % BK, row = threadIdx.x / BK;
    const bool k_ok = k0 + kk < p.k_per_group();
    const long long w_row = (long long)(k0 + kk) * p.spc;
    for (int n = row; n < BN; n += kRows) {
      const int nn = it.n0 + n;
      const bool ok = k_ok && nn < p.C_out_g;
      put_b(kk, n, ok ? to_float(p.pw_w[(long long)(it.g * p.C_out_g + nn) * p.spo + w_row]) : 0.0f);
    }
  }

  template <typename PutA>
  __device__ __forceinline__ void depthwise(const SepProblem<T>& p, PutA put_a) const {
    const int kk = threadIdx.x % BK;
    const float scale = sc_s[kk], shift = sh_s[kk];
    const int tile = p.tile_h * p.tile_w;
    for (int m = threadIdx.x / BK; m < BM; m += kRows) {
      float v = 0.0f;
      if (m < tile) {
        const int r = m / p.tile_w, q = m % p.tile_w;
        const float* const xp = x_s + (r * p.stride_h * RW + q * p.stride_w) * BK + kk;
        float acc = 0.0f;
        if (p.KH == 3 && p.KW == 3) {  // the common case, unrolled (a uniform branch)
          FB_UNROLL
          for (int kh = 0; kh < 3; ++kh)
            FB_UNROLL
            for (int kw = 0; kw < 3; ++kw)
              acc = fmaf(xp[(kh * p.dil_h * RW + kw * p.dil_w) * BK], w_s[(kh * 3 + kw) * BK + kk], acc);
        } else {
          for (int kh = 0; kh < p.KH; ++kh)
            for (int kw = 0; kw < p.KW; ++kw)
              acc = fmaf(xp[(kh * p.dil_h * RW + kw * p.dil_w) * BK], w_s[(kh * p.KW + kw) * BK + kk], acc);
        }
        v = activate_dynamic(p.dw_act, fmaf(acc, scale, shift), p.dw_slope);
      }
      put_a(m, kk, v);
    }
  }
};

// The pointwise coefficients of column n (group g); an identity past C_out_g (never stored).
template <typename T>
__device__ __forceinline__ ChannelAffine::Coeffs sep_coeffs(const SepProblem<T>& p, int g, int n) {
  return n < p.C_out_g ? p.pw_affine.at(g * p.C_out_g + n) : ChannelAffine::Coeffs{1.0f, 0.0f};
}

// out[pixel m of the tile, column n] = act(acc * scale + shift (+ residual)) into the channel slice.
template <typename T, int ACT>
__device__ __forceinline__ void sep_store(const SepProblem<T>& p, const SepItem& it, int m, int n, float acc,
                                          ChannelAffine::Coeffs c) {
  if (m >= p.tile_h * p.tile_w || n >= p.C_out_g) return;
  const int oh = it.oh0 + m / p.tile_w, ow = it.ow0 + m % p.tile_w;
  if (oh >= p.OH || ow >= p.OW) return;
  const int oc = it.g * p.C_out_g + n;
  float v = c.apply(acc);
  if (p.res != nullptr) v += to_float(p.res[it.nb * p.srn + oh * p.srh + ow * p.srw + oc * p.src]);
  p.out[it.nb * p.son + oh * p.soh + ow * p.sow + (long long)(p.out_c_offset + oc) * p.soc] =
      from_float<T>(activate<ACT>(v, p.pw_slope));
}

// The plain (SIMT) variant: A (depthwise output) and B (pointwise weights) tiles as float32, each
// thread accumulates TM x TN outputs, TN = BN / 16 (BN = 16, 64, 128).
template <typename T, int ACT, int BN>
__global__ void __launch_bounds__(kDwThreads, kSepMinBlocks) separable_conv_bn_act_kernel(FB_SEP_PARAMS(T)) {
  constexpr int BM = kSepBM, BK = kSepBK, TM = kSepTM, TN = BN / 16;
  static_assert((BM / TM) * (BN / TN) == kDwThreads, "one thread per TM x TN outputs");
  const SepProblem<T> p = FB_SEP_PROBLEM(T);
  __shared__ float a_tile[BK][BM + 1];  // [k][pixel]; +1 against bank conflicts on the writes
  __shared__ float b_tile[BK][BN + 1];  // [k][output channel]
  FB_DW_DYNAMIC_SMEM(smem);
  const SepStep<T, BM, BN, BK, kDwThreads> step(p, smem);
  // Thread (tm, tn) owns pixels tm + i * (BM / TM) and columns tn + j * (BN / TN): neighbouring
  // threads store neighbouring output channels (contiguous in NHWC).
  const int tn = threadIdx.x % (BN / TN), tm = threadIdx.x / (BN / TN);
  const int K = C_dw / pw_groups;

  for (WorkCursor cur(sep_items_per_image<BN>(p.tiles_h(), p.tiles_w(), pw_groups, C_out_g)); cur.nb < N;
       cur.next()) {
    const SepItem it = sep_item<T, BN>(p, cur);
    float acc[TM][TN];
    FB_UNROLL
    for (int i = 0; i < TM; ++i)
      FB_UNROLL
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += BK) {
      step.stage_depthwise(p, it, k0);
      step.gather_b(p, it, k0, [&](int k, int n, float v) { b_tile[k][n] = v; });
      __syncthreads();
      step.depthwise(p, [&](int m, int k, float v) { a_tile[k][m] = v; });
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
      __syncthreads();  // the next step overwrites every tile
    }
    FB_UNROLL
    for (int j = 0; j < TN; ++j) {
      const int n = it.n0 + tn + j * (BN / TN);
      const ChannelAffine::Coeffs c = sep_coeffs(p, it.g, n);
      FB_UNROLL
      for (int i = 0; i < TM; ++i) sep_store<T, ACT>(p, it, tm + i * (BM / TM), n, acc[i][j], c);
    }
  }
}

// The tensor-core variant for float16 / bfloat16 (sm_80+; the launchers pick it for BN = 64 / 128, and
// the emulator runs it under FASTBONE_CUDA_SEPARABLE_MMA=1). The 8 warps are a WARPS_M x WARPS_N grid
// over the BM x BN tile (warp sub-tiles 16 x 32 for BN = 64, 32 x 32 for BN = 128); each K step of
// BK = 16 channels is one k16 MMA per fragment (ldmatrix + mma.sync m16n8k16, float32 accumulators in
// registers: MmaBlockTile in kernels/mma.cuh, shared with the conv). Per K step kt:
//   1. stage_depthwise(kt): the input region, taps and BatchNorm of the step's channels -> x_s;
//   2. barrier: x_s ready; every warp has finished step kt - 1's MMAs, so the A stage and B buffer
//      (kt - 1) % S are free;
//   3. B of step kt + S - 1 -> buffer (kt + S - 1) % S: 16-byte cp.async when the pointwise weight's
//      input-channel stride is 1, K % 8 == 0, and its pointer and output-channel stride are 16-byte
//      multiples (zero-filled past C_out_g / K), else the element gather (stored directly); one commit
//      group per step, empty past the end, so the wait count stays uniform;
//   4. depthwise(kt) -> the A stage [BM][kLd] as T (the depthwise output rounded to T, as the unfused
//      sequence stores it);
//   5. wait until step kt's group has landed (at most S - 1 newer ones pending), barrier: A and B of
//      step kt visible to every warp, and x_s free for step kt + 1;
//   6. the MMAs of step kt.
// So the copies of the next B tiles overlap this step's depthwise work and MMAs. A needs one buffer (it
// is rewritten only after the barrier of step 2). The accumulators leave through shared memory (float32
// over x_s, kSepTcScratchBytes: in row bands) into sep_store, each thread storing one output channel.
constexpr int kSepTcMinCC = FB_MMA_MIN_CC;
constexpr int kSepMmaStages = 2;  // B buffers

template <int BN>
using SepMmaTile = MmaBlockTile<kSepBM, BN, kSepBK, kDwThreads / 32 / (BN / 32), BN / 32>;

template <typename T, int ACT, int BN>
__global__ void __launch_bounds__(kDwThreads, kSepMinBlocks) separable_conv_bn_act_tc_kernel(FB_SEP_PARAMS(T)) {
#ifdef FB_MMA_UNSUPPORTED
  __trap();  // compiled for a GPU before sm_80 (FASTBONE_CUDA_ARCHS): never launched there
#else
  using Tile = SepMmaTile<BN>;
  using Chunks = MmaStageChunks<BN, kSepBK, kDwThreads>;  // B's 16-byte chunks
  constexpr int BM = kSepBM, BK = kSepBK, LD = Tile::kLd, S = kSepMmaStages;
  static_assert(BN == 64 || BN == 128, "tensor-core column tiles: 64 or 128");
  static_assert(Tile::kThreads == kDwThreads, "the depthwise stage and the GEMM share the block's threads");
  // The epilogue's bands: as many whole 16-row fragments of pitch BN + 4 as the scratch holds.
  constexpr int LDC = BN + 4;
  constexpr int kFitRows = kSepTcScratchBytes / (4 * LDC) / 16 * 16;
  constexpr int kBandRows = kFitRows < BM ? kFitRows : BM;
  static_assert(kBandRows >= 16 && BM % kBandRows == 0, "the epilogue's row bands tile BM");
  static_assert(kDwThreads % BN == 0, "each thread stores a single output column");
  const SepProblem<T> p = FB_SEP_PROBLEM(T);
  __shared__ __align__(16) T a_stage[BM * LD];
  __shared__ __align__(16) T b_stages[S][BN * LD];
  FB_DW_DYNAMIC_SMEM(smem);
  const SepStep<T, BM, BN, BK, kDwThreads> step(p, smem);
  const typename Tile::Warp warp = Tile::warp(threadIdx.x);
  const Chunks chunks(threadIdx.x);
  const int K = C_dw / pw_groups, k_tiles = (K + BK - 1) / BK;
  // 8 consecutive k of one output channel are 16 contiguous, aligned bytes (a contiguous or channels_last
  // 1x1 weight has spc == 1); K % 8 == 0 makes every chunk lie wholly inside or outside K.
  const bool b_vec = K % 8 == 0 && spc == 1 && spo % 8 == 0 && is_aligned16(pw_w);

  for (WorkCursor cur(sep_items_per_image<BN>(p.tiles_h(), p.tiles_w(), pw_groups, C_out_g)); cur.nb < N;
       cur.next()) {
    const SepItem it = sep_item<T, BN>(p, cur);
    // B of reduction step kt into buffer `stage`: copies issued (not waited for), or stored directly.
    auto load_b = [&](int kt, int stage) {
      T* const bs = b_stages[stage];
      if (b_vec) {
        const int k = kt * BK + chunks.col * 8;
        FB_UNROLL
        for (int i = 0; i < Chunks::kPasses; ++i) {
          if (!chunks.has(i)) continue;
          const int n = it.n0 + chunks.row(i);
          const bool ok = k < K && n < C_out_g;
          cp_async_16(bs + chunks.offset(i, LD), ok ? pw_w + (long long)(it.g * C_out_g + n) * spo + k : pw_w, ok);
        }
      } else {
        step.gather_b(p, it, kt * BK, [&](int k, int n, float v) { bs[n * LD + k] = from_float<T>(v); });
      }
    };
    typename Tile::Acc acc;
    Tile::zero(acc);
    FB_UNROLL
    for (int s = 0; s < S - 1; ++s) {
      if (s < k_tiles) load_b(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      step.stage_depthwise(p, it, kt * BK);
      __syncthreads();
      if (kt + S - 1 < k_tiles) load_b(kt + S - 1, (kt + S - 1) % S);
      cp_async_commit();
      step.depthwise(p, [&](int m, int k, float v) { a_stage[m * LD + k] = from_float<T>(v); });
      cp_async_wait<S - 1>();
      __syncthreads();
      Tile::multiply(acc, a_stage, b_stages[kt % S], warp);
    }
    cp_async_wait<0>();  // nothing outlives the item (the trailing groups are empty)

    // The accumulators over x_s, which no thread reads after step 5 of the last K step.
    float* const c_tile = smem;
    const int col = threadIdx.x % BN;
    const ChannelAffine::Coeffs c = sep_coeffs(p, it.g, it.n0 + col);
    FB_UNROLL
    for (int band = 0; band < BM; band += kBandRows) {
      if (band > 0) __syncthreads();  // the previous band's values are read
      Tile::store(acc, c_tile, LDC, warp, band, kBandRows);
      __syncthreads();
      for (int row = threadIdx.x / BN; row < kBandRows; row += kDwThreads / BN)
        sep_store<T, ACT>(p, it, band + row, it.n0 + col, c_tile[row * LDC + col], c);
    }
    __syncthreads();  // the next item's staging overwrites x_s (= c_tile)
  }
#endif  // FB_MMA_UNSUPPORTED
}

}  // namespace fb
