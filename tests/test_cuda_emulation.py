"""The CUDA kernels execute in CI, without a GPU, through a host emulation.

tests/cuda_emulation/ compiles the unmodified kernels of
ms_deform_attn_cuda_kernel.cuh with g++ on a shim of the CUDA built-ins (one
OS thread per CUDA thread, shared memory, __syncthreads, warp shuffles,
atomics, vector and 16-bit float types), under AddressSanitizer and
UndefinedBehaviorSanitizer, and launches them with the launcher's own geometry
code. Every case runs forward and backward in fp32, fp64, fp16 and bf16, and
is checked against the float64 grid_sample reference and its autograd. An
extra line of defence: the real-GPU tests in test_ms_deform_attn.py stay.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest
import torch

from cuda_emulation import harness
from ddetr_tutorial.ops import loader, ms_deform_attn_pytorch
from msda_inputs import SHAPES, make_inputs

pytestmark = pytest.mark.skipif(harness.CXX is None, reason="g++ is not installed")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Of max |reference|: fp16 / bf16 values and grad_value are rounded once, at
# the end; locations and weights stay in fp32 (the opmath type).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
             torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Case:
    shapes: tuple
    N: int = 2
    Lq: int = 5
    M: int = 2
    D: int = 8
    K: int = 3
    value_offset: int = 0  # a value view that starts this many elements into its buffer
    grad_offset: int = 0
    nonfinite: bool = False  # NaN / Inf locations and weights, planted below
    sm_count: int = 132


FOUR = tuple(SHAPES["four_levels"])
CASES = {
    "four_levels": Case(FOUR, D=32),
    "with_1x1_level": Case(tuple(SHAPES["with_1x1"]), D=16),
    "only_1x1_level": Case(((1, 1),), D=4, K=2),
    "D3": Case(tuple(SHAPES["non_square"]), D=3),
    "D5": Case(FOUR, M=1, D=5),
    "D6": Case(tuple(SHAPES["with_1x1"]), D=6),
    # Wider than one chunk of VEC * 32 channels for every dtype.
    "D264_chunks": Case(((4, 5), (2, 3)), N=1, Lq=3, D=264, K=2),
    # L * K larger than one shared-memory tile of point records.
    "D1_many_tiles": Case(FOUR, Lq=3, D=1, K=4),
    "D3_two_tiles": Case(FOUR, N=1, Lq=3, D=3, K=6),
    "outside_and_nonfinite": Case(tuple(SHAPES["non_square"]), D=8, nonfinite=True),
    "nonfinite_two_tiles": Case(FOUR, N=1, Lq=3, D=3, K=6, nonfinite=True),
    # More blocks than the grid of one multiprocessor: the block-stride loop.
    "grid_stride": Case(((3, 4),), N=1, Lq=130, D=256, K=1, sm_count=1),
    "misaligned_value": Case(FOUR, D=32, value_offset=1),
    "misaligned_grad_output": Case(tuple(SHAPES["with_1x1"]), D=16, grad_offset=2),
    "batch3_heads4": Case(tuple(SHAPES["non_square"]), N=3, M=4, D=16),
    "empty_batch": Case(tuple(SHAPES["with_1x1"]), N=0, D=4),
    "empty_queries": Case(tuple(SHAPES["with_1x1"]), Lq=0, D=4),
}


def make_case(case: Case, dtype: torch.dtype, seed: int = 0) -> harness.Inputs:
    """The case's inputs in `dtype` (locations and weights in its opmath type)."""
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    value, ss, starts, loc, attn = make_inputs(list(case.shapes), N=max(case.N, 1),
                                               Lq=max(case.Lq, 1), M=case.M, D=case.D,
                                               K=case.K, seed=seed)
    value, loc, attn = value[:case.N], loc[:case.N, :case.Lq], attn[:case.N, :case.Lq]
    if case.nonfinite:
        loc, attn = plant_nonfinite(loc.clone(), attn.clone(), case.shapes)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(case.N, case.Lq, case.M * case.D, generator=g, dtype=torch.float64)
    return harness.Inputs(value.to(dtype), ss, starts, loc.to(opmath), attn.to(opmath),
                          grad_out.to(dtype), case.value_offset, case.grad_offset,
                          case.sm_count)


