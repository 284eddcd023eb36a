// Multi-scale deformable attention, CUDA device code (forward and backward).
//
// Work mapping. A work item is one (n, q, m): one query's one head, which
// needs L*K sampling points and produces D output channels. Items are ordered
// (n, q, m) with m fastest, the layout of the output (N, Lq, M*D), so that
// neighbouring items store neighbouring memory. A group of TPG threads (a
// power of two, at most 32, so a group never straddles a warp) owns one item;
// each thread owns VEC contiguous channels, read with one aligned vector load
// (16 bytes when D and the pointers allow), and loops over further chunks of
// VEC*TPG channels when D is wider than the group. A block of 256 threads
// holds G = 256 / TPG items and walks the grid with a block-uniform stride
// loop, so any N*Lq*M fits and __syncthreads() inside the loop is legal.
//
// Two phases per tile of PT points. The bilinear corners and weights of a
// point are the same for all D channels, so they are computed once:
//   phase 1: the block's 256 threads together compute, for every (item,
//            point) of the tile, the 4 corner token indices (into S, -1 when
//            the corner is off the map) and the 4 weights, into shared memory;
//   phase 2: every thread gathers its channels of the 4 corners of each point.
// Shared memory holds G*PT point records plus the (H, W, start) table of the
// L levels, loaded once per block; the host sizes PT so that it stays under
// about 40 KB and tiles the L*K points when they do not fit at once.
//
// Precision: coordinates, weights and sums are in opmath (double for double,
// float for float, half and bfloat16). Offsets into value, output and the
// gradients are 64-bit; a token index into S and per-level sizes are 32-bit
// (the host checks that S fits).
//
// Backward: the same mapping. Per point, each thread forms the dot products
// s_ab = sum_c g_c * v_ab,c of its channels for the 4 corners; a butterfly
// shuffle inside the group sums them over D, and the group's lane 0 turns
// them into grad_attention_weights and grad_sampling_locations with plain
// stores. grad_value is scattered with atomics (vector atomics on sm_90+)
// into a zeroed opmath buffer of value's shape.
//
// The corners and the point gradients come from ms_deform_attn_math.h (shared
// with the CPU kernel), the launch geometry from ms_deform_attn_cuda_geometry.h.
// Host compilers parse this file too: tests/cuda_emulation/ runs it on a CPU.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ms_deform_attn_cuda_geometry.h"
#include "ms_deform_attn_math.h"

// float2 / float4 atomicAdd exist on sm_90+ from CUDA 12.1 (PTX red.v4.f32).
// The CUDA emulation test (tests/cuda_emulation/) sets it to run both paths.
#if defined(DDETR_VECTOR_ATOMICS)
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
#define DDETR_VECTOR_ATOMICS 1
#else
#define DDETR_VECTOR_ATOMICS 0
#endif

namespace ddetr {
namespace msda {

// ---------------------------------------------------------------------------
// Types: storage T (float, double, __half, __nv_bfloat16) and its opmath type.

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

__device__ __forceinline__ float to_op(float x) { return x; }
__device__ __forceinline__ double to_op(double x) { return x; }
__device__ __forceinline__ float to_op(__half x) { return __half2float(x); }
// bfloat16 is the upper half of a float: widening is a shift, which the
// compiler schedules more freely than the cvt intrinsic.
__device__ __forceinline__ float to_op(__nv_bfloat16 x) {
  return __uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(x)) << 16);
}

// Rounding to a 2-byte type, for the one store narrower than a 32-bit word.
__device__ __forceinline__ void from_op(float x, __half& dst) { dst = __float2half_rn(x); }
__device__ __forceinline__ void from_op(float x, __nv_bfloat16& dst) {
  dst = __float2bfloat16_rn(x);
}

// VEC contiguous elements moved as one aligned vector (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The native vector type of a Pack's size: going through it makes the
// compiler emit one vector load or store (ld.global.v4 and friends).
template <int BYTES>
struct RawWords;
template <>
struct RawWords<16> {
  using type = uint4;
};
template <>
struct RawWords<8> {
  using type = uint2;
};
template <>
struct RawWords<4> {
  using type = unsigned int;
};
template <>
struct RawWords<2> {
  using type = unsigned short;
};

// out = VEC elements at p, or zeros (all bits 0) when !ok, in the storage type.
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, bool ok, Pack<T, VEC>& out) {
  using Raw = typename RawWords<sizeof(Pack<T, VEC>)>::type;
  Raw r{};
  if (ok) r = *reinterpret_cast<const Raw*>(p);
  memcpy(&out, &r, sizeof(r));
}

