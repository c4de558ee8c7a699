// Shared device helpers for every fastbone CUDA kernel family.
//
// This header is compiled three ways (DESIGN.md, "Three builds of one CUDA source"):
// nvcc (fastbone._C), NVRTC (no host headers available) and g++ with the host
// emulation shim force-included (FASTBONE_EMU; the shim provides __half and
// __nv_bfloat16). So: no standard library headers, no torch, only `long long`
// and the fixed-width types the three compilers share.
#pragma once

#ifndef FASTBONE_EMU
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

// Loop unrolling hints; g++ (emulation build) does not know `#pragma unroll`. FB_UNROLL_BY(n) with a
// literal n: FB_UNROLL_BY(1) keeps a loop rolled (less code where unrolling buys nothing).
#ifdef FASTBONE_EMU
#define FB_UNROLL
#define FB_UNROLL_BY(n)
#else
#define FB_UNROLL _Pragma("unroll")
#define FB_PRAGMA_(text) _Pragma(#text)
#define FB_UNROLL_BY(n) FB_PRAGMA_(unroll n)
#endif

// The launch's dynamic shared memory as `float* name`, in kernel headers: launch.h's FB_DYNAMIC_SMEM
// pulls in host headers, which NVRTC does not have (se.cuh; depthwise.cuh has its own copy).
#ifdef FASTBONE_EMU
#define FB_KERNEL_DYNAMIC_SMEM_FLOAT(name) float* name = static_cast<float*>(::fb_emu::dynamic_smem())
#else
#define FB_KERNEL_DYNAMIC_SMEM_FLOAT(name)                                \
  extern __shared__ __align__(16) unsigned char fb_kernel_dynamic_smem_[]; \
  float* name = reinterpret_cast<float*>(fb_kernel_dynamic_smem_)
#endif

namespace fb {

// Dtype codes passed by the bindings (0 float32, 1 float16, 2 bfloat16).
enum DtypeCode { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Activation codes; keep in sync with fastbone/ops/activation.py and kernels/activation.py.
enum ActCode { kIdentity = 0, kRelu = 1, kRelu6 = 2, kSilu = 3, kLeakyRelu = 4, kHardswish = 5 };
constexpr int kNumActivations = 6;

// Every kernel computes in float32: loads widen, stores round to nearest even.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ float load_float(const T* p) { return to_float(*p); }

// Comparisons are written so that NaN takes the branch that returns it unchanged
// (`x < 0` is false for NaN), as torch's relu/relu6/leaky_relu/hardswish propagate NaN.
__device__ __forceinline__ float clamp_0_6(float x) { return x < 0.0f ? 0.0f : (x > 6.0f ? 6.0f : x); }

template <int ACT>
__device__ __forceinline__ float activate(float x, float slope) {
  if (ACT == kRelu) return x < 0.0f ? 0.0f : x;
  if (ACT == kRelu6) return clamp_0_6(x);
  if (ACT == kSilu) return x / (1.0f + expf(-x));
  if (ACT == kLeakyRelu) return x < 0.0f ? x * slope : x;
  if (ACT == kHardswish) return x * clamp_0_6(x + 3.0f) / 6.0f;
  return x;
}

// An activation chosen at run time (the separable kernel's depthwise stage, the Fire expand kernel):
// one instantiation serves every activation where a uniform branch per element is cheap.
__device__ __forceinline__ float activate_dynamic(int act, float x, float slope) {
  switch (act) {
    case kRelu: return activate<kRelu>(x, slope);
    case kRelu6: return activate<kRelu6>(x, slope);
    case kSilu: return activate<kSilu>(x, slope);
    case kLeakyRelu: return activate<kLeakyRelu>(x, slope);
    case kHardswish: return activate<kHardswish>(x, slope);
    default: return x;
  }
}

// The conv epilogue's per-output-channel affine map, v = acc * scale + shift, in float32 from the
// module's own tensors (nothing folded or cached, so every call sees the current values):
//   BatchNorm (inference): scale = gamma / sqrt(var + eps), shift = beta + (conv_bias - mean) * scale
//   no BatchNorm:          scale = 1, shift = conv_bias (acc * 1 + b == acc + b exactly)
// Every pointer is float32, one value per output channel, nullptr for "absent": BatchNorm is
// present iff bn_mean is (then bn_var is too); gamma / beta absent (affine=False) read as 1 / 0,
// an absent conv bias as 0. 1 / sqrtf rather than rsqrtf: both IEEE-rounded, so the GPU builds
// and the emulator compute the same bits.
struct ChannelAffine {
  const float* bias;
  const float* bn_weight;
  const float* bn_bias;
  const float* bn_mean;
  const float* bn_var;
  float eps;

  struct Coeffs {
    float scale, shift;
    __device__ __forceinline__ float apply(float acc) const { return fmaf(acc, scale, shift); }
  };

  __device__ __forceinline__ Coeffs at(int c) const {
    const float b = bias != nullptr ? bias[c] : 0.0f;
    if (bn_mean == nullptr) return {1.0f, b};
    const float gamma = bn_weight != nullptr ? bn_weight[c] : 1.0f;
    const float beta = bn_bias != nullptr ? bn_bias[c] : 0.0f;
    const float scale = gamma * (1.0f / sqrtf(bn_var[c] + eps));
    return {scale, fmaf(b - bn_mean[c], scale, beta)};
  }
};

// Max that propagates NaN like torch's max pool (once NaN, stays NaN).
__device__ __forceinline__ float nan_max(float acc, float v) { return (v > acc || v != v) ? v : acc; }

__host__ __device__ __forceinline__ long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

}  // namespace fb
