// pybind11 bindings of the selftest launchers (csrc/emu/selftest.cu) as the submodule `selftest`.
// Kept out of the .cu file so that nvcc's per-architecture passes never parse pybind11.
#include <pybind11/pybind11.h>

#include "selftest.h"

void fb_register_selftests(pybind11::module_& parent) {
  namespace py = pybind11;
  namespace st = fb_selftest;
  py::module_ m = parent.def_submodule("selftest", "kernels that check the CUDA semantics of this build");
  m.def("block_sum", &st::block_sum, "per-block sums through a shared-memory tree", py::arg("x"), py::arg("partial"),
        py::arg("n"), py::arg("block"), py::arg("stream") = 0);
  m.def("reverse", &st::reverse, "reverse each block's slice through shared memory", py::arg("x"), py::arg("y"),
        py::arg("n"), py::arg("block"), py::arg("early_exit") = false, py::arg("stream") = 0);
  m.def("reverse_dynamic", &st::reverse_dynamic, "reverse each block's slice through dynamic shared memory",
        py::arg("x"), py::arg("y"), py::arg("n"), py::arg("block"), py::arg("stream") = 0);
  m.def("warp", &st::warp, "warp shuffles (mode: WARP_*)", py::arg("mode"), py::arg("x"), py::arg("out"), py::arg("n"),
        py::arg("block"), py::arg("stream") = 0);
  m.attr("WARP_XOR_SUM") = (int)st::kXorSum;
  m.attr("WARP_DOWN_SUM") = (int)st::kDownSum;
  m.attr("WARP_UP_SCAN") = (int)st::kUpScan;
  m.attr("WARP_INDEX_GATHER") = (int)st::kIndexGather;
  m.def("vote", &st::vote, "ballot/any/all and __syncthreads_count/and/or, 6 ints per thread", py::arg("pred"),
        py::arg("out"), py::arg("n"), py::arg("block"), py::arg("stream") = 0);
  m.def("atomics", &st::atomics, "atomics from every block", py::arg("v"), py::arg("n"), py::arg("bins"),
        py::arg("counter"), py::arg("vmax"), py::arg("vmin"), py::arg("hist"), py::arg("fsum"), py::arg("fmax"),
        py::arg("grid"), py::arg("block"), py::arg("stream") = 0);
  m.def("axpb", &st::axpb, "y[i] = a x[i] + b behind an early-return guard", py::arg("x"), py::arg("y"),
        py::arg("n"), py::arg("a"), py::arg("b"), py::arg("block"), py::arg("stream") = 0);
  m.def("index", [](uintptr_t out, py::tuple grid, py::tuple block, uintptr_t stream) {
    const unsigned g[3] = {grid[0].cast<unsigned>(), grid[1].cast<unsigned>(), grid[2].cast<unsigned>()};
    const unsigned b[3] = {block[0].cast<unsigned>(), block[1].cast<unsigned>(), block[2].cast<unsigned>()};
    st::index(out, g, b, stream);
  }, "each thread's (threadIdx, blockIdx), 6 ints per thread", py::arg("out"), py::arg("grid"), py::arg("block"),
     py::arg("stream") = 0);
  m.def("convert", &st::convert, "float -> half / bfloat16 bits and back", py::arg("x"), py::arg("half_bits"),
        py::arg("bf16_bits"), py::arg("half_back"), py::arg("bf16_back"), py::arg("n"), py::arg("stream") = 0);
  m.def("ldmatrix", &st::ldmatrix, "one warp's ldmatrix of count 8x8 b16 matrices from a 32x8 tile; lane l "
        "passes row rows[l]; out: count words per lane", py::arg("count"), py::arg("src"), py::arg("rows"),
        py::arg("out"), py::arg("stream") = 0);
  m.def("mma", &st::mma, "d = a @ b + c with one mma.sync m16n8k16 (dtype 1 float16, 2 bfloat16; a, b as bits)",
        py::arg("dtype"), py::arg("from_shared"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"),
        py::arg("stream") = 0);
  m.def("cp_async", &st::cp_async, "cp.async groups: what a thread reads before / between / after its waits",
        py::arg("old_values"), py::arg("new1"), py::arg("new2"), py::arg("out"), py::arg("threads"),
        py::arg("stream") = 0);
#ifdef FASTBONE_EMU
  m.def("set_serial_warps", &fb_emu::set_serial_warps,
        "release one warp per scheduling round (each warp runs ahead to its next __syncthreads); returns the "
        "previous setting", py::arg("on"));
  m.def("set_cp_async_wait_slack", &fb_emu::set_cp_async_wait_slack,
        "mutation switch: every cp.async wait_group<N> waits as wait_group<N + slack> (0: as PTX); returns the "
        "previous slack", py::arg("slack"));
  m.def("trap", &st::trap, py::arg("threads"), py::arg("trap_thread"));
  m.def("divergent_barrier", &st::divergent_barrier);
#endif
}
