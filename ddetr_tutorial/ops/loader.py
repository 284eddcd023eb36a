"""Lazy, cached JIT builds of the compiled backends (`cpu`, `cuda`).

Nothing is compiled at import. The first call that needs a backend builds it
with `torch.utils.cpp_extension.load` into
`$TORCH_EXTENSIONS_DIR/ddetr_msda_<backend>_<key>/`, where `key` hashes the
sources, their folder, the compiler flags and the torch, CUDA and Python
versions: a changed source or a new torch builds into a new folder, so a stale
build is never loaded. The folder counts because torch's build file names the
sources by absolute path: two checkouts sharing one build folder would rebuild
it each time the other had used it. A failed build is remembered for the
process and its compiler output is kept in `build.log` beside it.

Importing a built extension registers its kernels of
`torch.ops.ddetr_tutorial.ms_deform_attn` and `..._backward` with the
dispatcher (`TORCH_LIBRARY_IMPL` in csrc/bind.cpp; the schemas are defined in
`custom_op.py`): the CPU extension for the CPU key, the CUDA one for CUDA.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

from . import custom_op

CSRC = Path(__file__).resolve().parent / "csrc"
BACKENDS = ("cpu", "cuda")

SOURCES = {
    "cpu": ["bind.cpp", "ms_deform_attn_cpu.cpp"],
    "cuda": ["bind.cpp", "ms_deform_attn_cuda.cu"],
}
# Headers are not compiled on their own but change the build, so they are hashed too.
HEADERS = {
    "cpu": ["checks.h", "ms_deform_attn.h", "ms_deform_attn_math.h"],
    "cuda": ["checks.h", "ms_deform_attn.h", "ms_deform_attn_math.h",
             "ms_deform_attn_cuda_geometry.h", "ms_deform_attn_cuda_kernel.cuh"],
}

CFLAGS = {"cpu": ["-O3", "-fopenmp"], "cuda": ["-O3", "-DDDETR_CUDA"]}
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]
LDFLAGS = {"cpu": ["-fopenmp"], "cuda": []}


class BuildError(RuntimeError):
    """A compiled backend failed to build; `log_path` holds the compiler output."""

    def __init__(self, backend: str, cause: str, log_path: Path | None):
        self.backend, self.cause, self.log_path = backend, cause, log_path
        where = f"; full log: {log_path}" if log_path else ""
        super().__init__(f"the {backend} kernel of ms_deform_attn did not build: {cause}{where}")


_modules: dict[str, ModuleType] = {}
_failures: dict[str, BuildError] = {}


def extensions_root() -> Path:
    """Where builds go: `$TORCH_EXTENSIONS_DIR`, else torch's default cache folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root).expanduser()
    # Our folder names carry the full version key, so one folder serves all builds.
    return Path(cpp_extension.get_default_build_root())


def build_key(backend: str) -> str:
    """Hash of everything a build depends on (sources and where they are, flags,
    versions)."""
    h = hashlib.sha256()
    for name in SOURCES[backend] + HEADERS[backend]:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    parts = [str(CSRC.resolve()), torch.__version__, str(torch.version.cuda), sys.version,
             platform.machine(), repr(CFLAGS[backend]), repr(CUDA_CFLAGS), repr(LDFLAGS[backend]),
             os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    h.update("|".join(parts).encode())
    return h.hexdigest()[:16]


def build_directory(backend: str) -> Path:
    return extensions_root() / f"ddetr_msda_{backend}_{build_key(backend)}"


def is_loaded(backend: str) -> bool:
    return backend in _modules


def load_extension(backend: str) -> ModuleType:
    """Return the compiled module for `backend`, building it on first use; once it
    is loaded, torch.ops.ddetr_tutorial.ms_deform_attn runs on that device.

    Raises `BuildError` (remembered for this process) when it cannot be built.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown compiled backend {backend!r}; expected one of {BACKENDS}")
    if backend in _modules:
        return _modules[backend]
    if backend in _failures:
        raise _failures[backend]
    try:
        _modules[backend] = _build(backend)
    except BuildError as err:
        _failures[backend] = err
        raise
    return _modules[backend]


def _build(backend: str) -> ModuleType:
    if backend == "cuda" and torch.version.cuda is None:
        raise BuildError("cuda", f"this torch ({torch.__version__}) was built without CUDA", None)
    folder = build_directory(backend)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "build.log"
    try:
        module = cpp_extension.load(
            name=folder.name,
            sources=[str(CSRC / s) for s in SOURCES[backend]],
            # copies: load() appends to the lists it is given
            extra_cflags=list(CFLAGS[backend]),
            extra_cuda_cflags=list(CUDA_CFLAGS),
            extra_ldflags=list(LDFLAGS[backend]),
            extra_include_paths=[str(CSRC)],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as exc:  # compiler errors, missing toolchain, import errors
        text = f"{type(exc).__name__}: {exc}"
        log.write_text(text)
        raise BuildError(backend, _first_error_line(text), log) from exc
    missing = {custom_op.FORWARD, custom_op.BACKWARD} - set(custom_op.registered_kernels(backend))
    if missing:
        raise BuildError(backend, f"{module.__file__} registered no {backend} kernel for "
                         f"{', '.join(sorted(missing))}", None)
    return module


def _first_error_line(text: str) -> str:
    """The line of compiler output a user should read first."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.lower().startswith("runtimeerror: error building"):
            return ln[:300]
    return lines[0][:300] if lines else "unknown error"


def reset() -> None:
    """Forget loaded modules and remembered failures (for tests)."""
    _modules.clear()
    _failures.clear()
