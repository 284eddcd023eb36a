"""Benchmark roi_align: the grid_sample and ms_deform_attn backends against each other.

Sparse R-CNN's tiny size: N=2 images of 256x256, C=64, FPN levels 32x32, 16x16, 8x8,
4x4 (strides 8..64), 30 boxes per image, 7x7 bins, sampling ratio 2, aligned. Each box
is pooled on one level, Mask R-CNN's rule on our strides: level = floor(log2(sqrt(wh) /
32)) clamped to the four levels. Times are medians over --repeats runs after a warm-up,
the backends taking turns, forward and forward+backward (w.r.t. the features), float32;
the loop reference is timed once, forward only. Results go to JSON with the machine and
the ratios of one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_roi_align.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402
from ddetr_tutorial.ops import resolve_backend  # noqa: E402
from ddetr_tutorial.roi_align import BACKENDS, roi_align, roi_align_reference  # noqa: E402

N, C, IMAGE, BOXES, POOL, RATIO = 2, 64, 256, 30, 7, 2
LEVELS = [(32, 32), (16, 16), (8, 8), (4, 4)]


def make_inputs(seed: int = 0, dtype=torch.float32):
    """Features per level (N, C, H_l, W_l) and, per level, its boxes (K_l, 5) in pixels."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(N, C, h, w, generator=g, dtype=dtype) for h, w in LEVELS]
    ctr = torch.rand(N * BOXES, 2, generator=g) * IMAGE
    size = 2 ** (torch.rand(N * BOXES, 2, generator=g) * 5 + 3)  # 8 .. 256 pixels
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], 1).clamp(0, IMAGE)
    batch = torch.arange(N).repeat_interleave(BOXES)[:, None].float()
    rois = torch.cat([batch, boxes], 1).to(dtype)
    wh = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(torch.log2(wh.clamp(min=1).sqrt() / 32)).clamp(0, len(LEVELS) - 1).long()
    return feats, [rois[level == lvl] for lvl in range(len(LEVELS))]


def pool(fn, feats, rois_per_level, **kw):
    """Sparse R-CNN's multi-scale pooling: each level's boxes on its map, stride 8 * 2^l."""
    return [fn(f, r, POOL, 1.0 / (8 * 2 ** lvl), RATIO, True, **kw)
            for lvl, (f, r) in enumerate(zip(feats, rois_per_level)) if len(r)]


def time_interleaved(steps: dict, repeats: int) -> dict:
    """Median seconds of each step; the steps take turns, so a shared machine's load
    drifts over all of them alike and their ratios hold within one run."""
    for step in steps.values():
        step()  # warm-up (and, for ms_deform_attn, the kernel build)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(repeats: int) -> dict:
    feats, rois = make_inputs()

    def forward(backend):
        with torch.no_grad():
            pool(roi_align, feats, rois, backend=backend)

    def forward_backward(backend):
        leaves = [f.detach().requires_grad_(True) for f in feats]
        sum(o.sum() for o in pool(roi_align, leaves, rois, backend=backend)).backward()

    steps = {(b, name): (lambda b=b, fn=fn: fn(b)) for b in BACKENDS
             for name, fn in (("forward_ms", forward), ("forward_backward_ms", forward_backward))}
    medians = time_interleaved(steps, repeats)
    results = {b: {name: 1e3 * medians[(b, name)] for name in ("forward_ms", "forward_backward_ms")}
               for b in BACKENDS}
    t = time.perf_counter()
    pool(roi_align_reference, feats, rois)
    results["reference"] = {"forward_ms": 1e3 * (time.perf_counter() - t)}
    base = results["grid_sample"]
    ratios = {f"ms_deform_attn / grid_sample {k}": results["ms_deform_attn"][k] / base[k]
              for k in base}
    ratios["reference / grid_sample forward_ms"] = results["reference"]["forward_ms"] / base[
        "forward_ms"]
    return {"machine": machine(),
            "config": {"N": N, "C": C, "image": IMAGE, "boxes_per_image": BOXES,
                       "levels": LEVELS, "boxes_per_level": [len(r) for r in rois],
                       "output": POOL, "sampling_ratio": RATIO, "dtype": "float32",
                       "repeats": repeats, "timing": "median, backends interleaved",
                       "ms_deform_attn_kernel": resolve_backend("auto", feats[0])},
            "results": results, "ratios": {k: round(v, 3) for k, v in ratios.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/roi_align_cpu.json")
    args = parser.parse_args(argv)
    report = run(args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"results": report["results"], "ratios": report["ratios"]}, indent=1))


if __name__ == "__main__":
    main()
