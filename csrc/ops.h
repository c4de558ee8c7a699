// The kernel launchers of csrc/ops.cu, as csrc/ops_bindings.cpp binds them. Plain C++ (no CUDA,
// no pybind11): pointers and the stream travel as integers, shapes and strides as int64 lists,
// dtype codes 0 float32 / 1 float16 / 2 bfloat16, activation codes as fastbone/ops/activation.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fb_ops {

using Dims = std::vector<int64_t>;
using Pointers = std::vector<uintptr_t>;  // per-conv lists of pointers (0 = absent)

// bias, bn_weight, bn_bias, bn_mean, bn_var: the conv epilogue's per-output-channel tensors (float32, contiguous; 0 = absent): the conv bias and
// the BatchNorm weight (gamma), bias (beta), running mean and running variance. BatchNorm applies
// iff bn_mean != 0 (bn_var then required); gamma / beta absent mean 1 / 0 (affine=False).

// act(bn(conv2d(x, w) + bias) [+ residual]) into out[:, off:off+C_out].
// conv = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}; residual == 0 for none.
// in_scale: 0, or float32 (N, C_in) with row stride in_scale_stride (unit channel stride): the
// input is multiplied by it per (image, input channel) as it is loaded (the SE gate).
// residual_after_act: nonzero for act(bn(conv2d(x, w) + bias)) + residual.
// input_pool_mode 1 / 2 with input_pool_kernel k (odd, 3..7): the conv reads max_pool2d / avg_pool2d(x, k,
// stride 1, padding k / 2, count_include_pad=False) instead of x, pooled in the kernel's loader (never
// stored); mode 0 (kernel 1): no pool. Not with in_scale.
// in_channel_map: 0, or int64 (C_in,): the conv's input channel c reads x[:, in_channel_map[c]] (in_scale
// and the input pool follow the channel read). out_channel_map: 0, or int64 (C_out,): the result's channel
// oc goes to out[:, off + out_channel_map[oc]] (residual, bias and BatchNorm indexed by oc). Permutations
// (the op layer checks them): channel shuffles without a copy.
void conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w, const Dims& w_shape,
                 const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight, uintptr_t bn_bias, uintptr_t bn_mean,
                 uintptr_t bn_var, double eps, uintptr_t residual, const Dims& res_strides, uintptr_t out,
                 const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset, const Dims& conv,
                 int64_t groups, int64_t dtype, int64_t act, double slope, uintptr_t stream, uintptr_t in_scale = 0,
                 int64_t in_scale_stride = 0, int64_t residual_after_act = 0, int64_t input_pool_mode = 0,
                 int64_t input_pool_kernel = 1, uintptr_t in_channel_map = 0, uintptr_t out_channel_map = 0);

// Horizontal fusion: outs[i] = act(bn_i(conv2d(x, w_i) + bias_i)) for every i, the convs sharing x (groups
// 1), the kernel size, conv = {stride, padding, dilation} and the activation; per conv its own weight
// (shape / strides), epilogue tensors (0 = absent, independently per conv) and eps, and destination (any
// strides: typically a channel slice of a larger tensor, passed as the slice's pointer). Up to
// kConvMaxSegments convs per launch (one conv kernel, its block's channel tile picks the conv), more in
// further launches (conv_multi_launch_plan).
void conv_bn_act_multi(uintptr_t x, const Dims& x_shape, const Dims& x_strides, const Pointers& ws,
                       const std::vector<Dims>& w_shapes, const std::vector<Dims>& w_strides, const Pointers& biases,
                       const Pointers& bn_weights, const Pointers& bn_biases, const Pointers& bn_means,
                       const Pointers& bn_vars, const std::vector<double>& eps, const Pointers& outs,
                       const std::vector<Dims>& out_shapes,
                       const std::vector<Dims>& out_strides, const Dims& conv, int64_t dtype, int64_t act,
                       double slope, uintptr_t stream);

// conv_bn_act_multi's launches over channels (each image / row span of conv_launch_plan runs all of them):
// per launch the flat [conv, c0, c, ...] of its up to kConvMaxSegments pieces (channels [c0, c0 + c) of
// conv i), each conv split into pieces of at most max_grid_yz channel tiles of block_n.
std::vector<std::vector<int64_t>> conv_multi_launch_plan(const Dims& c_outs, int64_t block_n);

