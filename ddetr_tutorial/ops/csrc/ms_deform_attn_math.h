// Multi-scale deformable attention: the bilinear sampling math of one point,
// shared by the C++ CPU kernel and the CUDA kernel (and the CUDA emulation
// harness under tests/). Written once, compiled as host and device code.
//
// Convention: F.grid_sample(align_corners=False, padding_mode="zeros") on
// 2 * loc - 1. A normalized coordinate u in [0, 1] over a map of n pixels sits
// at pixel u * n - 0.5; corners outside the map read zeros and get no gradient.
//
// Non-finite inputs follow the reference (torch's CPU grid_sample) too: a NaN
// or +-Inf coordinate has NaN bilinear weights, so its sample is NaN (0 * NaN)
// while no corner is read or written; a NaN / Inf attention weight multiplies
// the sample, so it makes NaN even off the map (0 * Inf). See Corners below.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DDETR_HD __host__ __device__ __forceinline__
#define DDETR_UNROLL _Pragma("unroll")
#else
#define DDETR_HD inline
#define DDETR_UNROLL _Pragma("GCC unroll 4")
#endif

namespace ddetr {
namespace math {

DDETR_HD float floor_of(float x) { return floorf(x); }
DDETR_HD double floor_of(double x) { return floor(x); }
DDETR_HD float fused_mul_add(float a, float b, float c) { return fmaf(a, b, c); }
DDETR_HD double fused_mul_add(double a, double b, double c) { return fma(a, b, c); }
// False for NaN and +-Inf (NaN fails every comparison).
DDETR_HD bool is_finite(float x) { return fabsf(x) <= FLT_MAX; }
DDETR_HD bool is_finite(double x) { return fabs(x) <= DBL_MAX; }

// Pixel coordinate u * n - 0.5 of a normalized coordinate u over n pixels.
// kFused rounds once (fma), which keeps fp32 pixel coordinates as close to
// the float64 reference as fp32 allows; the CUDA kernel uses it. The CPU
// kernel keeps the plain expression (its numbers predate this header).
template <bool kFused, typename Op>
DDETR_HD Op pixel_coord(Op u, Op n) {
  if constexpr (kFused) {
    return fused_mul_add(u, n, Op(-0.5));
  } else {
    return u * n - Op(0.5);
  }
}

// The four bilinear corners of one point, in the order
// (h0, w0), (h0, w1), (h1, w0), (h1, w1). Int is the token index type.
// A point with a NaN / Inf coordinate has every corner off the map, NaN
// weights, and NaN in lh (lw) when h_im (w_im) is not finite: the reference's
// location gradient along x is NaN exactly when y is not finite, and so on.
template <typename Op, typename Int>
struct Corners {
  Int idx[4];  // token index into S, -1 when the corner is off the map
  Op w[4];     // bilinear weight, 0 when the corner is off the map (NaN: see above)
  Op lh, lw;   // fractional position inside the cell, for the location gradient
};

// Sets every corner off the map: the corners of a point that samples nothing.
template <typename Op, typename Int>
DDETR_HD void clear_corners(Corners<Op, Int>& c) {
  DDETR_UNROLL
  for (int i = 0; i < 4; ++i) {
    c.idx[i] = Int(-1);
    c.w[i] = Op(0);
  }
  c.lh = c.lw = Op(0);
}

// The corners of the point at pixel (h_im, w_im) of the level (H, W) whose
// first token is `start`, in a value of S tokens. A point entirely outside
// the map has every corner off it; the test is written so that NaN
// coordinates also count as outside (no NaN ever becomes an index), and such
// points are then marked non-finite (Corners) off the common path.
template <typename Op, typename Int>
DDETR_HD Corners<Op, Int> bilinear_corners(Op h_im, Op w_im, Int H, Int W, Int start, Int S) {
  Corners<Op, Int> c;
  if (!(h_im > Op(-1) && w_im > Op(-1) && h_im < static_cast<Op>(H) &&
        w_im < static_cast<Op>(W))) {
    clear_corners(c);
    const bool h_ok = is_finite(h_im), w_ok = is_finite(w_im);
    if (!(h_ok && w_ok)) {
      const Op nan = Op(NAN);
      DDETR_UNROLL
      for (int i = 0; i < 4; ++i) c.w[i] = nan;
      c.lh = h_ok ? Op(0) : nan;
      c.lw = w_ok ? Op(0) : nan;
    }
    return c;
  }
  const Op hf = floor_of(h_im), wf = floor_of(w_im);
  const Int h0 = static_cast<Int>(hf), w0 = static_cast<Int>(wf);
  c.lh = h_im - hf;
  c.lw = w_im - wf;
  const Op hh = Op(1) - c.lh, hw = Op(1) - c.lw;
  const Op weights[4] = {hh * hw, hh * c.lw, c.lh * hw, c.lh * c.lw};
  DDETR_UNROLL
  for (int i = 0; i < 4; ++i) {
    const Int h = h0 + (i >> 1), w = w0 + (i & 1);
    const int64_t token = static_cast<int64_t>(start) + static_cast<int64_t>(h) * W + w;
    // The token range test only matters for inconsistent level tables; it
    // makes an out-of-bounds access impossible whatever they hold.
    const bool inside = h >= 0 && h < H && w >= 0 && w < W && token >= 0 && token < S;
    c.idx[i] = inside ? static_cast<Int>(token) : Int(-1);
    c.w[i] = inside ? weights[i] : Op(0);
  }
  return c;
}

// Whether any corner is on the map (false for a point entirely outside it).
template <typename Op, typename Int>
DDETR_HD bool any_corner(const Corners<Op, Int>& c) {
  return c.idx[0] >= 0 || c.idx[1] >= 0 || c.idx[2] >= 0 || c.idx[3] >= 0;
}

// Whether the point's location is NaN / Inf (marked by bilinear_corners).
template <typename Op, typename Int>
DDETR_HD bool nonfinite_location(const Corners<Op, Int>& c) {
  return !(c.lh == c.lh && c.lw == c.lw);
}

// Whether a point with no corner on the map still changes the result: the
// reference's 0 * NaN and 0 * Inf are NaN (a non-finite location or weight).
template <typename Op, typename Int>
DDETR_HD bool off_map_but_not_finite(const Corners<Op, Int>& c, Op attn) {
  return !is_finite(attn) || nonfinite_location(c);
}

// Gradients of one point's term attn * sum_i w_i * v_i of the output.
template <typename Op>
struct PointGrad {
  Op attn;  // d loss / d attention weight
  Op x, y;  // d loss / d sampling location (x along W, y along H)
};

// From s_i = sum_c g_c * v_i,c, the output gradient g of the head dotted with
// corner i's values over its D channels. The sample's derivatives along w_im
// and h_im follow from the bilinear weights; the chain rule through
// w_im = x * W - 0.5 and h_im = y * H - 0.5 gives the factors W and H.
template <typename Op>
DDETR_HD PointGrad<Op> point_gradients(const Op (&w)[4], Op lh, Op lw, Op attn, const Op (&s)[4],
                                       Op H, Op W) {
  const Op hh = Op(1) - lh, hw = Op(1) - lw;
  const Op d_attn = w[0] * s[0] + w[1] * s[1] + w[2] * s[2] + w[3] * s[3];
  const Op d_w = hh * (s[1] - s[0]) + lh * (s[3] - s[2]);
  const Op d_h = hw * (s[2] - s[0]) + lw * (s[3] - s[1]);
  return {d_attn, W * attn * d_w, H * attn * d_h};
}

}  // namespace math
}  // namespace ddetr
