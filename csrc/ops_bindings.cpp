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
        py::arg("dtype"), py::arg("act"), py::arg("slope"), py::arg("stream"));
  m.def("conv_bn_act_maxpool", &fb_ops::conv_bn_act_maxpool,
        "max_pool(act(bn(conv2d(x, w) + bias))) in one launch; 0 for an absent bias / bn_*",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("w"), py::arg("w_shape"),
        py::arg("w_strides"), py::arg("bias"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("bn_mean"),
        py::arg("bn_var"), py::arg("eps"), py::arg("out"), py::arg("out_shape"), py::arg("out_strides"),
        py::arg("conv"), py::arg("groups"), py::arg("conv_out_hw"), py::arg("pool"), py::arg("dtype"),
        py::arg("act"), py::arg("slope"), py::arg("stream"));
  m.def("stem_supported", &fb_ops::stem_supported, "whether conv_bn_act_maxpool accepts this conv / pool",
        py::arg("c_in_g"), py::arg("kh"), py::arg("kw"), py::arg("pool"));
  m.def("max_pool2d", &fb_ops::max_pool2d, "max pool 2d; pool = {kh, kw, sh, sw, ph, pw}", py::arg("x"),
        py::arg("x_shape"), py::arg("x_strides"), py::arg("out"), py::arg("out_shape"), py::arg("out_strides"),
        py::arg("pool"), py::arg("dtype"), py::arg("stream"));
  m.def("avg_pool2d", &fb_ops::avg_pool2d, "average pool 2d; pool = {kh, kw, sh, sw, ph, pw}",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("out"), py::arg("out_shape"),
        py::arg("out_strides"), py::arg("pool"), py::arg("count_include_pad"), py::arg("dtype"), py::arg("stream"));
  m.def("adaptive_avg_pool2d", &fb_ops::adaptive_avg_pool2d, "adaptive average pool 2d (global pool when out is 1x1)",
        py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("out"), py::arg("out_shape"),
        py::arg("out_strides"), py::arg("dtype"), py::arg("stream"));
  py::dict constants;
  for (const auto& c : fb_ops::launch_constants()) {
    if (c.is_tuple) constants[c.name.c_str()] = py::tuple(py::cast(c.values));
    else constants[c.name.c_str()] = c.values.at(0);
  }
  m.attr("launch_constants") = constants;
}
