"""Deformable DETR (+ iterative box refinement, + two-stage), and post-processing.

The forward pass reads like the paper's Fig. 1:
backbone -> input projections -> flatten levels -> encoder -> decoder -> heads.
Parameter names follow the official repository, so its checkpoints load unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .outputs import DetectionOutput
from .transformer import DeformableTransformer, inverse_sigmoid


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box head: 3 layers, C -> C -> C -> 4)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _input_projections(backbone, d_model, n_levels):
    """1x1 conv + GroupNorm per backbone level, then 3x3 stride-2 convs for the
    extra, coarser levels (C5 -> stride 64 in the paper's 4-level setting)."""
    levels = min(len(backbone.num_channels), n_levels)  # the last, coarsest ones
    projections = [nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(32, d_model))
                   for c in backbone.num_channels[-levels:]]
    in_channels = backbone.num_channels[-1]
    for _ in range(n_levels - len(projections)):
        projections.append(nn.Sequential(
            nn.Conv2d(in_channels, d_model, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(32, d_model)))
        in_channels = d_model
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projections)


class DeformableDETR(nn.Module):
    """The detector of the paper.

    backbone: a `Joiner` (backbone + position encoding) with `num_channels`;
    transformer: `DeformableTransformer`; num_classes: sigmoid classes (no
    "no-object" logit); num_queries: object queries (Q); n_levels: feature levels
    (L); aux_loss: return every decoder layer's predictions; with_box_refine,
    two_stage: Sec. 4.2; denoising: a `denoising.Denoising` (DN-DETR's training
    queries; forward then takes the targets in training); one2many: Q_m extra
    two-stage queries in training (hybrid matching, `hybrid.py`).
    """

    def __init__(self, backbone, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, n_levels: int, aux_loss: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False, denoising=None,
                 one2many: int = 0):
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError("two_stage=True needs with_box_refine=True: the proposals are "
                             "refined by per-layer box heads (as in the official code)")
        if two_stage != transformer.two_stage:
            raise ValueError(f"two_stage={two_stage} but the transformer was built with "
                             f"two_stage={transformer.two_stage}")
        self.num_queries, self.n_levels = num_queries, n_levels
        if one2many and (not two_stage or denoising is not None):
            raise ValueError("one2many queries need two_stage=True (they are the next-best "
                             "proposals) and no denoising")
        self.one2many = one2many
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.transformer = transformer
        self.backbone = backbone
        C = transformer.d_model
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * C)  # (position, content) halves
        self.input_proj = _input_projections(backbone, C, n_levels)
        self.class_embed, self.bbox_embed = self._heads(C, num_classes,
                                                        transformer.decoder.num_layers)
        if denoising is not None:  # registered only then: plain models keep their keys
            if not two_stage:
                raise ValueError("denoising needs two_stage=True: the dn queries' noised "
                                 "boxes are 4-d reference boxes, as the two-stage proposals")
            self.denoising = denoising

    @property
    def uses_targets(self) -> bool:
        """Whether forward wants the targets in training (DN)."""
        return getattr(self, "denoising", None) is not None

    def _heads(self, C, num_classes, num_layers):
        """Class and box heads, one per decoder layer (+1 for two-stage proposals):
        separate modules with box refinement, else one module shared by all."""
        class_embed = nn.Linear(C, num_classes)
        bbox_embed = MLP(C, C, 4, 3)
        prior = 0.01  # focal-loss prior: every query starts as background
        nn.init.constant_(class_embed.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        # Zero offsets plus bias -2 on (w, h): first boxes are small, sigmoid(-2) = 0.12.
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
        n = num_layers + 1 if self.two_stage else num_layers
        if self.with_box_refine:
            class_heads = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(n))
            box_heads = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(n))
            for head in box_heads[1:]:
                nn.init.zeros_(head.layers[-1].bias[2:])  # later layers refine, not resize
            self.transformer.decoder.bbox_embed = box_heads
        else:
            class_heads = nn.ModuleList([class_embed] * n)
            box_heads = nn.ModuleList([bbox_embed] * n)
        if self.two_stage:
            self.transformer.decoder.class_embed = class_heads
            for head in box_heads:
                nn.init.zeros_(head.layers[-1].bias[2:])  # proposals carry the size
        return class_heads, box_heads

    def forward(self, images, mask, targets=None) -> DetectionOutput:
        """images: (N, 3, H, W) normalized; mask: (N, H, W) bool, True on padding;
        targets: N dicts of labels, boxes, read only by a DN model in training.

        Returns a `DetectionOutput` (it answers `outputs["pred_logits"]` like the
        official dict): pred_logits (N, Q, classes), pred_boxes (N, Q, 4) cxcywh
        in [0, 1] of each unpadded image, aux_outputs (earlier decoder layers)
        and, for two-stage, enc_outputs (the encoder's proposals). Where the
        attention sampled: `ddetr_tutorial.recording.record_sampling`. A DN model
        in training also returns dn_outputs, the dn queries' predictions.
        """
        features, masks, pos = self.backbone(images, mask)
        srcs, masks, pos = self.project(features, masks, pos, mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        dn = None
        if self.uses_targets and self.training and targets is not None:
            dn = self.denoising.queries(targets, self.num_queries)  # None without targets
        one2many = self.one2many if self.training else 0
        hs, init_reference, references, enc_class, enc_coord_unact = \
            self.transformer(srcs, masks, pos, query_embed, dn=dn, one2many=one2many)
        logits, boxes = self.predict(hs, init_reference, references)
        enc_outputs = dn_outputs = one2many_outputs = None
        if one2many:  # (layers, N, Q + Q_m, ...): the one-to-one part, then the one-to-many
            Q = self.num_queries
            one2many_outputs = _detection_output(logits[:, :, Q:], boxes[:, :, Q:],
                                                 self.aux_loss)
            logits, boxes = logits[:, :, :Q], boxes[:, :, :Q]
        if self.two_stage:
            enc_outputs = DetectionOutput(enc_class, enc_coord_unact.sigmoid())
        if dn is not None:  # (layers, N, Q + G*P, ...): the matching part, then the dn part
            Q = self.num_queries
            dn_outputs = _detection_output(logits[:, :, Q:], boxes[:, :, Q:], self.aux_loss)
            logits, boxes = logits[:, :, :Q], boxes[:, :, :Q]
        elif self.uses_targets and self.training:  # no target: keep the embedding in the
            logits = logits + 0 * self.denoising.label_embed.weight.sum()  # graph (for DDP)
        output = _detection_output(logits, boxes, self.aux_loss, enc_outputs)
        output.dn_outputs, output.one2many_outputs = dn_outputs, one2many_outputs
        return output

    def project(self, features, masks, pos, image_mask):
        """Backbone maps -> L maps of width C, adding the extra strided levels."""
        levels = min(len(features), self.n_levels)
        srcs = [self.input_proj[lvl](feat) for lvl, feat in enumerate(features[-levels:])]
        masks, pos = list(masks[-levels:]), list(pos[-levels:])
        for lvl in range(levels, self.n_levels):
            src = self.input_proj[lvl](features[-1] if lvl == levels else srcs[-1])
            level_mask = F.interpolate(image_mask[None].float(), size=src.shape[-2:])[0].bool()
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))
        return srcs, masks, pos

    def predict(self, hs, init_reference, references):
        """Per decoder layer: class logits, and boxes as offsets in logit space from
        the layer's reference. hs: (layers, N, Q, C). Returns (layers, N, Q, ...)."""
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(delta.sigmoid())
        return torch.stack(logits), torch.stack(boxes)


