"""Query denoising (DN-DETR, Li et al., CVPR 2022), on our two-stage Deformable DETR.

In training, noised copies of the ground truth join the Q matching queries as
extra queries: each of G groups holds one query per target (padded to P, the
most targets of any image of the batch), its content the embedding of the
(possibly flipped) label plus an indicator bit 1, its reference box the noised
box (Sec. 3.2: centres moved by up to lambda_1 w / 2, h / 2, sides scaled by up to
1 +- lambda_1, labels flipped with probability lambda_2). An attention mask
(Sec. 3.3) keeps the matching queries from seeing any dn query and each group
from seeing the others; the dn queries reconstruct their own targets, without
matching, with the set loss's focal + L1 + GIoU on every decoder layer. At
inference there are no dn queries: the model is plain Deformable DETR.

Where the paper is silent, or its DN-Deformable-DETR differs from our base:
- dn queries follow the Q matching ones (the official code puts them first);
  the mask is shared by the batch, so a group's padding queries stay visible
  to its real ones (as official) but get no loss;
- the positional query of a dn query is made from its box by the two-stage
  head (sine embedding, `pos_trans`) that makes the matching queries' from
  their proposal: the official DN-Deformable-DETR builds on DAB's 4-d anchors,
  which our base has only in two-stage, so DN needs two_stage=True;
- the matching queries keep their own content (no indicator bit 0 on them), so
  a DN model's weights run unchanged in a plain model;
- the dn loss is normalised by the number of real dn queries (G x targets), on
  each process (as official); a batch without targets has no dn queries, and
  the model keeps the label embedding in its graph with a zero term (for DDP).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from .losses import SetCriterion, sigmoid_focal_loss


class DenoisingQueries(NamedTuple):
    """The dn part of the decoder's queries: tgt (N, G*P, C) content, reference_points
    (N, G*P, 4) noised cxcywh boxes in [0, 1], attn_mask (Q + G*P, Q + G*P) bool,
    True where a query (row) may not attend to a key (column)."""

    tgt: Tensor
    reference_points: Tensor
    attn_mask: Tensor


def group_size(targets: list[dict]) -> int:
    """P: the queries of one dn group, the most targets of any image of the batch."""
    return max((len(t["labels"]) for t in targets), default=0)


def dn_indices(targets: list[dict], groups: int) -> list[tuple[Tensor, Tensor]]:
    """Per image, (dn query index, target index), each (G * T_i,): target j of group g
    is query g * P + j of the dn part (the layout `Denoising.queries` builds)."""
    P = group_size(targets)
    indices = []
    for t in targets:
        T = len(t["labels"])
        target = torch.arange(T).repeat(groups)  # (G * T,)
        query = target + torch.arange(groups).repeat_interleave(T) * P
        indices.append((query, target))
    return indices


def attention_mask(num_matching: int, group: int, groups: int, device=None) -> Tensor:
    """(Q + G*P, Q + G*P) bool, True = blocked: the Q matching queries see no dn query
    (no answer can leak into the matching), a dn group sees no other group, and dn
    queries see the matching ones and their own group."""
    total = num_matching + group * groups
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:num_matching, num_matching:] = True
    for g in range(groups):
        start, end = num_matching + g * group, num_matching + (g + 1) * group
        mask[start:end, num_matching:start] = True
        mask[start:end, end:] = True
    return mask


def noise_labels(labels: Tensor, probability: float, num_classes: int,
                 generator: torch.Generator | None = None) -> Tensor:
    """Each label (any shape, long) replaced, with `probability`, by a class drawn
    uniformly from [0, num_classes) (which may be the same one)."""
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    random = torch.randint(0, num_classes, labels.shape, generator=generator,
                           device=labels.device)
    return torch.where(flip, random, labels)


def noise_boxes(boxes: Tensor, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """(..., 4) cxcywh in [0, 1] -> noised, clipped to [0, 1]: centres moved by
    u * scale * (w, h) / 2 and sides by u * scale * (w, h), u ~ U(-1, 1) per number."""
    u = torch.rand(boxes.shape, generator=generator, device=boxes.device) * 2 - 1
    wh = boxes[..., 2:]
    diff = torch.cat([wh / 2, wh], -1)
    return (boxes + u * diff * scale).clamp(0.0, 1.0)


class Denoising(nn.Module):
    """Builds the dn queries from the targets of a training batch.

    num_classes: sigmoid classes (row num_classes of the label embedding is
    "unknown", for padding); d_model: C (C - 1 embedding + 1 indicator bit);
    groups: G; label_noise: lambda_2; box_noise: lambda_1.
    """

    def __init__(self, num_classes: int, d_model: int, groups: int = 5,
                 label_noise: float = 0.2, box_noise: float = 0.4):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups={groups}: expected an integer >= 1")
        if not 0 <= label_noise <= 1 or box_noise < 0:
            raise ValueError(f"label_noise={label_noise}, box_noise={box_noise}: expected a "
                             f"probability in [0, 1] and a scale >= 0")
        self.num_classes, self.groups = num_classes, groups
        self.label_noise, self.box_noise = label_noise, box_noise
        self.label_embed = nn.Embedding(num_classes + 1, d_model - 1)

    def queries(self, targets: list[dict], num_matching: int,
                generator: torch.Generator | None = None) -> DenoisingQueries | None:
        """targets: N dicts of labels (T_i,), boxes (T_i, 4). None when the batch has no
        target (nothing to reconstruct)."""
        P, G = group_size(targets), self.groups
        if P == 0:
            return None
        device = self.label_embed.weight.device
        N = len(targets)
        labels = torch.full((N, G, P), self.num_classes, dtype=torch.long, device=device)
        boxes = torch.zeros(N, G, P, 4, device=device)
        for i, t in enumerate(targets):
            T = len(t["labels"])
            labels[i, :, :T] = t["labels"].to(device).long()
            boxes[i, :, :T] = t["boxes"].to(device, torch.float32)
        real = labels < self.num_classes
        noised = noise_labels(labels, self.label_noise, self.num_classes, generator)
        labels = torch.where(real, noised, labels)
        boxes = noise_boxes(boxes, self.box_noise, generator)
        content = self.label_embed(labels.flatten(1))  # (N, G*P, C-1)
        indicator = content.new_ones(*content.shape[:2], 1)  # 1: a dn query
        mask = attention_mask(num_matching, P, G, device)
        return DenoisingQueries(torch.cat([content, indicator], -1), boxes.flatten(1, 2), mask)


def denoising_losses(outputs, targets: list[dict], groups: int,
                     focal_alpha: float = 0.25) -> dict[str, Tensor]:
    """One layer's reconstruction loss: focal, L1 and 1 - GIoU of each real dn query
    against its own target, summed and divided by their number. outputs:
    pred_logits (N, G*P, classes), pred_boxes (N, G*P, 4) of the dn part."""
    logits, pred = outputs["pred_logits"], outputs["pred_boxes"]
    indices = dn_indices(targets, groups)
    image = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(pred.device)
    query = torch.cat([q for q, _ in indices]).to(pred.device)
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(pred.device)
    boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)
    num = max(float(len(query)), 1.0)
    real_logits = logits[image, query][None]  # (1, R, classes)
    onehot = F.one_hot(labels.long(), logits.shape[-1]).to(real_logits)[None]
    loss_ce = sigmoid_focal_loss(real_logits, onehot, num, focal_alpha) * len(query)
    loss_bbox = F.l1_loss(pred[image, query], boxes, reduction="none").sum() / num
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred[image, query]),
                                      box_cxcywh_to_xyxy(boxes))
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num}


class DenoisingCriterion(SetCriterion):
    """The set criterion plus, when the outputs carry `dn_outputs`, the reconstruction
    loss of every decoder layer: keys `loss_*_dn` (last layer) and `loss_*_dn_{i}`."""

    def __init__(self, *args, groups: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups = groups

    def forward(self, outputs, targets: list[dict]) -> dict[str, Tensor]:
        losses = super().forward(outputs, targets)
        dn = getattr(outputs, "dn_outputs", None)
        if dn is None:
            return losses
        layers = [("_dn", dn)] + [(f"_dn_{i}", a) for i, a in enumerate(dn.aux_outputs or [])]
        for suffix, layer in layers:
            terms = denoising_losses(layer, targets, self.groups, self.focal_alpha)
            losses.update({name + suffix: value for name, value in terms.items()})
        return losses


def dn_weight_dict(weights: dict[str, float], num_decoder_layers: int,
                   aux_loss: bool) -> dict[str, float]:
    """The set loss's weights plus the same ones for the dn terms of every layer."""
    base = {name: weights[name] for name in ("loss_ce", "loss_bbox", "loss_giou")}
    out = dict(weights)
    out.update({f"{name}_dn": w for name, w in base.items()})
    if aux_loss:
        for i in range(num_decoder_layers - 1):
            out.update({f"{name}_dn_{i}": w for name, w in base.items()})
    return out