// Reads VEC channels at p into opmath registers.
template <typename T, int VEC>
__device__ __forceinline__ void load_channels(const T* p, opmath_t<T> (&out)[VEC]) {
  Pack<T, VEC> pk;
  load_pack<T, VEC>(p, true, pk);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_op(pk.v[i]);
}

// Rounds x to T and returns the bits as 32-bit words in memory order.
template <typename T>
struct Tag {};

template <int VEC, int NW>
__device__ __forceinline__ void to_words(Tag<float>, const float (&x)[VEC], unsigned (&w)[NW]) {
#pragma unroll
  for (int i = 0; i < NW; ++i) w[i] = __float_as_uint(x[i]);
}

template <int VEC, int NW>
__device__ __forceinline__ void to_words(Tag<double>, const double (&x)[VEC], unsigned (&w)[NW]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    w[2 * i] = static_cast<unsigned>(__double2loint(x[i]));
    w[2 * i + 1] = static_cast<unsigned>(__double2hiint(x[i]));
  }
}

template <int VEC, int NW>
__device__ __forceinline__ void to_words(Tag<__half>, const float (&x)[VEC], unsigned (&w)[NW]) {
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    w[i] = static_cast<unsigned>(__half_as_ushort(__float2half_rn(x[2 * i]))) |
           (static_cast<unsigned>(__half_as_ushort(__float2half_rn(x[2 * i + 1]))) << 16);
  }
}

template <int VEC, int NW>
__device__ __forceinline__ void to_words(Tag<__nv_bfloat16>, const float (&x)[VEC],
                                         unsigned (&w)[NW]) {
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    w[i] = static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i]))) |
           (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i + 1])))
            << 16);
  }
}

// Writes VEC channels at p from opmath registers with one vector store.
template <typename T, int VEC>
__device__ __forceinline__ void store_channels(T* p, const opmath_t<T> (&x)[VEC]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * VEC;
  if constexpr (kBytes < 4) {
    from_op(x[0], *p);  // a single half or bfloat16
  } else {
    unsigned w[kBytes / 4];
    to_words(Tag<T>{}, x, w);
    if constexpr (kBytes == 4) {
      *reinterpret_cast<unsigned*>(p) = w[0];
    } else {
#if defined(__CUDA_ARCH__)
      // PTX rather than an assignment through uint4*: inside the chunk loop
      // nvcc splits that assignment into scalar stores.
      const size_t global = __cvta_generic_to_global(p);
      if constexpr (kBytes == 16) {
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(global), "r"(w[0]),
                     "r"(w[1]), "r"(w[2]), "r"(w[3])
                     : "memory");
      } else {
        asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(global), "r"(w[0]), "r"(w[1])
                     : "memory");
      }
#else
      // Host compilers (never executed by nvcc builds; lets the file be parsed
      // and emulated on a CPU).
      for (int i = 0; i < kBytes / 4; ++i) reinterpret_cast<unsigned*>(p)[i] = w[i];
#endif
    }
  }
}

// grad_value += x over VEC channels. The buffer is a fresh allocation and the
// channel offset is a multiple of VEC, so dst is VEC*4-byte aligned.
template <int VEC>
__device__ __forceinline__ void atomic_add_channels(float* dst, const float (&x)[VEC]) {
#if DDETR_VECTOR_ATOMICS
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC / 4; ++j) {
      atomicAdd(reinterpret_cast<float4*>(dst) + j,
                make_float4(x[4 * j], x[4 * j + 1], x[4 * j + 2], x[4 * j + 3]));
    }
  } else if constexpr (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x[0], x[1]));
  } else {
    atomicAdd(dst, x[0]);
  }
#else
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, x[i]);
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_channels(double* dst, const double (&x)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, x[i]);
}

// Sum of x over the tpg lanes of a group. Every lane of the warp must call it
// (full mask); lanes without channels pass 0.
template <typename Op>
__device__ __forceinline__ Op group_sum(Op x, int tpg) {
  for (int offset = tpg >> 1; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset, tpg);
  }
  return x;
}

// ---------------------------------------------------------------------------
// Phase 1: one sampling point -> 4 corners.

// Per-level sizes, copied to shared memory once per block.
struct Levels {
  const int32_t* H;
  const int32_t* W;
  const int32_t* start;
};

