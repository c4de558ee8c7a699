// pybind11 bindings of the kernel launchers (csrc/ops.h), registered into fastbone._C and
// fastbone._emu by csrc/module.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops.h"

namespace py = pybind11;

void fb_register_ops(py::module_& m) {
  m.def("conv_bn_act", &fb_ops::conv_bn_act,
        "act(bn(conv2d(x, w) + bias) [+ residual]) into out[:, off:off+C_out]; 0 for an absent bias / bn_* / residual",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("w"), py::arg("w_shape"),
        py::arg("w_strides"), py::arg("bias"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("bn_mean"),
        py::arg("bn_var"), py::arg("eps"), py::arg("residual"), py::arg("res_strides"), py::arg("out"),
        py::arg("out_shape"), py::arg("out_strides"), py::arg("out_c_offset"), py::arg("conv"), py::arg("groups"),
        py::arg("dtype"), py::arg("act"), py::arg("slope"), py::arg("stream"), py::arg("in_scale") = 0,
        py::arg("in_scale_stride") = 0, py::arg("residual_after_act") = 0, py::arg("input_pool_mode") = 0,
        py::arg("input_pool_kernel") = 1, py::arg("in_channel_map") = 0, py::arg("out_channel_map") = 0);
  m.def("conv_bn_act_multi", &fb_ops::conv_bn_act_multi,
        "outs[i] = act(bn_i(conv2d(x, ws[i]) + biases[i])) for every i in launches of up to 3 convs; per-conv "
        "lists (0 for an absent bias / bn_*), shared x, conv = {stride, padding, dilation}, groups 1",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("ws"), py::arg("w_shapes"),
        py::arg("w_strides"), py::arg("biases"), py::arg("bn_weights"), py::arg("bn_biases"), py::arg("bn_means"),
        py::arg("bn_vars"), py::arg("eps"), py::arg("outs"), py::arg("out_shapes"), py::arg("out_strides"),
        py::arg("conv"), py::arg("dtype"), py::arg("act"), py::arg("slope"), py::arg("stream"));
  m.def("conv_multi_launch_plan", &fb_ops::conv_multi_launch_plan,
        "conv_bn_act_multi's launches over channels: [conv, c0, c, ...] of each launch's pieces",
        py::arg("c_outs"), py::arg("block_n"));
  m.def("conv_bn_act_maxpool", &fb_ops::conv_bn_act_maxpool,
        "max_pool(act(bn(conv2d(x, w) + bias))) in one launch; 0 for an absent bias / bn_*",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("w"), py::arg("w_shape"),
        py::arg("w_strides"), py::arg("bias"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("bn_mean"),
        py::arg("bn_var"), py::arg("eps"), py::arg("out"), py::arg("out_shape"), py::arg("out_strides"),
        py::arg("conv"), py::arg("groups"), py::arg("conv_out_hw"), py::arg("pool"), py::arg("dtype"),
        py::arg("act"), py::arg("slope"), py::arg("stream"));
  m.def("stem_supported", &fb_ops::stem_supported, "whether conv_bn_act_maxpool accepts this conv / pool",
        py::arg("c_in_g"), py::arg("kh"), py::arg("kw"), py::arg("pool"));
  m.def("conv_out_pool_supported", &fb_ops::conv_out_pool_supported,
        "whether conv_bn_act_maxpool fuses this pool into the conv kernels' epilogue (any conv)", py::arg("pool"));
  m.def("conv_variant", &fb_ops::conv_variant,
        "the conv kernel conv_bn_act runs: narrow, wide, mma_small or mma_large (compute_capability 0: the "
        "emulator; FASTBONE_CUDA_CONV_MMA applies)",
        py::arg("m"), py::arg("c_out_g"), py::arg("groups"), py::arg("dtype"), py::arg("compute_capability"));
  m.def("conv_launch_plan", &fb_ops::conv_launch_plan,
        "conv_bn_act's launches: [n0, n, oh0, oh, g0, g, c0, c] each (images, output rows, groups, channels)",
        py::arg("n"), py::arg("oh"), py::arg("ow"), py::arg("groups"), py::arg("c_out_g"), py::arg("block_n"));
  m.def("set_launch_limits", &fb_ops::set_launch_limits,
        "lower the grid / pixel limits the launchers split at (tests; the constants restore them)",
        py::arg("max_grid_yz"), py::arg("max_conv_launch_pixels"));
  m.def("max_pool2d", &fb_ops::max_pool2d, "max pool 2d; pool = {kh, kw, sh, sw, ph, pw}", py::arg("x"),
        py::arg("x_shape"), py::arg("x_strides"), py::arg("out"), py::arg("out_shape"), py::arg("out_strides"),
        py::arg("pool"), py::arg("dtype"), py::arg("stream"));
  m.def("avg_pool2d", &fb_ops::avg_pool2d, "average pool 2d; pool = {kh, kw, sh, sw, ph, pw}",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("out"), py::arg("out_shape"),
        py::arg("out_strides"), py::arg("pool"), py::arg("count_include_pad"), py::arg("dtype"), py::arg("stream"));
  m.def("adaptive_avg_pool2d", &fb_ops::adaptive_avg_pool2d, "adaptive average pool 2d (global pool when out is 1x1)",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("out"), py::arg("out_shape"),
        py::arg("out_strides"), py::arg("dtype"), py::arg("stream"));
  m.def("depthwise_conv_bn_act", &fb_ops::depthwise_conv_bn_act,
        "act(bn(depthwise_conv2d(x, w) + bias) [+ residual]) into out[:, off:off+C_out]; 0 for an absent "
        "bias / bn_* / residual; max_blocks > 0 caps the grid",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("w"), py::arg("w_shape"),
        py::arg("w_strides"), py::arg("bias"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("bn_mean"),
        py::arg("bn_var"), py::arg("eps"), py::arg("residual"), py::arg("res_strides"), py::arg("out"),
        py::arg("out_shape"), py::arg("out_strides"), py::arg("out_c_offset"), py::arg("conv"), py::arg("dtype"),
        py::arg("act"), py::arg("slope"), py::arg("max_blocks"), py::arg("stream"), py::arg("pool_sums") = 0);
  m.def("separable_conv_bn_act", &fb_ops::separable_conv_bn_act,
        "pw_act(pw_bn(pw_conv(dw_act(dw_bn(dw_conv(x)))[:, channel_order])) [+ residual]) into "
        "out[:, off:off+C_out] in one launch; 0 for an absent pointer",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("dw_w"), py::arg("dw_w_shape"),
        py::arg("dw_w_strides"), py::arg("dw_bias"), py::arg("dw_bn_weight"), py::arg("dw_bn_bias"),
        py::arg("dw_bn_mean"), py::arg("dw_bn_var"), py::arg("dw_eps"), py::arg("conv"), py::arg("dw_act"),
        py::arg("dw_slope"), py::arg("pw_w"), py::arg("pw_w_shape"), py::arg("pw_w_strides"), py::arg("pw_bias"),
        py::arg("pw_bn_weight"), py::arg("pw_bn_bias"), py::arg("pw_bn_mean"), py::arg("pw_bn_var"),
        py::arg("pw_eps"), py::arg("pw_groups"), py::arg("pw_act"), py::arg("pw_slope"), py::arg("channel_order"),
        py::arg("residual"), py::arg("res_strides"), py::arg("out"), py::arg("out_shape"), py::arg("out_strides"),
        py::arg("out_c_offset"), py::arg("dtype"), py::arg("max_blocks"), py::arg("stream"));
  m.def("depthwise_launch_plan", &fb_ops::depthwise_launch_plan,
        "[tile_h, tile_w, channel block, smem bytes] of the depthwise kernel (all 0: does not fit)",
        py::arg("c_out"), py::arg("oh"), py::arg("ow"), py::arg("kh"), py::arg("kw"), py::arg("conv"));
  m.def("separable_launch_plan", &fb_ops::separable_launch_plan,
        "[tile_h, tile_w, column tile, smem bytes] of the fused separable kernel (all 0: does not fit)",
        py::arg("c_out_g"), py::arg("oh"), py::arg("ow"), py::arg("kh"), py::arg("kw"), py::arg("conv"),
        py::arg("tensor_cores"));
  m.def("separable_variant", &fb_ops::separable_variant,
        "the kernel separable_conv_bn_act runs: plain or mma (compute_capability 0: the emulator; "
        "FASTBONE_CUDA_SEPARABLE_MMA applies)",
        py::arg("c_out_g"), py::arg("dtype"), py::arg("compute_capability"));
  m.def("fire_expand", &fb_ops::fire_expand,
        "act(conv1x1(x, w1) + b1) and act(conv3x3(x, w3, padding 1) + b3) into out[:, off:off+E1+E3] from one "
        "read of x; 0 for an absent bias",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("w1"), py::arg("w1_shape"),
        py::arg("w1_strides"), py::arg("b1"), py::arg("w3"), py::arg("w3_shape"), py::arg("w3_strides"),
        py::arg("b3"), py::arg("out"), py::arg("out_shape"), py::arg("out_strides"), py::arg("out_c_offset"),
        py::arg("dtype"), py::arg("act"), py::arg("slope"), py::arg("stream"));
  m.def("se_gate", &fb_ops::se_gate,
        "the squeeze-excitation gate (N, C) float32: gate(fc2(act(fc1(mean over H, W of x)))); 0 for an absent bias",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("w1"), py::arg("b1"), py::arg("w2"),
        py::arg("b2"), py::arg("out"), py::arg("squeeze"), py::arg("dtype"), py::arg("act"), py::arg("slope"),
        py::arg("gate"), py::arg("stream"));
  m.def("se_gate_from_sums", &fb_ops::se_gate_from_sums,
        "the squeeze-excitation gate (N, C) float32 from the pool's partial sums (N, tiles, C) float32: "
        "mean = sum over tiles / hw; 0 for an absent bias",
        py::arg("sums"), py::arg("n"), py::arg("tiles"), py::arg("c"), py::arg("hw"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("out"), py::arg("squeeze"), py::arg("dtype"), py::arg("act"),
        py::arg("slope"), py::arg("gate"), py::arg("stream"));
  py::dict constants;
  for (const auto& c : fb_ops::launch_constants()) {
    if (c.is_tuple) constants[c.name.c_str()] = py::tuple(py::cast(c.values));
    else constants[c.name.c_str()] = c.values.at(0);
  }
  m.attr("launch_constants") = constants;
}