def _detection_output(logits, boxes, aux_loss, enc_outputs=None) -> DetectionOutput:
    """Per-layer predictions (layers, N, Q, ...) -> the final layer's, with the
    earlier layers' as aux_outputs when `aux_loss`."""
    aux = [DetectionOutput(a, b) for a, b in zip(logits[:-1], boxes[:-1])] if aux_loss else None
    return DetectionOutput(logits[-1], boxes[-1], aux, enc_outputs)


# ------------------------------------------------------------------------- post-processing

class PostProcess(nn.Module):
    """Model outputs -> per-image detections in absolute xyxy pixels.

    Sigmoid heads: the top `num_select` over all (query, class) probabilities, so one
    query may yield several classes. Softmax heads (`no_object=True`, the original
    DETR, whose last class is "no object"): each query's best real class, the
    `num_select` best queries kept (DETR keeps all 100).
    """

    def __init__(self, num_select: int = 100, no_object: bool = False):
        super().__init__()
        self.num_select, self.no_object = num_select, no_object

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes: (N, 2) as (h, w) of the original images. Returns a list of
        dicts with scores (k,), labels (k,), boxes (k, 4) xyxy."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (N, 2) = ({logits.shape[0]}, 2), got "
                             f"{tuple(target_sizes.shape)}")
        N, Q, classes = logits.shape
        if self.no_object:
            scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)  # (N, Q)
            scores, query = scores.topk(min(self.num_select, Q), dim=1)
            labels = labels.gather(1, query)
        else:
            probs = logits.sigmoid().flatten(1)  # (N, Q * classes)
            scores, index = probs.topk(min(self.num_select, Q * classes), dim=1)
            query, labels = index // classes, index % classes
        boxes_xyxy = box_cxcywh_to_xyxy(boxes.float())
        boxes_xyxy = torch.gather(boxes_xyxy, 1, query[..., None].expand(-1, -1, 4))
        h, w = target_sizes.float().unbind(1)
        boxes_xyxy = boxes_xyxy * torch.stack([w, h, w, h], 1)[:, None]
        return [{"scores": s, "labels": lab, "boxes": b}
                for s, lab, b in zip(scores, labels, boxes_xyxy)]
