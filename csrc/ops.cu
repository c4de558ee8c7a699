// Launchers for the kernels in csrc/kernels/*.cuh (declared in ops.h). Their pybind11
// bindings live in ops_bindings.cpp: kept out of this file so nvcc, which compiles it once
// per target architecture, does not parse pybind11 each time.
//
// Every launcher takes raw pointers (uintptr_t, 0 for "absent"), shapes and strides as
// int64 lists, the dtype code (0 float32, 1 float16, 2 bfloat16), the activation code
// (fastbone/ops/activation.py) and the stream as an integer. Arguments are validated by
// the op layer; the checks here only guard the kernels' own limits.
// The launch geometry below is mirrored by NvrtcRuntime in fastbone/cuda/ops.py: change both.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "launch.h"
#include "ops.h"
#include "kernels/conv.cuh"
#include "kernels/pool.cuh"
#include "kernels/stem.cuh"

namespace fb_ops {

// --- dtype / activation dispatch: one generic lambda serves every instantiation ---------

template <typename T>
struct DtypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(int64_t code, F&& f) {
  switch (code) {
    case fb::kFloat32: f(DtypeTag<float>{}); return;
    case fb::kFloat16: f(DtypeTag<__half>{}); return;
    case fb::kBFloat16: f(DtypeTag<__nv_bfloat16>{}); return;
  }
  throw std::invalid_argument("fastbone cuda kernels: unknown dtype code " + std::to_string(code) +
                              "; accepted: 0 (float32), 1 (float16), 2 (bfloat16)");
}

template <int... Codes, typename F>
void dispatch_act_impl(int64_t code, F&& f, std::integer_sequence<int, Codes...>) {
  bool found = ((code == Codes ? (f(std::integral_constant<int, Codes>{}), true) : false) || ...);
  if (!found)
    throw std::invalid_argument("fastbone cuda kernels: unknown activation code " + std::to_string(code) +
                                "; accepted: 0.." + std::to_string(fb::kNumActivations - 1));
}

template <typename F>
void dispatch_act(int64_t code, F&& f) {
  dispatch_act_impl(code, std::forward<F>(f), std::make_integer_sequence<int, fb::kNumActivations>{});
}

void check_dims(const Dims& d, const char* name) {
  if (d.size() != 4) throw std::invalid_argument(std::string(name) + " must have 4 entries (N, C, H, W order)");
}

void check_params(const Dims& d, size_t n, const char* name) {
  if (d.size() != n) throw std::invalid_argument(std::string(name) + " must have " + std::to_string(n) + " entries");
}

// The kernels index pixels and channels with 32-bit ints (offsets are 64-bit).
void check_int_range(int64_t v, const char* what) {
  if (v > INT32_MAX)
    throw std::invalid_argument(std::string(what) + " = " + std::to_string(v) +
                                " exceeds the kernels' 32-bit index range; split the batch");
}

template <typename T>
const T* in_ptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* out_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// --- conv + BatchNorm / bias + activation (+ residual, + channel slice) ------------------

// BatchNorm needs both running statistics (the kernels read bn_var whenever bn_mean is given).
void check_bn(uintptr_t bn_mean, uintptr_t bn_var) {
  if ((bn_mean == 0) != (bn_var == 0))
    throw std::invalid_argument("BatchNorm needs both bn_mean and bn_var (or neither, for no BatchNorm)");
}

#ifndef FASTBONE_EMU
// Whether the current device runs the tensor-core conv (cached per device).
bool device_has_tensor_core_conv() {
  static int cached[64] = {0};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cached[device] = major * 10 + minor >= fb::kConvTcMinCC ? 2 : 1;
  }
  return cached[device] == 2;
}
#endif

