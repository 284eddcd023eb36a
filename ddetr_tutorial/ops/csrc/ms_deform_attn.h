// Multi-scale deformable attention: the compiled backends' entry points.
//
// Shapes (DESIGN.md letters):
//   value               (N, S, M, D)           T
//   spatial_shapes      (L, 2) int64, rows (H_l, W_l), on value's device
//   level_start_index   (L,)   int64, on value's device
//   sampling_locations  (N, Lq, M, L, K, 2)    opmath_t, normalized (x, y)
//   attention_weights   (N, Lq, M, L, K)       opmath_t
//   output              (N, Lq, M * D)         T
// opmath_t is double for double and float otherwise (float, half, bfloat16).
// Bilinear sampling with align_corners=False and zero padding, as
// F.grid_sample on 2 * loc - 1.
//
// The Python wrapper validates shapes, dtypes and devices; bind.cpp, which
// registers these as the kernels of torch.ops.ddetr_tutorial.ms_deform_attn(_backward),
// makes every tensor contiguous, casts locations and weights to opmath_t and runs
// the second-line checks of checks.h before it calls them.
#pragma once

#include <ATen/ATen.h>
#include <vector>

namespace ddetr {

// Returns the output (N, Lq, M * D).
at::Tensor ms_deform_attn_cpu_forward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Returns {grad_value (value's dtype), grad_sampling_locations,
// grad_attention_weights (both opmath_t)}.
std::vector<at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output);

at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output);

}  // namespace ddetr
