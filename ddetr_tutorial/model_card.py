"""model_card.md for a training run: how it was made (command, config, machine, time)
and its last COCO evaluation."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from .config import get_config


def write_model_card(out_dir: Path, cfg, seconds: float, metrics: dict, argv) -> Path:
    """model_card.md: how the run was made (command, config, machine, time) and its
    last COCO evaluation."""
    base = get_config("paper").to_dict()
    changed = {k: v for k, v in cfg.to_dict().items() if base[k] != v}
    table = (out_dir / "eval.txt").read_text() if (out_dir / "eval.txt").exists() else ""
    logged = []  # the whole log: a resumed run spans several calls
    log_path = out_dir / "log.jsonl"
    rows = ([json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
            if log_path.exists() else [])
    if rows:
        logged = [f"- The whole run: {rows[-1]['epoch']} epochs, "
                  f"{sum(r.get('train_seconds', 0) for r in rows) / 60:.1f} min of training "
                  f"steps (log.jsonl; evaluation not counted)"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    lines = [
        "# Model card", "",
        "Command:", "", "```", "python -m ddetr_tutorial " + " ".join(argv), "```", "",
        f"- Training time: {seconds / 60:.1f} min (training and per-epoch evaluation)"
        + (" in this call" if "--resume" in argv else ""), *logged,
        f"- Machine: {platform.node()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
        f" ({torch.get_num_threads()} threads)" + (f", GPU {torch.cuda.get_device_name()}"
                                                  if torch.cuda.is_available() else ""),
        f"- Config fields differing from the paper's: `{json.dumps(changed)}`", "",
        "COCO evaluation (pycocotools, bbox) after the last epoch:", "", "```", table.rstrip(),
        "```", "",
        "| AP | AP50 | AP75 | APs | APm | APl |", "|---|---|---|---|---|---|",
        "| " + " | ".join(f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
        + " |", "",
    ]
    path = out_dir / "model_card.md"
    path.write_text("\n".join(lines))
    return path
