"""Lazy, cached JIT builds of the compiled backends (`cpu`, `cuda`).

Nothing is compiled at import. The first call that needs a backend builds it
with `torch.utils.cpp_extension.load` into
`$TORCH_EXTENSIONS_DIR/ddetr_msda_<backend>_<key>/`, where `key` hashes the
sources, their folder, the compiler flags and the torch, CUDA and Python
versions: a changed source or a new torch builds into a new folder, so a stale
build is never loaded. The folder counts because torch's build file names the
sources by absolute path: two checkouts sharing one build folder would rebuild
it each time the other had used it. A failed build is remembered for the
process and its compiler output is kept in `build.log` beside it (when the
folder is writable; an unwritable one is a `BuildError` naming it).

Builds are guarded against what a killed one leaves behind. Every builder first
takes `build.flock` in the folder with `fcntl.flock` (the kernel drops it when
its owner dies), waiting at most `DDETR_BUILD_WAIT` seconds. Holding it, no live
builder can hold torch's own `lock` file, so a leftover one is stale and is
removed (torch would wait on it forever). A built library is loaded only when
it matches `stamp.json` (its name, size and sha256, written after a successful
load); otherwise, e.g. truncated, it is deleted and relinked, never mapped.

Importing a built extension registers its kernels of
`torch.ops.ddetr_tutorial.ms_deform_attn` and `..._backward` with the
dispatcher (`TORCH_LIBRARY_IMPL` in csrc/bind.cpp; the schemas are defined in
`custom_op.py`): the CPU extension for the CPU key, the CUDA one for CUDA.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # Windows has no fcntl: builds there go unguarded, as in torch
    fcntl = None

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

FLOCK_NAME, TORCH_LOCK_NAME, STAMP_NAME = "build.flock", "lock", "stamp.json"
# Long enough for a CUDA build for several architectures by another process.
DEFAULT_BUILD_WAIT_S = 1800.0


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
    with _build_lock(backend, folder):
        try:
            _remove_stale_torch_lock(folder)
            _discard_unverified_library(folder)
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
            _write_stamp(folder, Path(module.__file__))
        except Exception as exc:  # compiler errors, missing toolchain, import errors
            text = f"{type(exc).__name__}: {exc}"
            raise BuildError(backend, _first_error_line(text), _write_log(folder, text)) from exc
    missing = {custom_op.FORWARD, custom_op.BACKWARD} - set(custom_op.registered_kernels(backend))
    if missing:
        raise BuildError(backend, f"{module.__file__} registered no {backend} kernel for "
                         f"{', '.join(sorted(missing))}", None)
    return module


def _write_log(folder: Path, text: str) -> Path | None:
    """Keep the compiler output in `folder/build.log`; None when it cannot be written."""
    log = folder / "build.log"
    try:
        log.write_text(text)
    except OSError:
        return None
    return log


def _build_wait_s() -> float:
    raw = os.environ.get("DDETR_BUILD_WAIT", "").strip()
    if not raw:
        return DEFAULT_BUILD_WAIT_S
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not wait > 0:
        raise ValueError(f"DDETR_BUILD_WAIT must be a positive number of seconds, got {raw!r}")
    return wait


@contextmanager
def _build_lock(backend: str, folder: Path):
    """Create `folder` and hold `folder/build.flock` exclusively, waiting at most
    `DDETR_BUILD_WAIT` s for another live builder; the kernel releases the flock if
    this process dies. An uncreatable folder is a `BuildError` naming it."""
    wait = _build_wait_s()
    path = folder / FLOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # O_CREAT without O_TRUNC: an existing file is left untouched (mtime included).
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BuildError(backend, f"cannot write the build folder {folder} ({exc.strerror}); "
                         "set TORCH_EXTENSIONS_DIR to a writable folder", None) from exc
    try:
        deadline = time.monotonic() + wait
        while fcntl is not None and not _try_flock(fd):
            if time.monotonic() > deadline:
                raise BuildError(backend, f"another process has been building in {folder} "
                                 f"for over {wait:.0f} s (it holds {path}; raise "
                                 "DDETR_BUILD_WAIT to wait longer)", None)
            time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove_stale_torch_lock(folder: Path) -> None:
    """Delete torch's `lock` file: with build.flock held no live builder owns it, so a
    build killed mid-compile left it, and torch's load() would wait on it forever."""
    lock = folder / TORCH_LOCK_NAME
    if fcntl is None or not lock.exists():
        return
    lock.unlink()
    warnings.warn(f"removed the stale build lock {lock}, left by a build that was killed",
                  RuntimeWarning, stacklevel=2)


def _library_record(library: Path) -> dict:
    """What identifies a built library: its name, size and sha256."""
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    return {"file": library.name, "size": library.stat().st_size, "sha256": digest}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _discard_unverified_library(folder: Path) -> None:
    """Delete each built library that does not match `stamp.json` (truncated by a
    killed link or a full disk, or built before stamps): mapping a truncated shared
    object kills the process with SIGBUS; without it torch relinks it."""
    stamp = _read_stamp(folder)
    for library in folder.glob(f"{folder.name}*{cpp_extension.LIB_EXT}"):
        if stamp is None or stamp.get("file") != library.name or \
                _library_record(library) != stamp:
            library.unlink()


def _write_stamp(folder: Path, library: Path) -> None:
    """Record the library just loaded (rewritten only when it changed, so a reused
    build leaves the folder untouched)."""
    record = _library_record(library)
    if _read_stamp(folder) != record:
        tmp = folder / (STAMP_NAME + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / STAMP_NAME)


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
