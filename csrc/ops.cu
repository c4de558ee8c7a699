// Launchers for the kernels in csrc/kernels/*.cuh (declared in ops.h). Their pybind11
// bindings live in ops_bindings.cpp: kept out of this file so nvcc, which compiles it once
// per target architecture, does not parse pybind11 each time.
//
// Every launcher takes raw pointers (uintptr_t, 0 for "absent"), shapes and strides as
// int64 lists, the dtype code (0 float32, 1 float16, 2 bfloat16), the activation code
// (fastbone/ops/activation.py) and the stream as an integer. Arguments are validated by
// the op layer; the checks here only guard the kernels' own limits.
// The launch geometry below is mirrored by NvrtcRuntime in fastbone/cuda/ops.py: change both.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "launch.h"
#include "ops.h"
#include "kernels/conv.cuh"
#include "kernels/pool.cuh"
#include "kernels/stem.cuh"

namespace fb_ops {

// dispatch_dtype / dispatch_act (one generic lambda serves every instantiation): csrc/dispatch.h

void check_dims(const Dims& d, const char* name) {
  if (d.size() != 4) throw std::invalid_argument(std::string(name) + " must have 4 entries (N, C, H, W order)");
}

void check_params(const Dims& d, size_t n, const char* name) {
  if (d.size() != n) throw std::invalid_argument(std::string(name) + " must have " + std::to_string(n) + " entries");
}

// The kernels index pixels and channels with 32-bit ints (offsets are 64-bit).
void check_int_range(int64_t v, const char* what) {
  if (v > INT32_MAX)
    throw std::invalid_argument(std::string(what) + " = " + std::to_string(v) +
                                " exceeds the kernels' 32-bit index range; split the batch");
}

// --- conv + BatchNorm / bias + activation (+ residual, + channel slice) ------------------

// BatchNorm needs both running statistics (the kernels read bn_var whenever bn_mean is given).
void check_bn(uintptr_t bn_mean, uintptr_t bn_var) {
  if ((bn_mean == 0) != (bn_var == 0))
    throw std::invalid_argument("BatchNorm needs both bn_mean and bn_var (or neither, for no BatchNorm)");
}

// FASTBONE_CUDA_CONV_MMA: which float16 / bfloat16 convs run the tensor-core variant
// (conv_bn_act_mma_kernel). Read on every call, so tests can switch it with monkeypatch.setenv.
//   unset, "" or "auto": on GPUs of compute capability >= kConvMmaMinCC, never in the emulator
//   "1": also in the emulator (CPU tests of the kernel: its loaders, pipeline, fragments, epilogue)
//   "64" / "128": as "1", with the 64x64 / 128x128 tile forced instead of chosen by the problem's shape
//   "0": never (the plain variant everywhere, e.g. to compare the two on a GPU)
// Convs with few output channels per group (the narrow tile) always run the plain variant.
struct ConvMmaMode {
  bool allowed;  // whether the mma variant may run (given the device / build)
  int forced_tile;  // 0: by shape, else 64 or 128
};

ConvMmaMode conv_mma_mode(bool emulator) {
  const char* env = std::getenv("FASTBONE_CUDA_CONV_MMA");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto") return {!emulator, 0};  // a GPU subject to its compute capability
  if (v == "0") return {false, 0};
  if (v == "1") return {true, 0};
  if (v == "64" || v == "128") return {true, std::stoi(v)};
  throw std::invalid_argument("FASTBONE_CUDA_CONV_MMA=" + v + ": expected auto, 0, 1, 64 or 128");
}

// The tensor-core variant's tile for a problem: the large one where C_out per group fills it and its
// grid still has kConvMmaLargeMinBlocks blocks (mirrored by fastbone/cuda/ops.py's conv_mma_tile).
bool conv_mma_large(int64_t m, int64_t c_out_g, int64_t groups, int forced_tile) {
  if (forced_tile != 0) return forced_tile == fb::ConvMmaLarge::BM;
  using L = fb::ConvMmaLarge;
  return c_out_g >= fb::kConvMmaLargeMinCout &&
         fb::ceil_div(m, L::BM) * fb::ceil_div(c_out_g, L::BN) * groups >= fb::kConvMmaLargeMinBlocks;
}

enum class ConvVariant { kNarrow, kWide, kMmaSmall, kMmaLarge };

// The conv kernel for a problem of m output pixels; compute_capability 0 stands for the emulator.
ConvVariant choose_conv_variant(int64_t m, int64_t c_out_g, int64_t groups, int64_t dtype,
                                int64_t compute_capability) {
  if (c_out_g <= fb::kConvNarrowMaxCout) return ConvVariant::kNarrow;
  const bool emulator = compute_capability == 0;
  const ConvMmaMode mode = conv_mma_mode(emulator);
  const bool device_ok = emulator || compute_capability >= fb::kConvMmaMinCC;
  if (dtype == fb::kFloat32 || !mode.allowed || !device_ok) return ConvVariant::kWide;
  return conv_mma_large(m, c_out_g, groups, mode.forced_tile) ? ConvVariant::kMmaLarge : ConvVariant::kMmaSmall;
}

std::string conv_variant(int64_t m, int64_t c_out_g, int64_t groups, int64_t dtype, int64_t compute_capability) {
  switch (choose_conv_variant(m, c_out_g, groups, dtype, compute_capability)) {
    case ConvVariant::kNarrow: return "narrow";
    case ConvVariant::kWide: return "wide";
    case ConvVariant::kMmaSmall: return "mma_small";
    default: return "mma_large";
  }
}

// The current device's compute capability (cached per device); 0 in the emulator.
int64_t current_compute_capability() {
#ifdef FASTBONE_EMU
  return 0;
#else
  static int cached[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 1;  // no tensor cores assumed
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cached[device] = major * 10 + minor;
  }
  return cached[device];
#endif
}

// --- launch splitting ---------------------------------------------------------------------
// A launch's grid must fit CUDA's limits (gridDim.y and gridDim.z <= 65535, gridDim.x < 2^31) and
// the conv kernels index output pixels with 32-bit ints (cheap divisions in the inner loops;
// element offsets are 64-bit). A problem beyond either is run as several launches over slices of
// the tensors (pointer offsets; the kernels are unchanged), so no valid input is refused for its
// size. NvrtcRuntime (fastbone/cuda/ops.py) mirrors this plan; tests compare the two.
constexpr int64_t kMaxGridYZ = 65535;
// Output pixels (M) of one conv launch: m0 + BM and every row index stay below 2^31.
constexpr int64_t kMaxConvLaunchPixels = INT32_MAX - 256;

// The limits the launchers split at: the constants above, lowered only by tests
// (set_launch_limits) so that split launches run at small sizes in the emulator.
struct LaunchLimits {
  int64_t max_grid_yz = kMaxGridYZ, max_conv_launch_pixels = kMaxConvLaunchPixels;
};
LaunchLimits& launch_limits() {
  static LaunchLimits limits;
  return limits;
}

void set_launch_limits(int64_t max_grid_yz, int64_t max_conv_launch_pixels) {
  if (max_grid_yz < 1 || max_grid_yz > kMaxGridYZ || max_conv_launch_pixels < 1 ||
      max_conv_launch_pixels > kMaxConvLaunchPixels)
    throw std::invalid_argument("set_launch_limits: accepted 1 <= max_grid_yz <= " + std::to_string(kMaxGridYZ) +
                                " and 1 <= max_conv_launch_pixels <= " + std::to_string(kMaxConvLaunchPixels));
  launch_limits() = LaunchLimits{max_grid_yz, max_conv_launch_pixels};
}

template <typename T>
T* offset_or_null(T* p, int64_t elements) { return p == nullptr ? nullptr : p + elements; }

struct ConvChunk {
  int64_t n0, n, oh0, oh, g0, g, c0, c;
};

// The conv's launches: output images [n0, n0 + n) (rows [oh0, oh0 + oh) of one image when a
// single image has more than kMaxConvLaunchPixels output pixels), groups [g0, g0 + g), output
// channels [c0, c0 + c) of each of those groups (fewer than C_out/groups only when the channel
// tiles of one group exceed gridDim.y; then g == 1).
std::vector<ConvChunk> conv_chunks(int64_t n, int64_t oh, int64_t ow, int64_t groups, int64_t c_out_g,
                                   int64_t block_n) {
  const int64_t max_px = launch_limits().max_conv_launch_pixels, max_yz = launch_limits().max_grid_yz;
  if (ow > max_px)
    throw std::invalid_argument("conv: an output row of " + std::to_string(ow) + " pixels exceeds the kernels' " +
                                std::to_string(max_px) + "-pixel launch");
  std::vector<ConvChunk> chunks;
  const int64_t image = oh * ow;
  const int64_t max_c = max_yz * block_n;
  const int64_t g_step = c_out_g > max_c ? 1 : max_yz, c_step = c_out_g > max_c ? max_c : c_out_g;
  auto add = [&](int64_t n0, int64_t nn, int64_t oh0, int64_t ohn) {
    for (int64_t g0 = 0; g0 < groups; g0 += g_step)
      for (int64_t c0 = 0; c0 < c_out_g; c0 += c_step)
        chunks.push_back({n0, nn, oh0, ohn, g0, std::min(g_step, groups - g0), c0, std::min(c_step, c_out_g - c0)});
  };
  if (image <= max_px) {
    const int64_t per = std::max<int64_t>(1, max_px / std::max<int64_t>(image, 1));
    for (int64_t n0 = 0; n0 < n; n0 += per) add(n0, std::min(per, n - n0), 0, oh);
  } else {
    const int64_t rows = max_px / ow;
    for (int64_t n0 = 0; n0 < n; ++n0)
      for (int64_t oh0 = 0; oh0 < oh; oh0 += rows) add(n0, 1, oh0, std::min(rows, oh - oh0));
  }
  return chunks;
}

std::vector<std::vector<int64_t>> conv_launch_plan(int64_t n, int64_t oh, int64_t ow, int64_t groups,
                                                   int64_t c_out_g, int64_t block_n) {
  std::vector<std::vector<int64_t>> plan;
  for (const ConvChunk& c : conv_chunks(n, oh, ow, groups, c_out_g, block_n))
    plan.push_back({c.n0, c.n, c.oh0, c.oh, c.g0, c.g, c.c0, c.c});
  return plan;
}

// --- the conv launches (plain and horizontally fused) -----------------------------------------

// One conv of a launcher call: its weight, epilogue tensors (0 = absent) and destination. conv_bn_act
// has one; conv_bn_act_multi one per fused conv (segment).
struct ConvSegmentArgs {
  uintptr_t w;
  Dims w_strides;
  uintptr_t bias, bn_weight, bn_bias, bn_mean, bn_var;
  double eps;
  uintptr_t out;
  Dims out_strides;
  int64_t c_out_g;  // output channels per group
};

// What all segments of a call share. residual / in_scale / input pool / channel maps: conv_bn_act only (0 in
// the multi).
struct ConvCommonArgs {
  uintptr_t x;
  Dims x_shape, x_strides;
  int64_t c_in_g, kh, kw, oh, ow;
  const Dims* conv;
  uintptr_t residual;
  Dims res_strides;
  int64_t out_c_offset;
  int64_t dtype, act;
  double slope;
  uintptr_t stream, in_scale;
  int64_t in_scale_stride, residual_after_act, input_pool_mode, input_pool_kernel;
  uintptr_t in_channel_map, out_channel_map;  // int64 (C_in,) / (C_out,), 0: identity
  // Nonzero: the epilogue max-pools kConvOutPool x kConvOutPool windows (ConvProblem::out_pool) into a
  // pooled_h x pooled_w destination; the launches' row spans (ConvLaunch::oh0, oh) then count pooled rows.
  int64_t out_pool = 0, pooled_h = 0, pooled_w = 0;
};

// A segment's share of one launch: output channels [c0, c0 + c) of each launched group of segment `seg`.
struct ConvPiece {
  int64_t seg, c0, c;
};

// One launch: images [n0, n0 + n) (rows [oh0, oh0 + oh)), groups [g0, g0 + g) and up to kConvMaxSegments
// pieces, whose channel tiles lie one after the other along gridDim.y (conv_segment_problem).
struct ConvLaunch {
  int64_t n0, n, oh0, oh, g0, g;
  std::vector<ConvPiece> pieces;
};

// The horizontally fused launches' segment packing: each segment's channels in pieces of at most
// max_grid_yz tiles, packed in order into launches of at most kConvMaxSegments pieces and max_grid_yz
// tiles (gridDim.y) each.
std::vector<std::vector<ConvPiece>> conv_multi_packs(const Dims& c_outs, int64_t block_n) {
  const int64_t max_yz = launch_limits().max_grid_yz, max_c = max_yz * block_n;
  std::vector<std::vector<ConvPiece>> packs;
  int64_t tiles = 0;
  for (int64_t s = 0; s < (int64_t)c_outs.size(); ++s)
    for (int64_t c0 = 0; c0 < c_outs[s]; c0 += max_c) {
      const ConvPiece piece{s, c0, std::min(max_c, c_outs[s] - c0)};
      const int64_t piece_tiles = fb::ceil_div(piece.c, block_n);
      if (packs.empty() || (int64_t)packs.back().size() == fb::kConvMaxSegments || tiles + piece_tiles > max_yz) {
        packs.emplace_back();
        tiles = 0;
      }
      packs.back().push_back(piece);
      tiles += piece_tiles;
    }
  return packs;
}

std::vector<std::vector<int64_t>> conv_multi_launch_plan(const Dims& c_outs, int64_t block_n) {
  std::vector<std::vector<int64_t>> plan;
  for (const auto& pack : conv_multi_packs(c_outs, block_n)) {
    plan.emplace_back();
    for (const ConvPiece& p : pack) plan.back().insert(plan.back().end(), {p.seg, p.c0, p.c});
  }
  return plan;
}

// The kernels' parameters of segments 1 and 2 (FB_CONV_SEGMENT_PARAMS); all zero where unused.
template <typename T>
struct KernelSegment {
  const T* w = nullptr;
  const float *bias = nullptr, *bn_weight = nullptr, *bn_bias = nullptr, *bn_mean = nullptr, *bn_var = nullptr;
  T* out = nullptr;
  int c_out = 0;
  float eps = 0.0f;
  long long swo = 0, swc = 0, swh = 0, sww = 0, son = 0, soc = 0, soh = 0, sow = 0;
};
#define FB_KERNEL_SEGMENT_ARGS(s)                                                                              \
  s.w, s.bias, s.bn_weight, s.bn_bias, s.bn_mean, s.bn_var, s.out, s.c_out, s.eps, s.swo, s.swc, s.swh, s.sww, \
      s.son, s.soc, s.soh, s.sow

// Runs the launches `plan(block_n)` gives for the chosen variant's tile. Each launch's pointers are
// advanced to its first image / row, group and channel; a row band starting at output row oh0 sees
// rows 0.. and padding pad_h - oh0 * stride_h, so its input rows (oh * stride - pad) are the image's own.
// The kernel's C_out_g of a piece is its channel count c: both its bound on a group's channels and its
// stride between groups (oc = g * C_out_g + n from the piece's first channel). Channels are split only
// one group per launch, so where a launch spans several groups c is the whole C_out / groups.
// Channel maps (kernels/conv.cuh: ConvProblem) are advanced to the launch's first input channel / output
// channel instead: their entries count from channel 0 of x and of the slice, so x, in_scale (indexed by the
// channel read) and out_c_offset stay unshifted by the launch's groups / channels where a map is given.
void run_conv(const ConvCommonArgs& a, const std::vector<ConvSegmentArgs>& segs, ConvVariant variant,
              const std::function<std::vector<ConvLaunch>(int64_t block_n)>& plan) {
  const Dims& conv = *a.conv;
  const int64_t sxn = a.x_strides[0], sxc = a.x_strides[1];
  const bool in_mapped = a.in_channel_map != 0, out_mapped = a.out_channel_map != 0;
  const int64_t srn = a.res_strides[0], src = a.res_strides[1], srh = a.res_strides[2];
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_act(a.act, [&](auto act_c) {
      constexpr int ACT = decltype(act_c)::value;
      // A piece's weight and vectors from its first output channel oc0 (group offset included), its
      // destination from image n0, row oh0 (and channel oc0 where channel_in_pointer).
      auto segment_at = [&](const ConvPiece& piece, int64_t g0, int64_t n0, int64_t oh0, bool channel_in_pointer) {
        const ConvSegmentArgs& s = segs[piece.seg];
        const int64_t oc0 = g0 * s.c_out_g + piece.c0;
        KernelSegment<T> k;
        k.w = in_ptr<T>(s.w) + oc0 * s.w_strides[0];
        k.bias = offset_or_null(in_ptr<float>(s.bias), oc0);
        k.bn_weight = offset_or_null(in_ptr<float>(s.bn_weight), oc0);
        k.bn_bias = offset_or_null(in_ptr<float>(s.bn_bias), oc0);
        k.bn_mean = offset_or_null(in_ptr<float>(s.bn_mean), oc0);
        k.bn_var = offset_or_null(in_ptr<float>(s.bn_var), oc0);
        k.out = out_ptr<T>(s.out) + n0 * s.out_strides[0] + oh0 * s.out_strides[2] +
                (channel_in_pointer ? oc0 * s.out_strides[1] : 0);
        k.c_out = (int)piece.c;
        k.eps = (float)s.eps;
        k.swo = s.w_strides[0], k.swc = s.w_strides[1], k.swh = s.w_strides[2], k.sww = s.w_strides[3];
        k.son = s.out_strides[0], k.soc = s.out_strides[1], k.soh = s.out_strides[2], k.sow = s.out_strides[3];
        return k;
      };
      auto run = [&](auto conv_kernel, int64_t bm, int64_t block_n, int threads, int smem = 0) {
#ifndef FASTBONE_EMU
        if (smem > 48 * 1024) {  // past the default limit the kernel must opt in (sm_80+: up to 163 KiB)
          const cudaError_t err =
              cudaFuncSetAttribute(conv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
          if (err != cudaSuccess)
            throw std::runtime_error(std::string("conv: cannot give the tensor-core kernel ") +
                                     std::to_string(smem) + " bytes of shared memory: " + cudaGetErrorString(err));
        }
#endif
        for (const ConvLaunch& l : plan(block_n)) {
          const ConvPiece& first = l.pieces[0];
          const int64_t oc0 = l.g0 * segs[first.seg].c_out_g + first.c0;  // the first piece's first channel
          // With the output pool, l.oh0 / l.oh count pooled rows: the launch computes the conv rows of its
          // windows (the last launch's may reach past the conv output: ceil mode's partial windows).
          const int64_t conv_row0 = a.out_pool ? l.oh0 * fb::kConvOutPool : l.oh0;
          const int64_t conv_rows = a.out_pool ? std::min(l.oh * fb::kConvOutPool, a.oh - conv_row0) : l.oh;
          const int64_t m = a.out_pool ? l.n * l.oh * a.pooled_w * fb::kConvOutPoolArea : l.n * l.oh * a.ow;
          int64_t tiles = 0;
          for (const ConvPiece& p : l.pieces) tiles += fb::ceil_div(p.c, block_n);
          // Segment 0 travels in the kernel's own parameters (out_c_offset + oc0 from the destination's
          // pointer); pieces 1, 2 in the segment parameters, their channel offsets in their pointers.
          const KernelSegment<T> s0 = segment_at(first, l.g0, l.n0, l.oh0, false);
          KernelSegment<T> s1, s2;
          if (l.pieces.size() > 1) s1 = segment_at(l.pieces[1], l.g0, l.n0, l.oh0, true);
          if (l.pieces.size() > 2) s2 = segment_at(l.pieces[2], l.g0, l.n0, l.oh0, true);
          const dim3 grid((unsigned)fb::ceil_div(m, bm), (unsigned)tiles, (unsigned)l.g);
          const int64_t ic0 = l.g0 * a.c_in_g;  // the launch's first input channel
          FB_LAUNCH(conv_kernel, grid, dim3(threads), smem, FB_STREAM(a.stream),
                    in_ptr<T>(a.x) + l.n0 * sxn + (in_mapped ? 0 : ic0 * sxc), s0.w, s0.bias, s0.bn_weight,
                    s0.bn_bias, s0.bn_mean, s0.bn_var,
                    offset_or_null(in_ptr<T>(a.residual), l.n0 * srn + l.oh0 * srh + oc0 * src),
                    s0.out,
                    offset_or_null(in_ptr<float>(a.in_scale), l.n0 * a.in_scale_stride + (in_mapped ? 0 : ic0)),
                    (int)m, (int)a.x_shape[2], (int)a.x_shape[3], (int)a.c_in_g, (int)conv_rows, (int)a.ow, s0.c_out,
                    (int)a.kh, (int)a.kw, (long long)sxn, (long long)sxc, (long long)a.x_strides[2],
                    (long long)a.x_strides[3], s0.swo, s0.swc, s0.swh, s0.sww, (long long)srn, (long long)src,
                    (long long)srh, (long long)a.res_strides[3], s0.son, s0.soc, s0.soh, s0.sow,
                    (int)(a.out_c_offset + (out_mapped ? 0 : oc0)), (int)conv[0], (int)conv[1],
                    (int)(conv[2] - conv_row0 * conv[0]), (int)conv[3], (int)conv[4], (int)conv[5], s0.eps,
                    (float)a.slope, (long long)a.in_scale_stride, (int)(a.residual_after_act != 0),
                    (int)a.input_pool_mode, (int)a.input_pool_kernel,
                    offset_or_null(in_ptr<long long>(a.in_channel_map), ic0),
                    offset_or_null(in_ptr<long long>(a.out_channel_map), oc0), (int)(a.out_pool != 0),
                    (int)l.oh, (int)a.pooled_w, (int)l.pieces.size(),
                    FB_KERNEL_SEGMENT_ARGS(s1), FB_KERNEL_SEGMENT_ARGS(s2));
        }
      };
      auto launch = [&](auto tile) {
        using Tile = decltype(tile);
        run(fb::conv_bn_act_kernel<T, ACT, Tile::BM, Tile::BN, Tile::BK, Tile::TM, Tile::TN>, Tile::BM, Tile::BN,
            Tile::kThreads);
      };
      auto launch_mma = [&](auto tile) {
        using Tile = decltype(tile);
        run(fb::conv_bn_act_mma_kernel<T, ACT, Tile::BM, Tile::BN>, Tile::BM, Tile::BN, Tile::kThreads,
            Tile::kSmemBytes);
      };
      if constexpr (!std::is_same<T, float>::value) {  // float16 / bfloat16: tensor cores on sm_80+
        if (variant == ConvVariant::kMmaLarge) return launch_mma(fb::ConvMmaLarge{});
        if (variant == ConvVariant::kMmaSmall) return launch_mma(fb::ConvMmaSmall{});
      }
      if (variant == ConvVariant::kNarrow) launch(fb::ConvNarrow{}); else launch(fb::ConvWide{});
    });
  });
}

