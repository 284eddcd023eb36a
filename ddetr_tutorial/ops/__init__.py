"""Multi-scale deformable attention: reference, C++ CPU and CUDA backends.

The compiled backends run as one registered op, `torch.ops.ddetr_tutorial.ms_deform_attn`
(`custom_op.py`), built on first use by `loader.py`; `ms_deform_attn` validates and picks
the backend.
"""

from . import custom_op, loader
from .functions import BACKEND_CHOICES, check_inputs, level_tensors, ms_deform_attn, resolve_backend
from .loader import BuildError
from .reference import ms_deform_attn_loops, ms_deform_attn_pytorch

__all__ = [
    "BACKEND_CHOICES",
    "BuildError",
    "check_inputs",
    "custom_op",
    "level_tensors",
    "loader",
    "ms_deform_attn",
    "ms_deform_attn_loops",
    "ms_deform_attn_pytorch",
    "resolve_backend",
]
