"""Why the original DETR stalls on shapes: a few hundred steps, measured per step.

Trains the tiny DETR of the convergence study (the `tiny_pretrained` backbone and
sizes, DETR's softmax head with eos 0.1, one C5 map) and records, per step:
- the gradient norm of each parameter group before clipping, and the clip factor
  min(1, clip_max_norm / total norm) that scales every group;
- the decoder cross-attention entropy over the S valid pixels, divided by log(S)
  (1 = uniform attention; a localized query is well below 1);
- loss_ce against the class-blind optimum: the entropy of the batch's weighted
  labels (matched queries weight 1 on their class, the others eos_coef on "no
  object"), the best any model can do that gives every query the same distribution.

    OMP_NUM_THREADS=1 python benchmarks/detr_stall_probe.py NAME --steps 300 --set lr=1e-4

writes benchmarks/results/detr_investigation/NAME.json (the per-step rows and summaries).
`--set deformable=true ...` trains the same-sized Deformable DETR (`tiny_pretrained`)
instead, for comparison (no attention entropy or blind optimum: its head is focal).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import machine
from ddetr_tutorial.config import build_model, build_transforms, get_config
from ddetr_tutorial.data import build_dataset, collate_fn
from ddetr_tutorial.engine import build_optimizer, to_device
from ddetr_tutorial.losses import total_loss
from ddetr_tutorial.reproducibility import make_loader, seed_everything, set_epoch

DETR = dict(model="detr", no_object=True, eos_coef=0.1, position_offset=0.0,
            num_feature_levels=1, set_cost_class=1.0, cls_loss_coef=1.0,
            with_box_refine=False, two_stage=False)
GROUPS = (("dec0.self_attn.biases", ("transformer.decoder.layers.0.self_attn.in_proj_bias",
                                     "transformer.decoder.layers.0.self_attn.out_proj.bias")),
          ("dec0.self_attn.weights", ("transformer.decoder.layers.0.self_attn.",)),
          ("dec0.norm1", ("transformer.decoder.layers.0.norm1.",)),
          ("decoder.rest", ("transformer.decoder.",)),
          ("encoder", ("transformer.encoder.",)),
          ("backbone", ("backbone.",)), ("input_proj", ("input_proj.",)),
          ("query_embed", ("query_embed.",)), ("class_embed", ("class_embed.",)),
          ("bbox_embed", ("bbox_embed.",)))


def group_of(name: str) -> str:
    """The first group of GROUPS whose prefixes match the parameter `name`."""
    return next((g for g, prefixes in GROUPS if name.startswith(prefixes)), "other")


def group_norms(model) -> dict[str, float]:
    """Gradient L2 norm of each group (before clipping)."""
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[group_of(name)] = sq.get(group_of(name), 0.0) + float(p.grad.pow(2).sum())
    return {g: math.sqrt(v) for g, v in sq.items()}


class CrossAttentionEntropy:
    """Forward pre-hooks on every decoder `multihead_attn` that recompute its weights
    (N, M, Q, S) from its inputs and keep the mean entropy / log(S_valid) per layer."""

    def __init__(self, model):
        self.values: dict[int, float] = {}
        for i, layer in enumerate(model.transformer.decoder.layers):
            layer.multihead_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    def _hook(self, i):
        def hook(attn, args, kwargs):
            with torch.no_grad():
                query, key = args[0], args[1]  # (N, Q, C), (N, S, C)
                pad = kwargs["key_padding_mask"]  # (N, S) True on padding
                C, M = query.shape[-1], attn.num_heads
                w, b = attn.in_proj_weight, attn.in_proj_bias
                q = (query @ w[:C].T + b[:C]).unflatten(-1, (M, C // M)).transpose(1, 2)
                k = (key @ w[C:2 * C].T + b[C:2 * C]).unflatten(-1, (M, C // M)).transpose(1, 2)
                logits = q @ k.transpose(-1, -2) / math.sqrt(C // M)  # (N, M, Q, S)
                logits = logits.masked_fill(pad[:, None, None], float("-inf"))
                p = logits.softmax(-1)
                ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (N, M, Q)
                valid = (~pad).sum(1).clamp_min(2).float().log()  # (N,)
                self.values[i] = float((ent / valid[:, None, None]).mean())
        return hook


def class_blind_ce(targets, num_queries: int, num_classes: int, eos_coef: float) -> float:
    """Entropy of the weighted label histogram: the loss_ce of predicting one fixed
    distribution for every query (its optimum is that histogram)."""
    counts = torch.zeros(num_classes + 1)
    for t in targets:
        counts[:num_classes] += torch.bincount(t["labels"], minlength=num_classes).float()
        counts[-1] += eos_coef * (num_queries - len(t["labels"]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def train_step(model, criterion, optimizer, batch, cfg, entropy) -> dict:
    """One AdamW step as `engine.train_step` (clip at cfg.clip_max_norm, 0: none), with the
    group norms measured before clipping. Returns the step's row."""
    images, mask, targets = to_device(*batch, torch.device("cpu"))
    losses = criterion(model(images, mask), targets)
    loss = total_loss(losses, criterion.weight_dict)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = group_norms(model)
    clip = cfg.clip_max_norm if cfg.clip_max_norm > 0 else math.inf
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = float(torch.nn.utils.clip_grad_norm_(params, clip))
    optimizer.step()
    detr = entropy is not None
    return {"step": None, "loss": loss.item(), "loss_ce": losses["loss_ce"].item(),
            "blind_ce": (class_blind_ce(targets, cfg.num_queries, cfg.num_classes, cfg.eos_coef)
                         if detr else None),
            "class_error": losses["class_error"].item(),
            "loss_giou": losses["loss_giou"].item(), "grad_norm": total,
            "clip_factor": min(1.0, clip / total), "group_norms": norms,
            "xattn_entropy": [entropy.values[i] for i in sorted(entropy.values)] if detr else []}


