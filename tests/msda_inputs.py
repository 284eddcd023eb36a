"""Random inputs for the ms_deform_attn tests (imported by the test files)."""

from __future__ import annotations

import pytest
import torch

SHAPES = {
    "one_level": [(8, 8)],
    "four_levels": [(16, 16), (8, 8), (4, 4), (2, 2)],
    "non_square": [(6, 10), (3, 5)],
    "with_1x1": [(5, 7), (3, 4), (1, 1)],
}


def level_start_index(shapes):
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return torch.tensor(starts, dtype=torch.int64)


def make_inputs(shapes, N=2, Lq=5, M=2, D=8, K=3, dtype=torch.float64, device="cpu",
                seed=0, away_from_edges=False):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights.

    Pixel positions fall in [-2, size + 1], so some points are inside, some
    straddle the border and some lie entirely outside the map; a few are set to
    exactly 0 and 1. With `away_from_edges`, every sampling coordinate keeps at
    least 0.1 px from a pixel edge, where the bilinear gradient jumps.
    """
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    # (L, 1, 2) (W, H)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None]
    if away_from_edges:
        # Coordinates i + f with i integer in [-2, size] and f in [0.1, 0.9].
        cells = torch.rand(N, Lq, M, L, K, 2, generator=g, dtype=torch.float64)
        whole = torch.floor(cells * (sizes + 3)) - 2
        frac = 0.1 + 0.8 * torch.rand(N, Lq, M, L, K, 2, generator=g, dtype=torch.float64)
        locations = (whole + frac + 0.5) / sizes
    else:
        pixels = torch.rand(N, Lq, M, L, K, 2, generator=g, dtype=torch.float64)
        locations = (pixels * (sizes + 3) - 2) / sizes
        flat = locations.view(-1)
        flat[::7] = 0.0
        flat[3::11] = 1.0
    logits = torch.randn(N, Lq, M, L * K, generator=g, dtype=torch.float64)
    weights = logits.softmax(-1).view(N, Lq, M, L, K)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    return [t.to(device) for t in (value.to(dtype), spatial_shapes, level_start_index(shapes),
                                   locations.to(dtype), weights.to(dtype))]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The compiled backends under test: cpu always (a build failure must fail the
# tests, not skip them), cuda when a GPU is present.
COMPILED = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"
