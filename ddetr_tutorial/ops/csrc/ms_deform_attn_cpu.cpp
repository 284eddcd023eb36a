// Multi-scale deformable attention, C++ CPU kernel (forward and backward).
//
// Forward runs in parallel over (n, q) rows: each row's output is private, so
// no synchronisation is needed. For every (head m, level l, point k) the
// bilinear corners and weights are computed once, then one loop over the D
// channels of the head adds all four corners (the compiler vectorises it).
//
// Backward scatters into grad_value, and many queries hit the same value
// token. Instead of atomics or per-thread copies of grad_value, it runs in
// parallel over (n, m): every (n, m) owns the slice grad_value[n, :, m, :], so
// the scatter has no races and the result is deterministic, bit for bit.
//
// Corners outside the map are pointed at a row of zeros (reads) or a scratch
// row (writes), so the channel loops have no branches.
//
// Points with a NaN / Inf location or attention weight leave the vectorised
// loops for a scalar path that computes them in the reference's order, so
// they give the reference's NaN / Inf (ms_deform_attn_math.h); finite points
// outside the map still contribute exactly nothing.
//
// The corners and the point gradients come from ms_deform_attn_math.h, shared
// with the CUDA kernel; the backward forms s_i = g . v_i per corner and turns
// them into the point's gradients there.
//
// The per-range bodies are compiled twice on x86-64 with GCC (target_clones):
// once for the baseline (SSE2) and once for x86-64-v3 (AVX2 + FMA); the loader
// picks the best one for the CPU at load time, so one build runs everywhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DDETR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DDETR_CPU_CLONES
#endif
#define DDETR_INLINE __attribute__((always_inline)) inline

