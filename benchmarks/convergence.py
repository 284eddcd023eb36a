"""The paper's headline, measured in miniature from a pretrained backbone: how many
fewer epochs Deformable DETR needs to reach DETR's accuracy (Zhu et al. 2021,
Table 1: Deformable DETR at 50 epochs, 43.8 AP, beats DETR-DC5 at 500, 43.3: 10x).

Three detectors, each at the `tiny_pretrained` size (the shipped synthetic-pretrained
width-32 ResNet-18, frozen BatchNorm, conv1 and layer1 frozen, backbone lr 0.1x),
C=64, 2+2 layers, 30 queries, on the same shapes data at its own 128 px:
  deformable  Deformable DETR: 4 levels, multi-scale deformable attention, K=4
  detr        the original DETR: one C5 map (stride 32), dense attention, softmax
              with a no-object class (eos_coef 0.1), its class cost and weight 1
  detr_dc5    the same on a dilated C5 (stride 16)
Deformable DETR trains E epochs, DETR `--detr-factor` x E; each drops the learning
rate x0.1 for its last sixth (the paper: 40 of 50 and 400 of 500). Every epoch is
evaluated with pycocotools. Runs are resumable: each keeps checkpoints under
runs/convergence/<run>/ and per-epoch results, with the machine and threads of each
epoch, in benchmarks/results/convergence/<run>.json.

    python -m ddetr_tutorial make-data shapes --out data/shapes      # 2000 train / 200 val
    python benchmarks/convergence.py run --budget-min 60 --threads 1  # continues where it stopped
    python benchmarks/convergence.py report   # -> benchmarks/results/convergence.{json,png}

The factor: the first epoch at which Deformable DETR's seed-mean AP reaches
DETR-DC5's final seed-mean AP, against DETR-DC5's epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402
from paper_claims import add_budget_options, datasets, machine_label, train_budgeted  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "convergence"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

DETR = {"model": "detr", "no_object": True, "eos_coef": 0.1, "position_offset": 0.0,
        "num_feature_levels": 1, "set_cost_class": 1.0, "cls_loss_coef": 1.0}
VARIANTS = {
    "deformable": ("Deformable DETR: 4 levels, multi-scale deformable attention, K=4", {}),
    "detr": ("DETR: dense attention on C5 (stride 32), softmax + no-object", DETR),
    "detr_dc5": ("DETR-DC5: dense attention on dilated C5 (stride 16), softmax + no-object",
                 {**DETR, "dilation": True}),
}
# Deformable DETR's seed pair first (every DETR run is measured against it).
DEFAULT_PLAN = [("deformable", 0), ("deformable", 1), ("detr_dc5", 0), ("detr", 0),
                ("detr_dc5", 1), ("detr", 1)]
MINUTES_NOTE = ("minutes: cumulative training-step time (evaluation excluded) on the machine "
                "and thread count of each run's epochs")
NAMES = {"deformable": "Deformable DETR", "detr": "DETR", "detr_dc5": "DETR-DC5"}


def variant_config(name: str, args, num_classes: int):
    from ddetr_tutorial.config import get_config

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; variants are {list(VARIANTS)}")
    epochs = args.epochs * (1 if name == "deformable" else args.detr_factor)
    return get_config("tiny_pretrained", with_box_refine=False, two_stage=False,
                      image_size=args.image_size, num_classes=num_classes, epochs=epochs,
                      lr_drop=epochs - max(1, epochs // 6)).replace(**VARIANTS[name][1])


def threads_label() -> str:
    import torch

    return f"{machine_label()}, {torch.get_num_threads()} threads"


def run_record(run, model, description, seed, cfg, data, command, log_rows, machines) -> dict:
    """A run's per-epoch results as benchmarks/results/<benchmark>/<run>.json holds them."""
    done = len(log_rows)
    return {
        "run": run, "model": model, "description": description, "seed": seed,
        "data": str(data), "epochs_planned": cfg.epochs, "epochs_done": done,
        "status": "complete" if done >= cfg.epochs else f"partial ({done}/{cfg.epochs} epochs)",
        "config": cfg.to_dict(), "command": command,
        "curve": [{"epoch": row["epoch"], "machine": machines.get(str(row["epoch"]), "?"),
                   **{k: row.get(k) for k in ("lr", "train_seconds", "train_loss",
                                              "train_loss_ce", "train_class_error",
                                              "train_grad_norm")},
                   **{k: row[k] for k in METRICS if k in row}} for row in log_rows],
    }


