// Launchers of csrc/kernels/depthwise.cuh (declared in ops.h, bound in ops_bindings.cpp): the
// depthwise conv and the fused depthwise -> pointwise (separable) conv, each with BatchNorm / bias
// and activation in the epilogue.
//
// As in ops.cu: raw pointers as integers (0 = absent), shapes and strides as int64 lists (N, C, H, W
// order), dtype and activation codes, the stream as an integer. The op layer validates the
// arguments; the checks here guard the kernels' own limits. The launch plan (tile, channel block,
// shared memory) is mirrored by fastbone/cuda/depthwise_launch.py for the NVRTC build: change both
// (tests compare them through depthwise_launch_plan / separable_launch_plan).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "launch.h"
#include "ops.h"
#include "kernels/depthwise.cuh"

namespace fb_ops {

namespace {

void dw_check_dims(const Dims& d, const char* name) {
  if (d.size() != 4) throw std::invalid_argument(std::string(name) + " must have 4 entries (N, C, H, W order)");
}

void dw_check_int(int64_t v, const char* what) {
  if (v < 0 || v > INT32_MAX)
    throw std::invalid_argument(std::string(what) + " = " + std::to_string(v) +
                                " is outside the depthwise kernels' 32-bit index range");
}

void dw_check_bn(uintptr_t bn_mean, uintptr_t bn_var, const char* prefix) {
  if ((bn_mean == 0) != (bn_var == 0))
    throw std::invalid_argument(std::string(prefix) +
                                "BatchNorm needs both bn_mean and bn_var (or neither, for no BatchNorm)");
}

// {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}
void dw_check_conv(const Dims& conv) {
  if (conv.size() != 6) throw std::invalid_argument("conv must have 6 entries");
  for (int i : {0, 1, 4, 5})
    if (conv[i] < 1) throw std::invalid_argument("stride and dilation must be >= 1");
  if (conv[2] < 0 || conv[3] < 0) throw std::invalid_argument("padding must be >= 0");
  for (int64_t v : conv) dw_check_int(v, "a stride / padding / dilation");
}

// The square kernel sizes with their own instantiation (taps in registers); 0: any KH x KW.
int depthwise_ks(int64_t kh, int64_t kw) {
  return (kh == kw && (kh == 3 || kh == 5 || kh == 7)) ? (int)kh : 0;
}

int64_t region(int64_t tile, int64_t kernel, int64_t stride, int64_t dilation) {
  return (tile - 1) * stride + (kernel - 1) * dilation + 1;
}

// Tile shrinking shared by both plans: start at up to kDwTilePixels pixels, at most kDwTileMaxW
// wide; while the shared memory does not fit the budget, take a row or a column off the larger
// side. `bytes(th, tw)`; false when even a 1x1 tile does not fit.
template <typename Bytes>
bool fit_tile(int64_t oh, int64_t ow, Bytes bytes, int64_t& th, int64_t& tw) {
  tw = std::min<int64_t>(ow, fb::kDwTileMaxW);
  th = std::min<int64_t>(oh, fb::kDwTilePixels / tw);
  while (bytes(th, tw) > fb::kDwSmemBudget) {
    if (th == 1 && tw == 1) return false;
    if (th >= tw) --th; else --tw;
  }
  return true;
}

unsigned grid_blocks(int64_t items, int64_t max_blocks) {
  int64_t cap = fb::kDwMaxBlocks;
  if (max_blocks > 0) cap = std::min(cap, max_blocks);
  return (unsigned)std::min(items, cap);
}

// FASTBONE_CUDA_SEPARABLE_MMA: whether float16 / bfloat16 separable convs may run the tensor-core
// variant (separable_conv_bn_act_tc_kernel; column tiles of 64 / 128 only). Read on every call, so tests
// can switch it with monkeypatch.setenv.
//   unset, "" or "auto": on GPUs of compute capability >= kSepTcMinCC, never in the emulator
//   "1": also in the emulator (CPU tests of the kernel: its B pipeline, fragments, epilogue)
//   "0": never (the plain variant everywhere, e.g. to compare the two on a GPU)
bool separable_mma_allowed(bool emulator) {
  const char* env = std::getenv("FASTBONE_CUDA_SEPARABLE_MMA");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto") return !emulator;  // a GPU subject to its compute capability
  if (v == "0") return false;
  if (v == "1") return true;
  throw std::invalid_argument("FASTBONE_CUDA_SEPARABLE_MMA=" + v + ": expected auto, 0 or 1");
}

// Whether the launcher asks the plan for the tensor-core variant; compute_capability 0: the emulator.
bool separable_tensor_cores(int64_t dtype, int64_t compute_capability) {
  const bool emulator = compute_capability == 0;
  if (dtype == fb::kFloat32 || !separable_mma_allowed(emulator)) return false;
  return emulator || compute_capability >= fb::kSepTcMinCC;
}

// The separable kernel's column tile (output channels per block) for C_out per group.
int64_t separable_col_tile(int64_t c_out_g) { return c_out_g <= 16 ? 16 : (c_out_g <= 64 ? 64 : 128); }

}  // namespace

std::string separable_variant(int64_t c_out_g, int64_t dtype, int64_t compute_capability) {
  const bool tc = separable_tensor_cores(dtype, compute_capability) && separable_col_tile(c_out_g) >= 64;
  return tc ? "mma" : "plain";
}

// {tile_h, tile_w, channel block, dynamic shared memory bytes}; all 0 when the input region of a
// single output pixel does not fit (a huge dilated kernel): run the generic conv instead.
std::vector<int64_t> depthwise_launch_plan(int64_t c_out, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                                           const Dims& conv) {
  dw_check_conv(conv);
  const int ks = depthwise_ks(kh, kw);
  int64_t cb = c_out <= 16 ? 16 : (c_out <= 32 ? 32 : fb::kDwMaxChannelBlock);
  for (;;) {
    auto bytes = [&](int64_t th, int64_t tw) {
      return (region(th, kh, conv[0], conv[4]) * region(tw, kw, conv[1], conv[5]) + (ks == 0 ? kh * kw : 0)) * cb *
             (int64_t)sizeof(float);
    };
    int64_t th = 0, tw = 0;
    if (fit_tile(oh, ow, bytes, th, tw)) return {th, tw, cb, bytes(th, tw)};
    if (cb == fb::kDwMinChannelBlock) return {0, 0, 0, 0};
    cb /= 2;
  }
}

// {tile_h, tile_w, column tile BN, dynamic shared memory bytes}; all 0 when even a 1x1 tile's input
// region does not fit (run the depthwise and the pointwise conv in turn). tensor_cores: the
// tensor-core variant runs (it needs BN >= 64 and a scratch for its epilogue).
std::vector<int64_t> separable_launch_plan(int64_t c_out_g, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                                           const Dims& conv, bool tensor_cores) {
  dw_check_conv(conv);
  const int64_t bn = separable_col_tile(c_out_g);
  const bool tc = tensor_cores && bn >= 64;
  auto bytes = [&](int64_t th, int64_t tw) {
    int64_t b = (region(th, kh, conv[0], conv[4]) * region(tw, kw, conv[1], conv[5]) + kh * kw + 2) * fb::kSepBK *
                (int64_t)sizeof(float);
    if (tc) b = std::max<int64_t>(b, fb::kSepTcScratchBytes);
    return b;
  };
  int64_t th = 0, tw = 0;
  if (!fit_tile(oh, ow, bytes, th, tw)) return {0, 0, 0, 0};
  return {th, tw, bn, bytes(th, tw)};
}

// act(bn(depthwise_conv2d(x, w) + bias) [+ residual]) into out[:, off:off+C_out]; pool_sums != 0: also
// the squeeze-excitation pool's partial sums, float32 (N, tiles_h * tiles_w, C_out) by the launch plan's tile.
void depthwise_conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w,
                           const Dims& w_shape, const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight,
                           uintptr_t bn_bias, uintptr_t bn_mean, uintptr_t bn_var, double eps, uintptr_t residual,
                           const Dims& res_strides, uintptr_t out, const Dims& out_shape, const Dims& out_strides,
                           int64_t out_c_offset, const Dims& conv, int64_t dtype, int64_t act, double slope,
                           int64_t max_blocks, uintptr_t stream, uintptr_t pool_sums) {
  dw_check_dims(x_shape, "x_shape"), dw_check_dims(x_strides, "x_strides"), dw_check_dims(w_shape, "w_shape");
  dw_check_dims(w_strides, "w_strides"), dw_check_dims(res_strides, "res_strides");
  dw_check_dims(out_shape, "out_shape"), dw_check_dims(out_strides, "out_strides"), dw_check_conv(conv);
  dw_check_bn(bn_mean, bn_var, "");
  const int64_t n = x_shape[0], c_in = x_shape[1], c_out = w_shape[0], kh = w_shape[2], kw = w_shape[3];
  const int64_t oh = out_shape[2], ow = out_shape[3];
  if (w_shape[1] != 1 || c_in < 1 || c_out % c_in != 0)
    throw std::invalid_argument("depthwise_conv_bn_act: w_shape must be (m * C_in, 1, KH, KW) for the input's C_in = " +
                                std::to_string(c_in));
  if (out_c_offset < 0 || out_c_offset + c_out > out_shape[1])
    throw std::invalid_argument("depthwise_conv_bn_act: out has " + std::to_string(out_shape[1]) +
                                " channels, too few for [" + std::to_string(out_c_offset) + ", " +
                                std::to_string(out_c_offset + c_out) + ")");
  if (n == 0 || c_out == 0 || oh == 0 || ow == 0) return;
  for (int64_t v : {x_shape[2], x_shape[3], c_out, oh, ow, kh, kw, out_shape[1]}) dw_check_int(v, "a size");
  const std::vector<int64_t> plan = depthwise_launch_plan(c_out, oh, ow, kh, kw, conv);
  if (plan[0] == 0)
    throw std::invalid_argument("depthwise_conv_bn_act: a " + std::to_string(kh) + "x" + std::to_string(kw) +
                                " kernel with dilation " + std::to_string(conv[4]) + "x" + std::to_string(conv[5]) +
                                " needs more shared memory than the depthwise kernel has; run conv_bn_act");
  const int64_t th = plan[0], tw = plan[1], cb = plan[2];
  const int64_t per_image = fb::ceil_div(oh, th) * fb::ceil_div(ow, tw) * fb::ceil_div(c_out, cb);
  dw_check_int(per_image, "the depthwise kernel's work items per image");
  const int64_t items = n * per_image;
  const int ks = depthwise_ks(kh, kw);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_act(act, [&](auto act_c) {
      constexpr int ACT = decltype(act_c)::value;
      auto launch = [&](auto ks_c, auto pool_c) {
        constexpr int KS = decltype(ks_c)::value;
        constexpr bool POOL = decltype(pool_c)::value;
        FB_LAUNCH((fb::depthwise_conv_bn_act_kernel<T, ACT, KS, POOL>), dim3(grid_blocks(items, max_blocks)),
                  dim3(fb::kDwThreads), (size_t)plan[3], FB_STREAM(stream),
                  in_ptr<T>(x), in_ptr<T>(w), in_ptr<float>(bias), in_ptr<float>(bn_weight), in_ptr<float>(bn_bias),
                  in_ptr<float>(bn_mean), in_ptr<float>(bn_var), in_ptr<T>(residual), out_ptr<T>(out),
                  out_ptr<float>(pool_sums),
                  (int)x_shape[2], (int)x_shape[3], (int)c_out, (int)oh, (int)ow, (int)kh, (int)kw,
                  (int)(c_out / c_in),
                  (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
                  (long long)w_strides[0], (long long)w_strides[2], (long long)w_strides[3],
                  (long long)res_strides[0], (long long)res_strides[1], (long long)res_strides[2],
                  (long long)res_strides[3], (long long)out_strides[0], (long long)out_strides[1],
                  (long long)out_strides[2], (long long)out_strides[3], (int)out_c_offset,
                  (int)conv[0], (int)conv[1], (int)conv[2], (int)conv[3], (int)conv[4], (int)conv[5],
                  (int)th, (int)tw, (int)cb, (long long)n, (float)eps, (float)slope);
      };
      auto launch_ks = [&](auto pool_c) {
        switch (ks) {
          case 3: launch(std::integral_constant<int, 3>{}, pool_c); break;
          case 5: launch(std::integral_constant<int, 5>{}, pool_c); break;
          case 7: launch(std::integral_constant<int, 7>{}, pool_c); break;
          default: launch(std::integral_constant<int, 0>{}, pool_c); break;
        }
      };
      if (pool_sums != 0) launch_ks(std::true_type{});
      else launch_ks(std::false_type{});
    });
  });
}

