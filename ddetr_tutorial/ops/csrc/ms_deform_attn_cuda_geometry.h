// Multi-scale deformable attention, CUDA launch geometry: plain C++ shared by
// the host launcher (ms_deform_attn_cuda.cu) and the CUDA emulation harness
// under tests/cuda_emulation/, so both launch the kernels the same way.
//
// It picks the vector width VEC (16-byte loads when D and the pointers allow)
// and the group size TPG, sizes the point tile to the shared-memory budget and
// the grid to a few waves. ms_deform_attn_cuda_kernel.cuh describes the mapping.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace ddetr {
namespace msda {

constexpr int kThreads = 256;               // threads per block
constexpr int kSmemBudget = 40960;          // bytes of point records + level table per block
constexpr int64_t kMaxSharedBytes = 49152;  // dynamic shared memory a block may ask for

// Sizes in DESIGN.md letters.
struct Sizes {
  int64_t N, S, M, D, Lq, L, K;
};

// Launch geometry, passed to the kernels by value.
struct Shape {
  int64_t n_items;       // N * Lq * M work items
  int64_t n_blocks;      // ceil(n_items / items_per_block)
  int64_t qm;            // Lq * M: item / qm is n
  int32_t M, S, D;       // heads, tokens, channels per head
  int32_t L, K, LK;      // levels, points per level, L * K
  int32_t tpg;           // threads per item (group), power of two <= 32
  int32_t items_per_block;  // G = kThreads / tpg
  int32_t tile_points;   // PT points per tile
  int32_t n_tiles;       // ceil(LK / PT)
  int32_t n_chunks;      // ceil(D / (VEC * tpg)) channel chunks per thread
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// The widest VEC (at most 16 bytes) that divides D and keeps every pointer
// VEC-element aligned; D % VEC == 0 then aligns every row as well.
inline int pick_vec(int64_t D, int elem_size, std::initializer_list<const void*> ptrs) {
  int vec = 16 / elem_size;
  const auto aligned = [&](int v) {
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(v) * elem_size) != 0) {
        return false;
      }
    }
    return true;
  };
  while (vec > 1 && (D % vec != 0 || !aligned(vec))) vec /= 2;
  return vec;
}

// Launch geometry for one kernel whose shared-memory point record is Record.
template <typename Record>
Shape make_shape(const Sizes& z, int vec) {
  Shape sh{};
  sh.n_items = z.N * z.Lq * z.M;
  sh.qm = z.Lq * z.M;
  sh.M = static_cast<int32_t>(z.M);
  sh.S = static_cast<int32_t>(z.S);
  sh.D = static_cast<int32_t>(z.D);
  sh.L = static_cast<int32_t>(z.L);
  sh.K = static_cast<int32_t>(z.K);
  sh.LK = static_cast<int32_t>(z.L * z.K);
  // A group covers D with VEC channels per lane, capped at a warp; wider
  // heads loop over chunks of VEC * TPG channels.
  sh.tpg = static_cast<int32_t>(std::min<int64_t>(32, next_pow2(ceil_div(z.D, vec))));
  sh.items_per_block = kThreads / sh.tpg;
  sh.n_chunks = static_cast<int32_t>(ceil_div(z.D, int64_t(vec) * sh.tpg));
  sh.n_blocks = ceil_div(sh.n_items, sh.items_per_block);
  // As many points per tile as the budget holds after the level table.
  const int64_t table_bytes = 3 * z.L * int64_t(sizeof(int32_t));
  const int64_t point_bytes = int64_t(sh.items_per_block) * int64_t(sizeof(Record));
  const int64_t fit = (kSmemBudget - table_bytes) / point_bytes;
  sh.tile_points = static_cast<int32_t>(std::clamp<int64_t>(fit, 1, sh.LK));
  sh.n_tiles = static_cast<int32_t>(ceil_div(sh.LK, sh.tile_points));
  return sh;
}

// Dynamic shared memory of a block: G * PT records, then the (H, W, start)
// table of the L levels. The launcher refuses more than kMaxSharedBytes.
template <typename Record>
size_t shared_bytes(const Shape& sh) {
  return sizeof(Record) * size_t(sh.items_per_block) * size_t(sh.tile_points) +
         3 * size_t(sh.L) * sizeof(int32_t);
}

// A few waves of resident blocks; the kernels' block-stride loop does the rest.
inline unsigned grid_blocks(const Shape& sh, int sm_count) {
  const int64_t waves = int64_t(std::max(sm_count, 1)) * 32;
  return static_cast<unsigned>(std::min(sh.n_blocks, waves));
}

// Calls fn(std::integral_constant<int, VEC>) for the run-time vec, without
// instantiating widths over 16 bytes for the type.
template <int kMaxVec, typename Fn>
void dispatch_vec(int vec, Fn&& fn) {
  if constexpr (kMaxVec >= 8) {
    if (vec == 8) return fn(std::integral_constant<int, 8>{});
  }
  if constexpr (kMaxVec >= 4) {
    if (vec == 4) return fn(std::integral_constant<int, 4>{});
  }
  if (vec == 2) return fn(std::integral_constant<int, 2>{});
  if (vec != 1) {
    throw std::invalid_argument("ms_deform_attn (CUDA): bad vector width " + std::to_string(vec));
  }
  fn(std::integral_constant<int, 1>{});
}

}  // namespace msda
}  // namespace ddetr
