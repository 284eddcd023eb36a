"""A checkpoint's accuracy on shapes val sets nobody tuned on: each generated with a
seed other than the one its checkpoint was chosen on (0), with the generator's
defaults (200 images of 128 px), evaluated with pycocotools. Reports every seed,
the mean and the spread (max - min), and writes JSON with the machine.

    python benchmarks/unseen_seeds.py --checkpoint tiny_shapes --seeds 1 2 3 \\
        --out benchmarks/results/tiny_shapes_unseen.json
    python benchmarks/unseen_seeds.py --checkpoint runs/a/checkpoint_X.pth runs/b/checkpoint_Y.pth
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def val_set(root: Path, seed: int, size: int, images: int) -> Path:
    """The val split of shapes generated with `seed` (cached under `root`)."""
    from ddetr_tutorial.data import make_shapes

    folder = root / f"shapes_val_seed{seed}_{size}px_{images}"
    if not (folder / "annotations" / "instances_val.json").is_file():
        make_shapes(folder, num_train=0, num_val=images, size=size, seed=seed)
    return folder


def evaluate_on(checkpoint, folder: Path) -> dict:
    import torch

    from ddetr_tutorial.config import build_transforms
    from ddetr_tutorial.data import CocoDetection, collate_fn
    from ddetr_tutorial.engine import evaluate
    from ddetr_tutorial.model_files import load_model
    from ddetr_tutorial.reproducibility import make_loader

    model, cfg, postprocess, meta = load_model(checkpoint, device="cpu")
    val = CocoDetection(folder / "val", folder / "annotations" / "instances_val.json",
                        build_transforms(cfg, "val"), category_ids=meta.get("category_ids"))
    loader = make_loader(val, cfg.batch_size, False, collate_fn)
    return evaluate(model, postprocess, loader, val.coco, val.category_ids,
                    torch.device("cpu"))[0]


def summarise(per_seed: dict[int, dict]) -> dict:
    out = {}
    for k in METRICS:
        values = [m[k] for m in per_seed.values()]
        out[k] = {"mean": round(statistics.fmean(values), 4),
                  "spread": round(max(values) - min(values), 4),
                  "min": round(min(values), 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="checkpoints of any kind, or shipped names")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                   help="val-set seeds (default 1 2 3; 0 is the selection set)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--cache", default=None, help="where the val sets are kept (default: a "
                                                 "temporary folder)")
    p.add_argument("--out", default=None, help="the JSON to write")
    args = p.parse_args(argv)
    if 0 in args.seeds:
        print("note: seed 0 is the split checkpoints are chosen on, not an unseen one")
    from ddetr_tutorial.shipped import resolve_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.cache or tmp)
        folders = {s: val_set(root, s, args.size, args.images) for s in args.seeds}
        results = []
        for checkpoint in args.checkpoint:
            path = resolve_checkpoint(checkpoint)
            per_seed = {s: {k: round(v, 4) for k, v in evaluate_on(path, f).items()}
                        for s, f in folders.items()}
            summary = summarise(per_seed)
            results.append({"checkpoint": str(checkpoint), "per_seed": per_seed,
                            "summary": summary})
            print(f"{checkpoint}: " + ", ".join(
                f"{k} {summary[k]['mean']:.3f} (spread {summary[k]['spread']:.3f})"
                for k in ("AP", "AP50", "APs")))
    record = {"seeds": args.seeds, "images": args.images, "size": args.size,
              "generator": "make_shapes defaults (ddetr_tutorial.data), val split only",
              "results": results, "machine": machine()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
