"""Dynamic DETR (Dai et al., ICCV 2021, "Dynamic DETR: End-to-End Object Detection with
Dynamic Attention"): convolution-based dynamic attention in the encoder, RoI-based
dynamic attention in the decoder.

A re-implementation from the paper: there is no official code. The pieces:
- Dynamic encoder (Sec. 3.1). For every level l of the 4-level pyramid (Deformable
  DETR's C3-C5 + one extra, projected to C), a layer fuses the neighbouring scales
  l-1, l, l+1 (`DynamicEncoderLayer`):
  - spatial attention by deformable sampling: a 3x3 kernel of K = 9 taps around each
    pixel, moved by offsets predicted from level l (the middle level's offsets serve
    all three scales) and weighted by sigmoid modulation (DCNv2's), run by our
    `ms_deform_attn` op over the three maps;
  - scale attention: an SE block on the three scales' pooled features gives one weight
    per scale and image (`ScaleAttention`);
  - dynamic ReLU (`DyReLU`, Chen et al. 2020, DY-ReLU-B): max of two per-channel linear
    pieces whose slopes and intercepts come from the pooled features.
- Dynamic decoder (Sec. 3.2). Each layer (`DynamicDecoderLayer`): self-attention
  among the queries (q = k = content + the box's positional code), then RoIAlign 7x7 of
  the current boxes from the pyramid, then a dynamic convolution whose two filters come
  from each query (Sparse R-CNN's `DynamicConv`), then an FFN; the layer's box head
  refines its box (Deformable DETR's refinement in logit space, detached between layers).
- The loss: Deformable DETR's focal set loss on every decoder layer.

Choices where the paper (or the notes we work from) is silent:
- Sec. 3.1: the deformable kernel's taps share each head's value projection (as
  Deformable DETR's W'_m), not one matrix per tap; M heads, offsets per head shared
  by the three scales, modulation per head, scale and tap; offsets start at zero (the
  plain 3x3 grid, in level-l pixels) and modulation at 0.5.
- Sec. 3.1: each layer adds its attention output to its input (residual), then
  GroupNorm(32), then dynamic ReLU; the pooled statistics skip padding.
- Sec. 3.1: SE on the concatenated pooled features of the three scales, reduction 4,
  sigmoid; a missing neighbour (the finest and coarsest levels have one) pools as zeros
  and gets weight 0.
- Sec. 3.2: the queries are a learned content embedding and learned boxes, whose
  centres start uniform at random over the image and whose sides start at half of it
  (logit 0); the positional code is a 2-layer MLP of the box's sine code.
- Sec. 3.2: RoIs are pooled from the level the FPN rule picks (P3-P6 here, canonical
  box 224 px at P4; `tiny_dynamic_detr` scales it to 32 px); the dynamic filters are
  (C x D) and (D x C), D = `dim_dynamic`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .model import MLP, _detection_output, _input_projections
from .ops import ms_deform_attn
from .outputs import DetectionOutput
from .roi_align import pyramid_roi_align
from .sparse_rcnn import DynamicConv, image_whwh
from .transformer import DeformableTransformer, inverse_sigmoid


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), mask (N, H, W) True on padding -> (N, C) mean over valid pixels."""
    valid = (~mask)[:, None].to(x.dtype)
    return (x * valid).sum((2, 3)) / valid.sum((2, 3)).clamp(min=1)


class DyReLU(nn.Module):
    """Dynamic ReLU (DY-ReLU-B): y_c = max_k (a_c^k x_c + b_c^k), k = 1, 2, with
    (a, b) = (1, 0, 0, 0) + (1, 1, 0.5, 0.5) * (2 sigmoid(FC(ReLU(FC(pool(x))))) - 1):
    a plain ReLU when the hyper-function outputs 0."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(channels, max(1, channels // reduction))
        self.fc2 = nn.Linear(max(1, channels // reduction), 4 * channels)
        self.register_buffer("scale", torch.tensor([1.0, 1.0, 0.5, 0.5]), persistent=False)
        self.register_buffer("init", torch.tensor([1.0, 0.0, 0.0, 0.0]), persistent=False)

    def coefficients(self, x, mask):
        """-> (N, C, 4): a^1, a^2, b^1, b^2 per image and channel."""
        theta = 2 * torch.sigmoid(self.fc2(F.relu(self.fc1(masked_mean(x, mask))))) - 1
        return theta.view(x.shape[0], x.shape[1], 4) * self.scale + self.init

    def forward(self, x, mask):
        c = self.coefficients(x, mask)[..., None, None]  # (N, C, 4, 1, 1)
        return torch.maximum(x * c[:, :, 0] + c[:, :, 2], x * c[:, :, 1] + c[:, :, 3])


class ScaleAttention(nn.Module):
    """SE over three scales: pooled (N, 3, C) -> sigmoid weights (N, 3), one per scale."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(3 * channels, max(1, channels // reduction))
        self.fc2 = nn.Linear(max(1, channels // reduction), 3)

    def forward(self, pooled):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled.flatten(1)))))


