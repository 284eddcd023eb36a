"""Hungarian matching of predictions to targets (DETR Sec. 3.1; Deformable DETR Sec. 3 and 5).

DETR-style detectors predict a fixed set of Q boxes per image and are trained
against the T ground-truth objects through a one-to-one assignment: the one
that minimises the sum of pairwise matching costs. Unmatched queries learn to
predict "nothing" (all class probabilities low). scipy's
`linear_sum_assignment` solves the assignment exactly.
"""

from __future__ import annotations

import warnings

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_targets(targets: list[dict], batch_size: int, num_classes: int) -> None:
    """Raise TypeError/ValueError unless `targets` is N dicts of int `labels` (T,) in
    [0, num_classes) and float `boxes` (T, 4). Runs before any indexing, so a bad
    label is reported here rather than as an IndexError (or a CUDA assert) later."""
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch_size} images")
    for i, target in enumerate(targets):
        labels, boxes = target["labels"], target["boxes"]
        if labels.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"targets[{i}]['labels'] must be an integer tensor (int64), "
                            f"got {labels.dtype}")
        if labels.dim() != 1 or boxes.shape != (labels.shape[0], 4):
            raise ValueError(f"targets[{i}] must have labels (T,) and boxes (T, 4), got labels "
                             f"{tuple(labels.shape)} and boxes {tuple(boxes.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0]
            raise ValueError(f"targets[{i}] has label {int(bad)}, but labels must lie in "
                             f"[0, num_classes) with num_classes={num_classes}")


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25,
                     gamma: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Classification cost (B, T) of giving each of B predictions each of T labels.

    logits: (B, num_classes) raw; labels: (T,) int. It is the change in the
    sigmoid focal loss when a query stops being a negative for `label` and
    becomes its positive: pos[label] - neg[label]. The negative terms of all
    other (query, class) pairs are paid whatever the assignment, so that
    constant is left out: it cannot change which assignment is cheapest.
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + eps).log()  # (B, num_classes)
    pos = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of Q queries to T targets per image.

    cost = cost_class * focal class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU),
    with the official weights 2, 5, 2. Returns, per image, (query_idx, target_idx)
    int64 tensors of length min(Q, T): query query_idx[k] predicts target target_idx[k].
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        weights = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not any(weights.values()):
            raise ValueError("cost_class, cost_bbox and cost_giou are all 0: "
                             "every assignment would cost the same")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: `pred_logits` (N, Q, num_classes), `pred_boxes` (N, Q, 4) cxcywh;
        targets: N dicts with `labels` (T_i,) and `boxes` (T_i, 4) cxcywh."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(f"expected pred_logits (N, Q, num_classes) and pred_boxes (N, Q, 4), "
                             f"got {tuple(logits.shape)} and {tuple(boxes.shape)}")
        N, Q, num_classes = logits.shape
        check_targets(targets, N, num_classes)
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(logits, boxes, targets)  # (N*Q, T_total)
        # Costs between image i's queries and image j's targets are computed too (one
        # batched computation is faster than N small ones) but only blocks [i][i] are used.
        per_image = cost.view(N, Q, -1).cpu().split(sizes, dim=-1)
        return [self._assign(per_image[i][i], i) for i in range(N)]

    def cost_matrix(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> Tensor:
        """The weighted cost (N*Q, T_total) of every query of the batch against every target."""
        N, Q = logits.shape[:2]
        # Costs in float32: fp16 overflows in the logs, bf16 cannot go to numpy,
        # and scipy then fails with "matrix contains invalid numeric entries".
        logits = logits.flatten(0, 1).float()  # (N*Q, num_classes)
        boxes_cxcywh = boxes.flatten(0, 1).float()  # (N*Q, 4)
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device).long()  # (T_total,)
        target_cxcywh = torch.cat([t["boxes"] for t in targets]).to(boxes_cxcywh)  # (T_total, 4)
        sizes = [len(t["labels"]) for t in targets]

        cost_class = focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        _check_finite("class", cost_class, Q, sizes)
        # L1 on cxcywh alone favours big boxes being matched loosely; GIoU is
        # scale-invariant and complements it.
        cost_bbox = torch.cdist(boxes_cxcywh, target_cxcywh, p=1)
        _check_finite("bbox", cost_bbox, Q, sizes)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes_cxcywh),
                                         box_cxcywh_to_xyxy(target_cxcywh))
        _check_finite("giou", cost_giou, Q, sizes)
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    def _assign(self, cost: Tensor, image: int) -> tuple[Tensor, Tensor]:
        Q, T = cost.shape
        if T > Q:
            warnings.warn(f"image {image} has {T} targets but the model has only {Q} queries: "
                          f"{T - Q} objects get no query and are not learned; raise num_queries",
                          stacklevel=3)
        query_idx, target_idx = linear_sum_assignment(cost.numpy())
        return (torch.as_tensor(query_idx, dtype=torch.int64),
                torch.as_tensor(target_idx, dtype=torch.int64))


def _check_finite(term: str, cost: Tensor, num_queries: int, sizes: list[int]) -> None:
    """Raise FloatingPointError naming `term` and an image if `cost` (N*Q, T_total) is not finite."""
    bad = ~torch.isfinite(cost)
    if not bad.any():
        return
    query_image = torch.arange(cost.shape[0], device=cost.device) // num_queries  # (N*Q,)
    target_image = torch.repeat_interleave(torch.arange(len(sizes), device=cost.device),
                                           torch.tensor(sizes, device=cost.device))  # (T_total,)
    # A bad target box spoils its own image's block; a bad prediction spoils its
    # whole row. Prefer an image's own block, the one scipy would choke on.
    own_block = bad & (query_image[:, None] == target_image[None, :])
    row = int((own_block if own_block.any() else bad).nonzero()[0, 0])
    inputs = "pred_logits" if term == "class" else "pred_boxes or the target boxes"
    raise FloatingPointError(
        f"the '{term}' matching cost is not finite for image {row // num_queries}: {inputs} "
        "contain NaN or inf (a diverged run: lower the learning rate, check fp16/bf16 overflow)")