// The input pool's encoding (kernels/conv.cuh: ConvProblem::input_pool_mode): mode 0 (none, kernel 1),
// 1 (max) or 2 (average) with an odd kernel 3..7.
void check_input_pool(int64_t mode, int64_t kernel, uintptr_t in_scale) {
  if (mode == fb::kConvInputPoolNone) {
    if (kernel != 1)
      throw std::invalid_argument("input_pool_kernel = " + std::to_string(kernel) +
                                  " without an input pool (input_pool_mode 0); pass 1");
    return;
  }
  if (mode != fb::kConvInputPoolMax && mode != fb::kConvInputPoolAvg)
    throw std::invalid_argument("input_pool_mode = " + std::to_string(mode) +
                                "; accepted: 0 (none), 1 (max pool), 2 (average pool, count_include_pad=False)");
  if (kernel < 3 || kernel > 7 || kernel % 2 == 0)
    throw std::invalid_argument("input_pool_kernel = " + std::to_string(kernel) +
                                "; the input pool takes an odd kernel 3, 5 or 7 (stride 1, padding kernel / 2)");
  if (in_scale != 0)
    throw std::invalid_argument("the input pool cannot be combined with in_scale (the SE gate); run the pool "
                                "or the scale as its own op");
}

// conv = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}; residual == 0 for none. in_channel_map /
// out_channel_map: int64 permutations of x's C_in / the conv's C_out channels, 0 for none (the op layer
// checks them; the kernels index by them unchecked).
void conv_bn_act(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w, const Dims& w_shape,
                 const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight, uintptr_t bn_bias, uintptr_t bn_mean,
                 uintptr_t bn_var, double eps, uintptr_t residual, const Dims& res_strides, uintptr_t out,
                 const Dims& out_shape, const Dims& out_strides, int64_t out_c_offset, const Dims& conv,
                 int64_t groups, int64_t dtype, int64_t act, double slope, uintptr_t stream, uintptr_t in_scale,
                 int64_t in_scale_stride, int64_t residual_after_act, int64_t input_pool_mode,
                 int64_t input_pool_kernel, uintptr_t in_channel_map, uintptr_t out_channel_map) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(w_shape, "w_shape");
  check_dims(w_strides, "w_strides"), check_dims(res_strides, "res_strides"), check_dims(out_shape, "out_shape");
  check_dims(out_strides, "out_strides"), check_params(conv, 6, "conv"), check_bn(bn_mean, bn_var);
  check_input_pool(input_pool_mode, input_pool_kernel, in_scale);
  if (groups < 1) throw std::invalid_argument("groups must be >= 1, got " + std::to_string(groups));
  const int64_t n = x_shape[0], c_out = w_shape[0], oh = out_shape[2], ow = out_shape[3];
  const int64_t c_out_g = c_out / groups;
  if (n * oh * ow == 0 || c_out == 0) return;
  // Sizes the kernels hold in ints (one launch's pixel count is split to fit, below).
  check_int_range(x_shape[2], "H"), check_int_range(x_shape[3], "W"), check_int_range(oh, "OH");
  check_int_range(out_c_offset + c_out, "out_c_offset + C_out");
  check_int_range(w_shape[1] * w_shape[2] * w_shape[3] + 64, "C_in/groups * KH * KW");
  const ConvVariant variant = choose_conv_variant(n * oh * ow, c_out_g, groups, dtype, current_compute_capability());
  const ConvCommonArgs common{x, x_shape, x_strides, w_shape[1], w_shape[2], w_shape[3], oh, ow, &conv,
                              residual, res_strides, out_c_offset, dtype, act, slope, stream, in_scale,
                              in_scale_stride, residual_after_act, input_pool_mode, input_pool_kernel,
                              in_channel_map, out_channel_map};
  const std::vector<ConvSegmentArgs> segs{
      {w, w_strides, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, out, out_strides, c_out_g}};
  run_conv(common, segs, variant, [&](int64_t block_n) {
    std::vector<ConvLaunch> launches;
    for (const ConvChunk& ch : conv_chunks(n, oh, ow, groups, c_out_g, block_n))
      launches.push_back({ch.n0, ch.n, ch.oh0, ch.oh, ch.g0, ch.g, {{0, ch.c0, ch.c}}});
    return launches;
  });
}

