"""Multi-scale deformable attention: reference, C++ CPU and CUDA backends."""

from .functions import (BACKEND_CHOICES, check_inputs, level_tensors, ms_deform_attn,
                        resolve_backend)
from .loader import BuildError
from .reference import ms_deform_attn_loops, ms_deform_attn_pytorch

__all__ = [
    "BACKEND_CHOICES",
    "BuildError",
    "check_inputs",
    "level_tensors",
    "ms_deform_attn",
    "ms_deform_attn_loops",
    "ms_deform_attn_pytorch",
    "resolve_backend",
]
