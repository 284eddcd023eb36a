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

from .box_ops import batched_generalized_box_iou, box_cxcywh_to_xyxy

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
    """Classification cost (P, T) of giving each of P predictions each of T labels.

    logits: (P, num_classes) raw; labels: (T,) int. It is the change in the
    sigmoid focal loss when a query stops being a negative for `label` and
    becomes its positive: pos[label] - neg[label]. The negative terms of all
    other (query, class) pairs are paid whatever the assignment, so that
    constant is left out: it cannot change which assignment is cheapest.
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + eps).log()  # (P, num_classes)
    pos = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    # Batched too: logits (..., P, num_classes) and labels (..., T) -> (..., P, T).
    index = labels.unsqueeze(-2).expand(*pos.shape[:-1], labels.shape[-1])
    return (pos - neg).gather(-1, index)


def softmax_class_cost(logits: Tensor, labels: Tensor) -> Tensor:
    """DETR's classification cost (P, T): -p(label), with p the softmax over the
    num_classes + 1 logits (the last, "no object", only takes probability away).
    DETR approximates the NLL by 1 - p; the 1 cannot change the assignment."""
    prob = logits.softmax(-1)
    index = labels.unsqueeze(-2).expand(*prob.shape[:-1], labels.shape[-1])
    return -prob.gather(-1, index)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of Q queries to T targets per image.

    cost = cost_class * focal class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU),
    with the official weights 2, 5, 2 (DETR's softmax head, `no_object=True`: the
    class cost is -p(label), weights 1, 5, 2). Returns, per image, (query_idx,
    target_idx) int64 tensors of length min(Q, T): query query_idx[k] predicts
    target target_idx[k].
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, no_object: bool = False):
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
        self.no_object = no_object

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: `pred_logits` (N, Q, num_classes), `pred_boxes` (N, Q, 4) cxcywh;
        targets: N dicts with `labels` (T_i,) and `boxes` (T_i, 4) cxcywh."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(f"expected pred_logits (N, Q, num_classes) and pred_boxes (N, Q, 4), "
                             f"got {tuple(logits.shape)} and {tuple(boxes.shape)}")
        N, Q, num_classes = logits.shape
        check_targets(targets, N, num_classes - self.no_object)
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        # Each image's queries against its own targets only, batched by padding the
        # targets to the longest list (the padding columns are cut off below).
        labels = nn.utils.rnn.pad_sequence([t["labels"].long() for t in targets], batch_first=True)
        target_cxcywh = nn.utils.rnn.pad_sequence(
            [t["boxes"].float() for t in targets], batch_first=True, padding_value=0.5)
        cost = self._weighted_cost(logits.float(), boxes.float(), labels.to(logits.device),
                                   target_cxcywh.to(logits.device), Q, sizes)
        cost = cost.cpu()  # (N, Q, max T_i)
        return [self._assign(cost[i, :, :sizes[i]], i) for i in range(N)]

    def cost_matrix(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> Tensor:
        """The weighted cost (N*Q, T_total) of every query of the batch against every
        target (the matching itself uses only each image's own block)."""
        N, Q = logits.shape[:2]
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device).long()  # (T_total,)
        target_cxcywh = torch.cat([t["boxes"] for t in targets]).to(logits.device).float()
        sizes = [len(t["labels"]) for t in targets]
        logits, boxes = logits.flatten(0, 1).float(), boxes.flatten(0, 1).float()  # (N*Q, .)
        return self._weighted_cost(logits[None], boxes[None], labels[None], target_cxcywh[None],
                                   Q, sizes)[0]

    def _weighted_cost(self, logits: Tensor, boxes: Tensor, labels: Tensor,
                       target_cxcywh: Tensor, num_queries: int, sizes: list[int]) -> Tensor:
        """logits (G, P, num_classes), boxes (G, P, 4), labels (G, T), target_cxcywh (G, T, 4)
        -> cost (G, P, T), for G groups of P predictions against T targets: either
        G = N images of P = Q queries each, or one group (G = 1) of P = N*Q."""
        # The callers pass float32: fp16 overflows in the logs, bf16 cannot go to
        # numpy, and scipy then fails with "matrix contains invalid numeric entries".
        cost_class = (softmax_class_cost(logits, labels) if self.no_object
                      else focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma))
        _check_finite("class", cost_class, num_queries, sizes)
        # L1 on cxcywh alone favours big boxes being matched loosely; GIoU is
        # scale-invariant and complements it.
        cost_bbox = torch.cdist(boxes, target_cxcywh, p=1)
        _check_finite("bbox", cost_bbox, num_queries, sizes)
        cost_giou = -batched_generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                                 box_cxcywh_to_xyxy(target_cxcywh))
        _check_finite("giou", cost_giou, num_queries, sizes)
        return (self.cost_class * cost_class + self.cost_bbox * cost_bbox
                + self.cost_giou * cost_giou)

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
    """Raise FloatingPointError naming `term` and an image if `cost` is not finite. `cost`
    is (N, Q, T_max), one block per image, or (1, N*Q, T_total), every query against
    every target."""
    bad = ~torch.isfinite(cost)
    if not bad.any():
        return
    if len(cost) > 1 or len(sizes) == 1:  # per image: a bad box spoils only its own block
        image = int(bad.flatten(1).any(1).nonzero()[0, 0])
    else:
        bad = bad[0]
        query_image = torch.arange(bad.shape[0], device=bad.device) // num_queries  # (N*Q,)
        target_image = torch.repeat_interleave(torch.arange(len(sizes), device=bad.device),
                                               torch.tensor(sizes, device=bad.device))
        # A bad target box spoils its own image's columns; a bad prediction its whole
        # row. Prefer an image's own block, the one scipy would choke on.
        own_block = bad & (query_image[:, None] == target_image[None, :])
        image = int((own_block if own_block.any() else bad).nonzero()[0, 0]) // num_queries
    inputs = "pred_logits" if term == "class" else "pred_boxes or the target boxes"
    raise FloatingPointError(
        f"the '{term}' matching cost is not finite for image {image}: {inputs} "
        "contain NaN or inf (a diverged run: lower the learning rate, check fp16/bf16 overflow)")