void conv_bn_act_multi(uintptr_t x, const Dims& x_shape, const Dims& x_strides, const Pointers& ws,
                       const std::vector<Dims>& w_shapes, const std::vector<Dims>& w_strides, const Pointers& biases,
                       const Pointers& bn_weights, const Pointers& bn_biases, const Pointers& bn_means,
                       const Pointers& bn_vars, const std::vector<double>& eps, const Pointers& outs,
                       const std::vector<Dims>& out_shapes,
                       const std::vector<Dims>& out_strides, const Dims& conv, int64_t dtype, int64_t act,
                       double slope, uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_params(conv, 6, "conv");
  const size_t count = ws.size();
  if (count == 0) throw std::invalid_argument("conv_bn_act_multi: no convs given (ws is empty)");
  for (size_t size : {w_shapes.size(), w_strides.size(), biases.size(), bn_weights.size(), bn_biases.size(),
                      bn_means.size(), bn_vars.size(), eps.size(), outs.size(), out_shapes.size(),
                      out_strides.size()})
    if (size != count)
      throw std::invalid_argument("conv_bn_act_multi: every per-conv list needs one entry per conv (" +
                                  std::to_string(count) + " weights), got a list of " + std::to_string(size));
  std::vector<ConvSegmentArgs> segs;
  Dims c_outs;
  int64_t max_c_out = 0;
  for (size_t i = 0; i < count; ++i) {
    const std::string which = "conv " + std::to_string(i) + ": ";
    check_dims(w_shapes[i], "w_shapes[i]"), check_dims(w_strides[i], "w_strides[i]");
    check_dims(out_shapes[i], "out_shapes[i]"), check_dims(out_strides[i], "out_strides[i]");
    check_bn(bn_means[i], bn_vars[i]);
    const Dims& ws0 = w_shapes[0];
    if (w_shapes[i][1] != x_shape[1] || w_shapes[i][2] != ws0[2] || w_shapes[i][3] != ws0[3])
      throw std::invalid_argument(which + "the fused convs read all of x (groups 1) with one kernel size: weight (C_out, " +
                                  std::to_string(x_shape[1]) + ", " + std::to_string(ws0[2]) + ", " +
                                  std::to_string(ws0[3]) + ") expected");
    if (out_shapes[i][0] != x_shape[0] || out_shapes[i][1] != w_shapes[i][0] || out_shapes[i][2] != out_shapes[0][2] ||
        out_shapes[i][3] != out_shapes[0][3])
      throw std::invalid_argument(which + "its destination must be (N, C_out, OH, OW) = (" + std::to_string(x_shape[0]) +
                                  ", " + std::to_string(w_shapes[i][0]) + ", " + std::to_string(out_shapes[0][2]) +
                                  ", " + std::to_string(out_shapes[0][3]) + ")");
    check_int_range(w_shapes[i][0], "C_out");
    segs.push_back({ws[i], w_strides[i], biases[i], bn_weights[i], bn_biases[i], bn_means[i], bn_vars[i], eps[i],
                    outs[i], out_strides[i], w_shapes[i][0]});
    c_outs.push_back(w_shapes[i][0]);
    max_c_out = std::max(max_c_out, w_shapes[i][0]);
  }
  const int64_t n = x_shape[0], oh = out_shapes[0][2], ow = out_shapes[0][3];
  if (n * oh * ow == 0 || max_c_out == 0) return;
  check_int_range(x_shape[2], "H"), check_int_range(x_shape[3], "W"), check_int_range(oh, "OH");
  check_int_range(x_shape[1] * w_shapes[0][2] * w_shapes[0][3] + 64, "C_in * KH * KW");
  // One kernel serves all segments: the variant of the widest conv (narrow only where every conv is narrow).
  const ConvVariant variant = choose_conv_variant(n * oh * ow, max_c_out, 1, dtype, current_compute_capability());
  const ConvCommonArgs common{x, x_shape, x_strides, x_shape[1], w_shapes[0][2], w_shapes[0][3], oh, ow, &conv,
                              0, Dims{0, 0, 0, 0}, 0, dtype, act, slope, stream, 0, 0, 0, fb::kConvInputPoolNone, 1,
                              0, 0};
  run_conv(common, segs, variant, [&](int64_t block_n) {
    std::vector<ConvLaunch> launches;
    // Image / row spans as a one-channel conv would split them; channels by conv_multi_packs.
    for (const ConvChunk& span : conv_chunks(n, oh, ow, 1, 1, block_n))
      for (auto& pack : conv_multi_packs(c_outs, block_n))
        launches.push_back({span.n0, span.n, span.oh0, span.oh, 0, 1, std::move(pack)});
    return launches;
  });
}

