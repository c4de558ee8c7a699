// The kernel launchers of csrc/ops.cu, as csrc/ops_bindings.cpp binds them. Plain C++ (no CUDA,
// no pybind11): pointers and the stream travel as integers, shapes and strides as int64 lists,
// dtype codes 0 float32 / 1 float16 / 2 bfloat16, activation codes as fastbone/ops/activation.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fb_ops {

using Dims = std::vector<int64_t>;

// bias, bn_weight, bn_bias, bn_mean, bn_var: the conv epilogue's per-output-channel tensors (float32, contiguous; 0 = absent): the conv bias and
// the BatchNorm weight (gamma), bias (beta), running mean and running variance. BatchNorm applies
// iff bn_mean != 0 (bn_var then required); gamma / beta absent mean 1 / 0 (affine=False).

// act(bn(conv2d(x, w) + bias) [+ residual]) into out[:, off:off+C_out].
// conv = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}; residual == 0 for none.
void conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w, const Dims& w_shape,
                 const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight, uintptr_t bn_bias, uintptr_t bn_mean,
                 uintptr_t bn_var, double eps, uintptr_t residual, const Dims& res_strides, uintptr_t out,
                 const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset, const Dims& conv,
                 int64_t groups, int64_t dtype, int64_t act, double slope, uintptr_t stream);

// max_pool(act(bn(conv2d(x, w) + bias))) in one launch. pool = {kh, kw, sh, sw, ph, pw};
// conv_out_hw = the conv's output size; out_shape = the pooled output.
void conv_bn_act_maxpool(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w,
                         const Dims& w_shape, const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight,
                         uintptr_t bn_bias, uintptr_t bn_mean, uintptr_t bn_var, double eps, uintptr_t out,
                         const Dims& out_shape, const Dims& out_strides, const Dims& conv, int64_t groups,
                         const Dims& conv_out_hw, const Dims& pool, int64_t dtype, int64_t act, double slope,
                         uintptr_t stream);

bool stem_supported(int64_t c_in_g, int64_t kh, int64_t kw, const Dims& pool);

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

}  // namespace fb_ops
