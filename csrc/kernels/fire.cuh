// The Fire module's expand stage (SqueezeNet; the CUDA counterpart of kernels/fire.py):
//
//   out[:, o1 + n] = act(conv1x1(x, w1) + b1)[:, n]              n < E1
//   out[:, o3 + n] = act(conv3x3(x, w3, padding 1) + b3)[:, n]   n < E3
//
// in one launch from one read of x. The 3x3 is conv.cuh's implicit GEMM (K = 9 * S, k = tap * S + c,
// tap = kh * 3 + kw) with its ConvTileLoader staging the A tile (input windows) and the 3x3's B tile;
// the 1x1's operand is the A tile's centre-tap columns (k in [4S, 5S)), so the K steps that cover
// the centre tap also stage a B tile of the 1x1 weights (zero outside the centre columns) and feed
// the same A values to a second accumulator. A block owns BM output pixels x column block
// blockIdx.y of BOTH convs; columns past E1 (or E3) are zero and never stored, so E1 != E3 works.
//
// The epilogue adds each conv's bias in float32 (ChannelAffine without BatchNorm), applies the
// activation (chosen at run time: one instantiation per dtype) and stores through conv.cuh's
// conv_store into each half's channel slice. Plain CUDA (shared memory + __syncthreads, float32
// FMAs): runs under the host emulator and on any GPU.
#pragma once

#include "common.cuh"
#include "conv.cuh"

namespace fb {

using FireTile = ConvWide;  // BM x BN output tile per conv, BK-deep K steps (launchers read it)

// x, w1 (E1, S, 1, 1), w3 (E3, S, 3, 3) by strides; b1 / b3 float32 or nullptr. M = images * OH * W
// output pixels of this launch; OH its rows (a row band of a huge image starts at pad_h = 1 - oh0);
// o1 / o3: the first output channel of each half.
template <typename T>
__global__ void __launch_bounds__(FireTile::kThreads)
fire_expand_kernel(const T* __restrict__ x, const T* __restrict__ w1, const float* __restrict__ b1,
                   const T* __restrict__ w3, const float* __restrict__ b3, T* __restrict__ out, int M, int H, int W,
                   int S, int OH, int E1, int E3, long long sxn, long long sxc, long long sxh, long long sxw,
                   long long s1o, long long s1c, long long s3o, long long s3c, long long s3h, long long s3w,
                   long long son, long long soc, long long soh, long long sow, int o1, int o3, int pad_h, int act,
                   float slope) {
  constexpr int BM = FireTile::BM, BN = FireTile::BN, BK = FireTile::BK, TM = FireTile::TM, TN = FireTile::TN;
  constexpr int kThreads = FireTile::kThreads;
  constexpr int kRows = kThreads / BK;  // B rows one pass of the block covers
  // The 3x3 as conv.cuh's problem (its loader and store), and the 1x1 for the store only.
  const ConvProblem<T> p3{x, w3, ChannelAffine{b3, nullptr, nullptr, nullptr, nullptr, 0.0f}, nullptr, out, M, H, W, S,
                          OH, W, E3, 3, 3, sxn, sxc, sxh, sxw, s3o, s3c, s3h, s3w, 0, 0, 0, 0, son, soc, soh, sow, o3,
                          1, 1, pad_h, 1, 1, 1, slope};
  const ConvProblem<T> p1{x, w1, ChannelAffine{b1, nullptr, nullptr, nullptr, nullptr, 0.0f}, nullptr, out, M, H, W, S,
                          OH, W, E1, 1, 1, sxn, sxc, sxh, sxw, s1o, s1c, 0, 0, 0, 0, 0, 0, son, soc, soh, sow, o1,
                          1, 1, pad_h - 1, 0, 1, 1, slope};
  __shared__ float a_tile[BK][BM + 1];  // +1: the loader writes down a column (see conv.cuh)
  __shared__ float b3_tile[BK][BN + 1];
  __shared__ float b1_tile[BK][BN + 1];

  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const ConvTileLoader<T, BM, BN, BK, kThreads> loader(p3, 0, m0, n0);
  const int tn = threadIdx.x % (BN / TN), tm = threadIdx.x / (BN / TN);
  const int k_col = threadIdx.x % BK, row0 = threadIdx.x / BK;
  float acc3[TM][TN], acc1[TM][TN];
  FB_UNROLL
  for (int i = 0; i < TM; ++i)
    FB_UNROLL
    for (int j = 0; j < TN; ++j) acc3[i][j] = acc1[i][j] = 0.0f;

  const int K = 9 * S, centre0 = 4 * S;
  for (int k0 = 0; k0 < K; k0 += BK) {
    loader.load(p3, k0, [&](int m, int k, T v) { a_tile[k][m] = to_float(v); },
                [&](int k, int n, T v) { b3_tile[k][n] = to_float(v); });
    // Whether this step's columns reach the centre tap (uniform across the block).
    const bool centre = k0 < centre0 + S && k0 + BK > centre0;
    if (centre) {
      const int c = k0 + k_col - centre0;  // the squeeze channel, when this column is a centre-tap column
      const bool c_ok = c >= 0 && c < S;
      for (int n = row0; n < BN; n += kRows) {
        const int e = n0 + n;
        b1_tile[k_col][n] = (c_ok && e < E1) ? to_float(w1[e * s1o + c * s1c]) : 0.0f;
      }
    }
    __syncthreads();
    FB_UNROLL
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
      FB_UNROLL
      for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][tm + i * (BM / TM)];
      FB_UNROLL
      for (int j = 0; j < TN; ++j) b[j] = b3_tile[kk][tn + j * (BN / TN)];
      FB_UNROLL
      for (int i = 0; i < TM; ++i)
        FB_UNROLL
        for (int j = 0; j < TN; ++j) acc3[i][j] = fmaf(a[i], b[j], acc3[i][j]);
      if (centre) {
        FB_UNROLL
        for (int j = 0; j < TN; ++j) b[j] = b1_tile[kk][tn + j * (BN / TN)];
        FB_UNROLL
        for (int i = 0; i < TM; ++i)
          FB_UNROLL
          for (int j = 0; j < TN; ++j) acc1[i][j] = fmaf(a[i], b[j], acc1[i][j]);
      }
    }
    __syncthreads();  // the tiles are overwritten by the next step's loads
  }
  // The activation is applied here (run-time code) and conv_store gets the identity: it then
  // stores the value unchanged, bounds-checked, into its half's channel slice.
  const ChannelAffine::Coeffs unit{1.0f, 0.0f};
  FB_UNROLL
  for (int j = 0; j < TN; ++j) {
    const int n = n0 + tn + j * (BN / TN);
    const ChannelAffine::Coeffs c3 = conv_coeffs(p3, 0, n), c1 = conv_coeffs(p1, 0, n);
    FB_UNROLL
    for (int i = 0; i < TM; ++i) {
      const int m = m0 + tm + i * (BM / TM);
      conv_store<T, kIdentity>(p3, 0, m, n, activate_dynamic(act, c3.apply(acc3[i][j]), slope), unit);
      conv_store<T, kIdentity>(p1, 0, m, n, activate_dynamic(act, c1.apply(acc1[i][j]), slope), unit);
    }
  }
}

}  // namespace fb