// --- the fused stem: conv + BatchNorm / bias + activation + max pool ----------------------

struct StemTile {
  int64_t ph, pw;
};

int64_t stem_region(int64_t tile, int64_t pool_k, int64_t pool_s) { return (tile - 1) * pool_s + pool_k; }

// Largest pooled tile (up to kStemMaxTile a side) whose conv region fits kStemMaxRegion;
// {0, 0} when even one pooled output's window does not fit.
StemTile stem_tile(int64_t ph_out, int64_t pw_out, const Dims& pool) {
  StemTile t{std::min<int64_t>(ph_out, fb::kStemMaxTile), std::min<int64_t>(pw_out, fb::kStemMaxTile)};
  while (stem_region(t.ph, pool[0], pool[2]) * stem_region(t.pw, pool[1], pool[3]) > fb::kStemMaxRegion) {
    if (t.ph == 1 && t.pw == 1) return {0, 0};
    if (t.ph >= t.pw) --t.ph; else --t.pw;
  }
  return t;
}

// The fused kernel's limits: C_in_g * KH * KW taps and the pool window must fit shared memory.
bool stem_supported(int64_t c_in_g, int64_t kh, int64_t kw, const Dims& pool) {
  check_params(pool, 6, "pool");
  return c_in_g * kh * kw <= fb::kStemMaxTaps && stem_tile(1, 1, pool).ph == 1;
}