def plant_nonfinite(loc, attn, shapes):
    """NaN and +-Inf in x or y of some points, NaN weights on others, +Inf
    weights on points off the map (finite ones there must still add 0).

    +-Inf weights inside the map are left out: the CUDA kernel folds the weight
    into the bilinear weights, so there its NaN / Inf pattern can differ from
    the reference's (test_ms_deform_attn.CUDA_KNOWN).
    """
    points = loc.view(-1, 2)
    points[5::13, 0] = float("nan")
    points[6::17, 1] = float("nan")
    points[7::19, 0] = float("inf")
    points[8::23, 1] = -float("inf")
    points[9::29] = float("nan")
    attn.view(-1)[4::11] = float("nan")
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=loc.dtype)  # (L, 2)
    pixels = loc * sizes[:, None] - 0.5  # (N, Lq, M, L, K, 2)
    off = ((pixels <= -1) | (pixels >= sizes[:, None])).any(-1) & loc.isfinite().all(-1)
    weights = attn.clone()
    weights[off] = float("inf")
    keep = torch.zeros_like(off)
    keep.view(-1)[::3] = True
    return loc, torch.where(off & keep, weights, attn)


def reference(x: harness.Inputs):
    """Forward and gradients of the float64 grid_sample reference on x's numbers,
    NaN / Inf included (torch's CPU grid_sample gives NaN samples for them)."""
    value, loc, attn = (t.double().requires_grad_() for t in (x.value, x.locations, x.weights))
    out = ms_deform_attn_pytorch(value, x.spatial_shapes, x.level_start_index, loc, attn)
    out.backward(x.grad_out.double())
    return out.detach(), value.grad, loc.grad, attn.grad


