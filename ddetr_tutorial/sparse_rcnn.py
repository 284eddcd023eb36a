"""Sparse R-CNN (Sun et al. 2021, "Sparse R-CNN: End-to-End Object Detection with
Learnable Proposals"; PeizeSun/SparseR-CNN): a fixed, small set of learned boxes and
features, refined by six dynamic heads, trained with set matching, and no NMS.

- Proposals: `init_proposal_boxes` (N_p, 4), cxcywh relative to the image, start as the
  whole image (0.5, 0.5, 1, 1); `init_proposal_features` (N_p, C) are learned too.
- Features: a ResNet's C2-C5 through an FPN to P2-P5 (`fpn.py`); each box is pooled
  7x7 from the level its size picks (`roi_align.pyramid_roi_align`, aligned=True,
  2x2 samples per bin).
- A stage (`RCNNHead`): self-attention among the proposal features, then the dynamic
  instance interaction (`DynamicConv`): each proposal feature generates two matrices,
  (C x D) and (D x C), that its own 49 RoI features go through (bmm, LayerNorm, ReLU,
  twice), then flatten and a linear layer back to C; then an FFN. A class head (1 x
  Linear+LayerNorm+ReLU) and a box head (3 x) predict class logits and box deltas
  (x/y weighted 2, w/h 1, Faster R-CNN's parametrisation), applied to the stage's
  boxes. The next stage starts from these boxes, detached, and these features.
- Loss: the sigmoid focal loss with Hungarian matching on every stage (costs and weights
  2 / 5 / 2), as Deformable DETR's set criterion; inference: the top scores over
  (proposal, class), no NMS.

Head parameter names follow the official repository (`head.head_series.{i}....`);
the backbone is this library's torchvision-layout ResNet, so official detectron2
checkpoints do not load unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .fpn import FPN
from .outputs import DetectionOutput
from .roi_align import pyramid_roi_align

BOX_WEIGHTS = (2.0, 2.0, 1.0, 1.0)  # the deltas' (x, y, w, h) scales
SCALE_CLAMP = math.log(100000.0 / 16)  # no exp() overflow for the w, h deltas


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Faster R-CNN's box parametrisation: boxes (K, 4) xyxy, deltas (K, 4) ->
    the moved boxes (K, 4) xyxy: centre + (dx / 2) w, width x exp(dw)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    wx, wy, ww, wh = BOX_WEIGHTS
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[:, 3] / wh).clamp(max=SCALE_CLAMP)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = dw.exp() * w, dh.exp() * h
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], -1)


class DynamicConv(nn.Module):
    """The dynamic instance interaction: parameters generated from each proposal feature.

    forward(pro_features (1, B, C), roi_features (S, B, C)) -> (B, C), B = images x
    proposals, S = 7 x 7 RoI bins.
    """

    def __init__(self, d_model: int, dim_dynamic: int, pooler_resolution: int = 7,
                 num_dynamic: int = 2):
        super().__init__()
        self.d_model, self.dim_dynamic = d_model, dim_dynamic
        self.num_params = d_model * dim_dynamic
        self.dynamic_layer = nn.Linear(d_model, num_dynamic * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(d_model)
        self.out_layer = nn.Linear(d_model * pooler_resolution ** 2, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, pro_features: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        features = roi_features.permute(1, 0, 2)  # (B, S, C)
        params = self.dynamic_layer(pro_features).permute(1, 0, 2)  # (B, 1, 2 C D)
        param1 = params[:, :, :self.num_params].reshape(-1, self.d_model, self.dim_dynamic)
        param2 = params[:, :, self.num_params:].reshape(-1, self.dim_dynamic, self.d_model)
        features = F.relu(self.norm1(torch.bmm(features, param1)))  # (B, S, D)
        features = F.relu(self.norm2(torch.bmm(features, param2)))  # (B, S, C)
        return F.relu(self.norm3(self.out_layer(features.flatten(1))))


def _linear_norm_relu(d_model: int, n: int) -> nn.ModuleList:
    layers = []
    for _ in range(n):
        layers += [nn.Linear(d_model, d_model, bias=False), nn.LayerNorm(d_model),
                   nn.ReLU(inplace=True)]
    return nn.ModuleList(layers)


class RCNNHead(nn.Module):
    """One of the six stages: proposals' self-attention, the dynamic interaction with
    their RoI features, an FFN, then class logits and boxes."""

    def __init__(self, d_model: int, num_classes: int, n_heads: int = 8, d_ffn: int = 2048,
                 dropout: float = 0.0, dim_dynamic: int = 64, pooler_resolution: int = 7,
                 num_cls: int = 1, num_reg: int = 3):
        super().__init__()
        self.d_model = d_model
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.inst_interact = DynamicConv(d_model, dim_dynamic, pooler_resolution)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.cls_module = _linear_norm_relu(d_model, num_cls)
        self.reg_module = _linear_norm_relu(d_model, num_reg)
        self.class_logits = nn.Linear(d_model, num_classes)
        self.bboxes_delta = nn.Linear(d_model, 4)

    def forward(self, roi_features, boxes, pro_features):
        """roi_features (N * P, C, 7, 7); boxes (N, P, 4) xyxy pixels; pro_features
        (N, P, C). Returns class logits (N, P, classes), boxes (N, P, 4) xyxy and the
        object features (N, P, C) for the next stage."""
        N, P, C = pro_features.shape
        rois = roi_features.flatten(2).permute(2, 0, 1)  # (49, N * P, C)
        pro = pro_features.transpose(0, 1)  # (P, N, C): attention among one image's proposals
        pro = self.norm1(pro + self.dropout1(self.self_attn(pro, pro, pro)[0]))
        pro = pro.transpose(0, 1).reshape(1, N * P, C)
        obj = self.norm2(pro + self.dropout2(self.inst_interact(pro, rois)[None]))
        obj = self.norm3(obj + self.dropout3(self.linear2(self.dropout(
            F.relu(self.linear1(obj))))))
        feature = obj[0]  # (N * P, C)
        cls_feature, reg_feature = feature, feature
        for layer in self.cls_module:
            cls_feature = layer(cls_feature)
        for layer in self.reg_module:
            reg_feature = layer(reg_feature)
        logits = self.class_logits(cls_feature).view(N, P, -1)
        new_boxes = apply_deltas(self.bboxes_delta(reg_feature), boxes.reshape(-1, 4))
        return logits, new_boxes.view(N, P, 4), feature.view(N, P, C)


class DynamicHead(nn.Module):
    """The six stages in series; each pools the previous stage's (detached) boxes."""

    def __init__(self, head: RCNNHead, num_stages: int, strides: list[int],
                 pooler_resolution: int = 7, roi_backend: str = "auto",
                 canonical_size: float = 224.0):
        super().__init__()
        self.head_series = nn.ModuleList(copy.deepcopy(head) for _ in range(num_stages))
        for p in self.head_series.parameters():  # as the official head, after the copies
            if p.dim() > 1:                      # (each stage its own draw): xavier, then
                nn.init.xavier_uniform_(p)       # the focal prior: every class at 0.01
        for stage in self.head_series:
            nn.init.constant_(stage.class_logits.bias, -math.log((1 - 0.01) / 0.01))
        self.strides, self.pooler_resolution = list(strides), pooler_resolution
        self.roi_backend, self.canonical_size = roi_backend, canonical_size

    def forward(self, features, boxes, pro_features):
        """features: P2..P5; boxes (N, P, 4) xyxy pixels; pro_features (N, P, C).
        Returns per-stage logits and boxes, each (stages, N, P, ...)."""
        all_logits, all_boxes = [], []
        for stage in self.head_series:
            # RoIAlign passes no gradient to its boxes (as torchvision's): detach them
            rois = pyramid_roi_align(features, list(boxes.detach()), self.strides,
                                     self.pooler_resolution, sampling_ratio=2,
                                     canonical_size=self.canonical_size,
                                     backend=self.roi_backend)
            logits, new_boxes, pro_features = stage(rois, boxes, pro_features)
            all_logits.append(logits)
            all_boxes.append(new_boxes)
            boxes = new_boxes.detach()
        return torch.stack(all_logits), torch.stack(all_boxes)