// Whether the conv kernels' epilogue takes this pool (ConvProblem::out_pool): kConvOutPool x kConvOutPool
// windows at stride kConvOutPool, no padding.
bool conv_out_pool_supported(const Dims& pool) {
  check_params(pool, 6, "pool");
  const int64_t k = fb::kConvOutPool;
  return pool[0] == k && pool[1] == k && pool[2] == k && pool[3] == k && pool[4] == 0 && pool[5] == 0;
}

// The conv kernels with the output pool in their epilogue (conv_bn_act_maxpool's arguments, the pool a
// supported one): the launches split the pooled rows as conv_bn_act splits conv rows, each pooled row
// pooled_w * kConvOutPoolArea GEMM rows.
void conv_bn_act_out_pool(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w, const Dims& w_shape,
                          const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight, uintptr_t bn_bias,
                          uintptr_t bn_mean, uintptr_t bn_var, double eps, uintptr_t out, const Dims& out_shape,
                          const Dims& out_strides, const Dims& conv, int64_t groups, const Dims& conv_out_hw,
                          int64_t dtype, int64_t act, double slope, uintptr_t stream) {
  if (groups < 1) throw std::invalid_argument("groups must be >= 1, got " + std::to_string(groups));
  const int64_t n = out_shape[0], c_out = w_shape[0], ph = out_shape[2], pw = out_shape[3];
  const int64_t c_out_g = c_out / groups;
  check_int_range(x_shape[2], "H"), check_int_range(x_shape[3], "W"), check_int_range(conv_out_hw[0], "OH");
  check_int_range(conv_out_hw[1], "OW"), check_int_range(c_out, "C_out");
  check_int_range(w_shape[1] * w_shape[2] * w_shape[3] + 64, "C_in/groups * KH * KW");
  const ConvVariant variant =
      choose_conv_variant(n * ph * pw * fb::kConvOutPoolArea, c_out_g, groups, dtype, current_compute_capability());
  ConvCommonArgs common{x, x_shape, x_strides, w_shape[1], w_shape[2], w_shape[3], conv_out_hw[0], conv_out_hw[1],
                        &conv, 0, Dims{0, 0, 0, 0}, 0, dtype, act, slope, stream, 0, 0, 0, fb::kConvInputPoolNone, 1,
                        0, 0};
  common.out_pool = 1, common.pooled_h = ph, common.pooled_w = pw;
  const std::vector<ConvSegmentArgs> segs{
      {w, w_strides, bias, bn_weight, bn_bias, bn_mean, bn_var, eps, out, out_strides, c_out_g}};
  run_conv(common, segs, variant, [&](int64_t block_n) {
    std::vector<ConvLaunch> launches;
    for (const ConvChunk& ch : conv_chunks(n, ph, pw * fb::kConvOutPoolArea, groups, c_out_g, block_n))
      launches.push_back({ch.n0, ch.n, ch.oh0, ch.oh, ch.g0, ch.g, {{0, ch.c0, ch.c}}});
    return launches;
  });
}

