// Pooling over strided (NHWC in practice) tensors: max / average pool with padding and
// ceil_mode (the output size comes from the op layer), adaptive average pool with torch's
// bins, and a global average pool where one block reduces H * W for a group of channels.
// All accumulation is float32.
#pragma once

#include "common.cuh"

namespace fb {

constexpr int kPoolThreads = 256;
constexpr int kPoolMaxBlocks = 4096;  // elementwise kernels loop grid-stride beyond this

enum PoolMode { kPoolMax = 0, kPoolAvg = 1 };

// Decomposes a flat output index with the channel fastest, so neighbouring threads
// touch neighbouring channels (contiguous in NHWC).
struct OutPixel {
  int n, c, oh, ow;
};
__device__ __forceinline__ OutPixel unflatten(long long idx, int C, int OH, int OW) {
  OutPixel p;
  p.c = (int)(idx % C);
  long long rest = idx / C;
  p.ow = (int)(rest % OW);
  rest /= OW;
  p.oh = (int)(rest % OH);
  p.n = (int)(rest / OH);
  return p;
}

// Max pool (NaN propagates) or average pool. Average divisor as torch: the window
// clipped to the padded input when count_include_pad, else the window clipped to the input.
template <typename T, int MODE>
__global__ void __launch_bounds__(kPoolThreads)
window_pool2d_kernel(const T* __restrict__ x, T* __restrict__ out, long long total, int C, int H, int W,
                     int OH, int OW, long long sxn, long long sxc, long long sxh, long long sxw,
                     long long son, long long soc, long long soh, long long sow,
                     int kh, int kw, int sh, int sw, int ph, int pw, int count_include_pad) {
  for (long long idx = (long long)blockIdx.x * kPoolThreads + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * kPoolThreads) {
    const OutPixel o = unflatten(idx, C, OH, OW);
    const int hs = o.oh * sh - ph, ws = o.ow * sw - pw;
    const int h_lo = hs < 0 ? 0 : hs, h_hi = hs + kh < H ? hs + kh : H;
    const int w_lo = ws < 0 ? 0 : ws, w_hi = ws + kw < W ? ws + kw : W;
    const T* xp = x + o.n * sxn + o.c * sxc;
    // -inf, not the window's first value: an empty window (an empty input, which the op layer
    // refuses, reaching the kernel through a direct call) reads nothing and gives -inf, as the
    // Triton kernel does; a NaN in the window still wins (nan_max).
    float acc = MODE == kPoolMax ? -__int_as_float(0x7f800000) : 0.0f;
    for (int h = h_lo; h < h_hi; ++h)
      for (int v = w_lo; v < w_hi; ++v) {
        const float val = to_float(xp[h * sxh + v * sxw]);
        acc = MODE == kPoolMax ? nan_max(acc, val) : acc + val;
      }
    if (MODE == kPoolAvg) {
      int count;
      if (count_include_pad) {
        const int h_end = hs + kh < H + ph ? hs + kh : H + ph, w_end = ws + kw < W + pw ? ws + kw : W + pw;
        count = (h_end - hs) * (w_end - ws);
      } else {
        count = (h_hi - h_lo) * (w_hi - w_lo);
      }
      acc /= (float)count;
    }
    out[o.n * son + o.c * soc + o.oh * soh + o.ow * sow] = from_float<T>(acc);
  }
}

// Adaptive average pool: output cell o covers [floor(o * I / O), ceil((o + 1) * I / O)).
template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
adaptive_avg_pool2d_kernel(const T* __restrict__ x, T* __restrict__ out, long long total, int C, int H, int W,
                           int OH, int OW, long long sxn, long long sxc, long long sxh, long long sxw,
                           long long son, long long soc, long long soh, long long sow) {
  for (long long idx = (long long)blockIdx.x * kPoolThreads + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * kPoolThreads) {
    const OutPixel o = unflatten(idx, C, OH, OW);
    const int h_lo = (int)((long long)o.oh * H / OH), h_hi = (int)(((long long)(o.oh + 1) * H + OH - 1) / OH);
    const int w_lo = (int)((long long)o.ow * W / OW), w_hi = (int)(((long long)(o.ow + 1) * W + OW - 1) / OW);
    const T* xp = x + o.n * sxn + o.c * sxc;
    float acc = 0.0f;
    for (int h = h_lo; h < h_hi; ++h)
      for (int v = w_lo; v < w_hi; ++v) acc += to_float(xp[h * sxh + v * sxw]);
    out[o.n * son + o.c * soc + o.oh * soh + o.ow * sow] = from_float<T>(acc / (float)((h_hi - h_lo) * (w_hi - w_lo)));
  }
}

// Global average pool: block (channel group, image). Thread t sums channel t % kGapChannels
// over pixels t / kGapChannels, + kGapLanes, ...; the lanes' partial sums meet in shared memory.
constexpr int kGapChannels = 32;
constexpr int kGapLanes = kPoolThreads / kGapChannels;

template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
global_avg_pool_kernel(const T* __restrict__ x, T* __restrict__ out, int C, int H, int W,
                       long long sxn, long long sxc, long long sxh, long long sxw,
                       long long son, long long soc) {
  __shared__ float partial[kGapLanes][kGapChannels];
  const int cl = threadIdx.x % kGapChannels, lane = threadIdx.x / kGapChannels;
  const int c = blockIdx.x * kGapChannels + cl;
  const int n = blockIdx.y;
  float acc = 0.0f;
  const long long hw = (long long)H * W;  // may exceed 2^31 (one huge image): 64-bit then
  if (c < C) {
    const T* xp = x + n * sxn + c * sxc;
    if (hw <= 0x7fffffffLL - kGapLanes) {  // the common case: 32-bit pixel index and divisions
      for (int p = lane; p < (int)hw; p += kGapLanes) acc += to_float(xp[(p / W) * sxh + (p % W) * sxw]);
    } else {
      for (long long p = lane; p < hw; p += kGapLanes) acc += to_float(xp[(p / W) * sxh + (p % W) * sxw]);
    }
  }
  partial[lane][cl] = acc;
  __syncthreads();
  if (lane == 0 && c < C) {
    float sum = 0.0f;
    for (int l = 0; l < kGapLanes; ++l) sum += partial[l][cl];
    out[n * son + c * soc] = from_float<T>(sum / (float)hw);
  }
}

}  // namespace fb