def write_json(path: Path, record: dict) -> None:
    """Written whole or not at all (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def write_run_json(results_dir: Path, run, variant, seed, cfg, args, log_rows, machines):
    command = (f"python benchmarks/convergence.py run --only {variant} --seeds {seed} "
               f"--epochs {args.epochs} --detr-factor {args.detr_factor} "
               f"--image-size {args.image_size} --data {args.data}")
    write_json(results_dir / f"{run}.json", run_record(
        run, variant, VARIANTS[variant][0], seed, cfg, args.data, command, log_rows, machines))


def run_one(variant, seed, args, deadline, train, val) -> bool:
    cfg = variant_config(variant, args, len(train.category_ids))
    run = f"{variant}_{cfg.epochs}ep_s{seed}"  # one name per schedule

    def record(log_rows, machines):
        write_run_json(Path(args.results_dir), run, variant, seed, cfg, args, log_rows, machines)

    return train_budgeted(run, cfg, Path(args.runs_dir) / run, seed, args, deadline, train,
                          val, record, label=threads_label)


def cmd_run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = (float("inf") if args.budget_min is None
                else time.monotonic() + args.budget_min * 60)
    args.epochs_left = args.epochs_now
    if args.only and args.seeds:
        plan = [(v, s) for v in args.only for s in args.seeds]
    else:
        plan = [(v, s) for v, s in DEFAULT_PLAN if (not args.only or v in args.only)
                and (args.seeds is None or s in args.seeds)]
    train, val = datasets(args)
    for variant, seed in plan:
        if not run_one(variant, seed, args, deadline, train, val):
            break
    return 0


# ---------------------------------------------------------------------------- report

def load_runs(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]


def schema_run(record) -> dict:
    """One run in convergence.json's schema: per-epoch lists, minutes cumulative."""
    curve = [row for row in record["curve"] if "AP" in row]
    minutes, total = [], 0.0
    for row in record["curve"]:
        total += (row.get("train_seconds") or 0) / 60
        if "AP" in row:
            minutes.append(round(total, 2))
    return {"model": record["model"], "seed": record["seed"],
            "epochs": [row["epoch"] for row in curve],
            "AP": [row["AP"] for row in curve], "APs": [row["APs"] for row in curve],
            "minutes": minutes,
            "machine": "; ".join(sorted({row["machine"] for row in record["curve"]})),
            "status": record["status"], "epochs_planned": record["epochs_planned"]}


def mean_curve(runs, key="AP") -> dict[int, float]:
    """epoch -> mean over the runs that have it, for epochs every run has."""
    common = set.intersection(*(set(r["epochs"]) for r in runs))
    return {e: statistics.fmean(r[key][r["epochs"].index(e)] for r in runs)
            for e in sorted(common)}


def epochs_to_reach(deform_runs, detr_runs) -> dict:
    """The factor against one DETR model: DETR's epochs over the first epoch where
    Deformable DETR's seed-mean AP reaches DETR's final seed-mean AP."""
    complete = [r for r in detr_runs if r["status"] == "complete"]
    deform = [r for r in deform_runs if r["status"] == "complete"]
    if not complete or not deform:
        return {"factor": None, "note": "pending: needs complete Deformable DETR and DETR runs"}
    target = statistics.fmean(r["AP"][-1] for r in complete)
    total = complete[0]["epochs"][-1]
    curve = mean_curve(deform)
    reached = next((e for e, ap in curve.items() if ap >= target), None)
    out = {"target_AP": round(target, 4), "detr_epochs": total,
           "detr_final_AP": [round(r["AP"][-1], 4) for r in complete],
           "detr_seeds": [r["seed"] for r in complete],
           "deformable_seeds": [r["seed"] for r in deform],
           "deformable_mean_AP": {e: round(v, 4) for e, v in curve.items()}}
    if reached is None:
        return {**out, "factor": None,
                "note": f"not reached: Deformable DETR's mean AP stays below DETR's final "
                        f"{target:.3f} for all {max(curve)} of its epochs"}
    return {**out, "deformable_epoch": reached, "factor": round(total / reached, 2),
            "note": f"Deformable DETR's seed-mean AP first reaches DETR's final {target:.3f} "
                    f"at epoch {reached}, against DETR's {total}"}