// conv = {stride_h, stride_w, pad_h, pad_w, dil_h, dil_w}; pool = {kh, kw, sh, sw, ph, pw};
// conv_out_hw = the conv's output size; out_shape = the pooled output. The stem kernel where it takes the
// conv and the pool (few taps), else the conv kernels with the pool in their epilogue (2x2 / 2 pools).
void conv_bn_act_maxpool(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t w,
                         const Dims& w_shape, const Dims& w_strides, uintptr_t bias, uintptr_t bn_weight,
                         uintptr_t bn_bias, uintptr_t bn_mean, uintptr_t bn_var, double eps, uintptr_t out,
                         const Dims& out_shape, const Dims& out_strides, const Dims& conv, int64_t groups,
                         const Dims& conv_out_hw, const Dims& pool, int64_t dtype, int64_t act, double slope,
                         uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(w_shape, "w_shape");
  check_dims(w_strides, "w_strides"), check_dims(out_shape, "out_shape"), check_dims(out_strides, "out_strides");
  check_params(conv, 6, "conv"), check_params(pool, 6, "pool"), check_params(conv_out_hw, 2, "conv_out_hw");
  check_bn(bn_mean, bn_var);
  const bool stem = stem_supported(w_shape[1], w_shape[2], w_shape[3], pool);
  if (!stem && !conv_out_pool_supported(pool))
    throw std::invalid_argument("conv_bn_act_maxpool: fuses a pool after a conv of C_in/groups * KH * KW <= " +
                                std::to_string(fb::kStemMaxTaps) + " taps whose window fits " +
                                std::to_string(fb::kStemMaxRegion) + " conv outputs, or a " +
                                std::to_string(fb::kConvOutPool) + "x" + std::to_string(fb::kConvOutPool) +
                                " / stride " + std::to_string(fb::kConvOutPool) +
                                " unpadded pool after any conv; run conv and pool separately");
  const int64_t n = out_shape[0], c_out = out_shape[1], ph = out_shape[2], pw = out_shape[3];
  if (n == 0 || c_out == 0 || ph == 0 || pw == 0) return;
  const StemTile tile = stem ? stem_tile(ph, pw, pool) : StemTile{1, 1};
  const int64_t tiles = fb::ceil_div(ph, tile.ph) * fb::ceil_div(pw, tile.pw);
  const int64_t co_tiles = fb::ceil_div(c_out, fb::kStemCoTile);
  const int64_t max_yz = launch_limits().max_grid_yz;
  if (!stem || tiles > INT32_MAX || co_tiles > kMaxGridYZ) {
    if (conv_out_pool_supported(pool))
      return conv_bn_act_out_pool(x, x_shape, x_strides, w, w_shape, w_strides, bias, bn_weight, bn_bias, bn_mean,
                                  bn_var, eps, out, out_shape, out_strides, conv, groups, conv_out_hw, dtype, act,
                                  slope, stream);
    throw std::invalid_argument("conv_bn_act_maxpool: " + std::to_string(tiles) + " pooled tiles per image and " +
                                std::to_string(c_out) + " output channels exceed the fused kernel's grid (at most "
                                "2^31 - 1 tiles and " + std::to_string(kMaxGridYZ * fb::kStemCoTile) +
                                " channels); run conv and pool separately");
  }
  // Images go to gridDim.z, at most kMaxGridYZ per launch: larger batches run in several launches.
  for (int64_t n0 = 0; n0 < n; n0 += max_yz) {
    const dim3 grid((unsigned)tiles, (unsigned)co_tiles, (unsigned)std::min(max_yz, n - n0));
    dispatch_dtype(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      dispatch_act(act, [&](auto act_c) {
        constexpr int ACT = decltype(act_c)::value;
        FB_LAUNCH((fb::conv_bn_act_maxpool_kernel<T, ACT>), grid, dim3(fb::kStemThreads), 0, FB_STREAM(stream),
                  in_ptr<T>(x) + n0 * x_strides[0], in_ptr<T>(w), in_ptr<float>(bias), in_ptr<float>(bn_weight),
                  in_ptr<float>(bn_bias), in_ptr<float>(bn_mean), in_ptr<float>(bn_var),
                  out_ptr<T>(out) + n0 * out_strides[0],
                  (int)x_shape[2], (int)x_shape[3], (int)w_shape[1], (int)c_out, (int)(c_out / groups),
                  (int)w_shape[2], (int)w_shape[3], (int)conv_out_hw[0], (int)conv_out_hw[1], (int)ph, (int)pw,
                  (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
                  (long long)w_strides[0], (long long)w_strides[1], (long long)w_strides[2], (long long)w_strides[3],
                  (long long)out_strides[0], (long long)out_strides[1], (long long)out_strides[2],
                  (long long)out_strides[3],
                  (int)conv[0], (int)conv[1], (int)conv[2], (int)conv[3], (int)conv[4], (int)conv[5],
                  (int)pool[0], (int)pool[1], (int)pool[2], (int)pool[3], (int)pool[4], (int)pool[5],
                  (int)tile.ph, (int)tile.pw, (float)eps, (float)slope);
      });
    });
  }
}

