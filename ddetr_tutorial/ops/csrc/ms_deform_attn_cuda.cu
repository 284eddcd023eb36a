// Multi-scale deformable attention, CUDA host launchers.
//
// Each entry point allocates its outputs, returns early on empty inputs,
// picks the vector width VEC (16-byte loads when D and the pointers allow)
// and the group size TPG, sizes the point tile to the shared-memory budget,
// and launches one kernel of ms_deform_attn_cuda_kernel.cuh on the current
// stream of value's device. The mapping itself is described in that file.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_cuda_kernel.cuh"

namespace ddetr {
namespace {

using msda::kThreads;

// at::Half / at::BFloat16 -> the CUDA types the kernels compute with (same bits).
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Sizes in DESIGN.md letters.
struct Sizes {
  int64_t N, S, M, D, Lq, L, K;
};

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

// The kernels keep token indices, M * D and L * K in 32 bits.
void check_index_limits(const Sizes& z) {
  constexpr int64_t kMax = INT32_MAX;
  TORCH_CHECK(z.S < kMax, "ms_deform_attn (CUDA): S = ", z.S, " tokens is more than 2^31 - 1");
  TORCH_CHECK(z.M * z.D <= kMax, "ms_deform_attn (CUDA): M * D = ", z.M * z.D,
              " channels is more than 2^31 - 1");
  TORCH_CHECK(z.L * z.K <= kMax, "ms_deform_attn (CUDA): L * K = ", z.L * z.K,
              " points is more than 2^31 - 1");
}

// The widest VEC (at most 16 bytes) that divides D and keeps every pointer
// VEC-element aligned; D % VEC == 0 then aligns every row as well.
int pick_vec(int64_t D, int elem_size, std::initializer_list<const void*> ptrs) {
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
msda::Shape make_shape(const Sizes& z, int vec) {
  msda::Shape sh{};
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
  const int64_t fit = (msda::kSmemBudget - table_bytes) / point_bytes;
  sh.tile_points = static_cast<int32_t>(std::clamp<int64_t>(fit, 1, sh.LK));
  sh.n_tiles = static_cast<int32_t>(ceil_div(sh.LK, sh.tile_points));
  return sh;
}

// G * PT records, then the (H, W, start) table of the L levels.
template <typename Record>
size_t shared_bytes(const msda::Shape& sh) {
  const size_t bytes = sizeof(Record) * size_t(sh.items_per_block) * size_t(sh.tile_points) +
                       3 * size_t(sh.L) * sizeof(int32_t);
  TORCH_CHECK(bytes <= 48 * 1024, "ms_deform_attn (CUDA): L = ", sh.L,
              " levels need more shared memory than a block has");
  return bytes;
}

// A few waves of resident blocks; the kernels' block-stride loop does the rest.
unsigned grid_size(const msda::Shape& sh, int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
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
  TORCH_CHECK(vec == 1, "ms_deform_attn (CUDA): bad vector width ", vec);
  fn(std::integral_constant<int, 1>{});
}

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_ptr_mut(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
void launch_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                    const at::Tensor& attention_weights, at::Tensor& output, const Sizes& z) {
  using T = typename CudaType<scalar_t>::type;
  using Op = at::opmath_type<scalar_t>;
  static_assert(std::is_same_v<Op, msda::opmath_t<T>>, "opmath types disagree");
  using Record = msda::ForwardPoint<Op>;

  const int vec = pick_vec(z.D, sizeof(T), {value.data_ptr()});
  const msda::Shape sh = make_shape<Record>(z, vec);
  const size_t smem = shared_bytes<Record>(sh);
  const unsigned grid = grid_size(sh, value.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_vec<16 / sizeof(T)>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    msda::ms_deform_attn_forward_kernel<T, VEC><<<grid, kThreads, smem, stream>>>(
        cuda_ptr<scalar_t>(value), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<Op>(),
        attention_weights.data_ptr<Op>(), cuda_ptr_mut<scalar_t>(output), sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                     const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                     const at::Tensor& attention_weights, const at::Tensor& grad_output,
                     at::Tensor& grad_value_acc, at::Tensor& grad_sampling_locations,
                     at::Tensor& grad_attention_weights, const Sizes& z) {
  using T = typename CudaType<scalar_t>::type;
  using Op = at::opmath_type<scalar_t>;
  static_assert(std::is_same_v<Op, msda::opmath_t<T>>, "opmath types disagree");
  using Record = msda::BackwardPoint<Op>;

  // grad_value_acc is a fresh opmath buffer, aligned for any VEC that divides D.
  const int vec = pick_vec(z.D, sizeof(T), {value.data_ptr(), grad_output.data_ptr()});
  const msda::Shape sh = make_shape<Record>(z, vec);
  const size_t smem = shared_bytes<Record>(sh);
  const unsigned grid = grid_size(sh, value.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_vec<16 / sizeof(T)>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    msda::ms_deform_attn_backward_kernel<T, VEC><<<grid, kThreads, smem, stream>>>(
        cuda_ptr<scalar_t>(value), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<Op>(),
        attention_weights.data_ptr<Op>(), cuda_ptr<scalar_t>(grad_output),
        grad_value_acc.data_ptr<Op>(), grad_sampling_locations.data_ptr<Op>(),
        grad_attention_weights.data_ptr<Op>(), sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Cheap checks of what these launchers rely on; bind.cpp's check_inputs() and
// the Python layer check the rest.
void check_cuda_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA): value must be a CUDA tensor");
  // The kernels read the level table on the device.
  TORCH_CHECK(spatial_shapes.device() == value.device() &&
                  level_start_index.device() == value.device(),
              "ms_deform_attn (CUDA): spatial_shapes and level_start_index must be on ",
              value.device());
  const auto opmath = at::toOpMathType(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == opmath &&
                  attention_weights.scalar_type() == opmath,
              "ms_deform_attn (CUDA): sampling_locations and attention_weights must be ",
              opmath, " for a ", value.scalar_type(), " value");
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  check_cuda_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes z = sizes_of(value, sampling_locations);

  // (N, Lq, M * D); the kernel writes every element, so no memset.
  at::Tensor output = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  if (output.numel() == 0) return output;
  if (z.S == 0 || z.L == 0 || z.K == 0) return output.zero_();  // nothing to sample
  check_index_limits(z);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
      "ms_deform_attn_cuda_forward", [&] {
        launch_forward<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, output, z);
      });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  check_cuda_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights);
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.is_contiguous(),
              "ms_deform_attn (CUDA): grad_output must be a contiguous ", value.scalar_type(),
              " tensor");
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes z = sizes_of(value, sampling_locations);
  const auto opmath = at::toOpMathType(value.scalar_type());

  // No points, no tokens or no channels: every gradient is exactly zero.
  if (z.N * z.Lq * z.M * z.L * z.K == 0 || z.S == 0 || z.D == 0) {
    return {at::zeros(value.sizes(), value.options()),
            at::zeros(sampling_locations.sizes(), sampling_locations.options()),
            at::zeros(attention_weights.sizes(), attention_weights.options())};
  }
  check_index_limits(z);

  // grad_value is scattered with atomics, so it accumulates in a zeroed
  // opmath buffer; the point gradients are written once each, so no memset.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(opmath));
  at::Tensor grad_sampling_locations =
      at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_attention_weights =
      at::empty(attention_weights.sizes(), attention_weights.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
      "ms_deform_attn_cuda_backward", [&] {
        launch_backward<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, grad_output, grad_value_acc,
                                  grad_sampling_locations, grad_attention_weights, z);
      });

  // A no-op for float and double; half and bfloat16 round once, at the end.
  at::Tensor grad_value = value.scalar_type() == opmath
                              ? grad_value_acc
                              : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace ddetr
