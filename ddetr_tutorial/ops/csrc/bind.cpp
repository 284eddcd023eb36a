// Python binding of one compiled backend: checks inputs and dispatches, nothing else.
// The loader compiles this file into the CPU extension, and with -DDDETR_CUDA
// into the CUDA extension.
#include <torch/extension.h>

#include "checks.h"
#include "ms_deform_attn.h"

#ifdef DDETR_CUDA
#define DDETR_DEVICE at::kCUDA
#define DDETR_FORWARD ddetr::ms_deform_attn_cuda_forward
#define DDETR_BACKWARD ddetr::ms_deform_attn_cuda_backward
#define DDETR_DOC "Multi-scale deformable attention, CUDA kernel"
#else
#define DDETR_DEVICE at::kCPU
#define DDETR_FORWARD ddetr::ms_deform_attn_cpu_forward
#define DDETR_BACKWARD ddetr::ms_deform_attn_cpu_backward
#define DDETR_DOC "Multi-scale deformable attention, C++ CPU kernel"
#endif

namespace {

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  ddetr::check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights, DDETR_DEVICE);
  return DDETR_FORWARD(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights,
                                 const at::Tensor& grad_output) {
  ddetr::check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights, DDETR_DEVICE);
  ddetr::check_grad_output(value, sampling_locations, grad_output);
  return DDETR_BACKWARD(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights, grad_output);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = DDETR_DOC;
  m.def("forward", &forward, "forward -> output (N, Lq, M*D)");
  m.def("backward", &backward,
        "backward -> [grad_value, grad_sampling_locations, grad_attention_weights]");
}