// conv = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}; residual == 0 for none.
void conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w, const Dims& w_shape,
                 const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight, uintptr_t bn_bias, uintptr_t bn_mean,
                 uintptr_t bn_var, double eps, uintptr_t residual, const Dims& res_strides, uintptr_t out,
                 const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset, const Dims& conv,
                 int64_t groups, int64_t dtype, int64_t act, double slope, uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(w_shape, "w_shape");
  check_dims(w_strides, "w_strides"), check_dims(res_strides, "res_strides"), check_dims(out_shape, "out_shape");
  check_dims(out_strides, "out_strides"), check_params(conv, 6, "conv"), check_bn(bn_mean, bn_var);
  const int64_t n = x_shape[0], c_out = w_shape[0], oh = out_shape[2], ow = out_shape[3];
  const int64_t c_out_g = c_out / groups;
  const int64_t m = n * oh * ow;
  if (m == 0 || c_out == 0) return;
  check_int_range(m, "N * OH * OW");
  check_int_range(w_shape[1] * w_shape[2] * w_shape[3], "C_in/groups * KH * KW");
  const bool narrow = c_out_g <= fb::kConvNarrowMaxCout;
  // The kernels' arguments, the same for every variant (FB_CONV_PARAMS in conv.cuh).
#define CONV_ARGS                                                                                               \
  in_ptr<T>(x), in_ptr<T>(w), in_ptr<float>(bias), in_ptr<float>(bn_weight), in_ptr<float>(bn_bias),        \
      in_ptr<float>(bn_mean), in_ptr<float>(bn_var), in_ptr<T>(residual), out_ptr<T>(out), (int)m,            \
      (int)x_shape[2], (int)x_shape[3], (int)w_shape[1], (int)oh, (int)ow, (int)c_out_g, (int)w_shape[2],     \
      (int)w_shape[3], (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2],             \
      (long long)x_strides[3], (long long)w_strides[0], (long long)w_strides[1], (long long)w_strides[2],     \
      (long long)w_strides[3], (long long)res_strides[0], (long long)res_strides[1],                          \
      (long long)res_strides[2], (long long)res_strides[3], (long long)out_strides[0],                        \
      (long long)out_strides[1], (long long)out_strides[2], (long long)out_strides[3], (int)out_c_offset,     \
      (int)conv[0], (int)conv[1], (int)conv[2], (int)conv[3], (int)conv[4], (int)conv[5], (float)eps,         \
      (float)slope
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_act(act, [&](auto act_c) {
      constexpr int ACT = decltype(act_c)::value;
      auto launch = [&](auto tile) {
        using Tile = decltype(tile);
        const dim3 grid((unsigned)fb::ceil_div(m, Tile::BM), (unsigned)fb::ceil_div(c_out_g, Tile::BN),
                        (unsigned)groups);
        FB_LAUNCH((fb::conv_bn_act_kernel<T, ACT, Tile::BM, Tile::BN, Tile::BK, Tile::TM, Tile::TN>), grid,
                  dim3(Tile::kThreads), 0, FB_STREAM(stream),
                  CONV_ARGS);
      };
#ifndef FASTBONE_EMU
      if constexpr (!std::is_same<T, float>::value) {
        if (!narrow && device_has_tensor_core_conv()) {  // float16 / bfloat16 on sm_80+: tensor cores
          const dim3 grid((unsigned)fb::ceil_div(m, fb::kConvTcBM), (unsigned)fb::ceil_div(c_out_g, fb::kConvTcBN),
                          (unsigned)groups);
          FB_LAUNCH((fb::conv_bn_act_tc_kernel<T, ACT>), grid, dim3(fb::kConvTcThreads), 0, FB_STREAM(stream),
                    CONV_ARGS);
          return;
        }
      }
#endif
      if (narrow) launch(fb::ConvNarrow{}); else launch(fb::ConvWide{});
    });
  });
#undef CONV_ARGS
}

// --- the fused stem: conv + BatchNorm / bias + activation + max pool ----------------------

struct StemTile {
  int64_t ph, pw;
};

int64_t stem_region(int64_t tile, int64_t pool_k, int64_t pool_s) { return (tile - 1) * pool_s + pool_k; }

// Largest pooled tile (up to kStemMaxTile a side) whose conv region fits kStemMaxRegion;
// {0, 0} when even one pooled output's window does not fit.
StemTile stem_tile(int64_t ph_out, int64_t pw_out, const Dims& pool) {
  StemTile t{std::min<int64_t>(ph_out, fb::kStemMaxTile), std::min<int64_t>(pw_out, fb::kStemMaxTile)};
  while (stem_region(t.ph, pool[0], pool[2]) * stem_region(t.pw, pool[1], pool[3]) > fb::kStemMaxRegion) {
    if (t.ph == 1 && t.pw == 1) return {0, 0};
    if (t.ph >= t.pw) --t.ph; else --t.pw;
  }
  return t;
}

