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
// Run-time options of both variants (no extra instantiations): channel maps in the load and the store
// (ConvProblem::in_channel_map / out_channel_map: channel shuffles as index permutations), the input pool
// (the conv of a stride-1 max / average pool of x, pooled in the A loader: conv_input_pool) and horizontal
// fusion (up to kConvMaxSegments convs of one input with their own weights, epilogues and destinations in
// one launch, the segment picked from the block's channel tile: conv_segment_tile / conv_segment_problem) and
// the output pool (a 2x2 / stride 2 max pool after the activation, reduced in the epilogue: conv_store_pooled).
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
// The plain kernel's __launch_bounds__ minimum blocks per SM: 2 (up to 128 registers a thread, the
// occupancy both tiles had before) holds the accumulators, the loader's rows, the input pool's window
// loop and the segment selection without spilling; without the hint ptxas (CUDA 13, sm_90) aimed the
// 64x64 float16 / bfloat16 instantiations at 64 registers and spilled (as kSepMinBlocks, depthwise.cuh).
constexpr int kConvMinBlocks = 2;

// The kernels' parameters, flat so NVRTC launches pass plain scalars; each kernel packs them
// into a ConvProblem for the shared loader and epilogue.
// bias, bn_*: float32 per output channel or nullptr (ChannelAffine); res: nullptr for no residual.
// input_pool_mode / input_pool_kernel: the input pool; in_channel_map / out_channel_map: the channel maps
// (ConvProblem; nullptr in horizontally fused launches). num_segments and the parameters of
// segments 1 and 2 (FB_CONV_SEGMENT_PARAMS): horizontal fusion, see conv_segment_tile below.
#define FB_CONV_PARAMS(T)                                                                                  \
  const T *__restrict__ x, const T *__restrict__ w, const float *__restrict__ bias,                         \
      const float *__restrict__ bn_weight, const float *__restrict__ bn_bias,                               \
      const float *__restrict__ bn_mean, const float *__restrict__ bn_var, const T *__restrict__ res,       \
      T *__restrict__ out, const float *__restrict__ in_scale, int M, int H, int W, int C_in_g, int OH, int OW, int C_out_g, int KH, int KW,    \
      long long sxn, long long sxc, long long sxh, long long sxw, long long swo, long long swc,             \
      long long swh, long long sww, long long srn, long long src, long long srh, long long srw,             \
      long long son, long long soc, long long soh, long long sow, int out_c_offset, int stride_h,           \
      int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, float eps, float slope, long long ssn,     \
      int residual_after_act, int input_pool_mode, int input_pool_kernel,                                  \
      const long long *__restrict__ in_channel_map, const long long *__restrict__ out_channel_map,          \
      int out_pool, int pooled_h, int pooled_w, int num_segments, FB_CONV_SEGMENT_PARAMS(T, 1),            \
      FB_CONV_SEGMENT_PARAMS(T, 2)
#define FB_CONV_PROBLEM(T)                                                                                  \
  ConvProblem<T> {                                                                                         \
    x, w, ChannelAffine{bias, bn_weight, bn_bias, bn_mean, bn_var, eps}, res, out, M, H, W, C_in_g, OH, OW, \
        C_out_g, KH, KW, sxn, sxc, sxh, sxw, swo, swc, swh, sww, srn, src, srh, srw, son, soc, soh, sow,    \
        out_c_offset, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope, in_scale, ssn,                 \
        residual_after_act, input_pool_mode, input_pool_kernel, in_channel_map, out_channel_map, out_pool,  \
        pooled_h, pooled_w                                                                                 \
  }
// Segment i (1 or 2) of a horizontally fused launch: its weight (C_out##i, C_in, KH, KW) with strides
// sw*##i, epilogue tensors and eps, and destination (N, C_out##i, OH, OW) with strides so*##i, pointing
// at its first channel (out_c_offset applies to segment 0 only). Flat, as the rest. Unused
// (num_segments <= i): any values, never read.
#define FB_CONV_SEGMENT_PARAMS(T, i)                                                                     \
  const T *w##i, const float *bias##i, const float *bn_weight##i, const float *bn_bias##i,               \
      const float *bn_mean##i, const float *bn_var##i, T *out##i, int C_out##i, float eps##i,            \
      long long swo##i, long long swc##i, long long swh##i, long long sww##i, long long son##i,           \
      long long soc##i, long long soh##i, long long sow##i
