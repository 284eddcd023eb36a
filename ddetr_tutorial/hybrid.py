"""Hybrid matching (H-DETR, Jia et al., CVPR 2023; HDETR/H-Deformable-DETR), on our
two-stage Deformable DETR, training only.

In training, the decoder runs Q one-to-one queries (the usual ones) and Q_m extra
one-to-many queries: the two-stage head keeps the top Q + Q_m encoder proposals
instead of the top Q (the first Q are the usual ones, as topk is sorted). A
self-attention mask keeps each group from seeing the other, so the one-to-one part
is exactly the model without the extra queries. The one-to-one queries get the set
loss; the one-to-many ones get the same loss against the ground truth repeated k
times (so each object is matched to k queries), weighted lambda; the encoder's
proposal loss is counted once. At inference there are only the Q one-to-one queries:
the model is plain Deformable DETR, with the same state_dict keys.

As the official H-Deformable-DETR: Q_m = 1500 for Q = 300, k = 6, lambda = 1; the
one-to-many outputs carry every decoder layer (aux) but no encoder outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import SetCriterion


def hybrid_attn_mask(one2one: int, one2many: int, device=None) -> Tensor:
    """(Q + Q_m, Q + Q_m) bool, True where a query (row) may not attend to a key
    (column): the two groups are blind to each other."""
    n = one2one + one2many
    group = torch.arange(n, device=device) >= one2one
    return group[:, None] != group[None, :]


def repeat_targets(targets: list[dict], k: int) -> list[dict]:
    """Each image's ground truth repeated k times (labels (k T,), boxes (k T, 4))."""
    return [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)}
            for t in targets]


class HybridCriterion(SetCriterion):
    """The set criterion plus, when the outputs carry `one2many_outputs`, the same
    losses of the one-to-many queries against the targets repeated `k` times:
    keys `<name>_one2many`."""

    def __init__(self, *args, k: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = k

    def forward(self, outputs, targets: list[dict]) -> dict[str, Tensor]:
        losses = super().forward(outputs, targets)
        many = getattr(outputs, "one2many_outputs", None)
        if many is None:
            return losses
        extra = super().forward(many, repeat_targets(targets, self.k))
        losses.update({f"{name}_one2many": value for name, value in extra.items()})
        return losses


def hybrid_weight_dict(weights: dict[str, float], weight: float) -> dict[str, float]:
    """The set loss's weights plus, times `weight` (lambda), the same for the
    one-to-many terms of every decoder layer (not the encoder's `_enc`)."""
    out = dict(weights)
    out.update({f"{name}_one2many": w * weight for name, w in weights.items()
                if not name.endswith("_enc")})
    return out