// --- pools ----------------------------------------------------------------------------------

unsigned elementwise_blocks(int64_t total) {
  return (unsigned)std::min<int64_t>(fb::ceil_div(total, fb::kPoolThreads), fb::kPoolMaxBlocks);
}

template <int MODE>
void window_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                   const Dims& out_strides, const Dims& pool, bool count_include_pad, int64_t dtype,
                   uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(out_shape, "out_shape");
  check_dims(out_strides, "out_strides"), check_params(pool, 6, "pool");
  const int64_t total = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3];
  if (total == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    FB_LAUNCH((fb::window_pool2d_kernel<T, MODE>), dim3(elementwise_blocks(total)), dim3(fb::kPoolThreads), 0,
              FB_STREAM(stream), in_ptr<T>(x), out_ptr<T>(out), (long long)total, (int)x_shape[1],
              (int)x_shape[2], (int)x_shape[3], (int)out_shape[2], (int)out_shape[3],
              (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
              (long long)out_strides[0], (long long)out_strides[1], (long long)out_strides[2],
              (long long)out_strides[3],
              (int)pool[0], (int)pool[1], (int)pool[2], (int)pool[3], (int)pool[4], (int)pool[5],
              (int)count_include_pad);
  });
}

// out_shape (1, 1) runs the block-reduction global pool, anything else the per-output bins.
void adaptive_avg_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out,
                         const Dims& out_shape, const Dims& out_strides, int64_t dtype, uintptr_t stream) {
  check_dims(x_shape, "x_shape"), check_dims(x_strides, "x_strides"), check_dims(out_shape, "out_shape");
  check_dims(out_strides, "out_strides");
  const int64_t total = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3];
  if (total == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (out_shape[2] == 1 && out_shape[3] == 1) {
      // Images go to gridDim.y, at most kMaxGridYZ per launch: larger batches run in several launches.
      const int64_t max_yz = launch_limits().max_grid_yz;
      for (int64_t n0 = 0; n0 < x_shape[0]; n0 += max_yz) {
        const dim3 grid((unsigned)fb::ceil_div(x_shape[1], fb::kGapChannels),
                        (unsigned)std::min(max_yz, x_shape[0] - n0));
        FB_LAUNCH((fb::global_avg_pool_kernel<T>), grid, dim3(fb::kPoolThreads), 0, FB_STREAM(stream),
                  in_ptr<T>(x) + n0 * x_strides[0], out_ptr<T>(out) + n0 * out_strides[0], (int)x_shape[1],
                  (int)x_shape[2], (int)x_shape[3], (long long)x_strides[0], (long long)x_strides[1],
                  (long long)x_strides[2], (long long)x_strides[3], (long long)out_strides[0],
                  (long long)out_strides[1]);
      }
      return;
    }
    FB_LAUNCH((fb::adaptive_avg_pool2d_kernel<T>), dim3(elementwise_blocks(total)), dim3(fb::kPoolThreads), 0,
              FB_STREAM(stream), in_ptr<T>(x), out_ptr<T>(out), (long long)total, (int)x_shape[1],
              (int)x_shape[2], (int)x_shape[3], (int)out_shape[2], (int)out_shape[3],
              (long long)x_strides[0], (long long)x_strides[1], (long long)x_strides[2], (long long)x_strides[3],
              (long long)out_strides[0], (long long)out_strides[1], (long long)out_strides[2],
              (long long)out_strides[3]);
  });
}