#define FB_CONV_SEGMENT(T, i)                                                                             \
  ConvSegment<T> {                                                                                       \
    w##i, ChannelAffine{bias##i, bn_weight##i, bn_bias##i, bn_mean##i, bn_var##i, eps##i}, out##i,         \
        C_out##i, swo##i, swc##i, swh##i, sww##i, son##i, soc##i, soh##i, sow##i                          \
  }

// The input pool (ConvProblem::input_pool_mode): the conv reads max_pool2d / avg_pool2d(x, k, stride 1,
// padding k / 2, count_include_pad=False) instead of x.
constexpr int kConvInputPoolNone = 0, kConvInputPoolMax = 1, kConvInputPoolAvg = 2;
// Most segments of one horizontally fused launch (FB_CONV_PARAMS carries segments 1 .. kConvMaxSegments - 1).
constexpr int kConvMaxSegments = 3;
// The output pool's window and stride (ConvProblem::out_pool): VGG's and DarkNet-19's 2x2 / 2 max pools, the
// only pools that follow a conv in the body of a model. Fixed at compile time so the epilogue's window loop
// unrolls over a thread's own accumulators (registers, never local memory).
constexpr int kConvOutPool = 2;
constexpr int kConvOutPoolArea = kConvOutPool * kConvOutPool;

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
  // kConvInputPool*: the loader reads the k x k (k = input_pool_kernel, odd) stride-1 max / average of the
  // input around each element instead of the element (conv_input_pool), so the pooled map (x's H x W)
  // never exists in memory; the conv's own padding applies outside it. Last, so kernels that build a
  // ConvProblem without them get kConvInputPoolNone.
  int input_pool_mode;
  int input_pool_kernel;
  // Channel maps (int64, nullptr = identity), both over the launch's channels: the conv's input channel
  // c (g * C_in_g + c_in_group) reads x's channel in_channel_map[c] (the loader; in_scale and the input
  // pool follow the channel read), and its output channel oc (g * C_out_g + n) is stored at channel
  // out_c_offset + out_channel_map[oc] (conv_store; residual, bias and BatchNorm stay indexed by oc).
  // Channel shuffles (ShuffleNet) cost an index load instead of a copy. Last, so kernels that build a
  // ConvProblem without them get nullptr.
  const long long* in_channel_map;
  const long long* out_channel_map;
  // Nonzero: a kConvOutPool x kConvOutPool max pool at stride kConvOutPool (no padding) follows the activation
  // in the epilogue and `out` is the pooled map (N, C, pooled_h, pooled_w); the GEMM's rows are then ordered
  // (image, pooled row, pooled column, window position), so a window's conv pixels are consecutive rows
  // (conv_row_pixel) and the conv output never reaches memory. Ceil mode's partial windows at the right and
  // bottom edges are rows past OW / OH: computed as padding and left out of the max. Not with a residual or
  // horizontal fusion (the launchers refuse both). Last, so kernels that build a ConvProblem without it get 0.
  int out_pool;
  int pooled_h, pooled_w;
};

// The conv output pixel of GEMM row m: (image, row, column), and whether it is one (m < M, and inside the
// conv's output where an output pool's partial windows reach past it).
struct ConvPixel {
  int nb, oh, ow;
  bool ok;
};
template <typename T>
__device__ __forceinline__ ConvPixel conv_row_pixel(const ConvProblem<T>& p, int m) {
  if (!p.out_pool) return ConvPixel{m / (p.OW * p.OH), (m / p.OW) % p.OH, m % p.OW, m < p.M};
  const int window = m % kConvOutPoolArea, pooled = m / kConvOutPoolArea;
  const int ow = (pooled % p.pooled_w) * kConvOutPool + window % kConvOutPool;
  const int oh = ((pooled / p.pooled_w) % p.pooled_h) * kConvOutPool + window / kConvOutPool;
  return ConvPixel{pooled / (p.pooled_w * p.pooled_h), oh, ow, m < p.M && oh < p.OH && ow < p.OW};
}

