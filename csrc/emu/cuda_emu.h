// Host emulation of the CUDA C++ that fastbone's kernels use (the `fastbone._emu` build).
//
// g++ compiles every .cu file of the emu build with `-x c++ -include csrc/emu/cuda_emu.h -DFASTBONE_EMU`.
// A launch runs the grid's blocks one after another on the calling OS thread; each thread of a
// block is a fiber (csrc/emu/runtime.cpp), so __syncthreads, __shared__ memory, warp shuffles and
// atomics behave as on a GPU:
//   - __shared__ is `static`: blocks run one at a time, so a function-local static is exactly
//     "one object per block, seen by all its threads" (each template instantiation has its own).
//   - a thread runs until it finishes or reaches a barrier (__syncthreads, a shuffle, __syncwarp,
//     a vote); barrier-free kernels therefore cost no context switch per thread.
//   - a thread that has returned counts as arrived at later barriers (as the hardware treats exited
//     threads); a barrier that can never complete raises an error naming the waiting threads.
//   - a shuffle that reads a lane that does not exist or has exited returns all-ones bits (NaN for
//     floating point): the GPU returns an undefined value there.
//   - atomics are plain read-modify-writes (one OS thread runs everything).
//   - asynchronous copies (cp.async, used through kernels/mma.cuh): each thread queues its copies in
//     its current group; commit closes the group; wait_group<N> performs every queued copy except
//     those of the N most recently committed groups (copies not yet committed stay queued, as in
//     PTX). So a kernel that reads a stage before its wait sees the old contents, as it would race
//     on a GPU. A thread's copies still queued when it returns are performed then.
//     set_cp_async_wait_slack(s) makes every wait_group<N> act as wait_group<N + s>: a mutation switch
//     with which tests prove that a kernel's results depend on its waits (s = 0, the default, is PTX).
//   - a warp gather (warp_all_gather): every lane posts a small value and receives all 32; it is
//     a warp barrier like a shuffle. kernels/mma.cuh builds ldmatrix and mma.sync on it, following
//     the PTX ISA fragment layouts.
//   - warp scheduling: by default every warp whose lanes have all reached a warp barrier is released
//     in each round, so warps advance together between block barriers. set_serial_warps(true) releases
//     only the lowest-numbered ready warp per round: each warp runs ahead to its next __syncthreads
//     before the next warp moves, which exposes a missing block barrier between warps (a warp reading
//     shared memory that another warp has not written yet). Tests switch it on around a kernel.
// Not emulated: __CUDA_ARCH__ (undefined here; kernels branch on FASTBONE_EMU), PTX other than the
// mma.cuh wrappers (wgmma, TMA, ...), partial shuffle masks, `extern __shared__` (use
// FB_DYNAMIC_SMEM from launch.h).
#pragma once

#ifndef FASTBONE_EMU
#error "cuda_emu.h is the host emulation shim: compile with -DFASTBONE_EMU"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>  // device-side printf
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// __noinline__ is left alone: libstdc++ uses __attribute__((__noinline__)) itself.
#define __launch_bounds__(...)
#define __constant__
#define __managed__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define FB_EMU_HIDDEN __attribute__((visibility("hidden")))

// ---------------------------------------------------------------- vector types and built-ins
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define FB_EMU_VEC2(T, name) \
  struct alignas(2 * sizeof(T)) name { T x, y; }; \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define FB_EMU_VEC4(T, name, align) \
  struct alignas(align) name { T x, y, z, w; }; \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
FB_EMU_VEC2(float, float2)
FB_EMU_VEC2(int, int2)
FB_EMU_VEC4(float, float4, 16)
FB_EMU_VEC4(int, int4, 16)
#undef FB_EMU_VEC2
#undef FB_EMU_VEC4
static_assert(sizeof(float4) == 16, "float4 layout");

typedef struct CUstream_st* cudaStream_t;