__device__ __forceinline__ Levels load_levels(int32_t* table, const int64_t* spatial_shapes,
                                              const int64_t* level_start_index, int L) {
  for (int l = threadIdx.x; l < L; l += kThreads) {
    table[l] = static_cast<int32_t>(spatial_shapes[2 * l]);
    table[L + l] = static_cast<int32_t>(spatial_shapes[2 * l + 1]);
    table[2 * L + l] = static_cast<int32_t>(level_start_index[l]);
  }
  return {table, table + L, table + 2 * L};
}

// The bilinear corners of one point (ms_deform_attn_math.h), 32-bit token indices.
template <typename Op>
using Corners = math::Corners<Op, int32_t>;

// Shared-memory record of one point: forward folds the attention weight into
// the corner weights.
template <typename Op>
struct alignas(16) ForwardPoint {
  int32_t idx[4];
  Op w[4];  // attention weight * bilinear weight
};

// Backward needs the factors apart: grad_value uses attn * w, grad_attn the
// bilinear value (w), grad_loc the cell fractions and attn.
template <typename Op>
struct alignas(16) BackwardPoint {
  int32_t idx[4];
  Op w[4];   // bilinear weight
  Op attn;   // attention weight, 0 when the point is off the map
  Op lh, lw;
};

template <typename Op>
__device__ __forceinline__ void write_point(ForwardPoint<Op>& rec, const Corners<Op>& c, Op attn,
                                            bool inside) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    rec.idx[i] = c.idx[i];
    rec.w[i] = inside ? attn * c.w[i] : Op(0);
  }
}

template <typename Op>
__device__ __forceinline__ void write_point(BackwardPoint<Op>& rec, const Corners<Op>& c, Op attn,
                                            bool inside) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    rec.idx[i] = c.idx[i];
    rec.w[i] = c.w[i];
  }
  // attn = 0 off the map makes grad_loc exactly 0 there (inside is also true
  // for a non-finite location or weight, whose NaN the reference keeps).
  rec.attn = inside ? attn : Op(0);
  rec.lh = c.lh;
  rec.lw = c.lw;
}

// Phase 1 for the tile of points [p0, p0 + PT) of the block's items
// [item0, item0 + G). Record r belongs to item r / PT, point r % PT.
template <typename Op, typename Record>
__device__ void fill_tile(Record* recs, const Levels& levels, const Op* __restrict__ loc,
                          const Op* __restrict__ attn, int64_t item0, int p0, const Shape& sh) {
  const int n_records = sh.items_per_block * sh.tile_points;
  for (int r = threadIdx.x; r < n_records; r += kThreads) {
    const int g = r / sh.tile_points;
    const int p = p0 + (r - g * sh.tile_points);
    const int64_t item = item0 + g;
    Corners<Op> c;
    math::clear_corners(c);
    Op a = Op(0);
    if (item < sh.n_items && p < sh.LK) {
      const int64_t pt = item * sh.LK + p;  // flat (n, q, m, l, k)
      const int l = p / sh.K;
      const int32_t H = levels.H[l], W = levels.W[l];
      a = attn[pt];
      // x is along W, y along H, both normalized to [0, 1] over the map.
      const Op h_im = math::pixel_coord<true>(loc[2 * pt + 1], static_cast<Op>(H));
      const Op w_im = math::pixel_coord<true>(loc[2 * pt], static_cast<Op>(W));
      c = math::bilinear_corners(h_im, w_im, H, W, levels.start[l], sh.S);
    }
    // A point off the map adds nothing, unless its location or weight is
    // NaN / Inf: then its NaN weights or 0 * attn carry the reference's NaN.
    const bool inside = math::any_corner(c) || math::off_map_but_not_finite(c, a);
    write_point(recs[r], c, a, inside);
  }
}

// Dynamic shared memory: G*PT records, then the level table (3*L int32).
template <typename Record>
__device__ __forceinline__ int32_t* level_table(unsigned char* smem, const Shape& sh) {
  return reinterpret_cast<int32_t*>(
      smem + sizeof(Record) * sh.items_per_block * sh.tile_points);
}

// ---------------------------------------------------------------------------
// Phase 2 helpers.

// Loads VEC channels of the 4 corners of one point, all issued before any is
// used; zeros off the map (idx < 0). Zero-filling costs a few moves but fewer
// registers than predicating the arithmetic on idx. row = M * D fits int32
// (host check); the offset is formed in 64 bits.
template <typename T, int VEC>
__device__ __forceinline__ void load_corners(const T* __restrict__ base, const int32_t (&idx)[4],
                                             int32_t row, Pack<T, VEC> (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    load_pack<T, VEC>(base + static_cast<int64_t>(idx[i]) * row, idx[i] >= 0, v[i]);
  }
}