def run(name: str, steps: int, overrides: dict, data: str, out_dir: Path, seed: int = 0,
        save: str | None = None):
    torch.set_num_threads(1)
    seed_everything(seed)
    detr = not overrides.get("deformable", False)  # {"deformable": true}: the baseline
    cfg = get_config("tiny_pretrained", image_size=128, **(DETR if detr else {}))
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if k != "deformable"})
    train = build_dataset(data, "train", build_transforms(cfg, "train"))
    model, criterion, _ = build_model(cfg)
    entropy = CrossAttentionEntropy(model) if detr else None
    optimizer, _ = build_optimizer(model, cfg)
    loader = make_loader(train, cfg.batch_size, shuffle=True, collate_fn=collate_fn, seed=seed)
    rows, step, epoch, start = [], 0, 0, time.time()
    model.train()
    while step < steps:
        set_epoch(loader, epoch)
        for batch in loader:
            rows.append({**train_step(model, criterion, optimizer, batch, cfg, entropy),
                         "step": step})
            step += 1
            if step % 25 == 0:
                r = rows[-1]
                print(f"{name} {step} ce {r['loss_ce']:.3f} blind {r['blind_ce']} "
                      f"cls_err {r['class_error']:.1f} giou {r['loss_giou']:.3f} "
                      f"norm {r['grad_norm']:.2f} H {r['xattn_entropy']}", flush=True)
            if step >= steps:
                break
        epoch += 1
    if save:  # the final weights, for detr_attention_probe.py
        torch.save({"model": model.state_dict()}, save)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "overrides": overrides, "steps": steps, "seed": seed,
              "seconds": round(time.time() - start, 1), "machine": machine(),
              "summary": summarize(rows), "rows": rounded(rows)}
    (out_dir / f"{name}.json").write_text(json.dumps(result))
    print(json.dumps(result["summary"], indent=1))


def rounded(value, digits: int = 6):
    """`value` (nested lists / dicts of floats) with floats to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def summarize(rows, window: int = 50) -> dict:
    """Means over the first and last `window` steps of every scalar, and the groups'
    share of the squared total gradient norm."""
    def mean(rs, key):
        values = [r[key] for r in rs if r[key] is not None]
        return sum(values) / len(values) if values else float("nan")
    out = {}
    for label, rs in (("first", rows[:window]), ("last", rows[-window:])):
        s = {k: round(mean(rs, k), 4) for k in ("loss_ce", "blind_ce", "class_error",
                                                 "loss_giou", "grad_norm", "clip_factor")}
        s["xattn_entropy"] = [round(sum(r["xattn_entropy"][i] for r in rs) / len(rs), 4)
                              for i in range(len(rs[0]["xattn_entropy"]))]
        sq = {g: sum(r["group_norms"].get(g, 0.0) ** 2 for r in rs)
              for g in [g for g, _ in GROUPS] + ["other"]}
        total = sum(sq.values())
        s["grad_share"] = {g: round(v / total, 4) for g, v in sq.items()}
        out[label] = s
    out["step0_group_norms"] = {g: round(v, 4) for g, v in rows[0]["group_norms"].items()}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--out", default="benchmarks/results/detr_investigation")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (JSON values)")
    ap.add_argument("--save", default=None, help="write the final model state here")
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    run(args.name, args.steps, overrides, args.data, Path(args.out), args.seed, args.save)


if __name__ == "__main__":
    main()