// The pooled input of one channel at (ih, iw) inside the map (`base`: the offset of its image and
// channel): the max (NaN-propagating, as torch's max pool) or the mean over the in-bounds taps of the
// k x k window at stride 1, padding k / 2 (count_include_pad=False), in float32, rounded to T once (as
// torch's avg pool does; a max is exact). Loops kept rolled: k is a run-time value.
template <typename T>
__device__ __forceinline__ T conv_input_pool(const ConvProblem<T>& p, long long base, int ih, int iw) {
  const int r = p.input_pool_kernel / 2;
  const int h0 = max(ih - r, 0), h1 = min(ih + r, p.H - 1), w0 = max(iw - r, 0), w1 = min(iw + r, p.W - 1);
  const bool is_max = p.input_pool_mode == kConvInputPoolMax;
  float acc = is_max ? to_float(p.x[base + ih * p.sxh + iw * p.sxw]) : 0.0f;  // the centre is always in
FB_UNROLL_BY(1)
  for (int h = h0; h <= h1; ++h) {
FB_UNROLL_BY(1)
    for (int w = w0; w <= w1; ++w) {
      const float v = to_float(p.x[base + h * p.sxh + w * p.sxw]);
      acc = is_max ? nan_max(acc, v) : acc + v;
    }
  }
  if (!is_max) acc /= (float)((h1 - h0 + 1) * (w1 - w0 + 1));
  return from_float<T>(acc);
}

// Segment 1 or 2 of a horizontally fused launch (FB_CONV_SEGMENT): what differs from segment 0, whose
// values are the kernel's own parameters (w, bias, bn_*, eps, out, C_out_g, sw*, so*).
template <typename T>
struct ConvSegment {
  const T* w;
  ChannelAffine affine;
  T* out;
  int C_out;
  long long swo, swc, swh, sww, son, soc, soh, sow;
};

// Horizontal fusion: several convs of one input (groups == 1, same KH x KW, stride, padding, dilation,
// activation) in one launch. Along gridDim.y lie segment 0's channel tiles (C_out_g / block_n, rounded
// up), then segment 1's, then segment 2's: conv_segment_tile maps the block's tile index to (segment, tile
// within it), and conv_segment_problem puts that segment's values in place of segment 0's (the kernel's own
// parameters); everything else (loaders, main loop, epilogue) is the plain conv's. With num_segments == 1
// (every ordinary conv launch) segment 0 is all there is.
struct ConvSegmentTile {
  int segment, n_tile;
};
__device__ __forceinline__ ConvSegmentTile conv_segment_tile(int num_segments, int c_out0, int c_out1, int block_n,
                                                             int tile) {
  const int tiles0 = (c_out0 + block_n - 1) / block_n, tiles1 = (c_out1 + block_n - 1) / block_n;
  if (num_segments < 2 || tile < tiles0) return {0, tile};
  if (num_segments < 3 || tile < tiles0 + tiles1) return {1, tile - tiles0};
  return {2, tile - tiles0 - tiles1};
}

// What conv_segment_problem replaces: the main loop's operand (weight, its strides, C_out), or the
// epilogue's tensors (ChannelAffine, destination and its strides, C_out). Two calls, the epilogue's after
// the main loop, so the epilogue's values do not occupy registers through it (a single early selection of
// everything made the 64x64 tensor-core kernel spill).
enum ConvSegmentPart { kConvSegmentOperand, kConvSegmentEpilogue };