// Forward phase 2: acc += sum over the tile's points of w * corner, for the
// thread's VEC channels. base points at value[n, 0, m, c]; row = M * D.
template <typename T, int VEC>
__device__ __forceinline__ void gather_tile(const ForwardPoint<opmath_t<T>>* pts, int n_points,
                                            const T* __restrict__ base, int32_t row,
                                            opmath_t<T> (&acc)[VEC]) {
  using Op = opmath_t<T>;
#pragma unroll 2
  for (int p = 0; p < n_points; ++p) {
    const ForwardPoint<Op> pt = pts[p];
    Pack<T, VEC> v[4];
    load_corners<T, VEC>(base, pt.idx, row, v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += pt.w[i] * to_op(v[i].v[j]);
    }
  }
}

// Backward phase 2 for one point and VEC channels: scatter attn * w * g into
// grad_value and add g . v of each corner into s.
template <typename T, int VEC>
__device__ __forceinline__ void backprop_point(const BackwardPoint<opmath_t<T>>& pt,
                                               const opmath_t<T> (&g)[VEC],
                                               const T* __restrict__ base,
                                               opmath_t<T>* __restrict__ grad_base, int32_t row,
                                               opmath_t<T> (&s)[4]) {
  using Op = opmath_t<T>;
  Pack<T, VEC> v[4];
  load_corners<T, VEC>(base, pt.idx, row, v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (pt.idx[i] < 0) continue;  // zero padding: no value, no gradient
    const Op wa = pt.attn * pt.w[i];
    Op add[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s[i] += g[j] * to_op(v[i].v[j]);
      add[j] = wa * g[j];
    }
    atomic_add_channels<VEC>(grad_base + static_cast<int64_t>(pt.idx[i]) * row, add);
  }
}

// ---------------------------------------------------------------------------
// Kernels.

// out (N, Lq, M*D) = sum over (l, k) of attn * bilinear(value (N, S, M, D)).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_forward_kernel(const T* __restrict__ value,
                                  const int64_t* __restrict__ spatial_shapes,
                                  const int64_t* __restrict__ level_start_index,
                                  const opmath_t<T>* __restrict__ sampling_locations,
                                  const opmath_t<T>* __restrict__ attention_weights,
                                  T* __restrict__ output, const Shape sh) {
  using Op = opmath_t<T>;
  using Record = ForwardPoint<Op>;
  extern __shared__ __align__(16) unsigned char smem[];
  Record* recs = reinterpret_cast<Record*>(smem);
  const Levels levels =
      load_levels(level_table<Record>(smem, sh), spatial_shapes, level_start_index, sh.L);

  const int g = threadIdx.x / sh.tpg, lane = threadIdx.x % sh.tpg;
  const int32_t row = sh.M * sh.D;  // stride of one token in value (host: fits int32)
  const Record* my_recs = recs + g * sh.tile_points;

  for (int64_t blk = blockIdx.x; blk < sh.n_blocks; blk += gridDim.x) {
    const int64_t item0 = blk * sh.items_per_block;
    const int64_t item = item0 + g;
    const bool has_item = item < sh.n_items;
    const int64_t n = has_item ? item / sh.qm : 0, m = has_item ? item % sh.M : 0;
    const T* base = value + (n * sh.S * sh.M + m) * sh.D;  // value[n, 0, m, 0]

    for (int chunk = 0; chunk < sh.n_chunks; ++chunk) {
      const int c = (chunk * sh.tpg + lane) * VEC;
      const bool active = has_item && c < sh.D;
      Op acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = Op(0);

      for (int tile = 0; tile < sh.n_tiles; ++tile) {
        const int p0 = tile * sh.tile_points;
        // With a single tile the records survive across channel chunks.
        if (chunk == 0 || sh.n_tiles > 1) {
          __syncthreads();  // everyone is done reading the previous records
          fill_tile(recs, levels, sampling_locations, attention_weights, item0, p0, sh);
          __syncthreads();
        }
        if (active) {
          const int n_points = min(sh.tile_points, sh.LK - p0);
          gather_tile<T, VEC>(my_recs, n_points, base + c, row, acc);
        }
      }
      // Every output element is written, zeros included (no memset).
      if (active) store_channels<T, VEC>(output + item * sh.D + c, acc);
    }
  }
}

