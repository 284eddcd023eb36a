"""`ms_deform_attn`: input validation, backend choice, and the call into the op.

Backends, one contract (see DESIGN.md, "The op contract"):
  pytorch  the `grid_sample` reference (`reference.py`), runs anywhere
  cpu      the C++ kernel, float32/float64 CPU tensors
  cuda     the CUDA kernel, float32/float64/float16/bfloat16 CUDA tensors
  auto     the compiled kernel for the tensors' device when it builds, else
           pytorch with one warning. `DDETR_BACKEND` overrides it, and
           `DDETR_STRICT=1` makes a failed build raise instead of falling back.

The compiled backends run as one registered op,
`torch.ops.ddetr_tutorial.ms_deform_attn` (`custom_op.py`: schema, fake and
autograd; the kernels register themselves when the loader imports them), so
`torch.compile(fullgraph=True)` traces it. While compiling, the backend is
chosen once, when the graph is traced, and the checks that read index values
(`.tolist()`) are skipped; the shape, dtype and device checks still run.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence

import torch

from . import custom_op, loader  # noqa: F401  custom_op defines torch.ops.ddetr_tutorial.*
from .reference import ms_deform_attn_pytorch

BACKEND_CHOICES = ("auto", "pytorch", "cpu", "cuda")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": _FLOATS}
_warned: set[str] = set()


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend: str = "auto"):
    """Multi-scale deformable attention, the core of the paper's Eq. 3.

    value: (N, S, M, D); spatial_shapes: (L, 2) int64/int32 rows (H_l, W_l);
    level_start_index: (L,); sampling_locations: (N, Lq, M, L, K, 2)
    normalized (x, y), [0, 1] inside the map; attention_weights:
    (N, Lq, M, L, K), already softmaxed over L*K. Returns (N, Lq, M * D).
    Bad input raises ValueError/TypeError naming the numbers.
    """
    spatial_shapes, level_start_index = check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    backend = _resolve(backend, value.device.type, value.dtype)
    if backend == "pytorch":
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights)
    return torch.ops.ddetr_tutorial.ms_deform_attn(value, spatial_shapes, level_start_index,
                                                   sampling_locations, attention_weights)


# --------------------------------------------------------------------------- validation

def _shape(t):
    return tuple(t.shape)


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights):
    """Validate the op's inputs; return (spatial_shapes, level_start_index) as
    int64 tensors on value's device.

    Types, shapes, dtypes and devices are checked always; the index values (levels
    at least 1x1, S tokens, level starts) only in eager mode, from the host copy of
    `level_tensors` when there is one, else by reading them with `.tolist()`.
    """
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations",
             "attention_weights")
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")

    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {_shape(value)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (N, Lq, M, L, K, 2), got shape "
                         f"{_shape(sampling_locations)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights has shape {_shape(attention_weights)} but "
                         f"sampling_locations {_shape(sampling_locations)} needs "
                         f"{_shape(sampling_locations)[:-1]} (N, Lq, M, L, K)")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) rows (H, W), got shape "
                         f"{_shape(spatial_shapes)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")

    _check_dtypes(value, sampling_locations, attention_weights)
    _check_devices(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights)

    N, S, M, D = value.shape
    _, Lq, M_loc, L, K, _ = sampling_locations.shape
    if sampling_locations.shape[0] != N:
        raise ValueError(f"value has batch N={N} but sampling_locations has "
                         f"N={sampling_locations.shape[0]}")
    if M_loc != M:
        raise ValueError(f"value has M={M} heads but sampling_locations has M={M_loc}")
    if spatial_shapes.shape[0] != L:
        raise ValueError(f"sampling_locations has L={L} levels but spatial_shapes has "
                         f"{spatial_shapes.shape[0]} rows")
    if level_start_index.shape != (L,):
        raise ValueError(f"level_start_index must have shape ({L},) for L={L} levels, got "
                         f"{_shape(level_start_index)}")
    for letter, size in (("M", M), ("D", D), ("L", L), ("K", K)):
        if size == 0:
            raise ValueError(f"{letter} must be at least 1, got 0 (value {_shape(value)}, "
                             f"sampling_locations {_shape(sampling_locations)})")

    if not torch.compiler.is_compiling():  # reading values would break the graph
        _check_levels(S, spatial_shapes, level_start_index)
    device = value.device
    return (spatial_shapes.to(device=device, dtype=torch.int64),
            level_start_index.to(device=device, dtype=torch.int64))


def _check_levels(S, spatial_shapes, level_start_index):
    """Every level at least 1x1, S tokens in all, level_start_index their prefix sums.

    Reads the values: from the host copy of `level_tensors`, else by `.tolist()`.
    """
    known = _known_levels(spatial_shapes, level_start_index)
    if known is not None:  # built by level_tensors from host ints: no device read
        shapes = list(known)
    else:
        shapes = [tuple(int(s) for s in row) for row in spatial_shapes.tolist()]
    levels = ", ".join(f"({h}, {w})" for h, w in shapes)
    for lvl, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise ValueError(f"level {lvl} has size ({h}, {w}); every level needs H, W >= 1 "
                             f"(levels {levels})")
    tokens = sum(h * w for h, w in shapes)
    if tokens != S:
        raise ValueError(f"value has {S} tokens but spatial_shapes sum to {tokens} "
                         f"(levels {levels})")
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    given = starts if known is not None else [int(s) for s in level_start_index.tolist()]
    if given != starts:
        raise ValueError(f"level_start_index is {given} but spatial_shapes {levels} start "
                         f"their levels at {starts}")


# --------------------------------------------------------------------------- host-side levels

# id(spatial_shapes) -> (weakref to it, weakref to level_start_index, both
# tensors' versions, the (H, W) rows). Tensors made by level_tensors carry their
# values on the host, so validating them reads nothing back from the device.
_host_levels: dict[int, tuple] = {}


def level_tensors(shapes: Sequence[tuple[int, int]], device=None):
    """(H_l, W_l) rows known on the host -> (spatial_shapes (L, 2), level_start_index (L,))
    int64 tensors on `device`.

    The op remembers these two tensors' values (until either is changed in place or
    freed), so the layers of one forward that share them validate without a `.tolist()`
    device sync: the transformer builds them once per forward from its feature maps.
    """
    rows = [(int(h), int(w)) for h, w in shapes]
    for lvl, (h, w) in enumerate(rows):
        if h < 1 or w < 1:
            raise ValueError(f"level {lvl} has size ({h}, {w}); every level needs H, W >= 1 "
                             f"(levels {rows})")
    starts = [0]
    for h, w in rows[:-1]:
        starts.append(starts[-1] + h * w)
    spatial_shapes = torch.tensor(rows, dtype=torch.int64, device=device).view(len(rows), 2)
    level_start_index = torch.tensor(starts, dtype=torch.int64, device=device)
    if torch.compiler.is_compiling():  # a traced graph keeps no host state; the op
        return spatial_shapes, level_start_index  # skips value checks while compiling
    key = id(spatial_shapes)
    _host_levels[key] = (weakref.ref(spatial_shapes, lambda _: _host_levels.pop(key, None)),
                         weakref.ref(level_start_index), spatial_shapes._version,
                         level_start_index._version, tuple(rows))
    return spatial_shapes, level_start_index


def _known_levels(spatial_shapes, level_start_index):
    """The host copy of the rows when both tensors came from `level_tensors` unchanged."""
    entry = _host_levels.get(id(spatial_shapes))
    if entry is None:
        return None
    shapes_ref, starts_ref, shapes_version, starts_version, rows = entry
    if (shapes_ref() is not spatial_shapes or starts_ref() is not level_start_index
            or spatial_shapes._version != shapes_version
            or level_start_index._version != starts_version):
        return None
    return rows


def _check_dtypes(value, sampling_locations, attention_weights):
    if value.dtype not in _FLOATS:
        raise TypeError(f"value must be float16, bfloat16, float32 or float64, got {value.dtype}")
    # Locations and weights match value, or stay float32 beside a half-precision
    # value (keeps sub-pixel precision, as the CUDA kernel computes in float32).
    allowed = {value.dtype}
    if value.dtype in (torch.float16, torch.bfloat16):
        allowed.add(torch.float32)
    for name, t in (("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if t.dtype not in allowed:
            expected = " or ".join(sorted(str(d) for d in allowed))
            raise TypeError(f"{name} is {t.dtype} but value is {value.dtype}; "
                            f"expected {expected}")


def _check_devices(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    for name, t in (("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device != value.device and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device} but value is on {value.device} "
                             "(index tensors may also be on the CPU)")


# --------------------------------------------------------------------------- backends

def _strict() -> bool:
    return os.environ.get("DDETR_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


def _warn_no_kernel(device_type: str, dtype: torch.dtype) -> None:
    """One warning per (device, dtype) that `auto` has no compiled kernel to run."""
    key = f"{device_type}:{dtype}"
    if key in _warned:
        return
    _warned.add(key)
    if device_type in _KERNEL_DTYPES:
        takes = ", ".join(str(d) for d in _KERNEL_DTYPES[device_type])
        why = f"the {device_type} kernel takes {takes}, not {dtype}"
    else:
        why = f"there is no compiled kernel for {device_type} tensors"
    warnings.warn(f"ms_deform_attn(backend='auto'): {why}; using the pytorch reference",
                  RuntimeWarning, stacklevel=5)


def resolve_backend(backend: str, value: torch.Tensor) -> str:
    """The backend that will run for `value`: 'pytorch', 'cpu' or 'cuda'."""
    return _resolve(backend, value.device.type, value.dtype)


# torch.compile runs this once, when it traces, and keeps the answer as a constant:
# the env variables, the build and its warning are trace-time decisions, like a
# module's settings.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, dtype: torch.dtype) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("DDETR_BACKEND", "").strip().lower() or "auto"
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"DDETR_BACKEND must be one of {BACKEND_CHOICES}, "
                             f"got {os.environ['DDETR_BACKEND']!r}")
    if backend == "pytorch":
        return backend
    if backend == "auto":
        if device_type not in _KERNEL_DTYPES or dtype not in _KERNEL_DTYPES[device_type]:
            _warn_no_kernel(device_type, dtype)  # the reference is the path, said once
            return "pytorch"
        try:
            loader.load_extension(device_type)
        except loader.BuildError as err:
            if _strict():
                raise
            if device_type not in _warned:
                _warned.add(device_type)
                warnings.warn(f"{err}. Falling back to the pytorch reference (set "
                              "DDETR_STRICT=1 to raise instead).", RuntimeWarning, stacklevel=4)
            return "pytorch"
        return device_type
    # An explicit compiled backend: wrong device or dtype is the caller's error.
    if device_type != backend:
        raise ValueError(f"backend={backend!r} needs {backend.upper()} tensors, but value is "
                         f"on {device_type}")
    if dtype not in _KERNEL_DTYPES[backend]:
        supported = ", ".join(str(d) for d in _KERNEL_DTYPES[backend])
        raise TypeError(f"backend={backend!r} supports {supported}, got {dtype}")
    loader.load_extension(backend)  # registers the kernel of torch.ops.ddetr_tutorial
    return backend
