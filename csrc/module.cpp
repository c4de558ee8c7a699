// The pybind11 module of both host-compiled builds: fastbone._C (nvcc) and fastbone._emu (g++ with
// the host emulator). setup.py defines FB_MODULE_NAME (and, for _C, generates fb_build_config.h).
#include <pybind11/pybind11.h>

#ifndef FB_MODULE_NAME
#error "FB_MODULE_NAME must be defined by the build (_C or _emu)"
#endif

#ifndef FASTBONE_EMU
#include <cuda_runtime_api.h>
#include "fb_build_config.h"  // FB_CUDA_ARCHS, written by setup.py
#endif

void fb_register_ops(pybind11::module_& m);        // csrc/ops.cu
void fb_register_selftests(pybind11::module_& m);  // csrc/emu/selftest.cu

PYBIND11_MODULE(FB_MODULE_NAME, m) {
#ifdef FASTBONE_EMU
  m.doc() = "fastbone CUDA C++ kernels, host emulation build (CPU pointers)";
  m.attr("build") = "emu";
#else
  m.doc() = "fastbone CUDA C++ kernels, nvcc build (CUDA pointers, cudart linked statically)";
  m.attr("build") = "aot";
  m.attr("cuda_archs") = FB_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
#endif
  fb_register_ops(m);
  fb_register_selftests(m);
}
