"""Benchmark three pieces of a CPU training step, each against the way it was done before.

  matching   HungarianMatcher's per-image costs (targets padded to the longest
             list) vs every query of the batch against every target, then each
             image's block (the official code's way): the shipped tiny model's
             shapes, 16 images of 1-12 objects, for the two-stage encoder
             proposals (Q = 193 at 96 px) and the decoder queries (Q = 30)
  max-pool   the ResNet stem's 3x3/2 max-pool, forward + backward, on NCHW vs
             channels-last memory (16 x 32 x 48 x 48, a 96-px batch at width 32)
  reseed     the data loader's per-sample reseeding: torch.manual_seed (which also
             queues a seed for every GPU backend) vs the CPU generator alone

Medians over --repeats, after a warm-up, with their ratios, written as JSON with
the machine they ran on.

    python benchmarks/bench_train_parts.py     # -> benchmarks/results/train_parts_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402
from ddetr_tutorial.matcher import HungarianMatcher  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matching_problem(num_queries: int, batch: int = 16, num_classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(batch, num_queries, num_classes, generator=g),
               "pred_boxes": torch.rand(batch, num_queries, 4, generator=g) * 0.5 + 0.1}
    targets = []
    for _ in range(batch):
        t = int(torch.randint(1, 13, (1,), generator=g))
        targets.append({"labels": torch.randint(0, num_classes, (t,), generator=g),
                        "boxes": torch.rand(t, 4, generator=g) * 0.5 + 0.1})
    return outputs, targets


def match_all_pairs(matcher, outputs, targets):
    """The previous way: the (N*Q, T_total) cost of the whole batch, then the diagonal blocks."""
    N, Q = outputs["pred_logits"].shape[:2]
    sizes = [len(t["labels"]) for t in targets]
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], targets)
    blocks = cost.view(N, Q, -1).split(sizes, dim=-1)
    return [linear_sum_assignment(blocks[i][i].numpy()) for i in range(N)]


def bench_matching(repeats: int) -> list[dict]:
    matcher, rows = HungarianMatcher(), []
    for name, q in (("encoder proposals", 193), ("decoder queries", 30)):
        outputs, targets = matching_problem(q)
        per_image = [x.tolist() for pair in matcher(outputs, targets) for x in pair]
        all_pairs = [x.tolist() for pair in match_all_pairs(matcher, outputs, targets)
                     for x in pair]
        same = per_image == all_pairs
        new = median_seconds(lambda: matcher(outputs, targets), repeats)
        old = median_seconds(lambda: match_all_pairs(matcher, outputs, targets), repeats)
        rows.append({"piece": "matching", "case": f"{name}, N=16, Q={q}",
                     "before_ms": 1e3 * old, "after_ms": 1e3 * new, "speedup": old / new,
                     "same_assignment": same})
    return rows


def bench_maxpool(repeats: int) -> dict:
    pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
    x = torch.randn(16, 32, 48, 48)

    def step(channels_last):
        leaf = x.clone().requires_grad_()
        inp = leaf.contiguous(memory_format=torch.channels_last) if channels_last else leaf
        out = pool(inp).contiguous()
        out.backward(torch.ones_like(out))
        return out, leaf.grad

    (a, ga), (b, gb) = step(False), step(True)
    old = median_seconds(lambda: step(False), repeats)
    new = median_seconds(lambda: step(True), repeats)
    return {"piece": "max-pool", "case": "16x32x48x48, forward + backward",
            "before_ms": 1e3 * old, "after_ms": 1e3 * new, "speedup": old / new,
            "identical": bool(torch.equal(a, b) and torch.equal(ga, gb))}


def bench_reseed(repeats: int) -> dict:
    def reseed(fn, n=200):
        return lambda: [fn(i) for i in range(n)]
    old = median_seconds(reseed(torch.manual_seed), repeats) / 200
    new = median_seconds(reseed(torch.default_generator.manual_seed), repeats) / 200
    return {"piece": "reseed", "case": "one sample's torch reseed",
            "before_ms": 1e3 * old, "after_ms": 1e3 * new, "speedup": old / new}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "train_parts_cpu.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    rows = bench_matching(args.repeats) + [bench_maxpool(args.repeats), bench_reseed(args.repeats)]
    for r in rows:
        print(f"{r['piece']:9s} {r['case']:42s} {r['before_ms']:8.3f} ms -> {r['after_ms']:8.3f} ms"
              f"  x{r['speedup']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
