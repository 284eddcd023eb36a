"""The cost of validating ms_deform_attn's index tensors in every attention layer, in one run.

Every call of the op checks spatial_shapes and level_start_index. Built by
`ops.level_tensors` from host ints, they are checked from the host copy; any other
pair is read back with `.tolist()`, a device sync on a GPU. This times the tiny
model's training step (forward, loss, backward, AdamW step) both ways:
  per_layer  every layer reads the index tensors (`_known_levels` forced to None)
  once       the transformer builds them once per forward, the layers read nothing
The two models are identical and their steps alternate, so load on the machine
falls on both alike. Also counted: index reads (`.tolist()` of the two tensors)
per step.

    python benchmarks/bench_validation.py       # writes benchmarks/results/validation_sync.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_model import synthetic_batch  # noqa: E402
from common import machine  # noqa: E402
from ddetr_tutorial.config import build_model, get_config  # noqa: E402
from ddetr_tutorial.losses import total_loss  # noqa: E402
from ddetr_tutorial.ops import functions  # noqa: E402

MODES = ("per_layer", "once")


@contextlib.contextmanager
def validation(mode, counts):
    """Run the op's index checks as `mode`; counts[mode] += 1 per index read."""
    known_levels = functions._known_levels

    def counted(spatial_shapes, level_start_index):
        rows = None if mode == "per_layer" else known_levels(spatial_shapes, level_start_index)
        if rows is None:
            counts[mode] += 1  # check_inputs now reads both tensors with .tolist()
        return rows

    functions._known_levels = counted
    try:
        yield
    finally:
        functions._known_levels = known_levels


def make_step(cfg, device, images, mask, targets):
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = total_loss(criterion(model(images, mask), targets), criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def timed_step(step, mode, counts, cuda):
    with validation(mode, counts):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="op backend (default auto)")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "validation_sync.json")
    args = parser.parse_args(argv)

    cfg = get_config("tiny", op_backend=args.backend)
    images, mask, targets = synthetic_batch(args.batch, *args.size, args.device)
    steps = {mode: make_step(cfg, args.device, images, mask, targets) for mode in MODES}
    cuda = args.device.startswith("cuda")
    counts = dict.fromkeys(MODES, 0)
    for _ in range(args.warmup):
        for mode in MODES:
            timed_step(steps[mode], mode, counts, cuda)
    counts = dict.fromkeys(MODES, 0)
    times = {mode: [] for mode in MODES}
    for _ in range(args.steps):
        for mode in MODES:
            times[mode].append(timed_step(steps[mode], mode, counts, cuda))

    results = [{"validation": mode, "train_step_s": statistics.median(times[mode]),
                "index_reads_per_step": counts[mode] / args.steps, "times_s": times[mode]}
               for mode in MODES]
    per_layer, once = (r["train_step_s"] for r in results)
    report = {"machine": machine(), "config": "tiny", "op_backend": args.backend,
              "device": args.device, "image_size": args.size, "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup, "results": results,
              "step_time_ratio_per_layer_over_once": per_layer / once}
    for r in results:
        print(f"{r['validation']:9s} step {r['train_step_s'] * 1e3:7.1f} ms (median), "
              f"{r['index_reads_per_step']:.0f} index reads per step")
    print(f"per_layer / once: {report['step_time_ratio_per_layer_over_once']:.3f}")
    if results[1]["index_reads_per_step"]:
        print("note: the 'once' path still read the index tensors: the transformer does not "
              "build them with ops.level_tensors yet", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