// grad_value_acc (N, S, M, D) opmath, zeroed: += via atomics.
// grad_sampling_locations (N, Lq, M, L, K, 2), grad_attention_weights
// (N, Lq, M, L, K): every element written once.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_backward_kernel(const T* __restrict__ value,
                                   const int64_t* __restrict__ spatial_shapes,
                                   const int64_t* __restrict__ level_start_index,
                                   const opmath_t<T>* __restrict__ sampling_locations,
                                   const opmath_t<T>* __restrict__ attention_weights,
                                   const T* __restrict__ grad_output,
                                   opmath_t<T>* __restrict__ grad_value_acc,
                                   opmath_t<T>* __restrict__ grad_sampling_locations,
                                   opmath_t<T>* __restrict__ grad_attention_weights,
                                   const Shape sh) {
  using Op = opmath_t<T>;
  using Record = BackwardPoint<Op>;
  extern __shared__ __align__(16) unsigned char smem[];
  Record* recs = reinterpret_cast<Record*>(smem);
  const Levels levels =
      load_levels(level_table<Record>(smem, sh), spatial_shapes, level_start_index, sh.L);

  const int g = threadIdx.x / sh.tpg, lane = threadIdx.x % sh.tpg;
  const int32_t row = sh.M * sh.D;
  const Record* my_recs = recs + g * sh.tile_points;

  for (int64_t blk = blockIdx.x; blk < sh.n_blocks; blk += gridDim.x) {
    const int64_t item0 = blk * sh.items_per_block;
    const int64_t item = item0 + g;
    const bool has_item = item < sh.n_items;
    const int64_t n = has_item ? item / sh.qm : 0, m = has_item ? item % sh.M : 0;
    const int64_t value_offset = (n * sh.S * sh.M + m) * sh.D;  // [n, 0, m, 0]
    const T* base = value + value_offset;
    Op* grad_base = grad_value_acc + value_offset;
    const T* grad_out = grad_output + (has_item ? item : 0) * sh.D;

    // The item's grad_output row is reused by every point: keep it in
    // registers when one chunk covers D (the common case).
    Op g_first[VEC] = {};
    const int c_first = lane * VEC;
    if (sh.n_chunks == 1 && has_item && c_first < sh.D) {
      load_channels<T, VEC>(grad_out + c_first, g_first);
    }

    for (int tile = 0; tile < sh.n_tiles; ++tile) {
      const int p0 = tile * sh.tile_points;
      __syncthreads();
      fill_tile(recs, levels, sampling_locations, attention_weights, item0, p0, sh);
      __syncthreads();

      const int n_points = min(sh.tile_points, sh.LK - p0);  // block-uniform
      for (int p = 0; p < n_points; ++p) {
        Op s[4] = {Op(0), Op(0), Op(0), Op(0)};  // s_ab = sum_c g_c * v_ab,c
        if (has_item) {
          const Record pt = my_recs[p];
          for (int chunk = 0; chunk < sh.n_chunks; ++chunk) {
            const int c = (chunk * sh.tpg + lane) * VEC;
            if (c >= sh.D) break;
            Op gv[VEC];
            if (sh.n_chunks == 1) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) gv[j] = g_first[j];
            } else {
              load_channels<T, VEC>(grad_out + c, gv);
            }
            backprop_point<T, VEC>(pt, gv, base + c, grad_base + c, row, s);
          }
        }
        // All lanes of the warp take part; lanes without channels add 0.
#pragma unroll
        for (int i = 0; i < 4; ++i) s[i] = group_sum(s[i], sh.tpg);

        if (has_item && lane == 0) {
          const Record pt = my_recs[p];
          const int l = (p0 + p) / sh.K;
          const math::PointGrad<Op> pg =
              math::point_gradients(pt.w, pt.lh, pt.lw, pt.attn, s,
                                    static_cast<Op>(levels.H[l]), static_cast<Op>(levels.W[l]));
          const int64_t pi = item * sh.LK + p0 + p;  // flat (n, q, m, l, k)
          grad_attention_weights[pi] = pg.attn;
          Pack<Op, 2> d_loc;
          d_loc.v[0] = pg.x;
          d_loc.v[1] = pg.y;
          *reinterpret_cast<Pack<Op, 2>*>(grad_sampling_locations + 2 * pi) = d_loc;
        }
      }
    }
  }
}

}  // namespace msda
}  // namespace ddetr
