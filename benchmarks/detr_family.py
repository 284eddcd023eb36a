"""The family race: every DETR-family member trained side by side from the shipped
pretrained backbone, each paper's claim checked in miniature.

Every member of `family_cost.MEMBERS` at its `tiny` size (the synthetic-pretrained
width-32 ResNet-18, frozen BatchNorm, conv1 and layer1 frozen, backbone lr 0.1x; C=64,
30 queries or proposals, focal matching costs 2 / 5 / 2 and top-100 post-processing,
except the original DETR's softmax head with its class cost 1) on the same shapes data
at its own 128 px, E epochs with the learning rate dropped x0.1 for the last sixth, as
benchmarks/convergence.py trains Deformable DETR. Every epoch is evaluated with
pycocotools. The long DETR and DETR-DC5 schedules the convergence claims are measured
against come from benchmarks/results/convergence/ (same data, recipe and seeds).

Runs are resumable and budgeted: checkpoints under runs/detr_family/<run>/, per-epoch
results in benchmarks/results/detr_family/<run>.json; a run whose committed JSON is
complete is never trained again, so a fresh checkout continues where the last one
stopped (a partial run whose checkpoints are gone starts over).

    python -m ddetr_tutorial make-data shapes --out data/shapes       # 2000 train / 200 val
    python benchmarks/detr_family.py run --budget-min 60 --threads 1   # again until complete
    python benchmarks/detr_family.py cost      # parameters, step and inference time (ratios)
    python benchmarks/detr_family.py memory    # peak memory of each attention kind
    python benchmarks/detr_family.py report    # -> benchmarks/results/detr_family.{json,png}
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import convergence  # noqa: E402
import family_cost  # noqa: E402
from common import machine  # noqa: E402
from paper_claims import add_budget_options, datasets, train_budgeted  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "detr_family"
MEMBERS = family_cost.MEMBERS
BASE = family_cost.BASE
NAMES = {
    "detr": "DETR", "detr_dc5": "DETR-DC5", "deformable_detr": "Deformable DETR",
    "deformable_detr_refine": "Deformable DETR + refinement",
    "deformable_detr_two_stage": "Deformable DETR two-stage",
    "conditional_detr": "Conditional DETR", "anchor_detr": "Anchor DETR",
    "efficient_detr": "Efficient DETR", "sparse_rcnn": "Sparse R-CNN",
    "dynamic_detr": "Dynamic DETR", "dn_deformable_detr": "DN-Deformable-DETR",
    "h_deformable_detr": "H-Deformable-DETR",
}
# Where a member cannot share the common footing, and why (the README repeats these).
EXCEPTIONS = {
    "detr": "softmax with a no-object class (eos 0.1) and class cost 1, as the original",
    "detr_dc5": "as DETR, on a dilated C5 (stride 16)",
    "anchor_detr": "30 queries as 10 anchor points x 3 patterns",
    "sparse_rcnn": "30 learned proposal boxes; no encoder (6 stages read RoIs of an FPN)",
    "efficient_detr": "3 encoder layers and 1 decoder layer, as the paper",
    "dn_deformable_detr": "adds 5 denoising groups of noised ground truth in training",
    "h_deformable_detr": "adds 150 one-to-many queries (k = 6) in training",
}


def member_config(name: str, epochs: int, image_size: int, num_classes: int):
    from ddetr_tutorial.config import get_config

    if name not in MEMBERS:
        raise ValueError(f"unknown member {name!r}; members are {list(MEMBERS)}")
    preset, overrides = MEMBERS[name]
    return get_config(preset, image_size=image_size, num_classes=num_classes, epochs=epochs,
                      lr_drop=epochs - max(1, epochs // 6), **overrides)


def run_name(member: str, epochs: int, seed: int) -> str:
    return f"{member}_{epochs}ep_s{seed}"


def committed_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("status") == "complete"


def run_one(member, seed, args, deadline, train, val) -> bool:
    cfg = member_config(member, args.epochs, args.image_size, len(train.category_ids))
    run = run_name(member, cfg.epochs, seed)
    results = Path(args.results_dir) / f"{run}.json"
    if committed_complete(results) and not (Path(args.runs_dir) / run).exists():
        print(f"{run}: complete (committed)")
        return True
    command = (f"python benchmarks/detr_family.py run --only {member} --seeds {seed} "
               f"--epochs {args.epochs} --image-size {args.image_size} --data {args.data}")

    def record(log_rows, machines):
        convergence.write_json(results, convergence.run_record(
            run, member, NAMES[member], seed, cfg, args.data, command, log_rows, machines))

    return train_budgeted(run, cfg, Path(args.runs_dir) / run, seed, args, deadline, train,
                          val, record, label=convergence.threads_label)


def cmd_run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = (float("inf") if args.budget_min is None
                else time.monotonic() + args.budget_min * 60)
    args.epochs_left = args.epochs_now
    # Seed by seed, Deformable DETR first (the baseline every verdict is measured against).
    plan = [(m, s) for s in (args.seeds or (0, 1)) for m in (args.only or MEMBERS)]
    train, val = datasets(args)
    for member, seed in plan:
        if not run_one(member, seed, args, deadline, train, val):
            break
    return 0


# ---------------------------------------------------------------------------- cost

def cmd_cost(args) -> int:
    """family_cost.py at the race's image size: every member timed in one run."""
    argv = ["--size", str(args.image_size), "--out", str(args.out)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return family_cost.main(argv)


# ---------------------------------------------------------------------------- memory

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn) -> int:
    """The most resident memory `fn()` adds to the process: Linux's high-water mark
    (VmHWM) reset before the call (`5` into /proc/self/clear_refs), freed heap handed
    back first (malloc_trim) so the call cannot reuse what an earlier one left."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    fn()
    return _status("VmHWM:") - before


def attention_kinds(d_model: int, n_heads: int):
    """kind -> (module, call(module, side, queries)): one attention of each kind over a
    side x side map (batch 1) with the given number of queries (side * side: the
    encoder's self-attention; a few dozen: the decoder's cross-attention)."""
    import torch
    from torch import nn

    from ddetr_tutorial.attention import MSDeformAttn
    from ddetr_tutorial.conditional_detr import ProjectedAttention
    from ddetr_tutorial.rcda import RowColumnAttention

    C = d_model

    def dense(module, side, queries):  # the (Lq, S) weights formed, as attention was in 2021
        x, q = torch.randn(1, side * side, C), torch.randn(1, queries, C, requires_grad=True)
        module(q, x, x, need_weights=True, average_attn_weights=False)[0].sum().backward()

    def dense_fused(module, side, queries):  # PyTorch's fused kernel (SDPA), as our DETR runs
        x, q = torch.randn(1, side * side, C), torch.randn(1, queries, C, requires_grad=True)
        module(q, x, x, need_weights=False)[0].sum().backward()

    def conditional(module, side, queries):  # content and spatial parts concatenated: 2C
        q = torch.randn(1, queries, 2 * C, requires_grad=True)
        k, v = torch.randn(1, side * side, 2 * C), torch.randn(1, side * side, C)
        module(q, k, v)[0].sum().backward()

    def rcda(module, side, queries):
        x = torch.randn(1, side, side, C)
        q = torch.randn(1, queries, C, requires_grad=True)
        module(q, q, x, x, x).sum().backward()

    def deformable(module, side, queries):
        x = torch.randn(1, side * side, C)
        q = torch.randn(1, queries, C, requires_grad=True)
        ref = torch.rand(1, queries, 1, 2)
        shapes = torch.tensor([[side, side]])
        module(q, ref, x, shapes, torch.tensor([0])).sum().backward()

    return {
        "dense": (nn.MultiheadAttention(C, n_heads, batch_first=True), dense),
        "dense_fused": (nn.MultiheadAttention(C, n_heads, batch_first=True), dense_fused),
        "conditional": (ProjectedAttention(C, n_heads), conditional),
        "rcda": (RowColumnAttention(C, n_heads), rcda),
        "deformable": (MSDeformAttn(C, 1, n_heads, 4), deformable),
    }


def predicted_dense_bytes(side: int, queries: int, n_heads: int) -> int:
    """The attention weights dense attention holds (N M Lq S floats), with their softmax
    input and gradients: about 4 such matrices."""
    return 4 * 4 * n_heads * queries * side * side


def cmd_memory(args) -> int:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    kinds = attention_kinds(args.hidden_dim, args.heads)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    budget = min(args.budget_fraction * available, args.budget_gib * 2**30)
    settings = {"encoder": lambda side: side * side, "decoder": lambda side: args.queries}
    curves = {}
    for setting, queries_of in settings.items():
        for kind, (module, call) in kinds.items():
            rows = []
            for side in args.sides:
                queries = queries_of(side)
                if kind in ("dense", "conditional") and predicted_dense_bytes(
                        side, queries, args.heads) * (2 if kind == "conditional" else 1) > budget:
                    rows.append({"side": side, "tokens": side * side, "queries": queries,
                                 "peak_mib": None, "skipped": "over the memory budget"})
                    continue
                call(module, side, queries)  # warm-up: kernels, caches
                peaks = [peak_bytes(lambda: call(module, side, queries))
                         for _ in range(args.repeats)]
                rows.append({"side": side, "tokens": side * side, "queries": queries,
                             "peak_mib": round(statistics.median(peaks) / 2**20, 2)})
                print(f"{setting:>8} {kind:>12} side {side:>4}: "
                      f"{rows[-1]['peak_mib']:>9.2f} MiB", flush=True)
            curves.setdefault(setting, {})[kind] = rows
    result = {"benchmark": "attention_memory", "d_model": args.hidden_dim, "heads": args.heads,
              "decoder_queries": args.queries, "repeats": args.repeats,
              "what": "peak resident memory added by one forward + backward of one attention "
                      "(batch 1), Linux VmHWM, median of the repeats; encoder: every cell a "
                      "query; decoder: a fixed number of queries; dense: nn.MultiheadAttention "
                      "returning its weights (the (Lq, S) matrix formed), dense_fused: the same "
                      "without them (PyTorch's fused scaled_dot_product_attention)",
              "budget_mib": round(budget / 2**20), "machine": machine(), "curves": curves}
    out = Path(args.out)
    convergence.write_json(out, result)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------- report

def seed_stats(runs) -> dict:
    finals = [r["AP"][-1] for r in runs]
    return {"mean": statistics.fmean(finals), "spread": max(finals) - min(finals),
            "seeds": [r["seed"] for r in runs], "finals": finals}


def compare(a_runs, b_runs, claim_is="better") -> dict:
    """Member a against b at their final epoch, the seed spread as the noise: the larger
    of the two spreads (max - min of the seeds' final AP)."""
    a, b = seed_stats(a_runs), seed_stats(b_runs)
    diff, noise = a["mean"] - b["mean"], max(a["spread"], b["spread"])
    if claim_is == "better":
        verdict = ("holds" if diff > noise else "does not hold" if diff < -noise
                   else "inconclusive")
    else:  # "matches": not worse beyond the noise
        verdict = "holds" if diff >= -noise else "does not hold"
    return {"diff": diff, "noise": noise, "a": a, "b": b, "verdict": verdict}


def reach_epochs(runs, target: float) -> list[int | None]:
    """Per seed: the first epoch whose AP reaches `target` (None: never)."""
    return [next((e for e, ap in zip(r["epochs"], r["AP"]) if ap >= target), None)
            for r in runs]


def factor_claim(member_runs, detr_runs, threshold: float) -> dict:
    """DETR's epochs over the epoch the member first reaches DETR's final seed-mean AP,
    per member seed; the claim holds when every seed's factor reaches `threshold`."""
    target = seed_stats(detr_runs)["mean"]
    total = detr_runs[0]["epochs"][-1]
    reached = reach_epochs(member_runs, target)
    factors = [round(total / e, 2) if e else None for e in reached]
    mean_curve = convergence.mean_curve(member_runs)
    mean_reach = next((e for e, ap in mean_curve.items() if ap >= target), None)
    if all(f is not None and f >= threshold for f in factors):
        verdict = "holds"
    elif all(f is None or f < threshold for f in factors):
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return {"target_AP": target, "detr_epochs": total, "reach_epochs": reached,
            "factors": factors, "factor": round(total / mean_reach, 2) if mean_reach else None,
            "verdict": verdict}


def memory_claim(memory: dict | None, against: str = "dense") -> dict:
    """RCDA against dense attention (`against`: "dense", the weights formed, or
    "dense_fused", PyTorch's fused kernel) in the encoder (every cell a query): the peak
    ratio at the largest map both ran; holds when RCDA's peak is below dense's at every
    map of 32 x 32 cells and more."""
    if not memory:
        return {"ours": "pending: `detr_family.py memory` has not run", "verdict": "inconclusive"}
    if against not in memory["curves"]["encoder"]:
        return {"ours": f"pending: memory_cpu.json has no {against!r} curve (rerun "
                        f"`detr_family.py memory`)", "verdict": "inconclusive"}
    dense = {r["side"]: r["peak_mib"] for r in memory["curves"]["encoder"][against]}
    rcda = {r["side"]: r["peak_mib"] for r in memory["curves"]["encoder"]["rcda"]}
    both = [s for s in sorted(dense) if dense[s] is not None and rcda.get(s) is not None
            and s >= 32]
    if not both:
        return {"ours": "no map of 32 x 32 or more ran both", "verdict": "inconclusive"}
    side = both[-1]
    verdict = "holds" if all(rcda[s] < dense[s] for s in both) else "does not hold"
    skipped = [s for s in sorted(dense) if dense[s] is None and rcda.get(s) is not None]
    label = "dense" if against == "dense" else "fused dense (SDPA)"
    ours = (f"encoder self-attention, {side} x {side} map: RCDA {rcda[side]:.1f} MiB vs "
            f"{label} {dense[side]:.1f} MiB ({dense[side] / max(rcda[side], 1e-9):.1f}x)")
    if skipped:
        ours += f"; dense skipped (over the budget) from {skipped[0]} x {skipped[0]}, RCDA ran"
    return {"ours": ours, "verdict": verdict, "side": side}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def build_claims(by_member: dict, detr_long: dict, memory: dict | None) -> list[dict]:
    claims = []

    def add(claim, paper, ours, verdict, **detail):
        claims.append({"claim": claim, "paper": paper, "ours": ours, "verdict": verdict,
                       **detail})

    def have(*members):
        return all(by_member.get(m) for m in members)

    def ap_ours(c, a, b):
        return (f"{NAMES[a]} {pct(c['a']['mean'])} vs {NAMES[b]} {pct(c['b']['mean'])} AP "
                f"(diff {100 * c['diff']:+.1f}, seed spread {pct(c['noise'])})")

    def pending(claim, paper, *members):
        add(claim, paper, "pending: needs complete runs of " + ", ".join(members),
            "inconclusive")

    for member, threshold, claim, paper in (
            ("conditional_detr", 6.7, "Conditional DETR converges 6.7x to 10x faster than DETR",
             "6.7x faster (R50, R101), 10x (DC5-R50, DC5-R101): 50 vs 500 epochs"),
            ("sparse_rcnn", 3.0, "Sparse R-CNN needs about 3x fewer epochs than DETR, no NMS",
             "about 3x fewer epochs; set prediction, no NMS")):
        detr = detr_long.get("detr")
        if have(member) and detr:
            c = factor_claim(by_member[member], detr, threshold)
            seeds = ", ".join(f"{f}x" if f else "not reached" for f in c["factors"])
            ours = (f"reaches DETR's {c['detr_epochs']}-epoch AP {pct(c['target_AP'])} at "
                    f"epochs {c['reach_epochs']}: {seeds} (per seed)")
            if member == "sparse_rcnn":
                ours += "; every member here is evaluated without NMS"
            add(claim, paper, ours, c["verdict"], detail=c)
        else:
            pending(claim, paper, NAMES[member], "DETR (convergence)")
    dc5 = detr_long.get("detr_dc5")
    if have("anchor_detr") and dc5:
        c = compare(by_member["anchor_detr"], dc5)
        ratio = dc5[0]["epochs"][-1] / by_member["anchor_detr"][0]["epochs"][-1]
        add("Anchor DETR beats DETR with 10x fewer epochs",
            "better than DETR with 10x fewer training epochs (50 vs 500)",
            ap_ours(c, "anchor_detr", "detr_dc5").replace(
                "DETR-DC5", f"DETR-DC5 at {ratio:.0f}x the epochs"), c["verdict"], detail=c)
    else:
        pending("Anchor DETR beats DETR with 10x fewer epochs",
                "better than DETR with 10x fewer training epochs (50 vs 500)",
                "Anchor DETR", "DETR-DC5 (convergence)")
    m = memory_claim(memory)
    add("Anchor DETR's RCDA saves memory against dense attention",
        "RCDA: lower memory than standard attention, similar or better accuracy",
        m["ours"], m["verdict"])
    m = memory_claim(memory, against="dense_fused")
    add("Anchor DETR's RCDA saves memory against a fused attention kernel too",
        "(not the paper's: its standard attention formed the weights; PyTorch's SDPA does "
        "not)", m["ours"], m["verdict"])
    for member, base, claim, paper, claim_is in (
            ("efficient_detr", "deformable_detr_two_stage",
             "Efficient DETR: one decoder layer with dense initialisation matches six",
             "3 encoder + 1 decoder layers with dense prior are competitive with 6 + 6",
             "matches"),
            ("dynamic_detr", "deformable_detr_refine",
             "Dynamic DETR beats Deformable DETR at 12 epochs",
             "higher AP than Deformable DETR with the 1x (12-epoch) schedule", "better"),
            ("dn_deformable_detr", "deformable_detr_two_stage",
             "DN-DETR: denoising speeds up Deformable DETR's convergence",
             "higher AP at the same short schedule with denoising queries", "better"),
            ("h_deformable_detr", "deformable_detr_two_stage",
             "H-DETR: one-to-many matching speeds up Deformable DETR's convergence",
             "higher AP at the same schedule with the hybrid one-to-many branch", "better")):
        if have(member, base):
            c = compare(by_member[member], by_member[base], claim_is)
            ours = ap_ours(c, member, base)
            if member == "efficient_detr":  # our two-stage base is the tiny 2 + 2, not 6 + 6
                ours += "; 3 + 1 layers against a 2 + 2-layer base"
            add(claim, paper, ours, c["verdict"], detail=c)
        else:
            pending(claim, paper, NAMES[member], NAMES[base])
    return claims


def attach_cost(runs: list[dict], cost: dict | None) -> None:
    rows = (cost or {}).get("members", {})
    for r in runs:
        row = rows.get(r["model"], {})
        r.update({k: row.get(k) for k in ("params", "step_ms", "infer_ms", "params_ratio",
                                          "step_ratio", "infer_ratio")})


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def build_report(records, convergence_records, cost=None, memory=None) -> dict:
    runs = [convergence.schema_run(r) for r in records]
    attach_cost(runs, cost)
    complete = [r for r in runs if r["status"] == "complete"]
    by_member = {m: [r for r in complete if r["model"] == m] for m in MEMBERS}
    long_runs = [convergence.schema_run(r) for r in convergence_records]
    detr_long = {}
    for m in ("detr", "detr_dc5"):
        done = [r for r in long_runs if r["model"] == m and r["status"] == "complete"]
        if done:
            longest = max(r["epochs_planned"] for r in done)
            detr_long[m] = [r for r in done if r["epochs_planned"] == longest]
    return {"runs": runs, "claims": build_claims(by_member, detr_long, memory),
            "names": {m: NAMES[m] for m in MEMBERS}, "exceptions": EXCEPTIONS,
            "long_schedules": {m: {"epochs": rs[0]["epochs_planned"],
                                   "seeds": [r["seed"] for r in rs],
                                   "final_AP": [r["AP"][-1] for r in rs],
                                   "from": "benchmarks/results/convergence/"}
                               for m, rs in detr_long.items()},
            "cost_note": "params, step_ms (batch 16) and infer_ms (batch 1) from "
                         "benchmarks/results/detr_family/cost_cpu.json, one run, 2 threads",
            "minutes_note": convergence.MINUTES_NOTE,
            "written": machine()["date"]}


def plot_report(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    colours = plt.get_cmap("tab20").colors
    members = [m for m in MEMBERS if any(r["model"] == m for r in report["runs"])]
    for i, m in enumerate(members):
        runs = [r for r in report["runs"] if r["model"] == m and r["AP"]]
        colour = colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        for ax, x in zip(axes, ("epochs", "minutes")):
            n = min(len(r["AP"]) for r in runs)
            xs = [statistics.fmean(r[x][j] for r in runs) for j in range(n)]
            aps = [[100 * r["AP"][j] for r in runs] for j in range(n)]
            ax.plot(xs, [statistics.fmean(a) for a in aps], color=colour, label=NAMES[m])
            if len(runs) > 1:
                ax.fill_between(xs, [min(a) for a in aps], [max(a) for a in aps],
                                color=colour, alpha=0.2, linewidth=0)
    for ax, x in zip(axes, ("epoch", "training minutes")):
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AP (shapes val), seed mean; band: seed min-max")
    if members:
        axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("The DETR family from one pretrained backbone, same data and recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args) -> int:
    results = Path(args.results_dir)
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*_s[0-9]*.json"))]
    report = build_report(records, convergence.load_runs(args.convergence_dir),
                          read_json(results / "cost_cpu.json"),
                          read_json(results / "memory_cpu.json"))
    out = Path(args.out)
    convergence.write_json(out, report)
    plot_report(report, out.with_suffix(".png"))
    for r in report["runs"]:
        ap = r["AP"][-1] if r["AP"] else math.nan
        print(f"{r['model']:>26} seed {r['seed']}: {r['status']}, AP {ap:.3f}")
    for c in report["claims"]:
        print(f"{c['verdict']:>14}: {c['claim']} -- {c['ours']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the members (resumable, budgeted)")
    r.add_argument("--data", default=str(ROOT / "data" / "shapes"),
                   help="a COCO-format folder as written by make-data (default data/shapes)")
    r.add_argument("--only", nargs="*", choices=list(MEMBERS), help="members to run")
    r.add_argument("--seeds", nargs="*", type=int, default=None)
    r.add_argument("--epochs", type=int, default=12, help="every member's (default 12)")
    r.add_argument("--image-size", type=int, default=128)
    add_budget_options(r)
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    r.add_argument("--runs-dir", default=str(RUNS))
    r.add_argument("--results-dir", default=str(RESULTS / "detr_family"))
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("cost", help="parameters, step and inference time, one run")
    c.add_argument("--image-size", type=int, default=128)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--out", default=str(RESULTS / "detr_family" / "cost_cpu.json"))
    c.set_defaults(func=cmd_cost)
    m = sub.add_parser("memory", help="peak memory of each attention kind as the map grows")
    m.add_argument("--sides", nargs="*", type=int, default=[8, 16, 24, 32, 48, 64, 96, 128])
    m.add_argument("--hidden-dim", type=int, default=64)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--queries", type=int, default=30, help="decoder queries (default 30)")
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--budget-fraction", type=float, default=0.2,
                   help="skip dense sizes predicted past this share of available memory")
    m.add_argument("--budget-gib", type=float, default=4.0)
    m.add_argument("--out", default=str(RESULTS / "detr_family" / "memory_cpu.json"))
    m.set_defaults(func=cmd_memory)
    q = sub.add_parser("report", help="the runs' JSON -> detr_family.json + figure")
    q.add_argument("--results-dir", default=str(RESULTS / "detr_family"))
    q.add_argument("--convergence-dir", default=str(RESULTS / "convergence"))
    q.add_argument("--out", default=str(RESULTS / "detr_family.json"))
    q.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
