"""Where a trained DETR's matched queries look, and what their features know.

For a DETR checkpoint (the tiny shapes DETR of detr_stall_probe.py), on the
validation images: per decoder layer, the cross-attention weight (mean over
heads) that each matched query puts on the C5 cell holding its object's
centre, against 1/S for uniform attention, how often that cell is the query's
most attended one (chance: about 1/S), and the attention entropy / log S.
Then a linear probe: the final decoder output hs of the matched queries ->
their object's class (fit on `--fit-images` training images, top-1 on val),
against the linear probe on the encoder memory at the object's centre cell.

    OMP_NUM_THREADS=1 python benchmarks/detr_attention_probe.py CHECKPOINT --data data/shapes
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from common import machine
from ddetr_tutorial.config import build_model, build_transforms, get_config
from ddetr_tutorial.data import build_dataset, collate_fn
from detr_feature_probe import probe
from detr_stall_probe import DETR


class Recorder:
    """Pre-hooks keeping each decoder cross-attention's weights (N, Q, S), mean over
    heads, and the encoder memory (N, S, C) it reads."""

    def __init__(self, model):
        self.weights, self.memory = {}, None
        for i, layer in enumerate(model.transformer.decoder.layers):
            layer.multihead_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    def _hook(self, i):
        def hook(attn, args, kwargs):
            query, key, value = args
            pad = kwargs["key_padding_mask"]
            C, M = query.shape[-1], attn.num_heads
            w, b = attn.in_proj_weight, attn.in_proj_bias
            q = (query @ w[:C].T + b[:C]).unflatten(-1, (M, C // M)).transpose(1, 2)
            k = (key @ w[C:2 * C].T + b[C:2 * C]).unflatten(-1, (M, C // M)).transpose(1, 2)
            logits = (q @ k.transpose(-1, -2) / math.sqrt(C // M))
            logits = logits.masked_fill(pad[:, None, None], float("-inf"))
            self.weights[i] = logits.softmax(-1).mean(1)  # (N, Q, S)
            self.memory = value
        return hook


@torch.no_grad()
def collect(model, criterion, dataset, count, recorder):
    """Per matched (query, object): attention on the object's cell per layer, entropy,
    hs of the query, memory at the cell, label."""
    rows = {"on_object": [], "peak": [], "entropy": [], "hs": [], "memory": [], "labels": [],
            "S": []}
    for start in range(0, count, 16):
        images, mask, targets = collate_fn([dataset[i] for i in range(start,
                                                                      min(start + 16, count))])
        out = model(images, mask)
        hs = recorder.hs
        indices = criterion.matcher(out, targets)
        h, w = model.backbone[0](images, mask)[1][-1].shape[-2:]
        for n, (qi, ti) in enumerate(indices):
            boxes = targets[n]["boxes"][ti]
            cell = ((boxes[:, 1] * h).long().clamp(0, h - 1) * w
                    + (boxes[:, 0] * w).long().clamp(0, w - 1))  # (T,)
            per_layer = [recorder.weights[i][n, qi, cell] for i in sorted(recorder.weights)]
            rows["on_object"].append(torch.stack(per_layer, 1))  # (T, layers)
            rows["peak"].append(torch.stack([recorder.weights[i][n, qi].argmax(-1) == cell
                                             for i in sorted(recorder.weights)], 1).float())
            ent = [-(recorder.weights[i][n, qi] * recorder.weights[i][n, qi].clamp_min(1e-12)
                     .log()).sum(-1) / math.log(h * w) for i in sorted(recorder.weights)]
            rows["entropy"].append(torch.stack(ent, 1))
            rows["hs"].append(hs[-1][n, qi])
            rows["memory"].append(recorder.memory[n, cell])
            rows["labels"].append(targets[n]["labels"][ti])
        rows["S"].append(h * w)
    return {k: (torch.cat(v) if k != "S" else v[0]) for k, v in rows.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--fit-images", type=int, default=600)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (JSON)")
    ap.add_argument("--out", default=None, help="a JSON file for the result")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = get_config("tiny_pretrained", image_size=128, **DETR).replace(**overrides)
    model, criterion, _ = build_model(cfg)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state.get("model", state))
    model.eval()
    recorder = Recorder(model)
    # hs of every decoder layer: the transformer's output, caught by a forward hook.
    model.transformer.register_forward_hook(lambda m, i, o: setattr(recorder, "hs", o))
    train = build_dataset(args.data, "train", build_transforms(cfg, "val"))
    val = build_dataset(args.data, "val", build_transforms(cfg, "val"),
                        category_ids=train.category_ids)
    fit, test = (collect(model, criterion, d, n, recorder)
                 for d, n in ((train, args.fit_images), (val, len(val))))
    result = {"checkpoint": args.checkpoint, "S": test["S"], "uniform": 1 / test["S"],
              "attention_on_object_cell": test["on_object"].mean(0).tolist(),
              "attention_entropy_over_logS": test["entropy"].mean(0).tolist(),
              "share_peaking_on_object_cell": test["peak"].mean(0).tolist(),
              "probe_top1_hs": probe(fit["hs"], fit["labels"], test["hs"], test["labels"], 4),
              "probe_top1_memory": probe(fit["memory"], fit["labels"], test["memory"],
                                         test["labels"], 4),
              "matched_objects_val": int(len(test["labels"])), "machine": machine()}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