class SparseRCNN(nn.Module):
    """backbone -> FPN (P2-P5) -> learned proposals -> six dynamic stages -> heads.

    backbone: a `Backbone` returning C2..C5 (with `strides` and `num_channels`);
    num_classes: sigmoid classes; num_proposals: N_p; num_stages: 6 in the paper;
    d_model: C (the FPN's and the heads' width); dim_dynamic: D of the generated
    parameters (64 at C = 256); canonical_size: the side of a box pooled from P4 (224,
    detectron2's; `tiny_sparse_rcnn` scales it to its small images). Returns a
    `DetectionOutput`: pred_boxes cxcywh relative to each unpadded image (as every
    detector here), aux_outputs the earlier stages'.
    """

    def __init__(self, backbone, num_classes: int, num_proposals: int = 100,
                 num_stages: int = 6, d_model: int = 256, n_heads: int = 8,
                 d_ffn: int = 2048, dropout: float = 0.0, dim_dynamic: int = 64,
                 aux_loss: bool = True, roi_backend: str = "auto",
                 canonical_size: float = 224.0):
        super().__init__()
        if len(backbone.num_channels) != 4:
            raise ValueError(f"Sparse R-CNN pools from P2-P5: the backbone must return the 4 "
                             f"maps C2-C5, got {len(backbone.num_channels)}")
        self.backbone = backbone
        self.fpn = FPN(backbone.num_channels, d_model, backbone.strides)
        self.num_queries, self.aux_loss = num_proposals, aux_loss
        self.init_proposal_features = nn.Embedding(num_proposals, d_model)
        self.init_proposal_boxes = nn.Embedding(num_proposals, 4)
        nn.init.constant_(self.init_proposal_boxes.weight[:, :2], 0.5)  # the whole image
        nn.init.constant_(self.init_proposal_boxes.weight[:, 2:], 1.0)
        head = RCNNHead(d_model, num_classes, n_heads, d_ffn, dropout, dim_dynamic)
        self.head = DynamicHead(head, num_stages, backbone.strides, roi_backend=roi_backend,
                                canonical_size=canonical_size)

    def forward(self, images, mask, targets=None) -> DetectionOutput:
        """images (N, 3, H, W) normalized; mask (N, H, W) True on padding."""
        features, _ = self.backbone(images, mask)
        pyramid = self.fpn(features)
        whwh = image_whwh(mask).to(images.dtype)  # (N, 4) of each unpadded image
        N = images.shape[0]
        boxes = box_cxcywh_to_xyxy(self.init_proposal_boxes.weight)[None] * whwh[:, None]
        pro = self.init_proposal_features.weight[None].expand(N, -1, -1)
        logits, stage_boxes = self.head(pyramid, boxes, pro)
        rel = box_xyxy_to_cxcywh(stage_boxes / whwh[None, :, None])
        aux = ([DetectionOutput(a, b) for a, b in zip(logits[:-1], rel[:-1])]
               if self.aux_loss else None)
        return DetectionOutput(logits[-1], rel[-1], aux)


def image_whwh(mask: torch.Tensor) -> torch.Tensor:
    """mask (N, H, W) True on padding -> (N, 4) (w, h, w, h) of each image's unpadded part."""
    w = (~mask[:, 0, :]).sum(1)
    h = (~mask[:, :, 0]).sum(1)
    return torch.stack([w, h, w, h], 1)