namespace ddetr {
namespace {

struct Level {
  int64_t H, W, start;
};

std::vector<Level> read_levels(const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index) {
  const int64_t L = spatial_shapes.size(0);
  const int64_t* hw = spatial_shapes.data_ptr<int64_t>();
  const int64_t* start = level_start_index.data_ptr<int64_t>();
  std::vector<Level> levels(L);
  for (int64_t l = 0; l < L; ++l) levels[l] = {hw[2 * l], hw[2 * l + 1], start[l]};
  return levels;
}

template <typename scalar_t>
using Corners = math::Corners<scalar_t, int64_t>;

// The bilinear corners of the point xy = (x, y) of level lv (ms_deform_attn_math.h);
// false when no corner is on the map.
template <typename scalar_t>
DDETR_INLINE bool corners_of(const scalar_t* xy, const Level& lv, int64_t S,
                             Corners<scalar_t>& c) {
  const scalar_t w_im = math::pixel_coord<false>(xy[0], static_cast<scalar_t>(lv.W));
  const scalar_t h_im = math::pixel_coord<false>(xy[1], static_cast<scalar_t>(lv.H));
  c = math::bilinear_corners(h_im, w_im, lv.H, lv.W, lv.start, S);
  return math::any_corner(c);
}

struct Sizes {
  int64_t N, S, M, D, Lq, L, K;
};

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

template <typename scalar_t>
struct Args {
  const scalar_t* value;      // (N, S, M, D)
  const Level* levels;        // (L,)
  const scalar_t* loc;        // (N, Lq, M, L, K, 2)
  const scalar_t* attn;       // (N, Lq, M, L, K)
  const scalar_t* zeros;      // (D,) read by corners outside the map
  const scalar_t* grad_out;   // (N, Lq, M, D), backward only
  scalar_t* out;              // forward: output (N, Lq, M, D); backward: grad_value
  scalar_t* grad_loc;         // (N, Lq, M, L, K, 2), backward only
  scalar_t* grad_attn;        // (N, Lq, M, L, K), backward only
  Sizes z;
};

// The corner rows of head m of batch n: reads of corners off the map see the
// zeros row, writes go to `scratch` (4 rows of D), when given.
template <typename scalar_t>
DDETR_INLINE void corner_rows(const Args<scalar_t>& a, const Corners<scalar_t>& cr, int64_t n,
                              int64_t m, const scalar_t** v, scalar_t** gv,
                              scalar_t* scratch) {
  const Sizes& z = a.z;
  for (int i = 0; i < 4; ++i) {
    const int64_t off = ((n * z.S + cr.idx[i]) * z.M + m) * z.D;
    v[i] = cr.idx[i] < 0 ? a.zeros : a.value + off;
    if (gv) gv[i] = cr.idx[i] < 0 ? scratch + i * z.D : a.out + off;
  }
}

// Forward of a point with a NaN / Inf location or attention weight, in the
// reference's order: attn * (bilinear sample), the sample being NaN for a
// non-finite location (NaN weights) and 0 off the map. Rare: kept off the
// vectorised path so that path is unchanged.
template <typename scalar_t>
__attribute__((noinline)) void forward_nonfinite_point(const Args<scalar_t>& a,
                                                       const Corners<scalar_t>& cr, scalar_t at,
                                                       int64_t n, int64_t m, scalar_t* o) {
  const scalar_t* v[4];
  corner_rows<scalar_t>(a, cr, n, m, v, nullptr, nullptr);
  for (int64_t c = 0; c < a.z.D; ++c) {
    o[c] += at * (cr.w[0] * v[0][c] + cr.w[1] * v[1][c] + cr.w[2] * v[2][c] + cr.w[3] * v[3][c]);
  }
}

template <typename scalar_t>
DDETR_INLINE bool all_finite(const scalar_t* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= math::is_finite(x[i]);
  return ok;
}

// The head's points [point0, point0 + L*K) in the reference's order: all of
// them, or only those with a non-finite location.
template <typename scalar_t>
__attribute__((noinline)) void forward_head_nonfinite(const Args<scalar_t>& a, int64_t point0,
                                                      int64_t n, int64_t m, scalar_t* o,
                                                      bool only_nonfinite = false) {
  for (int64_t p = 0; p < a.z.L * a.z.K; ++p) {
    Corners<scalar_t> cr;
    corners_of(a.loc + 2 * (point0 + p), a.levels[p / a.z.K], a.z.S, cr);
    if (!only_nonfinite || math::nonfinite_location(cr)) {
      forward_nonfinite_point(a, cr, a.attn[point0 + p], n, m, o);
    }
  }
}

// Backward of such a point, as the reference's autograd computes it: the
// sample's gradient is g * attn per channel, the location gradient sums the
// bilinear derivatives times it channel by channel (so 0 * Inf is NaN where
// the reference has it), grad_attn = g . sample.
template <typename scalar_t>
__attribute__((noinline)) void backward_nonfinite_point(const Args<scalar_t>& a,
                                                        const Corners<scalar_t>& cr, scalar_t at,
                                                        const Level& lv, int64_t n, int64_t m,
                                                        const scalar_t* g, int64_t point,
                                                        scalar_t* scratch) {
  const scalar_t* v[4];
  scalar_t* gv[4];
  corner_rows<scalar_t>(a, cr, n, m, v, gv, scratch);
  const scalar_t lh = cr.lh, lw = cr.lw, hh = scalar_t(1) - lh, hw = scalar_t(1) - lw;
  scalar_t gx = 0, gy = 0, ga = 0;
  for (int64_t c = 0; c < a.z.D; ++c) {
    const scalar_t go = g[c] * at;
    const scalar_t v0 = v[0][c], v1 = v[1][c], v2 = v[2][c], v3 = v[3][c];
    for (int i = 0; i < 4; ++i) gv[i][c] += cr.w[i] * go;
    gx += (hh * (v1 - v0) + lh * (v3 - v2)) * go;
    gy += (hw * (v2 - v0) + lw * (v3 - v1)) * go;
    ga += g[c] * (cr.w[0] * v0 + cr.w[1] * v1 + cr.w[2] * v2 + cr.w[3] * v3);
  }
  a.grad_attn[point] = ga;
  a.grad_loc[2 * point] = static_cast<scalar_t>(lv.W) * gx;
  a.grad_loc[2 * point + 1] = static_cast<scalar_t>(lv.H) * gy;
}

// Output rows [begin, end) of the flattened (n, q).
template <typename scalar_t>
DDETR_INLINE void forward_rows(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  const Sizes& z = a.z;
  const int64_t LK = z.L * z.K;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / z.Lq;
    for (int64_t m = 0; m < z.M; ++m) {
      scalar_t* __restrict__ o = a.out + (row * z.M + m) * z.D;  // (D,)
      for (int64_t c = 0; c < z.D; ++c) o[c] = 0;
      const int64_t point0 = (row * z.M + m) * LK;
      // A NaN / Inf weight makes all of the head's channels NaN / Inf (Inf * x
      // is never finite), so such a head takes the reference's order throughout.
      if (!all_finite(a.attn + point0, LK)) {
        forward_head_nonfinite(a, point0, n, m, o);
        continue;
      }
      bool nonfinite_loc = false;  // handled after the loop, which stays call-free
      for (int64_t p = 0; p < LK; ++p) {
        Corners<scalar_t> cr;
        if (!corners_of(a.loc + 2 * (point0 + p), a.levels[p / z.K], z.S, cr)) {
          nonfinite_loc |= math::nonfinite_location(cr);
          continue;
        }
        const scalar_t at = a.attn[point0 + p];
        const scalar_t* v[4];
        for (int i = 0; i < 4; ++i) {
          v[i] = cr.idx[i] < 0 ? a.zeros : a.value + ((n * z.S + cr.idx[i]) * z.M + m) * z.D;
        }
        const scalar_t w0 = at * cr.w[0], w1 = at * cr.w[1];
        const scalar_t w2 = at * cr.w[2], w3 = at * cr.w[3];
        const scalar_t *__restrict__ v0 = v[0], *__restrict__ v1 = v[1];
        const scalar_t *__restrict__ v2 = v[2], *__restrict__ v3 = v[3];
#pragma omp simd
        for (int64_t c = 0; c < z.D; ++c) {
          o[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
        }
      }
      if (nonfinite_loc) forward_head_nonfinite(a, point0, n, m, o, /*only_nonfinite=*/true);
    }
  }
}

// Heads [begin, end) of the flattened (n, m); each owns grad_value[n, :, m, :].
template <typename scalar_t>
DDETR_INLINE void backward_heads(const Args<scalar_t>& a, int64_t begin, int64_t end,
                                 scalar_t* scratch) {
  const Sizes& z = a.z;
  const int64_t LK = z.L * z.K;
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / z.M, m = nm % z.M;
    for (int64_t q = 0; q < z.Lq; ++q) {
      const int64_t head_row = (n * z.Lq + q) * z.M + m;
      const scalar_t* __restrict__ g = a.grad_out + head_row * z.D;  // (D,)
      for (int64_t p = 0; p < LK; ++p) {
        const int64_t point = head_row * LK + p;
        const Level& lv = a.levels[p / z.K];
        Corners<scalar_t> cr;
        const bool on_map = corners_of(a.loc + 2 * point, lv, z.S, cr);
        const scalar_t at = a.attn[point];
        if (!(on_map && math::is_finite(at))) {
          if (on_map || math::off_map_but_not_finite(cr, at)) {
            backward_nonfinite_point(a, cr, at, lv, n, m, g, point, scratch);
          } else {
            a.grad_attn[point] = 0;
            a.grad_loc[2 * point] = a.grad_loc[2 * point + 1] = 0;
          }
          continue;
        }
        const scalar_t* v[4];
        scalar_t* gv[4];
        for (int i = 0; i < 4; ++i) {
          const int64_t off = ((n * z.S + cr.idx[i]) * z.M + m) * z.D;
          v[i] = cr.idx[i] < 0 ? a.zeros : a.value + off;
          gv[i] = cr.idx[i] < 0 ? scratch + i * z.D : a.out + off;
        }
        const scalar_t aw0 = at * cr.w[0], aw1 = at * cr.w[1];
        const scalar_t aw2 = at * cr.w[2], aw3 = at * cr.w[3];
        const scalar_t *__restrict__ v0 = v[0], *__restrict__ v1 = v[1];
        const scalar_t *__restrict__ v2 = v[2], *__restrict__ v3 = v[3];
        scalar_t *__restrict__ g0 = gv[0], *__restrict__ g1 = gv[1];
        scalar_t *__restrict__ g2 = gv[2], *__restrict__ g3 = gv[3];
        // s_i = g . v_i over the head's channels; the point's gradients follow
        // from them (ms_deform_attn_math.h).
        scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t c = 0; c < z.D; ++c) {
          const scalar_t gc = g[c];
          s0 += gc * v0[c];
          s1 += gc * v1[c];
          s2 += gc * v2[c];
          s3 += gc * v3[c];
          g0[c] += aw0 * gc;
          g1[c] += aw1 * gc;
          g2[c] += aw2 * gc;
          g3[c] += aw3 * gc;
        }
        const scalar_t s[4] = {s0, s1, s2, s3};
        const math::PointGrad<scalar_t> pg = math::point_gradients(
            cr.w, cr.lh, cr.lw, at, s, static_cast<scalar_t>(lv.H), static_cast<scalar_t>(lv.W));
        a.grad_attn[point] = pg.attn;
        a.grad_loc[2 * point] = pg.x;
        a.grad_loc[2 * point + 1] = pg.y;
      }
    }
  }
}