// max_pool(act(bn(conv2d(x, w) + bias))) in one launch (the stem kernel, or the conv kernels with the
// output pool). pool = {kh, kw, sh, sw, ph, pw};
// conv_out_hw = the conv's output size; out_shape = the pooled output.
void conv_bn_act_maxpool(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w,
                         const Dims& w_shape, const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight,
                         uintptr_t bn_bias, uintptr_t bn_mean, uintptr_t bn_var, double eps, uintptr_t out,
                         const Dims& out_shape, const Dims& out_strides, const Dims& conv, int64_t groups,
                         const Dims& conv_out_hw, const Dims& pool, int64_t dtype, int64_t act, double slope,
                         uintptr_t stream);

bool stem_supported(int64_t c_in_g, int64_t kh, int64_t kw, const Dims& pool);
// Whether the conv kernels' epilogue takes the pool (2x2 / stride 2, unpadded): conv_bn_act_maxpool then
// fuses it after any conv the stem kernel does not take.
bool conv_out_pool_supported(const Dims& pool);

// Which kernel conv_bn_act runs for m output pixels: "narrow", "wide", "mma_small" or "mma_large" (the
// tensor-core variant's tiles), on a device of compute_capability (0: the emulator), under the current
// FASTBONE_CUDA_CONV_MMA (mirrored by fastbone/cuda/ops.py's conv_variant / conv_mma_tile).
std::string conv_variant(int64_t m, int64_t c_out_g, int64_t groups, int64_t dtype, int64_t compute_capability);
// The current device's compute capability (major * 10 + minor, cached per device); 0 in the emulator.
int64_t current_compute_capability();

// How conv_bn_act splits a problem into launches that fit the grid limits and the kernels' 32-bit
// pixel index (mirrored by NvrtcRuntime): one {n0, n, oh0, oh, g0, g, c0, c} per launch (images,
// output rows, groups, output channels per group), for a kernel whose block tile has block_n columns.
std::vector<std::vector<int64_t>> conv_launch_plan(int64_t n, int64_t oh, int64_t ow, int64_t groups,
                                                   int64_t c_out_g, int64_t block_n);

// Lower the limits the launchers split at (gridDim.y / z, a conv launch's output pixels), for tests
// that run split launches at small sizes; set_launch_limits(65535, 2^31 - 257) restores them.
void set_launch_limits(int64_t max_grid_yz, int64_t max_conv_launch_pixels);

void max_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                const Dims& out_strides, const Dims& pool, int64_t dtype, uintptr_t stream);

void avg_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                const Dims& out_strides, const Dims& pool, bool count_include_pad, int64_t dtype,
                uintptr_t stream);

// out_shape (1, 1) runs the block-reduction global pool, anything else torch's adaptive bins.
void adaptive_avg_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out,
                         const Dims& out_shape, const Dims& out_strides, int64_t dtype, uintptr_t stream);

// The launch geometry NvrtcRuntime (fastbone/cuda/ops.py) mirrors: a tuple or a single int each.
struct LaunchConstant {
  std::string name;
  std::vector<int64_t> values;
  bool is_tuple;
};
std::vector<LaunchConstant> launch_constants();

// --- depthwise separable convs (csrc/depthwise_ops.cu, kernels/depthwise.cuh) ---------------
// conv = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w} of the depthwise conv; residual == 0 for
// none; max_blocks > 0 caps the grid below its default (the blocks loop over the work items).

// act(bn(depthwise_conv2d(x, w) + bias) [+ residual]) into out[:, off:off+C_out]; w (m * C_in, 1, KH, KW).
// pool_sums: 0, or float32 (N, tiles_h * tiles_w, C_out) contiguous (the launch plan's tiles): the
// epilogue also writes each (image, tile, channel)'s sum of the stored output (the SE pool).
void depthwise_conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w,
                           const Dims& w_shape, const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight,
                           uintptr_t bn_bias, uintptr_t bn_mean, uintptr_t bn_var, double eps, uintptr_t residual,
                           const Dims& res_strides, uintptr_t out, const Dims& out_shape, const Dims& out_strides,
                           int64_t out_c_offset, const Dims& conv, int64_t dtype, int64_t act, double slope,
                           int64_t max_blocks, uintptr_t stream, uintptr_t pool_sums = 0);