// Set by the scheduler before it resumes a thread (runtime.cpp); read-only for kernels.
extern FB_EMU_HIDDEN uint3 threadIdx;
extern FB_EMU_HIDDEN uint3 blockIdx;
extern FB_EMU_HIDDEN dim3 blockDim;
extern FB_EMU_HIDDEN dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- the fiber runtime's interface
namespace fb_emu {

enum class WarpOp : int { kIndex, kUp, kDown, kXor, kSync, kBallot, kAny, kAll, kGather };

using KernelBody = void (*)(void* payload);

// Runs body(payload) once per thread of every block (synchronous). Throws std::runtime_error for a
// bad configuration, a deadlocked barrier or an exception thrown by a kernel thread.
FB_EMU_HIDDEN void run_grid(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                            KernelBody body, void* payload);
// Block barrier; returns how many of the threads that arrived had a non-zero predicate (and, when
// `arrived` is given, how many arrived: the threads that had not returned).
FB_EMU_HIDDEN int block_barrier(int predicate, int* arrived = nullptr);
// Warp barrier that exchanges 64-bit values between lanes (op and arg as in the __shfl_* family).
FB_EMU_HIDDEN uint64_t warp_exchange(uint64_t value, WarpOp op, int arg, int width);
FB_EMU_HIDDEN unsigned active_lanes();
// Warp barrier: every lane posts `bytes` bytes at `mine` and receives all 32 lanes' posts, lane-major,
// at `all` (32 * bytes). A lane that has returned (or does not exist) contributes all-ones bytes.
// Every lane of one gather must post the same size.
FB_EMU_HIDDEN void warp_all_gather(const void* mine, void* all, size_t bytes);
// cp.async: queue a copy of `bytes` bytes from src to dst, of which the first src_bytes come from
// src and the rest are zero (src_bytes 0: zero fill, src not read); commit; wait_group(n).
FB_EMU_HIDDEN void cp_async(void* dst, const void* src, int bytes, int src_bytes);
FB_EMU_HIDDEN void cp_async_commit();
FB_EMU_HIDDEN void cp_async_wait(int n);
// The warp release policy (see the header comment); returns the previous setting.
FB_EMU_HIDDEN bool set_serial_warps(bool on);
// wait_group<N> waits as wait_group<N + slack> (see the header comment); returns the previous slack.
FB_EMU_HIDDEN int set_cp_async_wait_slack(int slack);
FB_EMU_HIDDEN void* dynamic_smem();
[[noreturn]] FB_EMU_HIDDEN void fail(const std::string& message);

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu)
    fail(std::string(what) + ": the emulator supports only the full mask 0xffffffff");
}