def build_report(records) -> dict:
    """The factor against each DETR model's longest complete schedule (every schedule's
    is in `factors_by_schedule`), on the shortest complete Deformable DETR schedule that
    reaches DETR's final AP (the shortest when none does)."""
    runs = [schema_run(r) for r in records]
    by_model = {m: [r for r in runs if r["model"] == m] for m in VARIANTS}

    def complete_schedules(model):
        return sorted({r["epochs_planned"] for r in by_model[model]
                       if r["status"] == "complete"})

    def schedule(model, epochs):
        return [r for r in by_model[model] if r["epochs_planned"] == epochs]

    deform_schedules = complete_schedules("deformable") or [None]
    against, by_schedule = {}, {}
    for m in ("detr_dc5", "detr"):
        by_schedule[m] = {}
        for e in complete_schedules(m) or [None]:
            tries = [{**epochs_to_reach(schedule("deformable", d), schedule(m, e)),
                      "deformable_schedule": d} for d in deform_schedules]
            by_schedule[m][str(e)] = next((t for t in tries if t["factor"]), tries[0])
        against[m] = by_schedule[m][max(by_schedule[m], key=lambda k: int(k) if k != "None"
                                        else -1)]
    headline = against["detr_dc5"]
    return {"runs": runs, "factor": headline["factor"],
            "note": "against DETR-DC5 (the paper's Table 1 comparison): " + headline["note"],
            "factors": against, "factors_by_schedule": by_schedule,
            "minutes_note": MINUTES_NOTE,
            "written": machine()["date"]}


def plot_report(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    colours = {"deformable": "tab:blue", "detr": "tab:orange", "detr_dc5": "tab:red"}
    for row, metric in enumerate(("AP", "APs")):
        for col, x in enumerate(("epochs", "minutes")):
            ax = axes[row][col]
            longest = {m: max(r["epochs_planned"] for r in report["runs"] if r["model"] == m)
                       for m in {r["model"] for r in report["runs"]}}
            for r in report["runs"]:
                short = r["epochs_planned"] < longest[r["model"]]  # a shorter schedule: faint
                ax.plot(r[x], [100 * v for v in r[metric]], color=colours[r["model"]],
                        linestyle="-" if r["seed"] == 0 else "--", alpha=0.3 if short else 0.85,
                        linewidth=1 if short else 1.5,
                        label=f"{NAMES[r['model']]} {r['epochs_planned']} ep, seed {r['seed']}")
            ax.set_xlabel("epoch" if x == "epochs" else "training minutes")
            ax.set_ylabel(f"{metric} (shapes val)")
            ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    factor = report["factor"]
    fig.suptitle("Convergence from the pretrained backbone: factor "
                 + (f"{factor:.1f}x" if factor else "not measured") + " (paper: 10x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args) -> int:
    report = build_report(load_runs(args.results_dir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot_report(report, out.with_suffix(".png"))
    for r in report["runs"]:
        print(f"{r['model']:>10} seed {r['seed']}: {r['status']}, AP "
              f"{r['AP'][-1] if r['AP'] else float('nan'):.3f} after {len(r['AP'])} epochs")
    print(f"factor: {report['factor']} ({report['note']})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the runs (resumable)")
    r.add_argument("--data", default=str(ROOT / "data" / "shapes"),
                   help="a COCO-format folder as written by make-data (default data/shapes)")
    r.add_argument("--only", nargs="*", choices=list(VARIANTS), help="models to run")
    r.add_argument("--seeds", nargs="*", type=int, default=None)
    r.add_argument("--epochs", type=int, default=12, help="E, Deformable DETR's (default 12)")
    r.add_argument("--detr-factor", type=int, default=5,
                   help="DETR and DETR-DC5 train this many times E epochs (default 5)")
    r.add_argument("--image-size", type=int, default=128,
                   help="train and test size in pixels (default 128, the shapes' own)")
    add_budget_options(r)
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    r.add_argument("--runs-dir", default=str(RUNS), help="checkpoints (default runs/convergence)")
    r.add_argument("--results-dir", default=str(RESULTS / "convergence"),
                   help="per-run JSON (default benchmarks/results/convergence)")
    r.set_defaults(func=cmd_run)
    q = sub.add_parser("report", help="the runs' JSON -> convergence.json + figure")
    q.add_argument("--results-dir", default=str(RESULTS / "convergence"))
    q.add_argument("--out", default=str(RESULTS / "convergence.json"),
                   help="the report; the .png is written beside it")
    q.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
