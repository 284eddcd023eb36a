"""Benchmark the whole detector with each ms_deform_attn backend, in one run.

CPU (always): the `tiny` config on small images: inference time per image
(batch 1, eval, no grad) and training step time (forward, loss, backward,
AdamW step) for every op backend that runs here, and their ratios to the
pytorch reference.
GPU (when present): also the paper config (ResNet-50, 6+6 layers, 300
queries) at 800x1333, batch 1, in images/s: the official repository reports
15 FPS on a V100 for Deformable DETR.

    python benchmarks/bench_model.py                 # writes benchmarks/results/model_<host>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402
from ddetr_tutorial.config import build_model, get_config  # noqa: E402
from ddetr_tutorial.losses import total_loss  # noqa: E402
from ddetr_tutorial.ops import BuildError, loader  # noqa: E402


def synthetic_batch(n, height, width, device, seed=0):
    """Random images with a few random boxes each (timing only needs valid shapes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, height, width, generator=g).to(device)
    mask = torch.zeros(n, height, width, dtype=torch.bool, device=device)
    targets = []
    for _ in range(n):
        k = 5
        centres = 0.2 + 0.6 * torch.rand(k, 2, generator=g)
        sizes = 0.05 + 0.2 * torch.rand(k, 2, generator=g)
        targets.append({"labels": torch.randint(0, 4, (k,), generator=g).to(device),
                        "boxes": torch.cat([centres, sizes], 1).to(device)})
    return images, mask, targets


def timed(fn, repeats, cuda):
    """Median seconds of fn() over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config, backend, device, size, batch, repeats, train=True):
    torch.manual_seed(0)
    cfg = get_config(config, op_backend=backend)
    model, criterion, _ = build_model(cfg)
    model.to(device)
    cuda = device == "cuda"
    images, mask, targets = synthetic_batch(batch, *size, device)

    model.eval()

    def infer():
        with torch.no_grad():
            model(images[:1], mask[:1])

    result = {"config": config, "backend": backend, "device": device,
              "image_size": list(size), "infer_s_per_image": timed(infer, repeats, cuda)}
    result["images_per_s"] = 1.0 / result["infer_s_per_image"]
    if train:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss = total_loss(criterion(model(images, mask), targets), criterion.weight_dict)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        result["batch"] = batch
        result["train_step_s"] = timed(step, repeats, cuda)
    return result


def runnable_backends(device):
    backends = ["pytorch"]
    try:
        loader.load_extension(device)
        backends.append(device)
    except BuildError as err:
        print(f"skipping the {device} kernel: {err}", file=sys.stderr)
    return backends


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                        help="tiny-config image size (default 256 256)")
    parser.add_argument("--batch", type=int, default=2, help="training batch (default 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_grad_enabled(True)
    results = []
    for backend in runnable_backends("cpu"):
        results.append(measure("tiny", backend, "cpu", tuple(args.size), args.batch, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    if torch.cuda.is_available():
        for backend in runnable_backends("cuda"):
            results.append(measure("tiny", backend, "cuda", tuple(args.size), args.batch,
                                   args.repeats))
            print(json.dumps(results[-1]), flush=True)
            results.append(measure("paper", backend, "cuda", (800, 1333), 1, args.repeats,
                                   train=False))
            print(json.dumps(results[-1]), flush=True)

    ratios = []
    for r in results:
        ref = next((x for x in results if x["backend"] == "pytorch" and x["device"] == r["device"]
                    and x["config"] == r["config"]), None)
        if ref is None or r is ref:
            continue
        row = {"config": r["config"], "device": r["device"], "backend": r["backend"],
               "inference_speedup_vs_pytorch": ref["infer_s_per_image"] / r["infer_s_per_image"]}
        if "train_step_s" in r:
            row["train_step_speedup_vs_pytorch"] = ref["train_step_s"] / r["train_step_s"]
        ratios.append(row)
        print(json.dumps(row))
    out = args.out or ROOT / "benchmarks" / "results" / f"model_{platform.node() or 'machine'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "results": results, "ratios": ratios},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
