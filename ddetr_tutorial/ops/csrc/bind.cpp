// Registers one compiled backend with the dispatcher: checks inputs and dispatches,
// nothing else. The schemas of ddetr_tutorial::ms_deform_attn and
// ddetr_tutorial::ms_deform_attn_backward are defined once, in Python
// (ddetr_tutorial/ops/custom_op.py); this file adds their kernels for one device
// key. The loader compiles it into the CPU extension, and with -DDDETR_CUDA into
// the CUDA extension: two .so files, each registering its own key.
#include <Python.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "ms_deform_attn.h"

#ifdef DDETR_CUDA
#define DDETR_DISPATCH_KEY CUDA
#define DDETR_DEVICE at::kCUDA
#define DDETR_FORWARD ddetr::ms_deform_attn_cuda_forward
#define DDETR_BACKWARD ddetr::ms_deform_attn_cuda_backward
#define DDETR_DOC "Multi-scale deformable attention, CUDA kernel of torch.ops.ddetr_tutorial"
#else
#define DDETR_DISPATCH_KEY CPU
#define DDETR_DEVICE at::kCPU
#define DDETR_FORWARD ddetr::ms_deform_attn_cpu_forward
#define DDETR_BACKWARD ddetr::ms_deform_attn_cpu_backward
#define DDETR_DOC "Multi-scale deformable attention, C++ CPU kernel of torch.ops.ddetr_tutorial"
#endif

namespace {

// The kernels' contract (ms_deform_attn.h): every tensor contiguous, locations and
// weights in value's opmath type. The op also takes them in value's dtype.
struct KernelInputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
};

KernelInputs kernel_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index,
                           const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights) {
  ddetr::check_float_types(value, sampling_locations, attention_weights);
  const auto opmath = at::toOpMathType(value.scalar_type());
  KernelInputs k{value.contiguous(), spatial_shapes.contiguous(),
                 level_start_index.contiguous(), sampling_locations.to(opmath).contiguous(),
                 attention_weights.to(opmath).contiguous()};
  ddetr::check_inputs(k.value, k.spatial_shapes, k.level_start_index, k.sampling_locations,
                      k.attention_weights, DDETR_DEVICE);
  return k;
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  const KernelInputs k = kernel_inputs(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights);
  return DDETR_FORWARD(k.value, k.spatial_shapes, k.level_start_index, k.sampling_locations,
                       k.attention_weights);
}

// Gradients come back in the dtypes the inputs came in.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const KernelInputs k = kernel_inputs(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights);
  const at::Tensor grad = grad_output.contiguous();
  ddetr::check_grad_output(k.value, k.sampling_locations, grad);
  auto grads = DDETR_BACKWARD(k.value, k.spatial_shapes, k.level_start_index,
                              k.sampling_locations, k.attention_weights, grad);
  return {grads[0], grads[1].to(sampling_locations.scalar_type()),
          grads[2].to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr_tutorial, DDETR_DISPATCH_KEY, m) {
  m.impl("ms_deform_attn", &forward);
  m.impl("ms_deform_attn_backward", &backward);
}

// An empty Python module, so that torch.utils.cpp_extension.load can import the
// .so (which runs the registration above); the ops are reached via torch.ops.
#define DDETR_CONCAT_(a, b) a##b
#define DDETR_CONCAT(a, b) DDETR_CONCAT_(a, b)
#define DDETR_STRING_(a) #a
#define DDETR_STRING(a) DDETR_STRING_(a)

PyMODINIT_FUNC DDETR_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, DDETR_STRING(TORCH_EXTENSION_NAME),
                                      DDETR_DOC, -1, nullptr};
  return PyModule_Create(&module);
}