// The fused kernel's limits: C_in_g * KH * KW taps and the pool window must fit shared memory.
bool stem_supported(int64_t c_in_g, int64_t kh, int64_t kw, const Dims& pool) {
  check_params(pool, 6, "pool");
  return c_in_g * kh * kw <= fb::kStemMaxTaps && stem_tile(1, 1, pool).ph == 1;
}

// conv = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}; pool = {kh, kw, sh, sw, ph, pw};
// conv_out_hw = the conv's output size; out_shape = the pooled output.
void conv_bn_act_maxpool(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w,
                         const Dims& w_shape, const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight,
                         uintptr_t bn_bias, uintptr_t bn_mean, uintptr_t bn_var, double eps, uintptr_t out,
                         const Dims& out_shape, const Dims& out_strides, const Dims& conv, int64_t groups,
                         const Dims& conv_out_hw, const Dims& pool, int64_t dtype, int64_t act, double slope,
                         uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(w_shape, "w_shape");
  check_dims(w_strides, "w_strides"), check_dims(out_shape, "out_shape"), check_dims(out_strides, "out_strides");
  check_params(conv, 6, "conv"), check_params(pool, 6, "pool"), check_params(conv_out_hw, 2, "conv_out_hw");
  check_bn(bn_mean, bn_var);
  if (!stem_supported(w_shape[1], w_shape[2], w_shape[3], pool))
    throw std::invalid_argument("conv_bn_act_maxpool: C_in/groups * KH * KW must be <= " +
                                std::to_string(fb::kStemMaxTaps) + " and the pool window must fit " +
                                std::to_string(fb::kStemMaxRegion) + " conv outputs; run conv and pool separately");
  const int64_t n = out_shape[0], c_out = out_shape[1], ph = out_shape[2], pw = out_shape[3];
  if (n == 0 || c_out == 0) return;
  const StemTile tile = stem_tile(ph, pw, pool);
  const dim3 grid((unsigned)(fb::ceil_div(ph, tile.ph) * fb::ceil_div(pw, tile.pw)),
                  (unsigned)fb::ceil_div(c_out, fb::kStemCoTile), (unsigned)n);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_act(act, [&](auto act_c) {
      constexpr int ACT = decltype(act_c)::value;
      FB_LAUNCH((fb::conv_bn_act_maxpool_kernel<T, ACT>), grid, dim3(fb::kStemThreads), 0, FB_STREAM(stream),
                in_ptr<T>(x), in_ptr<T>(w), in_ptr<float>(bias), in_ptr<float>(bn_weight), in_ptr<float>(bn_bias),
                in_ptr<float>(bn_mean), in_ptr<float>(bn_var), out_ptr<T>(out),
                (int)x_shape[2], (int)x_shape[3], (int)w_shape[1], (int)c_out, (int)(c_out / groups),
                (int)w_shape[2], (int)w_shape[3], (int)conv_out_hw[0], (int)conv_out_hw[1], (int)ph, (int)pw,
                (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
                (long long)w_strides[0], (long long)w_strides[1], (long long)w_strides[2], (long long)w_strides[3],
                (long long)out_strides[0], (long long)out_strides[1], (long long)out_strides[2],
                (long long)out_strides[3],
                (int)conv[0], (int)conv[1], (int)conv[2], (int)conv[3], (int)conv[4], (int)conv[5],
                (int)pool[0], (int)pool[1], (int)pool[2], (int)pool[3], (int)pool[4], (int)pool[5],
                (int)tile.ph, (int)tile.pw, (float)eps, (float)slope);
    });
  });
}

// --- pools ----------------------------------------------------------------------------------

unsigned elementwise_blocks(int64_t total) {
  return (unsigned)std::min<int64_t>(fb::ceil_div(total, fb::kPoolThreads), fb::kPoolMaxBlocks);
}

