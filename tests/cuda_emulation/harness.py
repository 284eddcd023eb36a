"""TEST TOOL, not a backend: build the CUDA emulation driver and run cases on it.

`build()` compiles driver.cpp (the unmodified kernels of
ms_deform_attn_cuda_kernel.cuh on the shim of cuda_shim.h) with g++ into
`$TORCH_EXTENSIONS_DIR/ddetr_msda_emulation_<flavour>_<key>/`, keyed like the
op's own builds on the sources, flags and compiler. `run()` writes each case's
inputs to a folder, runs every case in one process and reads the outputs back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from ddetr_tutorial.ops import loader

HERE = Path(__file__).resolve().parent
CXX = shutil.which("g++")
KERNEL_FILES = ["ms_deform_attn_cuda_kernel.cuh", "ms_deform_attn_cuda_geometry.h",
                "ms_deform_attn_math.h"]
FLAGS = ["-std=c++20", "-O0", "-g", "-pthread", "-fno-strict-aliasing", "-Wall",
         "-Wno-unknown-pragmas"]
SANITIZERS = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
              "-fno-omit-frame-pointer"]
# Leak checking needs ptrace-like rights that containers often lack.
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
DTYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "half",
               torch.bfloat16: "bfloat16"}


def _key(files: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    h.update("|".join([*flags, version, str(HERE)]).encode())
    return h.hexdigest()[:16]


def build(flavour: str = "sanitized", sanitize: bool = True, defines: tuple[str, ...] = (),
          kernel_dir: Path | None = None) -> Path:
    """Path of the driver binary, compiled on first use and cached.

    `defines` are -D macros (e.g. "DDETR_EMU_FLOAT_ONLY"); `kernel_dir`, when
    given, holds the KERNEL_FILES to use instead of the library's csrc/ ones.
    """
    flags = FLAGS + (SANITIZERS if sanitize else []) + [f"-D{d}" for d in defines]
    kernel_dir = kernel_dir or loader.CSRC
    files = sorted(HERE.rglob("*.h")) + [HERE / "driver.cpp"]
    files += [kernel_dir / n for n in KERNEL_FILES]
    folder = loader.extensions_root() / f"ddetr_msda_emulation_{flavour}_{_key(files, flags)}"
    exe = folder / "msda_emu"
    if exe.exists():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"msda_emu.{os.getpid()}.tmp"
    command = [CXX, *flags, f"-I{HERE / 'include'}", f"-I{kernel_dir}",
               str(HERE / "driver.cpp"), "-o", str(tmp)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        (folder / "build.log").write_text(result.stderr)
        raise RuntimeError(f"the CUDA emulation driver did not build:\n{result.stderr[-4000:]}")
    os.replace(tmp, exe)
    return exe


@dataclass
class Inputs:
    """One case's tensors as the op takes them (value and grad_out in dtype,
    locations and weights in its opmath type), and the driver's options."""

    value: torch.Tensor             # (N, S, M, D)
    spatial_shapes: torch.Tensor    # (L, 2) int64
    level_start_index: torch.Tensor  # (L,) int64
    locations: torch.Tensor         # (N, Lq, M, L, K, 2)
    weights: torch.Tensor           # (N, Lq, M, L, K)
    grad_out: torch.Tensor          # (N, Lq, M * D)
    value_offset: int = 0           # elements before value's first one in its buffer
    grad_offset: int = 0
    sm_count: int = 132             # multiprocessors of the emulated device (an H100's)


@dataclass
class Outputs:
    out: torch.Tensor
    grad_value: torch.Tensor
    grad_loc: torch.Tensor
    grad_attn: torch.Tensor
    geometry: dict[str, dict[str, int]]  # pass -> {"vec": ..., "tpg": ..., ...}


def _write(t: torch.Tensor, path: Path) -> None:
    t = t.contiguous()
    raw = t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t
    raw.numpy().tofile(path)


def _read(path: Path, like: torch.Tensor) -> torch.Tensor:
    data = bytearray(path.read_bytes())
    flat = torch.frombuffer(data, dtype=like.dtype) if data else torch.empty(0, dtype=like.dtype)
    return flat.view(like.shape)


def write_case(folder: Path, x: Inputs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    N, S, M, D = x.value.shape
    _, Lq, _, L, K = x.weights.shape
    (folder / "case.txt").write_text(
        f"dtype {DTYPE_NAMES[x.value.dtype]}\nsizes {N} {S} {M} {D} {Lq} {L} {K}\n"
        f"value_offset {x.value_offset}\ngrad_offset {x.grad_offset}\nsm_count {x.sm_count}\n")
    for name, t in (("value", x.value), ("shapes", x.spatial_shapes),
                    ("starts", x.level_start_index), ("loc", x.locations),
                    ("attn", x.weights), ("grad_out", x.grad_out)):
        _write(t, folder / f"{name}.bin")


def read_outputs(folder: Path, x: Inputs) -> Outputs:
    N, S, M, D = x.value.shape
    geometry = {}
    for line in (folder / "geometry.txt").read_text().splitlines():
        words = line.split()
        geometry[words[0]] = {k: int(v) for k, v in zip(words[1::2], words[2::2])}
    return Outputs(_read(folder / "out.bin", x.grad_out), _read(folder / "grad_value.bin", x.value),
                   _read(folder / "grad_loc.bin", x.locations),
                   _read(folder / "grad_attn.bin", x.weights), geometry)


def run(exe: Path, cases: dict[str, Inputs], workdir: Path,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs every case in one driver process; outputs stay in workdir/<name>/."""
    for name, x in cases.items():
        write_case(workdir / name, x)
    env = {**os.environ, **SANITIZER_ENV}
    return subprocess.run([str(exe), *(str(workdir / n) for n in cases)], capture_output=True,
                          text=True, timeout=timeout, env=env)
