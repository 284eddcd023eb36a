"""`torch.ops.ddetr_tutorial.ms_deform_attn`: the compiled kernels as one dispatcher op.

Two ops, their schemas defined here at import (this compiles nothing):
  ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights) -> output (N, Lq, M * D)
  ms_deform_attn_backward(..., grad_output) -> (grad_value, grad_sampling_locations,
                                                 grad_attention_weights)
The CPU and CUDA kernels are added by the extensions themselves (`TORCH_LIBRARY_IMPL`
in csrc/bind.cpp) when `loader.load_extension` imports them. Here: the fake
implementations (shapes only, for torch.compile, meta and fake tensors) and the
autograd formula, which calls the backward op. Inputs follow DESIGN.md's op
contract with int64 index tensors on value's device; locations and weights may be
float32 beside a float16/bfloat16 value, and their gradients keep their dtypes.
"""

from __future__ import annotations

import torch

NAMESPACE = "ddetr_tutorial"
FORWARD = f"{NAMESPACE}::ms_deform_attn"
BACKWARD = f"{NAMESPACE}::ms_deform_attn_backward"
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

_INPUTS = ("Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
           "Tensor sampling_locations, Tensor attention_weights")
torch.library.define(FORWARD, f"({_INPUTS}) -> Tensor")
torch.library.define(BACKWARD, f"({_INPUTS}, Tensor grad_output) -> (Tensor, Tensor, Tensor)")


def _check_ranks(value, sampling_locations, attention_weights):
    torch._check(value.dim() == 4, lambda: "value must be (N, S, M, D)")
    torch._check(sampling_locations.dim() == 6,
                 lambda: "sampling_locations must be (N, Lq, M, L, K, 2)")
    torch._check(attention_weights.dim() == 5,
                 lambda: "attention_weights must be (N, Lq, M, L, K)")


@torch.library.register_fake(FORWARD)
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
    """value (N, S, M, D), sampling_locations (N, Lq, M, L, K, 2) -> (N, Lq, M * D)."""
    _check_ranks(value, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


@torch.library.register_fake(BACKWARD)
def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, grad_output):
    """Gradients shaped, typed and placed like value, sampling_locations and
    attention_weights (contiguous, as the kernels write them)."""
    _check_ranks(value, sampling_locations, attention_weights)
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors)
    grad_value, grad_locations, grad_weights = torch.ops.ddetr_tutorial.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output)
    return grad_value, None, None, grad_locations, grad_weights


def _no_double_backward(ctx, *grads):
    raise RuntimeError("ms_deform_attn is differentiable once: its backward op has no "
                       "gradient (no double backward, as in the official op)")


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)
# Without an autograd kernel a double backward would only warn and give zeros.
torch.library.register_autograd(BACKWARD, _no_double_backward)


def registered_kernels(backend: str) -> list[str]:
    """The ops ('ddetr_tutorial::...') that have a kernel for `backend` ('cpu', 'cuda')."""
    key = DISPATCH_KEYS[backend]
    return [name for name in (FORWARD, BACKWARD)
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