template <ConvSegmentPart PART, typename T>
__device__ __forceinline__ ConvProblem<T> conv_segment_problem(ConvProblem<T> p, int segment,
                                                               const ConvSegment<T>& s1, const ConvSegment<T>& s2) {
  if (segment == 0) return p;
  // Field by field (selects of uniform values: nothing indexed at run time, nothing in local memory).
  const bool third = segment == 2;
  p.C_out_g = third ? s2.C_out : s1.C_out;
  if (PART == kConvSegmentOperand) {
    p.w = third ? s2.w : s1.w;
    p.swo = third ? s2.swo : s1.swo;
    p.swc = third ? s2.swc : s1.swc;
    p.swh = third ? s2.swh : s1.swh;
    p.sww = third ? s2.sww : s1.sww;
  } else {
    p.affine = third ? s2.affine : s1.affine;
    p.out = third ? s2.out : s1.out;
    p.out_c_offset = 0;  // out##i points at the segment's first channel already
    p.son = third ? s2.son : s1.son;
    p.soc = third ? s2.soc : s1.soc;
    p.soh = third ? s2.soh : s1.soh;
    p.sow = third ? s2.sow : s1.sow;
  }
  return p;
}

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
  // A row past M (or past the conv output: conv_row_pixel) gets a window corner so far outside the input
  // that every tap reads as padding.
  static constexpr int kOutside = -(1 << 29);

  int k_col, row0, group, m_first;
  long long a_base[kAPasses];
  long long s_base[kAPasses];  // the row's first in_scale element (its image, group g)
  int a_ih0[kAPasses], a_iw0[kAPasses];
  long long b_base[kBPasses];
  bool b_ok[kBPasses];

  __device__ ConvTileLoader(const ConvProblem<T>& p, int g, int m0, int n0) {
    k_col = threadIdx.x % BK;
    row0 = threadIdx.x / BK;
    group = g;
    m_first = m0;
    FB_UNROLL
    for (int i = 0; i < kAPasses; ++i) {
      const ConvPixel px = conv_row_pixel(p, m0 + row0 + i * kRowsPerPass);
      if (px.ok) {
        a_base[i] = px.nb * p.sxn + (long long)g * p.C_in_g * p.sxc;
        s_base[i] = px.nb * p.ssn + (long long)g * p.C_in_g;
        a_ih0[i] = px.oh * p.stride_h - p.pad_h;
        a_iw0[i] = px.ow * p.stride_w - p.pad_w;
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

  // The x channel that input channel c of this group reads, counted from the group's first channel (where
  // a_base / s_base point): c, or through in_channel_map, whose entries count from the x pointer's channel 0
  // (the launchers do not shift x by groups when there is a map). One load per reduction step.
  __device__ __forceinline__ int x_channel(const ConvProblem<T>& p, int c) const {
    if (p.in_channel_map == nullptr) return c;
    const int first = group * p.C_in_g;
    return (int)p.in_channel_map[first + c] - first;
  }

  // The A tile alone (the tensor-core variant stages B with asynchronous copies where it can).
  template <typename PutA>
  __device__ __forceinline__ void load_a(const ConvProblem<T>& p, int k0, PutA put_a) const {
    if (p.input_pool_mode != kConvInputPoolNone) return load_a_pooled(p, k0, put_a);  // uniform per launch
    const T zero = from_float<T>(0.0f);
    const KTap t = k_tap(p, k0);
    const bool k_ok = t.ok;
    const int c = x_channel(p, t.c);  // in_scale is indexed by the channel read, too
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

  // The A tile of the pooled input (conv_input_pool; never with in_scale: the launchers refuse it). Rows
  // in a loop kept rolled, each decoded from its pixel index again rather than read from the per-row
  // arrays (which a rolled loop would index at run time, in local memory): the window loops inside would
  // otherwise be unrolled kAPasses times into the kernel and crowd the registers the plain path needs.
  template <typename PutA>
  __device__ __forceinline__ void load_a_pooled(const ConvProblem<T>& p, int k0, PutA put_a) const {
    const KTap t = k_tap(p, k0);
FB_UNROLL_BY(1)
    for (int i = 0; i < kAPasses; ++i) {
      const ConvPixel px = conv_row_pixel(p, m_first + row0 + i * kRowsPerPass);
      T v = from_float<T>(0.0f);
      if (t.ok && px.ok) {
        const int ih = px.oh * p.stride_h - p.pad_h + t.kh * p.dil_h;
        const int iw = px.ow * p.stride_w - p.pad_w + t.kw * p.dil_w;
        if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)
          v = conv_input_pool(p, px.nb * p.sxn + ((long long)group * p.C_in_g + x_channel(p, t.c)) * p.sxc, ih, iw);
      }
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

// The destination channel of column n of group g in out: out_c_offset + oc, or out_c_offset +
// out_channel_map[oc] (not read past C_out_g). The kernels compute it once per column, with its coefficients
// (a map load per stored element made the 64x64 tensor-core kernel spill on sm_80).
template <typename T>
__device__ __forceinline__ int conv_out_channel(const ConvProblem<T>& p, int g, int n) {
  const int oc = g * p.C_out_g + n;
  return p.out_c_offset + (p.out_channel_map != nullptr && n < p.C_out_g ? (int)p.out_channel_map[oc] : oc);
}

// out[m, n] of group g = act(acc * scale + shift (+ residual)), or act(acc * scale + shift) + residual
// with p.residual_after_act, rounded to T, stored at channel out_channel of the destination; `c` =
// conv_coeffs(p, g, n), out_channel = conv_out_channel(p, g, n). The residual is indexed by the conv's own
// channel oc, never by the mapped one.
template <typename T, int ACT>
__device__ __forceinline__ void conv_store(const ConvProblem<T>& p, int g, int m, int n, float acc,
                                           ChannelAffine::Coeffs c, int out_channel) {
  if (m >= p.M || n >= p.C_out_g) return;
  const int ow = m % p.OW, oh = (m / p.OW) % p.OH, nb = m / (p.OW * p.OH);  // never pooled (conv_store_pooled)
  const int oc = g * p.C_out_g + n;
  float v = c.apply(acc);
  const float r = p.res != nullptr ? to_float(p.res[nb * p.srn + oh * p.srh + ow * p.srw + oc * p.src]) : 0.0f;
  v = p.residual_after_act ? activate<ACT>(v, p.slope) + r : activate<ACT>(v + r, p.slope);
  p.out[nb * p.son + oh * p.soh + ow * p.sow + (long long)out_channel * p.soc] = from_float<T>(v);
}

// The output pool's store (ConvProblem::out_pool): rows m .. m + kConvOutPoolArea - 1 are one window (m a
// multiple of kConvOutPoolArea); acc_of(r) is row m + r's accumulator. Each conv pixel of the window inside
// the conv output goes through the epilogue (BatchNorm, activation: the pool follows them, whatever the sign
// of the BatchNorm scale), the max in float32 (NaN propagates, as torch's max pool), rounded to T once: a max
// commutes with rounding, so this is torch's pool of the rounded conv output.
template <typename T, int ACT, typename AccOf>
__device__ __forceinline__ void conv_store_pooled(const ConvProblem<T>& p, int g, int m, int n, AccOf acc_of,
                                                  ChannelAffine::Coeffs c, int out_channel) {
  if (m >= p.M || n >= p.C_out_g) return;
  const int pooled = m / kConvOutPoolArea;
  const int pw = pooled % p.pooled_w, ph = (pooled / p.pooled_w) % p.pooled_h, nb = pooled / (p.pooled_w * p.pooled_h);
  float v = -__int_as_float(0x7f800000);  // -inf; the window's first pixel is always inside the conv output
  FB_UNROLL
  for (int r = 0; r < kConvOutPoolArea; ++r) {
    const int oh = ph * kConvOutPool + r / kConvOutPool, ow = pw * kConvOutPool + r % kConvOutPool;
    if (oh < p.OH && ow < p.OW) v = nan_max(v, activate<ACT>(c.apply(acc_of(r)), p.slope));
  }
  p.out[nb * p.son + ph * p.soh + pw * p.sow + (long long)out_channel * p.soc] = from_float<T>(v);
}

// The same, the destination channel computed here (callers that build a ConvProblem without channel maps).
template <typename T, int ACT>
__device__ __forceinline__ void conv_store(const ConvProblem<T>& p, int g, int m, int n, float acc,
                                           ChannelAffine::Coeffs c) {
  conv_store<T, ACT>(p, g, m, n, acc, c, conv_out_channel(p, g, n));
}

// The plain (SIMT) variant: tiles staged as float32, each thread accumulates TM x TN outputs.
template <typename T, int ACT, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), kConvMinBlocks) conv_bn_act_kernel(FB_CONV_PARAMS(T)) {
  constexpr int kThreads = (BM / TM) * (BN / TN);
  const ConvSegmentTile tile = conv_segment_tile(num_segments, C_out_g, C_out1, BN, blockIdx.y);
  const ConvProblem<T> p =
      conv_segment_problem<kConvSegmentOperand>(FB_CONV_PROBLEM(T), tile.segment, FB_CONV_SEGMENT(T, 1),
                                                FB_CONV_SEGMENT(T, 2));
  // +1 column: the loader writes down a column (fixed k, consecutive m), which would
  // otherwise hit one shared-memory bank.
  __shared__ float a_tile[BK][BM + 1];
  __shared__ float b_tile[BK][BN + 1];

  const int g = blockIdx.z;
  const int m0 = blockIdx.x * BM, n0 = tile.n_tile * BN;
  const ConvTileLoader<T, BM, BN, BK, kThreads> loader(p, g, m0, n0);
  // Thread (tm, tn) owns rows tm * TM .. tm * TM + TM - 1 (whole output pool windows) and columns
  // tn + j * (BN / TN), so neighbouring threads store neighbouring output channels (contiguous in NHWC).
  static_assert(TM % kConvOutPoolArea == 0 && BM % kConvOutPoolArea == 0, "a thread's rows are whole pool windows");
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
      for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][tm * TM + i];
      FB_UNROLL
      for (int j = 0; j < TN; ++j) b[j] = b_tile[kk][tn + j * (BN / TN)];
      FB_UNROLL
      for (int i = 0; i < TM; ++i)
        FB_UNROLL
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten by the next step's loads
  }
  const ConvProblem<T> pe =
      conv_segment_problem<kConvSegmentEpilogue>(p, tile.segment, FB_CONV_SEGMENT(T, 1), FB_CONV_SEGMENT(T, 2));
  FB_UNROLL
  for (int j = 0; j < TN; ++j) {
    const int n = n0 + tn + j * (BN / TN);
    const ChannelAffine::Coeffs c = conv_coeffs(pe, g, n);  // once per owned column
    const int out_channel = conv_out_channel(pe, g, n);
    if (pe.out_pool) {
      FB_UNROLL
      for (int i = 0; i < TM; i += kConvOutPoolArea)
        conv_store_pooled<T, ACT>(pe, g, m0 + tm * TM + i, n, [&](int r) { return acc[i + r][j]; }, c, out_channel);
    } else {
      FB_UNROLL
      for (int i = 0; i < TM; ++i) conv_store<T, ACT>(pe, g, m0 + tm * TM + i, n, acc[i][j], c, out_channel);
    }
  }
}

// --- the tensor-core variant (float16 / bfloat16, sm_80+) -----------------------------------
// A BM x BN block tile over (BM / 2) x 32 warp tiles (2 x BN / 32 warps), reduction steps of BK = 32
// staged through kStages buffers of dynamic shared memory: while the warps multiply step kt (ldmatrix
// + mma.sync m16n8k16, float32 accumulators in registers), the copies of steps kt + 1 .. kt + kStages - 1
// are in flight. The warp grid, the shared layout (A as [m][k] and B as [n][k], rows padded to kLd = BK + 8
// elements, 80 bytes) and the warps' ldmatrix + mma.sync step are kernels/mma.cuh's MmaBlockTile, which
// the separable conv's tensor-core kernel shares.
// Staging, decided per launch at run time (one instantiation serves both; the branch is uniform):
//   A: 16-byte cp.async of 8 input channels when the input's channel stride is 1, C_in_g % 8 == 0, the
//      pointer and the other strides are 16-byte multiples, and there is no in_scale, input pool or
//      in_channel_map (a copy can neither scale nor pool, and 8 mapped channels need not be adjacent);
//      zero-filled where the window leaves the image, past M or past K.
//   B: likewise when the weight's input-channel stride is 1 (channels_last weights, 1x1 convs).
//   Otherwise ConvTileLoader gathers that operand element by element and stores the stage directly
//   (synchronously; same pipeline, same barriers).
// The epilogue writes the accumulators to shared memory (MmaBlockTile::store), then stores through
// conv_coeffs / conv_store (and so through out_channel_map), as the plain variant does.
template <int BM_, int BN_>
struct ConvMmaTile : MmaBlockTile<BM_, BN_, 32, 2, BN_ / 32> {  // BM, BN, BK = 32, kThreads, kLd, MT, NT, ...
  using Base = MmaBlockTile<BM_, BN_, 32, 2, BN_ / 32>;
  static constexpr int kStages = 4;
  static constexpr int kSmemBytes = kStages * (BM_ + BN_) * Base::kLd * 2;
  static_assert(BM_ % 32 == 0 && BN_ % 32 == 0, "warp tiles are (BM / 2) x 32");
  static_assert((BM_ * Base::BK / 8) % Base::kThreads == 0 && (BN_ * Base::BK / 8) % Base::kThreads == 0,
                "16-byte chunks split evenly");
};
// The launchers (csrc/ops.cu, NvrtcRuntime in fastbone/cuda/ops.py) take the large tile where C_out per
// group fills it and the large tiles still give kConvMmaLargeMinBlocks blocks (two waves of a 132-SM
// GPU at two blocks per SM), the small one otherwise.
using ConvMmaLarge = ConvMmaTile<128, 128>;
using ConvMmaSmall = ConvMmaTile<64, 64>;
constexpr int kConvMmaLargeMinCout = 128;
constexpr int kConvMmaLargeMinBlocks = 264;
constexpr int kConvMmaMinCC = FB_MMA_MIN_CC;

// Minimum blocks per SM: 2 of the 256-thread tile, 4 of the 128-thread one, i.e. up to 128 registers a thread
// (shared memory allows no more blocks than that anyway). Left to itself, ptxas put the 64x64 tile at 72
// registers on sm_80 and spilled once the input pool, segments and channel maps were in.
template <int BM, int BN>
constexpr int kConvMmaMinBlocks = ConvMmaTile<BM, BN>::kThreads >= 256 ? 2 : 4;

template <typename T, int ACT, int BM, int BN>
__global__ void __launch_bounds__((ConvMmaTile<BM, BN>::kThreads), (kConvMmaMinBlocks<BM, BN>))
    conv_bn_act_mma_kernel(FB_CONV_PARAMS(T)) {
#ifdef FB_MMA_UNSUPPORTED
  __trap();  // compiled for a GPU before sm_80 (FASTBONE_CUDA_ARCHS): never launched there
#else
  using Tile = ConvMmaTile<BM, BN>;
  constexpr int BK = Tile::BK, LD = Tile::kLd, S = Tile::kStages, kThreads = Tile::kThreads;
  using AChunks = MmaStageChunks<BM, BK, kThreads>;  // this thread's 16-byte chunks of the A / B stages
  using BChunks = MmaStageChunks<BN, BK, kThreads>;  // (even splits: ConvMmaTile's assert)
  constexpr int kAChunks = AChunks::kPasses, kBChunks = BChunks::kPasses;
  constexpr int kBand = kThreads / BK;               // rows of one pass of the element gather
  const ConvSegmentTile tile = conv_segment_tile(num_segments, C_out_g, C_out1, BN, blockIdx.y);
  const ConvProblem<T> p =
      conv_segment_problem<kConvSegmentOperand>(FB_CONV_PROBLEM(T), tile.segment, FB_CONV_SEGMENT(T, 1),
                                                FB_CONV_SEGMENT(T, 2));
  FB_KERNEL_DYNAMIC_SMEM_FLOAT(smem);
  T* const a_smem = reinterpret_cast<T*>(smem);  // [S][BM][LD]
  T* const b_smem = a_smem + S * BM * LD;        // [S][BN][LD]

  const int g = blockIdx.z;
  const int m0 = blockIdx.x * BM, n0 = tile.n_tile * BN;
  const int K = C_in_g * KH * KW, k_tiles = (K + BK - 1) / BK;
  // 8 consecutive k are 8 input channels of one tap when C_in_g % 8 == 0 (k0 steps by 32). The stride of a
  // size-1 dimension never multiplies a non-zero index (a 1x1 OIHW weight has swh = sww = 1): not checked.
  // The weight and its strides are the block's segment's (p, not the parameters).
  const bool a_vec = C_in_g % 8 == 0 && sxc == 1 && in_scale == nullptr && input_pool_mode == kConvInputPoolNone &&
                     in_channel_map == nullptr && is_aligned16(x) && sxn % 8 == 0 && (H == 1 || sxh % 8 == 0) &&
                     (W == 1 || sxw % 8 == 0);
  const bool b_vec = C_in_g % 8 == 0 && p.swc == 1 && is_aligned16(p.w) && p.swo % 8 == 0 &&
                     (KH == 1 || p.swh % 8 == 0) && (KW == 1 || p.sww % 8 == 0);

  // This thread's 16-byte chunks: column chunks.col of rows chunks.row(i) (A and B alike).
  const AChunks a_chunks(threadIdx.x);
  const BChunks b_chunks(threadIdx.x);
  long long a_off[kAChunks];
  int a_ih0[kAChunks], a_iw0[kAChunks];
  FB_UNROLL
  for (int i = 0; i < kAChunks; ++i) {
    const ConvPixel px = conv_row_pixel(p, m0 + a_chunks.row(i));
    a_off[i] = px.ok ? px.nb * sxn + (long long)g * C_in_g : 0;  // sxc == 1 wherever it is used
    // A row past M (or past the conv output) gets a window corner far outside the input: every tap reads as
    // padding.
    a_ih0[i] = px.ok ? px.oh * stride_h - pad_h : ConvTileLoader<T, BM, BN, BK, kThreads>::kOutside;
    a_iw0[i] = px.ok ? px.ow * stride_w - pad_w : ConvTileLoader<T, BM, BN, BK, kThreads>::kOutside;
  }
  long long b_off[kBChunks];
  bool b_ok[kBChunks];
  FB_UNROLL
  for (int i = 0; i < kBChunks; ++i) {
    const int n = n0 + b_chunks.row(i);
    b_ok[i] = n < p.C_out_g;
    b_off[i] = (long long)(g * p.C_out_g + (b_ok[i] ? n : 0)) * p.swo;
  }

  // Stages reduction step kt into buffer `stage`: copies issued (not waited for), or stored directly.
  auto load_stage = [&](int kt, int stage) {
    T* const as = a_smem + stage * BM * LD;
    T* const bs = b_smem + stage * BN * LD;
    const int k0 = kt * BK;
    const int k = k0 + a_chunks.col * 8;  // b_chunks.col alike
    const bool k_ok = k < K;
    const int c = k_ok ? k % C_in_g : 0, tap = k_ok ? k / C_in_g : 0;
    const int kw = tap % KW, kh = tap / KW;
    if (a_vec) {
      FB_UNROLL
      for (int i = 0; i < kAChunks; ++i) {
        const int ih = a_ih0[i] + kh * dil_h, iw = a_iw0[i] + kw * dil_w;
        const bool ok = k_ok && ih >= 0 && ih < H && iw >= 0 && iw < W;
        const T* src = ok ? x + a_off[i] + ih * sxh + iw * sxw + c : x;
        cp_async_16(as + a_chunks.offset(i, LD), src, ok);
      }
    }
    if (b_vec) {
      const long long w_koff = c + kh * p.swh + kw * p.sww;
      FB_UNROLL
      for (int i = 0; i < kBChunks; ++i) {
        const bool ok = k_ok && b_ok[i];
        cp_async_16(bs + b_chunks.offset(i, LD), ok ? p.w + b_off[i] + w_koff : p.w, ok);
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

  const typename Tile::Warp warp = Tile::warp(threadIdx.x);
  typename Tile::Acc acc;
  Tile::zero(acc);

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

    Tile::multiply(acc, a_smem + (kt % S) * BM * LD, b_smem + (kt % S) * BN * LD, warp);
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
  Tile::store(acc, c_tile, LDC, warp);
  __syncthreads();
  const int col = threadIdx.x % BN;
  const ConvProblem<T> pe =
      conv_segment_problem<kConvSegmentEpilogue>(p, tile.segment, FB_CONV_SEGMENT(T, 1), FB_CONV_SEGMENT(T, 2));
  const ChannelAffine::Coeffs c = conv_coeffs(pe, g, n0 + col);
  const int out_channel = conv_out_channel(pe, g, n0 + col);
  if (pe.out_pool) {  // each thread stores whole windows: kConvOutPoolArea consecutive rows of its column
    static_assert(BM % kConvOutPoolArea == 0, "the tile's rows are whole pool windows");
FB_UNROLL_BY(1)
    for (int row = threadIdx.x / BN * kConvOutPoolArea; row < BM; row += kThreads / BN * kConvOutPoolArea)
      conv_store_pooled<T, ACT>(pe, g, m0 + row, n0 + col, [&](int r) { return c_tile[(row + r) * LDC + col]; }, c,
                                out_channel);
  } else {
FB_UNROLL_BY(4)
    for (int row = threadIdx.x / BN; row < BM; row += kThreads / BN)
      conv_store<T, ACT>(pe, g, m0 + row, n0 + col, c_tile[row * LDC + col], c, out_channel);
  }
#endif  // FB_MMA_UNSUPPORTED
}

}  // namespace fb
