"""Each DETR-family member's cost at its `tiny` size, in one run, as ratios to Deformable
DETR: parameters, a training step (forward, loss, backward, AdamW step; batch 16,
96-px images) and inference per image (batch 1, eval, no grad), on this machine.

    python benchmarks/family_cost.py --threads 2   # -> benchmarks/results/family_cost_cpu.json

Members are timed in turn, `--rounds` times round-robin, each round `--repeats` steps,
and the median step is kept, so a slow spell of the machine touches them all alike.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import synthetic_batch  # noqa: E402
from common import machine  # noqa: E402
from convergence import DETR  # noqa: E402
from ddetr_tutorial.config import build_model, get_config  # noqa: E402
from ddetr_tutorial.losses import total_loss  # noqa: E402

# The original DETR as benchmarks/convergence.py trains it: softmax + no-object, one map.
DETR_ORIGINAL = {**DETR, "with_box_refine": False, "two_stage": False}
MEMBERS = {  # name in the results -> tiny preset (and overrides)
    "deformable_detr": ("tiny_pretrained", {"with_box_refine": False, "two_stage": False}),
    "deformable_detr_refine": ("tiny_pretrained", {"two_stage": False}),
    "deformable_detr_two_stage": ("tiny_pretrained", {}),
    "detr": ("tiny_pretrained", DETR_ORIGINAL),
    "detr_dc5": ("tiny_pretrained", {**DETR_ORIGINAL, "dilation": True}),
    "conditional_detr": ("tiny_conditional_detr", {}),
    "anchor_detr": ("tiny_anchor_detr", {}),
    "efficient_detr": ("tiny_efficient_detr", {}),
    "sparse_rcnn": ("tiny_sparse_rcnn", {}),
    "dynamic_detr": ("tiny_dynamic_detr", {}),
    "dn_deformable_detr": ("tiny_dn_deformable_detr", {}),
    "h_deformable_detr": ("tiny_h_deformable_detr", {}),
}
BASE = "deformable_detr"


def build(name, image_size=96):
    preset, overrides = MEMBERS[name]
    torch.manual_seed(0)
    model, criterion, _ = build_model(get_config(preset, image_size=image_size, **overrides))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, criterion, torch.optim.AdamW(params, lr=1e-4)


def train_step(model, criterion, optimizer, batch):
    images, mask, targets = batch
    model.train()
    extra = {"targets": targets} if getattr(model, "uses_targets", False) else {}
    loss = total_loss(criterion(model(images, mask, **extra), targets), criterion.weight_dict)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@torch.no_grad()
def infer(model, image):
    model.eval()
    model(*image)


def clock(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", choices=list(MEMBERS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "family_cost_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or list(MEMBERS)
    if BASE not in names:
        names = [BASE, *names]
    batch = synthetic_batch(args.batch, args.size, args.size, "cpu")
    image = synthetic_batch(1, args.size, args.size, "cpu", seed=1)[:2]
    built = {name: build(name, args.size) for name in names}
    steps = {name: [] for name in names}
    infers = {name: [] for name in names}
    for name in names:  # warm-up: first calls build kernels and caches
        train_step(*built[name], batch)
        infer(built[name][0], image)
    for _ in range(args.rounds):
        for name in names:
            model, criterion, optimizer = built[name]
            steps[name] += clock(lambda: train_step(model, criterion, optimizer, batch),
                                 args.repeats)
            infers[name] += clock(lambda: infer(model, image), args.repeats)
    rows = {}
    for name in names:
        model = built[name][0]
        rows[name] = {"preset": MEMBERS[name][0], "overrides": MEMBERS[name][1],
                      "params": sum(q.numel() for q in model.parameters()),
                      "step_ms": round(1000 * statistics.median(steps[name]), 1),
                      "infer_ms": round(1000 * statistics.median(infers[name]), 2)}
    base = rows[BASE]
    for row in rows.values():
        row["params_ratio"] = round(row["params"] / base["params"], 3)
        row["step_ratio"] = round(row["step_ms"] / base["step_ms"], 3)
        row["infer_ratio"] = round(row["infer_ms"] / base["infer_ms"], 3)
    result = {"benchmark": "family_cost", "batch": args.batch, "image_size": args.size,
              "rounds": args.rounds, "repeats": args.repeats, "baseline": BASE,
              "machine": machine(), "members": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'member':<28}{'params':>10}{'x':>7}{'step ms':>10}{'x':>7}{'infer ms':>10}{'x':>7}")
    for name, r in rows.items():
        print(f"{name:<28}{r['params']:>10}{r['params_ratio']:>7.2f}{r['step_ms']:>10.1f}"
              f"{r['step_ratio']:>7.2f}{r['infer_ms']:>10.2f}{r['infer_ratio']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
