// Dtype / activation dispatch shared by the launchers (csrc/ops.cu, csrc/depthwise_ops.cu): one
// generic lambda serves every instantiation,
//   dispatch_dtype(dtype, [&](auto tag) { using T = typename decltype(tag)::type; ... });
//   dispatch_act(act, [&](auto act_c) { constexpr int ACT = decltype(act_c)::value; ... });
// and the raw-pointer casts of the integers the bindings pass. Host code, compiled by nvcc (with
// cuda_fp16.h / cuda_bf16.h from kernels/common.cuh) and by g++ under the emulator shim.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "kernels/common.cuh"

namespace fb_ops {

template <typename T>
struct DtypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(int64_t code, F&& f) {
  switch (code) {
    case fb::kFloat32: f(DtypeTag<float>{}); return;
    case fb::kFloat16: f(DtypeTag<__half>{}); return;
    case fb::kBFloat16: f(DtypeTag<__nv_bfloat16>{}); return;
  }
  throw std::invalid_argument("fastbone cuda kernels: unknown dtype code " + std::to_string(code) +
                              "; accepted: 0 (float32), 1 (float16), 2 (bfloat16)");
}

template <int... Codes, typename F>
void dispatch_act_impl(int64_t code, F&& f, std::integer_sequence<int, Codes...>) {
  bool found = ((code == Codes ? (f(std::integral_constant<int, Codes>{}), true) : false) || ...);
  if (!found)
    throw std::invalid_argument("fastbone cuda kernels: unknown activation code " + std::to_string(code) +
                                "; accepted: 0.." + std::to_string(fb::kNumActivations - 1));
}

template <typename F>
void dispatch_act(int64_t code, F&& f) {
  dispatch_act_impl(code, std::forward<F>(f), std::make_integer_sequence<int, fb::kNumActivations>{});
}

template <typename T>
const T* in_ptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* out_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace fb_ops
