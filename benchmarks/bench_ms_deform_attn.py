"""Benchmark ms_deform_attn: time and peak memory of every available backend.

Configs (DESIGN.md letters; M=8 heads, D=32 channels per head, K=4 points):
  tiny     N=2, levels 32x32, 16x16, 8x8, 4x4 of a 256x256 image (1,360 tokens), Lq=S
  encoder  N=2, levels 100x167, 50x84, 25x42, 13x21 of 800x1333 (22,223 tokens), Lq=S
  decoder  the same levels, Lq=300

Each (config, backend, device, dtype, pass) runs in a fresh subprocess. Peak
memory is measured on the second run (after a warm-up): on CPU the rise of the
process's RSS high-water mark (reset through /proc/self/clear_refs) over its
RSS before the run, on CUDA torch.cuda.max_memory_allocated over the inputs.
Times are medians over --repeats runs after a warm-up. Results go to a JSON
file with the machine they ran on, plus ratios against the pytorch reference.

    python benchmarks/bench_ms_deform_attn.py                      # all configs
    python benchmarks/bench_ms_deform_attn.py --configs tiny --figure out/bench.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402
from ddetr_tutorial.ops import loader, ms_deform_attn  # noqa: E402

LEVELS = {
    "tiny": [(32, 32), (16, 16), (8, 8), (4, 4)],
    "standard": [(100, 167), (50, 84), (25, 42), (13, 21)],
}
CONFIGS = {  # name: (levels, Lq or None for Lq = S)
    "tiny": ("tiny", None),
    "encoder": ("standard", None),
    "decoder": ("standard", 300),
}
N, M, D, K = 2, 8, 32, 4
# Peak HBM bandwidth in bytes/s, for the floor of the forward pass.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def make_inputs(config: str, device: str, dtype: torch.dtype, seed: int = 0):
    levels, lq = CONFIGS[config]
    shapes = LEVELS[levels]
    S = sum(h * w for h, w in shapes)
    Lq = lq or S
    L = len(shapes)
    g = torch.Generator(device=device).manual_seed(seed)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(N, S, M, D, device=device, dtype=dtype, generator=g)
    # Locations spread over the map and a little beyond, as trained models do.
    loc = torch.rand(N, Lq, M, L, K, 2, device=device, dtype=opmath, generator=g)
    loc.mul_(1.1).sub_(0.05)
    attn = torch.rand(N, Lq, M, L, K, device=device, dtype=opmath, generator=g)
    attn.div_(attn.sum((-1, -2), keepdim=True))
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    starts = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    return value, spatial_shapes, starts, loc, attn


def forward_bytes(value, loc, attn) -> int:
    """Compulsory memory traffic of the forward pass: read the inputs, write the output."""
    out = value.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    return value.nbytes + loc.nbytes + attn.nbytes + out


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(config: str, backend: str, device: str, dtype_name: str, mode: str,
           repeats: int) -> dict:
    """One measurement, in its own process."""
    dtype = getattr(torch, dtype_name)
    value, ss, starts, loc, attn = make_inputs(config, device, dtype)
    grad = mode == "fwd+bwd"
    for t in (value, loc, attn):
        t.requires_grad_(grad)
    if backend != "pytorch":
        loader.load_extension(backend)
    grad_out = None

    def step():
        nonlocal grad_out
        if grad:
            out = ms_deform_attn(value, ss, starts, loc, attn, backend=backend)
            if grad_out is None:
                grad_out = torch.randn_like(out)
            torch.autograd.backward(out, grad_out)
            value.grad = loc.grad = attn.grad = None
        else:
            with torch.no_grad():
                ms_deform_attn(value, ss, starts, loc, attn, backend=backend)

    cuda = device == "cuda"
    step()  # warm-up: one-time allocations (thread pools, caches) are not the op's
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss()
        reset_peak_rss()
    step()  # the peak-memory run
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    result = {"config": config, "backend": backend, "device": device, "dtype": dtype_name,
              "pass": mode, "median_ms": 1e3 * statistics.median(times),
              "min_ms": 1e3 * min(times), "repeats": repeats,
              "peak_memory_mb": max(peak, 0) / 2**20,
              "N": N, "S": value.shape[1], "Lq": loc.shape[1], "M": M, "D": D, "K": K,
              "L": loc.shape[3]}
    if cuda and mode == "forward":
        name = torch.cuda.get_device_name()
        bandwidth = next((bw for key, bw in HBM_BANDWIDTH.items() if key in name), None)
        moved = forward_bytes(value, loc, attn)
        result["forward_bytes_mb"] = moved / 1e6
        result["achieved_gb_per_s"] = moved / (result["median_ms"] / 1e3) / 1e9
        if bandwidth:
            result["hbm_floor_us"] = moved / bandwidth * 1e6
            result["x_of_hbm_floor"] = result["median_ms"] * 1e3 / result["hbm_floor_us"]
    return result


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def plan(configs, backends, devices):
    """(config, backend, device, dtype, pass) to measure: on each device its
    compiled kernel beside the pytorch reference; bfloat16 too on CUDA."""
    for config in configs:
        for device in devices:
            for backend in ("pytorch", device):
                if backend not in backends:
                    continue
                for dtype in ["float32"] + (["bfloat16"] if device == "cuda" else []):
                    for mode in ("forward", "fwd+bwd"):
                        yield config, backend, device, dtype, mode


def run_one(config, backend, device, dtype, mode, repeats) -> dict:
    if backend != "pytorch":
        try:
            loader.load_extension(backend)  # build once here, not in every worker
        except loader.BuildError as err:
            return {"config": config, "backend": backend, "device": device, "dtype": dtype,
                    "pass": mode, "error": str(err)}
    command = [sys.executable, __file__, "--worker", config, backend, device, dtype, mode,
               "--repeats", str(repeats)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"config": config, "backend": backend, "device": device, "dtype": dtype,
                "pass": mode, "error": lines[-1] if lines else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(results: list[dict]) -> list[dict]:
    """Speed-up and memory ratio of each compiled backend against pytorch, same run."""
    index = {(r["config"], r["backend"], r["device"], r["dtype"], r["pass"]): r
             for r in results if "error" not in r}
    rows = []
    for (config, backend, device, dtype, mode), r in index.items():
        ref = index.get((config, "pytorch", device, dtype, mode))
        if backend == "pytorch" or ref is None:
            continue
        rows.append({"config": config, "backend": backend, "dtype": dtype, "pass": mode,
                     "speedup_vs_pytorch": ref["median_ms"] / r["median_ms"],
                     "memory_fraction_of_pytorch":
                         r["peak_memory_mb"] / ref["peak_memory_mb"]
                         if ref["peak_memory_mb"] > 0 else None})
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    groups = sorted({(r["config"], r["pass"], r["dtype"]) for r in ok},  # one bar group each
                    key=lambda g: (list(CONFIGS).index(g[0]), g[1] != "forward", g[2]))
    backends = sorted({r["backend"] for r in ok}, key=["pytorch", "cpu", "cuda"].index)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        xs, ys = [], []
        for j, group in enumerate(groups):
            match = [r for r in ok if (r["config"], r["pass"], r["dtype"]) == group
                     and r["backend"] == backend]
            if match:
                xs.append(j + i * width)
                ys.append(match[0]["median_ms"])
        ax.bar(xs, ys, width, label=backend)
    ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{p}\n{d}" for c, p, d in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(f"ms_deform_attn on {machine().get('gpu') or machine().get('cpu_model', 'cpu')}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,encoder,decoder",
                        help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--backends", default="available",
                        help="comma-separated subset of pytorch,cpu,cuda (default: all that run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/ms_deform_attn_<host>.json)")
    parser.add_argument("--figure", type=Path, default=None, help="also write a PNG here")
    parser.add_argument("--worker", nargs=5,
                        metavar=("CONFIG", "BACKEND", "DEVICE", "DTYPE", "PASS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, repeats=args.repeats)))
        return 0

    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; expected a subset of {list(CONFIGS)}")
    backends = ("pytorch", "cpu", "cuda") if args.backends == "available" \
        else args.backends.split(",")
    results = []
    for config, backend, device, dtype, mode in plan(configs, backends, available_devices()):
        r = run_one(config, backend, device, dtype, mode, args.repeats)
        results.append(r)
        shown = (f"{r['median_ms']:10.2f} ms  peak {r['peak_memory_mb']:8.1f} MB"
                 if "error" not in r else f"ERROR {r['error']}")
        print(f"{config:8s} {backend:8s} {device:5s} {dtype:9s} {mode:8s} {shown}", flush=True)
    report = {"machine": machine(), "results": results, "ratios": ratios(results)}
    for row in report["ratios"]:
        mem = row["memory_fraction_of_pytorch"]
        print(f"{row['config']:8s} {row['backend']:5s} {row['dtype']:9s} {row['pass']:8s} "
              f"{row['speedup_vs_pytorch']:6.1f}x faster than pytorch"
              + (f", {mem:.3f} of its peak memory" if mem is not None else ""))
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"ms_deform_attn_{platform.node() or 'machine'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.figure:
        plot(results, args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