void max_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                const Dims& out_strides, const Dims& pool, int64_t dtype, uintptr_t stream) {
  window_pool2d<fb::kPoolMax>(x, x_shape, x_strides, out, out_shape, out_strides, pool, false, dtype, stream);
}

void avg_pool2d(uintptr_t x, const Dims& x_shape, const Dims& x_strides, uintptr_t out, const Dims& out_shape,
                const Dims& out_strides, const Dims& pool, bool count_include_pad, int64_t dtype,
                uintptr_t stream) {
  window_pool2d<fb::kPoolAvg>(x, x_shape, x_strides, out, out_shape, out_strides, pool, count_include_pad, dtype,
                              stream);
}

std::vector<LaunchConstant> launch_constants() {
  auto tile = [](const char* name, auto t) {
    using Tile = decltype(t);
    return LaunchConstant{name, {Tile::BM, Tile::BN, Tile::BK, Tile::TM, Tile::TN}, true};
  };
  auto mma_tile = [](const char* name, auto t) {  // BM, BN, BK, threads, stages, dynamic shared memory bytes
    using Tile = decltype(t);
    return LaunchConstant{name, {Tile::BM, Tile::BN, Tile::BK, Tile::kThreads, Tile::kStages, Tile::kSmemBytes},
                          true};
  };
  std::vector<LaunchConstant> constants = {
      tile("conv_wide_tile", fb::ConvWide{}),
      tile("conv_narrow_tile", fb::ConvNarrow{}),
      {"conv_narrow_max_cout", {fb::kConvNarrowMaxCout}, false},
      mma_tile("conv_mma_large_tile", fb::ConvMmaLarge{}),
      mma_tile("conv_mma_small_tile", fb::ConvMmaSmall{}),
      {"conv_mma_large_min_cout", {fb::kConvMmaLargeMinCout}, false},
      {"conv_mma_large_min_blocks", {fb::kConvMmaLargeMinBlocks}, false},
      {"conv_mma_min_cc", {fb::kConvMmaMinCC}, false},
      {"conv_max_segments", {fb::kConvMaxSegments}, false},
      {"conv_out_pool", {fb::kConvOutPool}, false},
      {"stem_threads", {fb::kStemThreads}, false},
      {"stem_co_tile", {fb::kStemCoTile}, false},
      {"stem_max_taps", {fb::kStemMaxTaps}, false},
      {"stem_max_region", {fb::kStemMaxRegion}, false},
      {"stem_max_tile", {fb::kStemMaxTile}, false},
      {"pool_threads", {fb::kPoolThreads}, false},
      {"pool_max_blocks", {fb::kPoolMaxBlocks}, false},
      {"gap_channels", {fb::kGapChannels}, false},
      {"max_grid_yz", {kMaxGridYZ}, false},
      {"max_conv_launch_pixels", {kMaxConvLaunchPixels}, false},
  };
  for (auto& c : depthwise_launch_constants()) constants.push_back(std::move(c));  // csrc/depthwise_ops.cu
  return constants;
}

}  // namespace fb_ops
