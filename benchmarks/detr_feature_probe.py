"""Can the class of a shapes object be read off the pretrained backbone's maps?

A linear probe (softmax regression) on the frozen `shapes_resnet18_w32` features
at 128 px: per object, the feature of the cell holding its box centre, or the
mean over the cells its box covers (what an ideal attention over that map
could gather), on C3 (16x16, stride 8), C4 (8x8), C5 (4x4, DETR's only map)
and DC5's C5 (8x8). Trained on `--train-images` training images, top-1 on the
validation images.

    OMP_NUM_THREADS=1 python benchmarks/detr_feature_probe.py --data data/shapes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine
from ddetr_tutorial.backbone import Backbone
from ddetr_tutorial.config import build_transforms, get_config
from ddetr_tutorial.data import build_dataset, collate_fn


@torch.no_grad()
def object_features(body, dataset, count, levels):
    """{(level, mode): (T, C_l)} features and labels (T,) of the first `count` images."""
    feats, labels = {}, []
    for start in range(0, count, 16):
        batch = [dataset[i] for i in range(start, min(start + 16, count))]
        images, mask, targets = collate_fn(batch)
        maps = body(images)
        for t_idx, t in enumerate(targets):
            labels.append(t["labels"])
            for name, level in levels.items():
                fmap = maps[level][t_idx]  # (C, h, w)
                h, w = fmap.shape[-2:]
                cx, cy, bw, bh = t["boxes"].unbind(-1)
                col = (cx * w).long().clamp(0, w - 1)
                row = (cy * h).long().clamp(0, h - 1)
                feats.setdefault((name, "centre"), []).append(fmap[:, row, col].T)
                x0 = ((cx - bw / 2) * w).floor().long().clamp(0, w - 1)
                x1 = ((cx + bw / 2) * w).ceil().long().clamp(1, w)
                y0 = ((cy - bh / 2) * h).floor().long().clamp(0, h - 1)
                y1 = ((cy + bh / 2) * h).ceil().long().clamp(1, h)
                pooled = [fmap[:, a:b, c:d].mean((1, 2)) for a, b, c, d in zip(y0, y1, x0, x1)]
                feats.setdefault((name, "box_mean"), []).append(torch.stack(pooled))
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def probe(x_train, y_train, x_val, y_val, classes, steps=300):
    """Softmax regression (standardized features, L-BFGS) -> validation top-1."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x_train), y_train) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float((linear(x_val).argmax(1) == y_val).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--train-images", type=int, default=600)
    ap.add_argument("--out", default="benchmarks/results/detr_investigation/feature_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    cfg = get_config("tiny_pretrained", image_size=128)
    train = build_dataset(args.data, "train", build_transforms(cfg, "val"))
    val = build_dataset(args.data, "val", build_transforms(cfg, "val"),
                        category_ids=train.category_ids)
    result = {}
    for dilation in (False, True):
        body = Backbone("resnet18", pretrained=cfg.pretrained_backbone, width=32,
                        dilation=dilation).body.eval()
        levels = {"C5_dc5": 3} if dilation else {"C3": 1, "C4": 2, "C5": 3}
        x_tr, y_tr = object_features(body, train, args.train_images, levels)
        x_va, y_va = object_features(body, val, len(val), levels)
        for key in x_tr:
            result[f"{key[0]} {key[1]}"] = probe(x_tr[key], y_tr, x_va[key], y_va, 4)
            print(key, result[f"{key[0]} {key[1]}"], flush=True)
    out = {"top1": result, "train_objects": int(len(y_tr)), "val_objects": int(len(y_va)),
           "chance": float(torch.bincount(y_va).max() / len(y_va)),
           "seconds": round(time.time() - start, 1), "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["top1"], indent=1), out["chance"])


if __name__ == "__main__":
    main()