// pw_act(pw_bn(pw_conv(order(dw_act(dw_bn(dw_conv(x)))))) [+ residual]) into out[:, off:off+C_out].
void separable_conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t dw_w,
                           const Dims& dw_w_shape, const Dims& dw_w_strides, uintptr_t dw_bias,
                           uintptr_t dw_bn_weight, uintptr_t dw_bn_bias, uintptr_t dw_bn_mean, uintptr_t dw_bn_var,
                           double dw_eps, const Dims& conv, int64_t dw_act, double dw_slope, uintptr_t pw_w,
                           const Dims& pw_w_shape, const Dims& pw_w_strides, uintptr_t pw_bias,
                           uintptr_t pw_bn_weight, uintptr_t pw_bn_bias, uintptr_t pw_bn_mean, uintptr_t pw_bn_var,
                           double pw_eps, int64_t pw_groups, int64_t pw_act, double pw_slope,
                           uintptr_t channel_order, uintptr_t residual, const Dims& res_strides, uintptr_t out,
                           const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset, int64_t dtype,
                           int64_t max_blocks, uintptr_t stream) {
  dw_check_dims(x_shape, "x_shape"), dw_check_dims(x_strides, "x_strides");
  dw_check_dims(dw_w_shape, "dw_w_shape"), dw_check_dims(dw_w_strides, "dw_w_strides");
  dw_check_dims(pw_w_shape, "pw_w_shape"), dw_check_dims(pw_w_strides, "pw_w_strides");
  dw_check_dims(res_strides, "res_strides"), dw_check_dims(out_shape, "out_shape");
  dw_check_dims(out_strides, "out_strides"), dw_check_conv(conv);
  dw_check_bn(dw_bn_mean, dw_bn_var, "depthwise "), dw_check_bn(pw_bn_mean, pw_bn_var, "pointwise ");
  if (dw_act < 0 || dw_act >= fb::kNumActivations)
    throw std::invalid_argument("fastbone cuda kernels: unknown activation code " + std::to_string(dw_act) +
                                "; accepted: 0.." + std::to_string(fb::kNumActivations - 1));
  const int64_t n = x_shape[0], c_in = x_shape[1], c_dw = dw_w_shape[0], kh = dw_w_shape[2], kw = dw_w_shape[3];
  const int64_t c_out = pw_w_shape[0], oh = out_shape[2], ow = out_shape[3];
  if (dw_w_shape[1] != 1 || c_in < 1 || c_dw % c_in != 0)
    throw std::invalid_argument("separable_conv_bn_act: dw_w_shape must be (m * C_in, 1, KH, KW) for the input's "
                                "C_in = " + std::to_string(c_in));
  if (pw_groups < 1 || c_out % pw_groups != 0 || c_dw % pw_groups != 0 || pw_w_shape[1] * pw_groups != c_dw ||
      pw_w_shape[2] != 1 || pw_w_shape[3] != 1)
    throw std::invalid_argument("separable_conv_bn_act: pw_w_shape must be (C_out, C_dw / pw_groups, 1, 1) with C_dw = " +
                                std::to_string(c_dw) + ", pw_groups = " + std::to_string(pw_groups) +
                                " dividing C_out = " + std::to_string(c_out));
  if (out_c_offset < 0 || out_c_offset + c_out > out_shape[1])
    throw std::invalid_argument("separable_conv_bn_act: out has " + std::to_string(out_shape[1]) +
                                " channels, too few for [" + std::to_string(out_c_offset) + ", " +
                                std::to_string(out_c_offset + c_out) + ")");
  if (n == 0 || c_out == 0 || oh == 0 || ow == 0) return;
  for (int64_t v : {x_shape[2], x_shape[3], c_dw, c_out, oh, ow, kh, kw, out_shape[1]}) dw_check_int(v, "a size");
  const int64_t c_out_g = c_out / pw_groups;
  const bool tensor_cores = separable_tensor_cores(dtype, current_compute_capability());
  const std::vector<int64_t> plan = separable_launch_plan(c_out_g, oh, ow, kh, kw, conv, tensor_cores);
  if (plan[0] == 0)
    throw std::invalid_argument("separable_conv_bn_act: a " + std::to_string(kh) + "x" + std::to_string(kw) +
                                " depthwise kernel with dilation " + std::to_string(conv[4]) + "x" +
                                std::to_string(conv[5]) + " needs more shared memory than the fused kernel has; "
                                "run depthwise_conv_bn_act, then conv_bn_act");
  const int64_t th = plan[0], tw = plan[1], bn = plan[2];
  const int64_t per_image = fb::ceil_div(oh, th) * fb::ceil_div(ow, tw) * pw_groups * fb::ceil_div(c_out_g, bn);
  dw_check_int(per_image, "the separable kernel's work items per image");
  const int64_t items = n * per_image;
  const dim3 grid(grid_blocks(items, max_blocks));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_act(pw_act, [&](auto act_c) {
      constexpr int ACT = decltype(act_c)::value;
#define SEP_ARGS                                                                                                   \
  in_ptr<T>(x), in_ptr<T>(dw_w), in_ptr<float>(dw_bias), in_ptr<float>(dw_bn_weight), in_ptr<float>(dw_bn_bias),  \
      in_ptr<float>(dw_bn_mean), in_ptr<float>(dw_bn_var), in_ptr<T>(pw_w), in_ptr<float>(pw_bias),               \
      in_ptr<float>(pw_bn_weight), in_ptr<float>(pw_bn_bias), in_ptr<float>(pw_bn_mean), in_ptr<float>(pw_bn_var), \
      in_ptr<long long>(channel_order), in_ptr<T>(residual), out_ptr<T>(out), (int)x_shape[2], (int)x_shape[3],   \
      (int)c_dw, (int)oh, (int)ow, (int)kh, (int)kw, (int)(c_dw / c_in), (int)c_out_g, (int)pw_groups,            \
      (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],          \
      (long long)dw_w_strides[0], (long long)dw_w_strides[2], (long long)dw_w_strides[3],                         \
      (long long)pw_w_strides[0], (long long)pw_w_strides[1], (long long)res_strides[0],                          \
      (long long)res_strides[1], (long long)res_strides[2], (long long)res_strides[3], (long long)out_strides[0],  \
      (long long)out_strides[1], (long long)out_strides[2], (long long)out_strides[3], (int)out_c_offset,         \
      (int)conv[0], (int)conv[1], (int)conv[2], (int)conv[3], (int)conv[4], (int)conv[5], (int)dw_act, (int)th,   \
      (int)tw, (long long)n, (float)dw_eps, (float)dw_slope, (float)pw_eps, (float)pw_slope
      auto launch = [&](auto bn_c) {
        constexpr int BN = decltype(bn_c)::value;
        if constexpr (!std::is_same<T, float>::value && BN >= 64) {
          if (tensor_cores) {  // float16 / bfloat16 on sm_80+ (or forced): the pointwise GEMM on tensor cores
            FB_LAUNCH((fb::separable_conv_bn_act_tc_kernel<T, ACT, BN>), grid, dim3(fb::kDwThreads),
                      (size_t)plan[3], FB_STREAM(stream), SEP_ARGS);
            return;
          }
        }
        FB_LAUNCH((fb::separable_conv_bn_act_kernel<T, ACT, BN>), grid, dim3(fb::kDwThreads), (size_t)plan[3],
                  FB_STREAM(stream), SEP_ARGS);
      };
      if (bn == 16) launch(std::integral_constant<int, 16>{});
      else if (bn == 64) launch(std::integral_constant<int, 64>{});
      else launch(std::integral_constant<int, 128>{});
#undef SEP_ARGS
    });
  });
}

std::vector<LaunchConstant> depthwise_launch_constants() {
  return {
      {"dw_threads", {fb::kDwThreads}, false},
      {"dw_tile_pixels", {fb::kDwTilePixels}, false},
      {"dw_tile_max_w", {fb::kDwTileMaxW}, false},
      {"dw_smem_budget", {fb::kDwSmemBudget}, false},
      {"dw_max_blocks", {fb::kDwMaxBlocks}, false},
      {"dw_channel_blocks", {fb::kDwMinChannelBlock, 32, fb::kDwMaxChannelBlock}, true},
      {"sep_tile", {fb::kSepBM, fb::kSepBK, fb::kSepTM}, true},
      {"sep_col_tiles", {16, 64, 128}, true},
      {"sep_tc_min_cc", {fb::kSepTcMinCC}, false},
      {"sep_tc_scratch_bytes", {fb::kSepTcScratchBytes}, false},
  };
}

}  // namespace fb_ops
