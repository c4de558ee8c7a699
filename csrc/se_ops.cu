// Launcher of csrc/kernels/se.cuh (declared in ops.h, bound in ops_bindings.cpp): the
// squeeze-excitation gate, one block per image. As in ops.cu: raw pointers as integers (0 =
// absent bias), shapes and strides as int64 lists (N, C, H, W order), codes as integers, the stream
// as an integer. The op layer validates the arguments; the checks here guard the kernel's limits.
// NvrtcRuntime mirrors it (fastbone/cuda/se.py, SeNvrtcMixin).
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "launch.h"
#include "ops.h"
#include "kernels/se.cuh"

namespace fb_ops {

void se_gate(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w1, uintptr_t b1, uintptr_t w2,
             uintptr_t b2, uintptr_t out, int64_t squeeze, int64_t dtype, int64_t act, double slope, int64_t gate,
             uintptr_t stream) {
  if (x_shape.size() != 4 || x_strides.size() != 4)
    throw std::invalid_argument("se_gate: x_shape and x_strides must have 4 entries (N, C, H, W order)");
  if (act < 0 || act >= fb::kNumActivations)
    throw std::invalid_argument("fastbone cuda kernels: unknown activation code " + std::to_string(act) +
                                "; accepted: 0.." + std::to_string(fb::kNumActivations - 1));
  if (gate != fb::kGateSigmoid && gate != fb::kGateHardsigmoid)
    throw std::invalid_argument("se_gate: unknown gate code " + std::to_string(gate) +
                                "; accepted: 0 (sigmoid), 1 (hardsigmoid)");
  const int64_t n = x_shape[0], c = x_shape[1], hw = x_shape[2] * x_shape[3];
  if (n == 0 || c == 0) return;
  if (hw == 0) throw std::invalid_argument("se_gate: the images are empty (H * W = 0): no mean to take");
  if (squeeze < 1 || squeeze > fb::kSeMaxSqueeze)
    throw std::invalid_argument("se_gate: " + std::to_string(squeeze) + " squeeze channels; the kernel holds 1.." +
                                std::to_string(fb::kSeMaxSqueeze) + " in shared memory");
  if (n > INT32_MAX || c > INT32_MAX || hw > INT32_MAX || c * squeeze > INT32_MAX)
    throw std::invalid_argument("se_gate: a size is outside the kernel's 32-bit index range");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    FB_LAUNCH(fb::se_gate_kernel<T>, dim3((unsigned)n), dim3(fb::kSeThreads), (size_t)squeeze * sizeof(float),
              FB_STREAM(stream), out_ptr<float>(out), in_ptr<T>(x), in_ptr<T>(w1), in_ptr<T>(b1), in_ptr<T>(w2),
              in_ptr<T>(b2), (int)c, (int)hw, (int)x_shape[3], (int)squeeze,
              (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
              (float)(1.0 / (double)hw), (int)act, (float)slope, (int)gate);
  });
}

}  // namespace fb_ops