def kernel_grid(n_points: int) -> torch.Tensor:
    """The K taps of a sqrt(K) x sqrt(K) kernel, (K, 2) as (x, y) in pixels around 0."""
    side = math.isqrt(n_points)
    if side * side != n_points:
        raise ValueError(f"n_points={n_points}: expected a square (a 3x3 kernel is 9)")
    r = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


class DynamicEncoderLayer(nn.Module):
    """Every level attends to itself and its two neighbouring scales (Sec. 3.1).

    forward(srcs, masks): L maps (N, C, H_l, W_l) finest first, their padding masks
    (N, H_l, W_l) -> L maps of the same shapes.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, n_points: int = 9,
                 dropout: float = 0.1, backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.n_points = d_model, n_heads, n_points
        self.backend = backend
        self.register_buffer("grid", kernel_grid(n_points), persistent=False)
        # offsets (M, K, 2), shared by the three scales, and modulation (M, 3, K)
        self.sampling_offsets = nn.Conv2d(d_model, n_heads * n_points * 5, 3, padding=1)
        nn.init.zeros_(self.sampling_offsets.weight)
        nn.init.zeros_(self.sampling_offsets.bias)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.scale_attention = ScaleAttention(d_model)
        self.norm = nn.GroupNorm(32, d_model)
        self.activation = DyReLU(d_model)
        self.dropout = nn.Dropout(dropout)

    def sampling(self, src, level: int, slots: list[int]):
        """Sampling locations (N, HW, M, S, K, 2) normalized, and modulation (N, HW, M, S, K)
        for level `level`'s pixels on its neighbouring scales `slots` (of 0, 1, 2 =
        finer, same, coarser)."""
        N, _, H, W = src.shape
        M, K = self.n_heads, self.n_points
        pred = self.sampling_offsets(src).flatten(2).transpose(1, 2)  # (N, HW, 5MK)
        offsets = pred[..., :2 * M * K].reshape(N, H * W, M, 1, K, 2)
        modulation = pred[..., 2 * M * K:].reshape(N, H * W, M, 3, K)[:, :, :, slots].sigmoid()
        ys, xs = torch.meshgrid(torch.arange(H, device=src.device, dtype=src.dtype) + 0.5,
                                torch.arange(W, device=src.device, dtype=src.dtype) + 0.5,
                                indexing="ij")
        centre = torch.stack([xs.flatten(), ys.flatten()], -1)  # (HW, 2) in level-l pixels
        size = torch.tensor([W, H], device=src.device, dtype=src.dtype)
        taps = centre[None, :, None, None, None] + self.grid.to(src.dtype) + offsets
        return (taps / size).expand(-1, -1, -1, len(slots), -1, -1).contiguous(), modulation

    def forward(self, srcs, masks):
        L = len(srcs)
        values = [self.value_proj(s.flatten(2).transpose(1, 2)).masked_fill(
            m.flatten(1)[..., None], 0.0).unflatten(-1, (self.n_heads, -1))
            for s, m in zip(srcs, masks)]  # (N, H_l W_l, M, D)
        pooled = torch.stack([masked_mean(s, m) for s, m in zip(srcs, masks)], 1)  # (N, L, C)
        outputs = []
        for lvl, (src, mask) in enumerate(zip(srcs, masks)):
            levels = [j for j in (lvl - 1, lvl, lvl + 1) if 0 <= j < L]
            slots = [j - lvl + 1 for j in levels]
            three = pooled.new_zeros(pooled.shape[0], 3, pooled.shape[2])
            three[:, slots] = pooled[:, levels]
            scale = self.scale_attention(three)[:, slots]  # (N, S)
            locations, modulation = self.sampling(src, lvl, slots)
            weights = modulation * scale[:, None, None, :, None]
            shapes = torch.tensor([srcs[j].shape[-2:] for j in levels], device=src.device)
            starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
            sampled = ms_deform_attn(torch.cat([values[j] for j in levels], 1), shapes, starts,
                                     locations, weights, backend=self.backend)
            y = self.output_proj(sampled).transpose(1, 2).reshape(src.shape)
            outputs.append(self.activation(self.norm(src + self.dropout(y)), mask))
        return outputs


class DynamicDecoderLayer(nn.Module):
    """Self-attention among queries, RoI-based dynamic attention, FFN (Sec. 3.2).

    forward(tgt (N, Q, C), query_pos (N, Q, C), rois (N * Q, C, 7, 7)) -> (N, Q, C).
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, d_ffn: int = 1024,
                 dropout: float = 0.1, dim_dynamic: int = 64, pooler_resolution: int = 7):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout,
                                               batch_first=True)
        self.dynamic_conv = DynamicConv(d_model, dim_dynamic, pooler_resolution)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, rois):
        N, Q, C = tgt.shape
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt)[0]))
        rois = rois.flatten(2).permute(2, 0, 1)  # (49, N * Q, C)
        dynamic = self.dynamic_conv(tgt.reshape(1, N * Q, C), rois).view(N, Q, C)
        tgt = self.norm2(tgt + self.dropout(dynamic))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class DynamicDETR(nn.Module):
    """backbone -> input projections (4 levels) -> dynamic encoder -> dynamic decoder with
    box refinement -> heads.

    backbone: a `Joiner` returning C3-C5; the rest as `DeformableDETR`'s, plus
    n_points (the encoder's kernel taps, 9), dim_dynamic (D) and canonical_size (the
    side of a box pooled from P4). Returns a `DetectionOutput`.
    """

    def __init__(self, backbone, num_classes: int, num_queries: int = 300, n_levels: int = 4,
                 d_model: int = 256, n_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, d_ffn: int = 1024, dropout: float = 0.1,
                 n_points: int = 9, dim_dynamic: int = 64, canonical_size: float = 224.0,
                 aux_loss: bool = True, backend: str = "auto"):
        super().__init__()
        self.backbone, self.num_queries, self.n_levels = backbone, num_queries, n_levels
        self.aux_loss, self.canonical_size, self.d_model = aux_loss, canonical_size, d_model
        self.input_proj = _input_projections(backbone, d_model, n_levels)
        levels = min(len(backbone.strides), n_levels)
        strides = backbone.strides[-levels:]
        self.strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(n_levels - levels)]
        self.encoder = nn.ModuleList(
            DynamicEncoderLayer(d_model, n_heads, n_points, dropout, backend)
            for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(
            DynamicDecoderLayer(d_model, n_heads, d_ffn, dropout, dim_dynamic)
            for _ in range(num_decoder_layers))
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.query_boxes = nn.Embedding(num_queries, 4)  # logits of cxcywh
        nn.init.uniform_(self.query_boxes.weight[:, :2], -3.0, 3.0)  # centres over the image
        nn.init.zeros_(self.query_boxes.weight[:, 2:])  # sides 0.5
        self.pos_mlp = MLP(2 * d_model, d_model, d_model, 2)
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes)
                                         for _ in range(num_decoder_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3)
                                        for _ in range(num_decoder_layers))
        for cls, box in zip(self.class_embed, self.bbox_embed):
            nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))  # the focal prior
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)

    def forward(self, images, mask, targets=None) -> DetectionOutput:
        """images (N, 3, H, W) normalized; mask (N, H, W) True on padding."""
        features, masks, _ = self.backbone(images, mask)
        srcs, masks = self.project(features, masks, mask)
        for layer in self.encoder:
            srcs = layer(srcs, masks)
        N = images.shape[0]
        whwh = image_whwh(mask).to(images.dtype)
        tgt = self.query_embed.weight[None].expand(N, -1, -1)
        boxes = self.query_boxes.weight.sigmoid()[None].expand(N, -1, -1)
        logits, all_boxes = [], []
        for layer, cls_head, box_head in zip(self.decoder, self.class_embed, self.bbox_embed):
            embed = DeformableTransformer.proposal_pos_embed(inverse_sigmoid(boxes),
                                                             self.d_model // 2)
            pixels = box_cxcywh_to_xyxy(boxes.detach()) * whwh[:, None]  # no grad via RoIs
            rois = pyramid_roi_align(srcs, list(pixels),
                                     self.strides, 7, sampling_ratio=2, min_level=3,
                                     canonical_size=self.canonical_size)
            tgt = layer(tgt, self.pos_mlp(embed.to(tgt.dtype)), rois)
            new_boxes = (inverse_sigmoid(boxes) + box_head(tgt)).sigmoid()
            logits.append(cls_head(tgt))
            all_boxes.append(new_boxes)
            boxes = new_boxes.detach()
        return _detection_output(torch.stack(logits), torch.stack(all_boxes), self.aux_loss)

    def project(self, features, masks, image_mask):
        """Backbone maps -> L maps of width C with their masks (Deformable DETR's levels)."""
        levels = min(len(features), self.n_levels)
        srcs = [self.input_proj[i](f) for i, f in enumerate(features[-levels:])]
        masks = list(masks[-levels:])
        for lvl in range(levels, self.n_levels):
            srcs.append(self.input_proj[lvl](features[-1] if lvl == levels else srcs[-1]))
            masks.append(F.interpolate(image_mask[None].float(),
                                       size=srcs[-1].shape[-2:])[0].bool())
        return srcs, masks
