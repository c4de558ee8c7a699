// Launcher of csrc/kernels/fire.cuh (declared in ops.h, bound in ops_bindings.cpp): the Fire module's
// expand stage, expand1x1 and expand3x3 (+ bias + activation) from one read of the squeeze output.
//
// As in ops.cu: raw pointers as integers (0 = absent), shapes and strides as int64 lists (N, C, H, W
// order), dtype and activation codes, the stream as an integer. The op layer validates the arguments;
// the checks here guard the kernel's own limits. A problem beyond CUDA's grid or the kernel's 32-bit
// pixel index runs as several launches over pointer-offset slices, split by ops.cu's conv_launch_plan
// (one group, max(E1, E3) columns); NvrtcRuntime mirrors it (fastbone/cuda/fire_launch.py).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "launch.h"
#include "ops.h"
#include "kernels/fire.cuh"

namespace fb_ops {

namespace {

void fire_check_dims(const Dims& d, const char* name) {
  if (d.size() != 4) throw std::invalid_argument(std::string("fire_expand: ") + name +
                                                 " must have 4 entries (N, C, H, W order)");
}

void fire_check_int(int64_t v, const char* what) {
  if (v < 0 || v > INT32_MAX)
    throw std::invalid_argument(std::string("fire_expand: ") + what + " = " + std::to_string(v) +
                                " is outside the kernel's 32-bit index range");
}

}  // namespace

void fire_expand(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w1, const Dims& w1_shape,
                 const Dims& w1_strides, uintptr_t b1, uintptr_t w3, const Dims& w3_shape, const Dims& w3_strides,
                 uintptr_t b3, uintptr_t out, const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset,
                 int64_t dtype, int64_t act, double slope, uintptr_t stream) {
  fire_check_dims(x_shape, "x_shape"), fire_check_dims(x_strides, "x_strides");
  fire_check_dims(w1_shape, "w1_shape"), fire_check_dims(w1_strides, "w1_strides");
  fire_check_dims(w3_shape, "w3_shape"), fire_check_dims(w3_strides, "w3_strides");
  fire_check_dims(out_shape, "out_shape"), fire_check_dims(out_strides, "out_strides");
  if (act < 0 || act >= fb::kNumActivations)
    throw std::invalid_argument("fastbone cuda kernels: unknown activation code " + std::to_string(act) +
                                "; accepted: 0.." + std::to_string(fb::kNumActivations - 1));
  const int64_t n = x_shape[0], s = x_shape[1], h = x_shape[2], w = x_shape[3];
  const int64_t e1 = w1_shape[0], e3 = w3_shape[0];
  if (w1_shape[1] != s || w1_shape[2] != 1 || w1_shape[3] != 1 || w3_shape[1] != s || w3_shape[2] != 3 ||
      w3_shape[3] != 3)
    throw std::invalid_argument("fire_expand: w1_shape must be (E1, S, 1, 1) and w3_shape (E3, S, 3, 3) for the "
                                "input's S = " + std::to_string(s) + " channels");
  if (out_shape[0] != n || out_shape[2] != h || out_shape[3] != w || out_c_offset < 0 ||
      out_c_offset + e1 + e3 > out_shape[1])
    throw std::invalid_argument("fire_expand: out has shape (" + std::to_string(out_shape[0]) + ", " +
                                std::to_string(out_shape[1]) + ", " + std::to_string(out_shape[2]) + ", " +
                                std::to_string(out_shape[3]) + "), which does not hold channels [" +
                                std::to_string(out_c_offset) + ", " + std::to_string(out_c_offset + e1 + e3) +
                                ") of the input's N, H, W");
  if (n == 0 || h == 0 || w == 0 || e1 + e3 == 0) return;
  for (int64_t v : {h, w, out_c_offset + e1 + e3, 9 * s + fb::FireTile::BK}) fire_check_int(v, "a size");
  const int64_t e = std::max(e1, e3);
  const int64_t sxn = x_strides[0], son = out_strides[0], soh = out_strides[2];
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (const std::vector<int64_t>& ch : conv_launch_plan(n, h, w, 1, e, fb::FireTile::BN)) {
      const int64_t n0 = ch[0], nn = ch[1], oh0 = ch[2], ohn = ch[3], c0 = ch[6], cn = ch[7];
      // This launch's columns [c0, c0 + cn) of each half (fewer, or none, where a half is narrower).
      const int64_t e1c = std::clamp<int64_t>(e1 - c0, 0, cn), e3c = std::clamp<int64_t>(e3 - c0, 0, cn);
      const int64_t m = nn * ohn * w;
      const dim3 grid((unsigned)fb::ceil_div(m, fb::FireTile::BM), (unsigned)fb::ceil_div(cn, fb::FireTile::BN));
      FB_LAUNCH((fb::fire_expand_kernel<T>), grid, dim3(fb::FireTile::kThreads), 0, FB_STREAM(stream),
                in_ptr<T>(x) + n0 * sxn, in_ptr<T>(w1) + (e1c ? c0 * w1_strides[0] : 0),
                b1 && e1c ? in_ptr<float>(b1) + c0 : in_ptr<float>(b1), in_ptr<T>(w3) + (e3c ? c0 * w3_strides[0] : 0),
                b3 && e3c ? in_ptr<float>(b3) + c0 : in_ptr<float>(b3), out_ptr<T>(out) + n0 * son + oh0 * soh,
                (int)m, (int)h, (int)w, (int)s, (int)ohn, (int)e1c, (int)e3c, (long long)sxn,
                (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3], (long long)w1_strides[0],
                (long long)w1_strides[1], (long long)w3_strides[0], (long long)w3_strides[1],
                (long long)w3_strides[2], (long long)w3_strides[3], (long long)son, (long long)out_strides[1],
                (long long)soh, (long long)out_strides[3], (int)(out_c_offset + c0), (int)(out_c_offset + e1 + c0),
                (int)(1 - oh0), (int)act, (float)slope);
    }
  });
}

}  // namespace fb_ops
