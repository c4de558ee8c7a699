// Launchers of csrc/kernels/se.cuh (declared in ops.h, bound in ops_bindings.cpp): the
// squeeze-excitation gate, one block per image, from the activation (se_gate) or from the depthwise
// kernel's pool sums (se_gate_from_sums: the same kernel reading the sums as a tiles x 1 image). As in
// ops.cu: raw pointers as integers (0 = absent bias), shapes and strides as int64 lists (N, C, H, W
// order), codes as integers, the stream as an integer. The op layer validates the arguments; the
// checks here guard the kernel's limits.
// NvrtcRuntime mirrors it (fastbone/cuda/se.py, SeNvrtcMixin).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "dispatch.h"
#include "launch.h"
#include "ops.h"
#include "kernels/se.cuh"

namespace fb_ops {

namespace {

// The checks both gates share (the op layer validates the arguments; these guard the kernel's limits).
void se_check(int64_t n, int64_t c, int64_t rows, int64_t squeeze, int64_t act, int64_t gate, const char* op) {
  if (act < 0 || act >= fb::kNumActivations)
    throw std::invalid_argument("fastbone cuda kernels: unknown activation code " + std::to_string(act) +
                                "; accepted: 0.." + std::to_string(fb::kNumActivations - 1));
  if (gate != fb::kGateSigmoid && gate != fb::kGateHardsigmoid)
    throw std::invalid_argument(std::string(op) + ": unknown gate code " + std::to_string(gate) +
                                "; accepted: 0 (sigmoid), 1 (hardsigmoid)");
  if (squeeze < 1 || squeeze > fb::kSeMaxSqueeze)
    throw std::invalid_argument(std::string(op) + ": " + std::to_string(squeeze) +
                                " squeeze channels; the kernel holds 1.." + std::to_string(fb::kSeMaxSqueeze) +
                                " in shared memory");
  if (n > INT32_MAX || c > INT32_MAX || rows > INT32_MAX || c * squeeze > INT32_MAX)
    throw std::invalid_argument(std::string(op) + ": a size is outside the kernel's 32-bit index range");
}

// One block per image; x of type TX read through (N, C, rows / W, W) strides, weights of dtype code `dtype`.
template <typename TX>
void se_launch(uintptr_t x, int64_t n, int64_t c, int64_t rows, int64_t w, const Dims& x_strides, double inv_hw,
               uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t out, int64_t squeeze, int64_t dtype,
               int64_t act, double slope, int64_t gate, uintptr_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using X = typename std::conditional<std::is_same<TX, void>::value, T, TX>::type;  // void: x in T
    FB_LAUNCH((fb::se_gate_kernel<X, T>), dim3((unsigned)n), dim3(fb::kSeThreads), (size_t)squeeze * sizeof(float),
              FB_STREAM(stream), out_ptr<float>(out), in_ptr<X>(x), in_ptr<T>(w1), in_ptr<T>(b1), in_ptr<T>(w2),
              in_ptr<T>(b2), (int)c, (int)rows, (int)w, (int)squeeze,
              (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
              (float)inv_hw, (int)act, (float)slope, (int)gate);
  });
}

}  // namespace

void se_gate(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w1, uintptr_t b1, uintptr_t w2,
             uintptr_t b2, uintptr_t out, int64_t squeeze, int64_t dtype, int64_t act, double slope, int64_t gate,
             uintptr_t stream) {
  if (x_shape.size() != 4 || x_strides.size() != 4)
    throw std::invalid_argument("se_gate: x_shape and x_strides must have 4 entries (N, C, H, W order)");
  const int64_t n = x_shape[0], c = x_shape[1], hw = x_shape[2] * x_shape[3];
  se_check(n, c, hw, squeeze, act, gate, "se_gate");
  if (n == 0 || c == 0) return;
  if (hw == 0) throw std::invalid_argument("se_gate: the images are empty (H * W = 0): no mean to take");
  se_launch<void>(x, n, c, hw, x_shape[3], x_strides, 1.0 / (double)hw, w1, b1, w2, b2, out, squeeze, dtype, act,
                  slope, gate, stream);
}

void se_gate_from_sums(uintptr_t sums, int64_t n, int64_t tiles, int64_t c, int64_t hw, uintptr_t w1, uintptr_t b1,
                       uintptr_t w2, uintptr_t b2, uintptr_t out, int64_t squeeze, int64_t dtype, int64_t act,
                       double slope, int64_t gate, uintptr_t stream) {
  se_check(n, c, tiles, squeeze, act, gate, "se_gate_from_sums");
  if (n == 0 || c == 0) return;
  if (tiles < 1 || hw < 1)
    throw std::invalid_argument("se_gate_from_sums: tiles = " + std::to_string(tiles) + " and hw = " +
                                std::to_string(hw) + "; both must be >= 1");
  // The (N, tiles, C) sums as an NHWC image of tiles x 1 pixels.
  se_launch<float>(sums, n, c, tiles, 1, Dims{tiles * c, 1, c, c}, 1.0 / (double)hw, w1, b1, w2, b2, out, squeeze,
                   dtype, act, slope, gate, stream);
}

}  // namespace fb_ops
