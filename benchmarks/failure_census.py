"""Where a checkpoint still fails: every ground-truth object of a val set sorted into
found / wrong class / rough / missed by the detections scoring at least a threshold,
by COCO size (area in the original image's pixels), plus the confident detections
that match no object. Writes JSON with the machine.

    python benchmarks/failure_census.py --checkpoint tiny_shapes --seed 1 \\
        --out benchmarks/results/shipped/tiny_shapes_failures_seed1.json

An object is
- found:       a detection of its class overlaps it with IoU >= 0.5;
- wrong class: not found, but a detection of another class overlaps it with IoU >= 0.5;
- rough:       neither, but some detection overlaps it with IoU in [0.1, 0.5);
- missed:      no detection overlaps it with IoU >= 0.1.
A detection is a false positive when it overlaps no object with IoU >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402
from unseen_seeds import val_set  # noqa: E402

OUTCOMES = ("found", "wrong class", "rough", "missed")
SIZES = ("small", "medium", "large")


def size_of(area: float) -> str:
    """COCO's area ranges: small < 32^2 <= medium < 96^2 <= large."""
    return "small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)


def census(objects: list[dict], detections: list[dict], threshold: float = 0.3) -> dict:
    """objects: COCO annotations ({image_id, category_id, bbox xywh, area});
    detections: COCO results ({image_id, category_id, bbox, score}). Returns counts
    per outcome and size, the total per size, and the false positives."""
    from ddetr_tutorial.box_ops import box_iou

    counts = {size: dict.fromkeys(OUTCOMES, 0) for size in SIZES}
    false_positives = 0
    images = sorted({o["image_id"] for o in objects} | {d["image_id"] for d in detections})
    for image in images:
        gt = [o for o in objects if o["image_id"] == image]
        det = [d for d in detections if d["image_id"] == image and d["score"] >= threshold]
        iou = torch.zeros(len(gt), len(det), dtype=torch.float64)
        if gt and det:
            boxes_gt = torch.tensor([o["bbox"] for o in gt], dtype=torch.float64)
            boxes_det = torch.tensor([d["bbox"] for d in det], dtype=torch.float64)
            iou = box_iou(xywh_to_xyxy(boxes_gt), xywh_to_xyxy(boxes_det))[0]
        same = torch.tensor([[o["category_id"] == d["category_id"] for d in det] for o in gt],
                            dtype=torch.bool).reshape(len(gt), len(det))
        for i, o in enumerate(gt):
            if (iou[i] >= 0.5)[same[i]].any():
                outcome = "found"
            elif (iou[i] >= 0.5).any():
                outcome = "wrong class"
            elif (iou[i] >= 0.1).any():
                outcome = "rough"
            else:
                outcome = "missed"
            counts[size_of(o["area"])][outcome] += 1
        false_positives += int((iou < 0.5).all(0).sum()) if gt else len(det)
    totals = {size: sum(counts[size].values()) for size in SIZES}
    return {"threshold": threshold, "by_size": counts, "objects": totals,
            "all": {k: sum(counts[s][k] for s in SIZES) for k in OUTCOMES},
            "false_positives": false_positives}


def detections_of(checkpoint, folder: Path) -> tuple[list[dict], list[dict]]:
    """The checkpoint's COCO results on the val split in `folder`, and its annotations."""
    from ddetr_tutorial.coco_eval import coco_results
    from ddetr_tutorial.config import build_transforms
    from ddetr_tutorial.data import CocoDetection, collate_fn
    from ddetr_tutorial.engine import predict
    from ddetr_tutorial.model_files import load_model
    from ddetr_tutorial.reproducibility import make_loader

    model, cfg, postprocess, meta = load_model(checkpoint, device="cpu")
    val = CocoDetection(folder / "val", folder / "annotations" / "instances_val.json",
                        build_transforms(cfg, "val"), category_ids=meta.get("category_ids"))
    loader = make_loader(val, cfg.batch_size, False, collate_fn)
    results = []
    for image_ids, detections in predict(model, postprocess, loader, torch.device("cpu")):
        results += coco_results(detections, image_ids, val.category_ids)
    return results, list(val.coco.dataset["annotations"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of any kind, or a shipped name")
    p.add_argument("--seed", type=int, default=1, help="the val set's seed (default 1)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--cache", default=None, help="where the val sets are kept")
    p.add_argument("--out", default=None, help="the JSON to write")
    args = p.parse_args(argv)
    from ddetr_tutorial.shipped import resolve_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = val_set(Path(args.cache or tmp), args.seed, args.size, args.images)
        results, objects = detections_of(resolve_checkpoint(args.checkpoint), folder)
    record = {"checkpoint": args.checkpoint, "seed": args.seed, "images": args.images,
              "size": args.size, **census(objects, results, args.threshold),
              "machine": machine()}
    print(json.dumps({k: record[k] for k in ("objects", "all", "false_positives")}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