def mismatches(x: harness.Inputs, got: harness.Outputs) -> list[str]:
    """What of got differs from the reference beyond the dtype's tolerance."""
    tol = TOLERANCE[x.value.dtype]
    found = []
    for name, actual, expected in zip(("output", "grad_value", "grad_locations",
                                       "grad_weights"),
                                      (got.out, got.grad_value, got.grad_loc, got.grad_attn),
                                      reference(x)):
        if actual.shape != expected.shape:
            found.append(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            continue
        if expected.numel() == 0:
            continue
        actual = actual.double()
        # Non-finite exactly where the reference is, the same NaN / +-Inf.
        special = ~expected.isfinite()
        same = (actual[special] == expected[special]) | (actual[special].isnan()
                                                         & expected[special].isnan())
        if not same.all():
            found.append(f"{name}: {int((~same).sum())} of {int(special.sum())} NaN / Inf "
                         "of the reference differ")
        if (~special).sum() == 0:
            continue
        finite = ~special
        err = (actual[finite] - expected[finite]).abs().max()  # NaN (unwritten) fails
        scale = expected[finite].abs().max().clamp_min(1e-12)
        if not err <= tol * scale:
            found.append(f"{name}: max error {err:.3g} vs max |reference| {scale:.3g}")
    return found


def run_cases(exe, cases: dict[str, harness.Inputs], workdir):
    result = harness.run(exe, cases, workdir)
    assert result.returncode == 0, (result.stdout[-2000:] + result.stderr[-6000:])
    return {name: harness.read_outputs(workdir / name, x) for name, x in cases.items()}


ALL = {f"{name}-{harness.DTYPE_NAMES[dtype]}": (case, dtype)
       for name, case in CASES.items() for dtype in DTYPES}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Every case in every dtype, run once on the sanitized driver."""
    exe = harness.build()
    inputs = {key: make_case(case, dtype) for key, (case, dtype) in ALL.items()}
    return inputs, run_cases(exe, inputs, tmp_path_factory.mktemp("emulation"))


@pytest.mark.parametrize("key", list(ALL))
def test_kernels_match_reference(sweep, key):
    inputs, outputs = sweep
    assert mismatches(inputs[key], outputs[key]) == []


def test_cases_reach_every_kernel_path(sweep):
    """The case list exercises what it claims: each vector width, several
    channel chunks, several tiles, the block-stride loop, the misaligned views."""
    _, outputs = sweep
    geometry = [g for out in outputs.values() for g in out.geometry.values()]
    assert {g["vec"] for g in geometry} == {1, 2, 4, 8}
    assert any(g["n_chunks"] > 1 for g in geometry)
    assert any(g["n_tiles"] > 1 for g in geometry)
    assert any(g["grid"] < g["n_blocks"] for g in geometry)
    assert outputs["misaligned_value-float"].geometry["forward"]["vec"] == 1
    misaligned_grad = outputs["misaligned_grad_output-float"].geometry
    assert misaligned_grad["forward"]["vec"] == 4 and misaligned_grad["backward"]["vec"] == 2
    for name in ("D264_chunks", "D1_many_tiles", "D3_two_tiles", "grid_stride"):
        for dtype in DTYPES:
            g = outputs[f"{name}-{harness.DTYPE_NAMES[dtype]}"].geometry
            key = {"D264_chunks": "n_chunks", "grid_stride": "n_blocks"}.get(name, "n_tiles")
            limit = {"grid_stride": g["forward"]["grid"]}.get(name, 1)
            assert g["backward"][key] > limit, (name, dtype, g)
    # Empty inputs return before any launch, as the launcher does.
    assert outputs["empty_batch-float"].geometry == {}


def test_vector_atomics_path(tmp_path):
    """grad_value's float2 / float4 atomics (sm_90+), off in host builds."""
    exe = harness.build("vector_atomics", defines=("DDETR_EMU_FLOAT_ONLY",
                                                   "DDETR_VECTOR_ATOMICS=1"))
    names = ["four_levels", "D6", "D264_chunks", "misaligned_grad_output"]
    inputs = {n: make_case(CASES[n], torch.float32) for n in names}
    outputs = run_cases(exe, inputs, tmp_path)
    for n in names:
        assert mismatches(inputs[n], outputs[n]) == [], n
    assert {outputs[n].geometry["backward"]["vec"] for n in names} >= {2, 4}


# Planted bugs: a copy of the kernel sources with one edit must be caught,
# by the comparison ("mismatch") or by a sanitizer ("sanitizer").
FILL = "fill_tile(recs, levels, sampling_locations, attention_weights, item0, p0, sh);"
KERNEL = "ms_deform_attn_cuda_kernel.cuh"
MUTANTS = {
    # A butterfly that skips its first step sums only half of each group.
    "broken_reduction": (KERNEL, "for (int offset = tpg >> 1; offset > 0; offset >>= 1)",
                         "for (int offset = tpg >> 2; offset > 0; offset >>= 1)", "mismatch"),
    # The point index forgets the tile offset: wrong only from the second tile on.
    "tile_index": (KERNEL, "const int64_t pi = item * sh.LK + p0 + p;",
                   "const int64_t pi = item * sh.LK + p;", "mismatch"),
    # Forward reads the point records before every thread has written its share.
    "missing_barrier": (KERNEL, FILL + "\n          __syncthreads();\n        }",
                        FILL + "\n        }", "sanitizer"),
    # Vector width chosen from D alone: 16-byte loads from a misaligned view.
    "ignores_alignment": ("ms_deform_attn_cuda_geometry.h", "(D % vec != 0 || !aligned(vec))",
                          "(D % vec != 0)", "sanitizer"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_planted_bug_is_caught(tmp_path, mutant):
    file, before, after, caught_by = MUTANTS[mutant]
    mutant_dir = tmp_path / "csrc"
    mutant_dir.mkdir()
    for name in harness.KERNEL_FILES:
        source = (loader.CSRC / name).read_text()
        if name == file:
            assert source.count(before) == 1, f"{file} no longer contains {before!r}"
            source = source.replace(before, after)
        (mutant_dir / name).write_text(source)
    exe = harness.build(f"mutant_{mutant}", defines=("DDETR_EMU_FLOAT_ONLY",),
                        kernel_dir=mutant_dir)
    names = ("four_levels", "D3_two_tiles", "misaligned_value")
    inputs = {n: make_case(CASES[n], torch.float32) for n in names}
    result = harness.run(exe, inputs, tmp_path / "run")
    if caught_by == "sanitizer":
        assert result.returncode != 0, "the sanitized driver ran the mutant to the end"
        assert "AddressSanitizer" in result.stderr or "runtime error" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-4000:]
        found = [harness.read_outputs(tmp_path / "run" / n, x) for n, x in inputs.items()]
        assert any(mismatches(x, out) for x, out in zip(inputs.values(), found))


def test_half_and_bfloat16_conversions_match_torch(tmp_path):
    """The shim's fp16 / bf16 conversions are torch's, bit for bit."""
    exe = harness.build()
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, float("inf"),
                             -float("inf"), 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-30,
                             1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8])
    floats = torch.cat([specials, -specials, torch.randn(20000, generator=g) * 100,
                        torch.randn(20000, generator=g) * 1e-5,
                        torch.empty(20000).uniform_(-7e4, 7e4, generator=g)])
    floats.numpy().tofile(tmp_path / "floats.bin")
    result = subprocess.run([str(exe), "--conversions", str(tmp_path)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **harness.SANITIZER_ENV})
    assert result.returncode == 0, result.stderr[-4000:]
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for name, dtype in (("half", torch.float16), ("bf16", torch.bfloat16)):
        got = torch.from_file(str(tmp_path / f"from_{name}.bin"), size=65536, dtype=torch.float32)
        torch.testing.assert_close(got, bits.view(dtype).float(), rtol=0, atol=0,
                                   equal_nan=True)
        got = torch.from_file(str(tmp_path / f"to_{name}.bin"), size=len(floats),
                              dtype=torch.int16)
        assert torch.equal(got, floats.to(dtype).view(torch.int16)), name
