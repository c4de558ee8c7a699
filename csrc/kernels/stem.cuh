// The network stem in one launch: max_pool(act(bn(conv2d(x, w) + bias))), BatchNorm (inference)
// and the conv bias applied per output channel in float32 as in the conv epilogue (ChannelAffine
// in common.cuh: bias and bn_* float32 or nullptr).
//
// A block owns a tile of pooled outputs (tile_ph x tile_pw pixels, kStemCoTile output
// channels, one image). It computes the conv outputs the tile's pool windows cover
// (the tile plus its halo) into shared memory, then writes only the pooled outputs:
// the full-resolution conv activation never goes to global memory.
// Meant for small C_in (3 for RGB): each conv output is a direct dot product over
// C_in_g * KH * KW taps, with that block's weights staged in shared memory.
// Plain CUDA (shared memory + __syncthreads): runs under the host emulator too.
#pragma once

#include "common.cuh"

namespace fb {

constexpr int kStemThreads = 256;
constexpr int kStemCoTile = 16;     // output channels per block
constexpr int kStemMaxTaps = 256;   // C_in_g * KH * KW held in shared memory (7x7x3 = 147)
constexpr int kStemMaxRegion = 324; // conv outputs per block: (tile-1) * pool_stride + pool_kernel, squared
constexpr int kStemMaxTile = 8;     // pooled outputs per block side

template <typename T, int ACT>
__global__ void __launch_bounds__(kStemThreads)
conv_bn_act_maxpool_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ bias,
                           const float* __restrict__ bn_weight, const float* __restrict__ bn_bias,
                           const float* __restrict__ bn_mean, const float* __restrict__ bn_var,
                           T* __restrict__ out,
                           int H, int W, int C_in_g, int C_out, int C_out_g, int KH, int KW, int OH, int OW,
                           int PH, int PW,
                           long long sxn, long long sxc, long long sxh, long long sxw,
                           long long swo, long long swc, long long swh, long long sww,
                           long long son, long long soc, long long soh, long long sow,
                           int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,
                           int pool_kh, int pool_kw, int pool_sh, int pool_sw, int pool_ph, int pool_pw,
                           int tile_ph, int tile_pw, float eps, float slope) {
  __shared__ float w_tile[kStemMaxTaps][kStemCoTile];      // [tap (kh, kw, c)][output channel]
  __shared__ float conv_tile[kStemMaxRegion][kStemCoTile]; // [region pixel][output channel]

  const int tid = threadIdx.x;
  const int tiles_w = (PW + tile_pw - 1) / tile_pw;
  const int ph0 = (blockIdx.x / tiles_w) * tile_ph;
  const int pw0 = (blockIdx.x % tiles_w) * tile_pw;
  const int co0 = blockIdx.y * kStemCoTile;
  const int nb = blockIdx.z;
  const int taps = C_in_g * KH * KW;

  for (int idx = tid; idx < taps * kStemCoTile; idx += kStemThreads) {
    const int co = idx % kStemCoTile, k = idx / kStemCoTile;
    const int oc = co0 + co;
    const int c = k % C_in_g, kw = (k / C_in_g) % KW, kh = k / (C_in_g * KW);
    w_tile[k][co] = oc < C_out ? to_float(w[oc * swo + c * swc + kh * swh + kw * sww]) : 0.0f;
  }
  __syncthreads();

  // The conv outputs under this tile's pool windows: rows r0 .. r0 + RH, columns c0 .. c0 + RW.
  const int r0 = ph0 * pool_sh - pool_ph, c0 = pw0 * pool_sw - pool_pw;
  const int RH = (tile_ph - 1) * pool_sh + pool_kh, RW = (tile_pw - 1) * pool_sw + pool_kw;
  // Neighbouring threads take neighbouring output channels of one pixel: they read the
  // same input values (broadcast) and adjacent weights. A thread keeps one output channel
  // (kStemThreads is a multiple of kStemCoTile), so it computes its coefficients once.
  static_assert(kStemThreads % kStemCoTile == 0, "each thread keeps a single output channel");
  const int own_oc = co0 + tid % kStemCoTile;
  const ChannelAffine::Coeffs coeffs = own_oc < C_out
                                           ? ChannelAffine{bias, bn_weight, bn_bias, bn_mean, bn_var, eps}.at(own_oc)
                                           : ChannelAffine::Coeffs{1.0f, 0.0f};
  for (int idx = tid; idx < RH * RW * kStemCoTile; idx += kStemThreads) {
    const int co = idx % kStemCoTile, pix = idx / kStemCoTile;
    const int oh = r0 + pix / RW, ow = c0 + pix % RW;
    const int oc = co0 + co;
    // Outside the conv output (pool padding), or past C_out: never read by the pool below.
    if (oh < 0 || oh >= OH || ow < 0 || ow >= OW || oc >= C_out) continue;
    const long long x_base = nb * sxn + (long long)(oc / C_out_g) * C_in_g * sxc;
    const int ih0 = oh * stride_h - pad_h, iw0 = ow * stride_w - pad_w;
    float acc = 0.0f;
    for (int kh = 0; kh < KH; ++kh) {
      const int ih = ih0 + kh * dil_h;
      if (ih < 0 || ih >= H) continue;
      for (int kw = 0; kw < KW; ++kw) {
        const int iw = iw0 + kw * dil_w;
        if (iw < 0 || iw >= W) continue;
        const T* xp = x + x_base + ih * sxh + iw * sxw;
        const int tap0 = (kh * KW + kw) * C_in_g;
        for (int c = 0; c < C_in_g; ++c) acc = fmaf(to_float(xp[c * sxc]), w_tile[tap0 + c][co], acc);
      }
    }
    conv_tile[pix][co] = activate<ACT>(coeffs.apply(acc), slope);
  }
  __syncthreads();

  for (int idx = tid; idx < tile_ph * tile_pw * kStemCoTile; idx += kStemThreads) {
    const int co = idx % kStemCoTile, pix = idx / kStemCoTile;
    const int ph = ph0 + pix / tile_pw, pw = pw0 + pix % tile_pw;
    const int oc = co0 + co;
    if (ph >= PH || pw >= PW || oc >= C_out) continue;
    // The window clipped to the conv output; never empty for arguments the op layer accepts
    // (padding <= kernel / 2 and torch's ceil_mode rule keep every window's start inside the
    // input). Starting from -inf, an empty one (a direct call with bad arguments) reads no shared
    // memory outside the tile and gives -inf, as the plain max pool does.
    const int hs = ph * pool_sh - pool_ph, ws = pw * pool_sw - pool_pw;
    const int h_lo = hs < 0 ? 0 : hs, h_hi = hs + pool_kh < OH ? hs + pool_kh : OH;
    const int w_lo = ws < 0 ? 0 : ws, w_hi = ws + pool_kw < OW ? ws + pool_kw : OW;
    float m = -__int_as_float(0x7f800000);
    for (int h = h_lo; h < h_hi; ++h)
      for (int v = w_lo; v < w_hi; ++v) m = nan_max(m, conv_tile[(h - r0) * RW + (v - c0)][co]);
    out[nb * son + ph * soh + pw * sow + oc * soc] = from_float<T>(m);
  }
}

}  // namespace fb
