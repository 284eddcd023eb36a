// Multi-scale deformable attention, CUDA host launchers.
//
// Each entry point allocates its outputs, returns early on empty inputs, takes
// the launch geometry from ms_deform_attn_cuda_geometry.h (vector width VEC,
// group size TPG, point tile, grid) and launches one kernel of
// ms_deform_attn_cuda_kernel.cuh on the current stream of value's device. The
// mapping itself is described in that file.
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
#include "ms_deform_attn_cuda_geometry.h"
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

using msda::Sizes;

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

// Dynamic shared memory of a block, refused when over what a block may have.
template <typename Record>
size_t checked_shared_bytes(const msda::Shape& sh) {
  const size_t bytes = msda::shared_bytes<Record>(sh);
  TORCH_CHECK(bytes <= msda::kMaxSharedBytes, "ms_deform_attn (CUDA): L = ", sh.L,
              " levels need more shared memory than a block has");
  return bytes;
}

unsigned grid_size(const msda::Shape& sh, int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return msda::grid_blocks(sh, sm_count);
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

  const int vec = msda::pick_vec(z.D, sizeof(T), {value.data_ptr()});
  const msda::Shape sh = msda::make_shape<Record>(z, vec);
  const size_t smem = checked_shared_bytes<Record>(sh);
  const unsigned grid = grid_size(sh, value.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  msda::dispatch_vec<16 / sizeof(T)>(vec, [&](auto vec_c) {
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
  const int vec = msda::pick_vec(z.D, sizeof(T), {value.data_ptr(), grad_output.data_ptr()});
  const msda::Shape sh = msda::make_shape<Record>(z, vec);
  const size_t smem = checked_shared_bytes<Record>(sh);
  const unsigned grid = grid_size(sh, value.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  msda::dispatch_vec<16 / sizeof(T)>(vec, [&](auto vec_c) {
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
