// The squeeze-excitation gate (the CUDA counterpart of kernels/se.py), one block per image:
//
//   mean[c]   = sum_{h, w} x[n, c, h, w] / (H * W)                          (float32 sums)
//   hidden[s] = act(sum_c w1[s, c] * mean[c] + b1[s])                        (fc1: a 1x1 conv)
//   out[n, c] = sigmoid | hardsigmoid(sum_s w2[c, s] * hidden[s] + b2[c])    (fc2, float32)
//
// The block walks the channels kSeLanes at a time: lane l of every warp sums channel c0 + l over
// a strided subset of the pixels (consecutive lanes read consecutive channels: contiguous in NHWC),
// the warps' partial sums meet in shared memory, and the chunk's means are folded at once into
// fc1's accumulators (hidden, dynamic shared memory, S floats; thread t owns s = t + k * threads).
// So x is read once and no mean goes to global memory. Then fc2 and the gate, one output channel
// per thread. w1 (S, C) and w2 (C, S) are contiguous, b1 / b2 vectors or nullptr, all in x's type T
// (widened to float32 as they are read: a float16 model's weights need no cast).
// Plain CUDA (shared memory + __syncthreads): runs under the host emulator and on any GPU.
#pragma once

#include "common.cuh"

namespace fb {

constexpr int kSeThreads = 256;
constexpr int kSeLanes = 32;  // channels per chunk
constexpr int kSeMaxSqueeze = 8192;  // hidden in dynamic shared memory: 32 KiB, under every GPU's default 48
enum SeGateCode { kGateSigmoid = 0, kGateHardsigmoid = 1 };

__device__ __forceinline__ float se_gate_fn(int gate, float v) {
  if (gate == kGateHardsigmoid) return clamp_0_6(v + 3.0f) / 6.0f;  // NaN propagates (clamp_0_6)
  return 1.0f / (1.0f + expf(-v));
}

// TX: x's element type, T: the weights'. se_gate runs <T, T>; the gate from the depthwise kernel's
// pool sums runs <float, T> with x = the (N, tiles, C) float32 sums read as an image of tiles x 1
// pixels (HW = tiles, W = 1) and inv_hw = 1 / (the activation's H * W).
template <typename TX, typename T>
__global__ void __launch_bounds__(kSeThreads)
se_gate_kernel(float* __restrict__ out, const TX* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ b1,
               const T* __restrict__ w2, const T* __restrict__ b2, int C, int HW,
               int W, int S, long long sxn, long long sxc, long long sxh, long long sxw, float inv_hw, int act,
               float slope, int gate) {
  constexpr int kRows = kSeThreads / kSeLanes;
  __shared__ float partial[kRows][kSeLanes + 1];
  __shared__ float mean[kSeLanes];
  FB_KERNEL_DYNAMIC_SMEM_FLOAT(hidden);
  const long long n = blockIdx.x;
  const int lane = threadIdx.x % kSeLanes, row = threadIdx.x / kSeLanes;
  const TX* img = x + n * sxn;
  for (int s = threadIdx.x; s < S; s += kSeThreads) hidden[s] = 0.0f;  // each thread its own entries

  for (int c0 = 0; c0 < C; c0 += kSeLanes) {
    const int c = c0 + lane;
    float sum = 0.0f;
    if (c < C)
      for (int p = row; p < HW; p += kRows) sum += to_float(img[(long long)(p / W) * sxh + (long long)(p % W) * sxw +
                                                                 (long long)c * sxc]);
    partial[row][lane] = sum;
    __syncthreads();
    if (threadIdx.x < kSeLanes) {
      float t = 0.0f;
      for (int r = 0; r < kRows; ++r) t += partial[r][threadIdx.x];
      mean[threadIdx.x] = t * inv_hw;
    }
    __syncthreads();
    const int chunk = C - c0 < kSeLanes ? C - c0 : kSeLanes;
    for (int s = threadIdx.x; s < S; s += kSeThreads) {
      float acc = hidden[s];
      const T* w1_row = w1 + (long long)s * C + c0;
      for (int j = 0; j < chunk; ++j) acc = fmaf(to_float(w1_row[j]), mean[j], acc);
      hidden[s] = acc;
    }
    __syncthreads();  // partial / mean are overwritten by the next chunk
  }
  for (int s = threadIdx.x; s < S; s += kSeThreads)
    hidden[s] = activate_dynamic(act, hidden[s] + (b1 != nullptr ? to_float(b1[s]) : 0.0f), slope);
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kSeThreads) {
    float g = b2 != nullptr ? to_float(b2[c]) : 0.0f;
    const T* w2_row = w2 + (long long)c * S;
    for (int s = 0; s < S; ++s) g = fmaf(to_float(w2_row[s]), hidden[s], g);
    out[n * C + c] = se_gate_fn(gate, g);
  }
}

}  // namespace fb
