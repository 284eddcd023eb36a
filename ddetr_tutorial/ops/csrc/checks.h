// Second-line checks shared by the CPU and CUDA bindings. The Python wrapper
// (ddetr_tutorial/ops/functions.py) validates inputs with messages that name
// the numbers; these keep a direct torch.ops call that breaks the contract from
// becoming a bad read.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace ddetr {

// Before the cast to opmath: locations and weights are value's dtype or its opmath type.
inline void check_float_types(const at::Tensor& value, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const auto dtype = value.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype) && !at::isComplexType(dtype),
              "ms_deform_attn: value must be a floating tensor, got ", dtype);
  const auto opmath = at::toOpMathType(dtype);
  for (const at::Tensor* t : {&sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->scalar_type() == dtype || t->scalar_type() == opmath,
                "ms_deform_attn: sampling_locations and attention_weights must be ", dtype,
                " or ", opmath, " for a ", dtype, " value, got ", t->scalar_type());
  }
}

// After the cast: the kernels' contract of ms_deform_attn.h.
inline void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights, at::DeviceType device) {
  const at::Tensor* all[] = {&value, &spatial_shapes, &level_start_index,
                             &sampling_locations, &attention_weights};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device().type() == device, "ms_deform_attn: expected ",
                device, " tensors, got one on ", t->device());
    TORCH_CHECK(t->device() == value.device(),
                "ms_deform_attn: all tensors must be on ", value.device());
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: inputs must be contiguous");
  }
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D)");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, K, 2)");
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be (N, Lq, M, L, K)");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
                  spatial_shapes.scalar_type() == at::kLong,
              "spatial_shapes must be (L, 2) int64");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.scalar_type() == at::kLong,
              "level_start_index must be (L,) int64");
  const int64_t N = value.size(0), M = value.size(2), L = spatial_shapes.size(0);
  TORCH_CHECK(sampling_locations.size(0) == N && sampling_locations.size(2) == M &&
                  sampling_locations.size(3) == L && level_start_index.size(0) == L,
              "ms_deform_attn: N, M or L disagree between inputs");
  for (int d = 0; d < 5; ++d) {
    TORCH_CHECK(attention_weights.size(d) == sampling_locations.size(d),
                "attention_weights must match sampling_locations[..., 0]");
  }
  const auto opmath = at::toOpMathType(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == opmath &&
                  attention_weights.scalar_type() == opmath,
              "sampling_locations and attention_weights must be ", opmath,
              " for a ", value.scalar_type(), " value");
}

inline void check_grad_output(const at::Tensor& value, const at::Tensor& sampling_locations,
                              const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.dim() == 3 &&
                  grad_output.size(0) == value.size(0) &&
                  grad_output.size(1) == sampling_locations.size(1) &&
                  grad_output.size(2) == value.size(2) * value.size(3) &&
                  grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "grad_output must be a contiguous (N, Lq, M * D) tensor like value");
}

}  // namespace ddetr