template <int MODE>
void window_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                   const Dims& out_strides, const Dims& pool, bool count_include_pad, int64_t dtype,
                   uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(out_shape, "out_shape");
  check_dims(out_strides, "out_strides"), check_params(pool, 6, "pool");
  const int64_t total = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3];
  if (total == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    FB_LAUNCH((fb::window_pool2d_kernel<T, MODE>), dim3(elementwise_blocks(total)), dim3(fb::kPoolThreads), 0,
              FB_STREAM(stream), in_ptr<T>(x), out_ptr<T>(out), (long long)total, (int)x_shape[1],
              (int)x_shape[2], (int)x_shape[3], (int)out_shape[2], (int)out_shape[3],
              (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
              (long long)out_strides[0], (long long)out_strides[1], (long long)out_strides[2],
              (long long)out_strides[3],
              (int)pool[0], (int)pool[1], (int)pool[2], (int)pool[3], (int)pool[4], (int)pool[5],
              (int)count_include_pad);
  });
}

// out_shape (1, 1) runs the block-reduction global pool, anything else the per-output bins.
void adaptive_avg_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out,
                         const Dims& out_shape, const Dims& out_strides, int64_t dtype, uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(out_shape, "out_shape");
  check_dims(out_strides, "out_strides");
  const int64_t total = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3];
  if (total == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (out_shape[2] == 1 && out_shape[3] == 1) {
      const dim3 grid((unsigned)fb::ceil_div(x_shape[1], fb::kGapChannels), (unsigned)x_shape[0]);
      FB_LAUNCH((fb::global_avg_pool_kernel<T>), grid, dim3(fb::kPoolThreads), 0, FB_STREAM(stream),
                in_ptr<T>(x), out_ptr<T>(out), (int)x_shape[1], (int)x_shape[2], (int)x_shape[3],
                (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2],
                (long long)x_strides[3], (long long)out_strides[0], (long long)out_strides[1]);
      return;
    }
    FB_LAUNCH((fb::adaptive_avg_pool2d_kernel<T>), dim3(elementwise_blocks(total)), dim3(fb::kPoolThreads), 0,
              FB_STREAM(stream), in_ptr<T>(x), out_ptr<T>(out), (long long)total, (int)x_shape[1],
              (int)x_shape[2], (int)x_shape[3], (int)out_shape[2], (int)out_shape[3],
              (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
              (long long)out_strides[0], (long long)out_strides[1], (long long)out_strides[2],
              (long long)out_strides[3]);
  });
}

void max_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                const Dims& out_strides, const Dims& pool, int64_t dtype, uintptr_t stream) {
  window_pool2d<fb::kPoolMax>(x, x_shape, x_strides, out, out_shape, out_strides, pool, false, dtype, stream);
}

void avg_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                const Dims& out_strides, const Dims& pool, bool count_include_pad, int64_t dtype,
                uintptr_t stream) {
  window_pool2d<fb::kPoolAvg>(x, x_shape, x_strides, out, out_shape, out_strides, pool, count_include_pad, dtype,
                              stream);
}

std::vector<LaunchConstant> launch_constants() {
  auto tile = [](const char* name, auto t) {
    using Tile = decltype(t);
    return LaunchConstant{name, {Tile::BM, Tile::BN, Tile::BK, Tile::TM, Tile::TN}, true};
  };
  std::vector<LaunchConstant> constants = {
      tile("conv_wide_tile", fb::ConvWide{}),
      tile("conv_narrow_tile", fb::ConvNarrow{}),
      {"conv_narrow_max_cout", {fb::kConvNarrowMaxCout}, false},
#ifndef FASTBONE_EMU
      {"conv_tc_tile", {fb::kConvTcBM, fb::kConvTcBN, fb::kConvTcThreads}, true},
      {"conv_tc_min_cc", {fb::kConvTcMinCC}, false},
#endif
      {"stem_threads", {fb::kStemThreads}, false},
      {"stem_co_tile", {fb::kStemCoTile}, false},
      {"stem_max_taps", {fb::kStemMaxTaps}, false},
      {"stem_max_region", {fb::kStemMaxRegion}, false},
      {"stem_max_tile", {fb::kStemMaxTile}, false},
      {"pool_threads", {fb::kPoolThreads}, false},
      {"pool_max_blocks", {fb::kPoolMaxBlocks}, false},
      {"gap_channels", {fb::kGapChannels}, false},
  };
  return constants;
}

}  // namespace fb_ops