template <typename T>
inline T exchange(T value, WarpOp op, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(bits, op, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Launch: converts the arguments to the kernel's parameter types (as <<<>>> does) and runs the grid.
template <typename... Params, typename... Args>
void launch_named(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                  Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  struct Payload {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
  } payload{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  run_grid(name, grid, block, smem_bytes,
           [](void* p) {
             auto* pl = static_cast<Payload*>(p);
             std::apply(pl->kernel, pl->args);
           },
           &payload);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  launch_named("kernel", kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
}

}  // namespace fb_emu

// ---------------------------------------------------------------- synchronisation and warp intrinsics
inline void __syncthreads() { fb_emu::block_barrier(0); }
inline int __syncthreads_count(int p) { return fb_emu::block_barrier(p); }
inline int __syncthreads_or(int p) { return fb_emu::block_barrier(p) != 0; }
inline int __syncthreads_and(int p) {
  int arrived = 0;
  return fb_emu::block_barrier(p, &arrived) == arrived;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fb_emu::check_full_mask(mask, "__syncwarp");
  fb_emu::warp_exchange(0, fb_emu::WarpOp::kSync, 0, 32);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { fb_emu::fail("__trap() called in a kernel"); }
inline unsigned __activemask() { return fb_emu::active_lanes(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  fb_emu::check_full_mask(mask, "__shfl_sync");
  return fb_emu::exchange(v, fb_emu::WarpOp::kIndex, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  fb_emu::check_full_mask(mask, "__shfl_up_sync");
  return fb_emu::exchange(v, fb_emu::WarpOp::kUp, (int)delta, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  fb_emu::check_full_mask(mask, "__shfl_down_sync");
  return fb_emu::exchange(v, fb_emu::WarpOp::kDown, (int)delta, width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  fb_emu::check_full_mask(mask, "__shfl_xor_sync");
  return fb_emu::exchange(v, fb_emu::WarpOp::kXor, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  fb_emu::check_full_mask(mask, "__ballot_sync");
  return (unsigned)fb_emu::warp_exchange(predicate != 0, fb_emu::WarpOp::kBallot, 0, 32);
}
inline int __any_sync(unsigned mask, int predicate) {
  fb_emu::check_full_mask(mask, "__any_sync");
  return (int)fb_emu::warp_exchange(predicate != 0, fb_emu::WarpOp::kAny, 0, 32);
}
inline int __all_sync(unsigned mask, int predicate) {
  fb_emu::check_full_mask(mask, "__all_sync");
  return (int)fb_emu::warp_exchange(predicate != 0, fb_emu::WarpOp::kAll, 0, 32);
}

// ---------------------------------------------------------------- atomics (one OS thread: plain RMW)
#define FB_EMU_ATOMIC(name, T, expr) \
  inline T name(T* address, T val) { \
    T old = *address;                 \
    *address = (expr);                \
    return old;                       \
  }
#define FB_EMU_ATOMIC_INTEGRAL(T)                             \
  FB_EMU_ATOMIC(atomicAdd, T, old + val)                      \
  FB_EMU_ATOMIC(atomicSub, T, old - val)                      \
  FB_EMU_ATOMIC(atomicExch, T, val)                           \
  FB_EMU_ATOMIC(atomicMax, T, old < val ? val : old)          \
  FB_EMU_ATOMIC(atomicMin, T, val < old ? val : old)          \
  FB_EMU_ATOMIC(atomicAnd, T, old & val)                      \
  FB_EMU_ATOMIC(atomicOr, T, old | val)                       \
  FB_EMU_ATOMIC(atomicXor, T, old ^ val)                      \
  inline T atomicCAS(T* address, T compare, T val) {          \
    T old = *address;                                         \
    if (old == compare) *address = val;                       \
    return old;                                               \
  }
FB_EMU_ATOMIC_INTEGRAL(int)
FB_EMU_ATOMIC_INTEGRAL(unsigned int)
FB_EMU_ATOMIC_INTEGRAL(unsigned long long)
FB_EMU_ATOMIC(atomicMax, long long, old < val ? val : old)
FB_EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
FB_EMU_ATOMIC(atomicAdd, float, old + val)
FB_EMU_ATOMIC(atomicAdd, double, old + val)
FB_EMU_ATOMIC(atomicExch, float, val)
#undef FB_EMU_ATOMIC_INTEGRAL
#undef FB_EMU_ATOMIC
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  unsigned old = *address;
  *address = old >= limit ? 0u : old + 1u;
  return old;
}

// ---------------------------------------------------------------- math and bit intrinsics
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// CUDA's global min/max overloads (device code calls them unqualified). Same-type overloads plus
// the mixed signed/unsigned ones CUDA resolves to the unsigned type.
#define FB_EMU_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T max(T a, T b) { return a < b ? b : a; }
FB_EMU_MINMAX(int)
FB_EMU_MINMAX(unsigned int)
FB_EMU_MINMAX(long long)
FB_EMU_MINMAX(unsigned long long)
FB_EMU_MINMAX(long)
FB_EMU_MINMAX(unsigned long)
#undef FB_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline float min(float a, double b) { return fminf(a, (float)b); }
inline float max(float a, double b) { return fmaxf(a, (float)b); }

// ---------------------------------------------------------------- __half and __nv_bfloat16
namespace fb_emu {
// Exact IEEE conversions, NaN mapped to the canonical NaN CUDA produces (0x7fff).
inline unsigned short float_to_half_bits(float f) {
  if (f != f) return 0x7fff;
  _Float16 h = (_Float16)f;  // round to nearest even (libgcc / F16C)
  unsigned short bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
inline unsigned short double_to_half_bits(double d) {
  if (d != d) return 0x7fff;
  _Float16 h = (_Float16)d;  // one rounding, no double rounding through float
  unsigned short bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
inline float half_bits_to_float(unsigned short bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return (float)h;
}
inline unsigned short float_to_bfloat16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even on the 16 dropped bits (overflow -> inf)
  return (unsigned short)(u >> 16);
}
inline float bfloat16_bits_to_float(unsigned short bits) {
  uint32_t u = (uint32_t)bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace fb_emu

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

// Arithmetic is done in float and rounded once: for + - * / that equals the correctly rounded
// half (bfloat16) result because float carries more than 2p+2 bits.
#define FB_EMU_HALF_TYPE(Name, Raw, to_bits, from_bits, dbl_to_bits)                                    \
  struct alignas(2) Name {                                                                              \
    unsigned short __x;                                                                                 \
    Name() = default;                                                                                   \
    constexpr Name(Raw r) : __x(r.x) {}                                                                 \
    Name(float f) : __x(fb_emu::to_bits(f)) {}                                                          \
    Name(double d) : __x(fb_emu::dbl_to_bits(d)) {}                                                     \
    Name(int i) : Name((double)i) {}                                                                    \
    Name(unsigned int i) : Name((double)i) {}                                                           \
    Name(long long i) : Name((double)i) {}                                                              \
    Name(unsigned long long i) : Name((double)i) {}                                                     \
    Name(short i) : Name((double)i) {}                                                                  \
    Name(unsigned short i) : Name((double)i) {}                                                         \
    operator float() const { return fb_emu::from_bits(__x); }                                           \
    operator Raw() const { return Raw{__x}; }                                                           \
    Name& operator+=(Name o) { return *this = Name(float(*this) + float(o)); }                          \
    Name& operator-=(Name o) { return *this = Name(float(*this) - float(o)); }                          \
    Name& operator*=(Name o) { return *this = Name(float(*this) * float(o)); }                          \
    Name& operator/=(Name o) { return *this = Name(float(*this) / float(o)); }                          \
  };                                                                                                    \
  inline Name operator+(Name a, Name b) { return Name(float(a) + float(b)); }                           \
  inline Name operator-(Name a, Name b) { return Name(float(a) - float(b)); }                           \
  inline Name operator*(Name a, Name b) { return Name(float(a) * float(b)); }                           \
  inline Name operator/(Name a, Name b) { return Name(float(a) / float(b)); }                           \
  inline Name operator-(Name a) { return Name(Raw{(unsigned short)(a.__x ^ 0x8000u)}); }                \
  inline Name operator+(Name a) { return a; }                                                           \
  inline bool operator==(Name a, Name b) { return float(a) == float(b); }                               \
  inline bool operator!=(Name a, Name b) { return float(a) != float(b); }                               \
  inline bool operator<(Name a, Name b) { return float(a) < float(b); }                                 \
  inline bool operator>(Name a, Name b) { return float(a) > float(b); }                                 \
  inline bool operator<=(Name a, Name b) { return float(a) <= float(b); }                               \
  inline bool operator>=(Name a, Name b) { return float(a) >= float(b); }

// bfloat16 from double: round the double to float first is double rounding; go through the exact
// float only when representable, else round directly on the double's bits.
namespace fb_emu {
inline unsigned short double_to_bfloat16_bits(double d) {
  float f = (float)d;
  if ((double)f == d || d != d) return float_to_bfloat16_bits(f);
  // Round toward zero to float, then set the sticky bit so the final RNE sees the lost bits.
  uint32_t u;
  float t = (float)d;
  if (std::fabs((double)t) > std::fabs(d)) t = std::nextafter(t, 0.0f);
  std::memcpy(&u, &t, 4);
  u |= 1u;
  std::memcpy(&t, &u, 4);
  return float_to_bfloat16_bits(t);
}
}  // namespace fb_emu

FB_EMU_HALF_TYPE(__half, __half_raw, float_to_half_bits, half_bits_to_float, double_to_half_bits)
FB_EMU_HALF_TYPE(__nv_bfloat16, __nv_bfloat16_raw, float_to_bfloat16_bits, bfloat16_bits_to_float,
                 double_to_bfloat16_bits)
#undef FB_EMU_HALF_TYPE
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
static_assert(std::is_trivially_default_constructible<__half>::value, "__shared__ __half arrays need no guard");
static_assert(std::is_trivially_copyable<__nv_bfloat16>::value, "bfloat16 moves through shuffles");

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline __half __ushort_as_half(unsigned short b) { return __half(__half_raw{b}); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hneg(__half a) { return -a; }
inline __half __hmax(__half a, __half b) { return __half(fmaxf(float(a), float(b))); }  // NaN loses, as in CUDA
inline __half __hmin(__half a, __half b) { return __half(fminf(float(a), float(b))); }
inline __half __hfma(__half a, __half b, __half c) { return __half(fma((double)float(a), (double)float(b), (double)float(c))); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