// pw_act(pw_bn(pw_conv(D)) [+ residual]) into out[:, off:off+C_out] in one launch, D[:, k] =
// dw_act(dw_bn(depthwise_conv2d(x, dw_w)))[:, channel_order[k]] (identity when channel_order == 0,
// an int64 pointer otherwise); pw_w (C_out, C_dw / pw_groups, 1, 1).
void separable_conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t dw_w,
                           const Dims& dw_w_shape, const Dims& dw_w_strides, uintptr_t dw_bias,
                           uintptr_t dw_bn_weight, uintptr_t dw_bn_bias, uintptr_t dw_bn_mean, uintptr_t dw_bn_var,
                           double dw_eps, const Dims& conv, int64_t dw_act, double dw_slope, uintptr_t pw_w,
                           const Dims& pw_w_shape, const Dims& pw_w_strides, uintptr_t pw_bias,
                           uintptr_t pw_bn_weight, uintptr_t pw_bn_bias, uintptr_t pw_bn_mean, uintptr_t pw_bn_var,
                           double pw_eps, int64_t pw_groups, int64_t pw_act, double pw_slope,
                           uintptr_t channel_order, uintptr_t residual, const Dims& res_strides, uintptr_t out,
                           const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset, int64_t dtype,
                           int64_t max_blocks, uintptr_t stream);

// The launch plans (mirrored in fastbone/cuda/depthwise_launch.py): {tile_h, tile_w, channel block,
// shared memory bytes} / {tile_h, tile_w, column tile, shared memory bytes}; all 0 where the kernel's
// shared memory cannot hold one output pixel's input region (run the unfused ops instead).
std::vector<int64_t> depthwise_launch_plan(int64_t c_out, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                                           const Dims& conv);
std::vector<int64_t> separable_launch_plan(int64_t c_out_g, int64_t oh, int64_t ow, int64_t kh, int64_t kw,
                                           const Dims& conv, bool tensor_cores);
// "mma" (separable_conv_bn_act_tc_kernel) or "plain": the kernel separable_conv_bn_act runs for C_out per
// group c_out_g and dtype on a device of compute_capability (0: the emulator), under the current
// FASTBONE_CUDA_SEPARABLE_MMA (mirrored by fastbone/cuda/depthwise_launch.py's separable_variant).
std::string separable_variant(int64_t c_out_g, int64_t dtype, int64_t compute_capability);
std::vector<LaunchConstant> depthwise_launch_constants();  // merged into launch_constants()

// --- the Fire module's expand stage (csrc/fire_ops.cu, kernels/fire.cuh) ---------------------
// out[:, off : off+E1] = act(conv1x1(x, w1) + b1), out[:, off+E1 : off+E1+E3] = act(conv3x3(x, w3, pad 1) + b3)
// in one launch per grid-sized slice; w1 (E1, S, 1, 1), w3 (E3, S, 3, 3); b1 / b3 float32 or 0.
void fire_expand(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w1, const Dims& w1_shape,
                 const Dims& w1_strides, uintptr_t b1, uintptr_t w3, const Dims& w3_shape, const Dims& w3_strides,
                 uintptr_t b3, uintptr_t out, const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset,
                 int64_t dtype, int64_t act, double slope, uintptr_t stream);

// The squeeze-excitation gate, out (N, C) float32 contiguous = gate(fc2(act(fc1(mean_hw(x))))), one block
// per image; w1 (squeeze, C) and w2 (C, squeeze) contiguous, b1 / b2 vectors or 0, all in x's dtype; gate 0
// sigmoid, 1 hardsigmoid (csrc/se_ops.cu).
void se_gate(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w1, uintptr_t b1, uintptr_t w2,
             uintptr_t b2, uintptr_t out, int64_t squeeze, int64_t dtype, int64_t act, double slope, int64_t gate,
             uintptr_t stream);

// The same gate from the depthwise kernel's pool sums: sums float32 (N, tiles, C) contiguous, mean = the
// sum over tiles / hw; dtype: the weights' (csrc/se_ops.cu).
void se_gate_from_sums(uintptr_t sums, int64_t n, int64_t tiles, int64_t c, int64_t hw, uintptr_t w1, uintptr_t b1,
                       uintptr_t w2, uintptr_t b2, uintptr_t out, int64_t squeeze, int64_t dtype, int64_t act,
                       double slope, int64_t gate, uintptr_t stream);

}  // namespace fb_ops