// The cloned entry points (see the top of the file).
DDETR_CPU_CLONES void forward_range(const Args<float>& a, int64_t begin, int64_t end) {
  forward_rows(a, begin, end);
}
DDETR_CPU_CLONES void forward_range(const Args<double>& a, int64_t begin, int64_t end) {
  forward_rows(a, begin, end);
}
DDETR_CPU_CLONES void backward_range(const Args<float>& a, int64_t begin, int64_t end,
                                     float* scratch) {
  backward_heads(a, begin, end, scratch);
}
DDETR_CPU_CLONES void backward_range(const Args<double>& a, int64_t begin, int64_t end,
                                     double* scratch) {
  backward_heads(a, begin, end, scratch);
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Sizes z = sizes_of(value, sampling_locations);
  at::Tensor out = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  if (out.numel() == 0) return out;
  const auto levels = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    const std::vector<scalar_t> zeros(z.D, scalar_t(0));
    Args<scalar_t> a{value.data_ptr<scalar_t>(), levels.data(),
                     sampling_locations.data_ptr<scalar_t>(),
                     attention_weights.data_ptr<scalar_t>(), zeros.data(), nullptr,
                     out.data_ptr<scalar_t>(), nullptr, nullptr, z};
    // Rows are (n, q); a grain of 16 rows keeps tiny inputs on one thread.
    at::parallel_for(0, z.N * z.Lq, 16,
                     [&](int64_t begin, int64_t end) { forward_range(a, begin, end); });
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const Sizes z = sizes_of(value, sampling_locations);
  // grad_value is accumulated into, so it starts at zero; the other two are
  // written once per point.
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  if (z.N * z.Lq * z.M * z.L * z.K == 0) {
    return {grad_value, grad_loc.zero_(), grad_attn.zero_()};
  }
  const auto levels = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    const std::vector<scalar_t> zeros(z.D, scalar_t(0));
    Args<scalar_t> a{value.data_ptr<scalar_t>(), levels.data(),
                     sampling_locations.data_ptr<scalar_t>(),
                     attention_weights.data_ptr<scalar_t>(), zeros.data(),
                     grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                     grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), z};
    at::parallel_for(0, z.N * z.M, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(4 * z.D);  // write target of corners outside the map
      backward_range(a, begin, end, scratch.data());
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace ddetr
