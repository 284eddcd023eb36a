"""DETR (Carion et al., ECCV 2020): the dense detector Deformable DETR sets out to fix.

One map (C5, stride 32; DC5: 16), dense attention over all of its S pixels in
the encoder (O(S^2)) and from every object query in the decoder, post-norm
layers, Q learned queries decoded from zeros. Two heads:
- the original (`no_object=True`): a softmax over num_classes + 1 classes, the
  last one "no object" (weighted eos_coef = 0.1 in the loss);
- DETR+ (`no_object=False`): Deformable DETR's sigmoid focal head (Table 1's
  "DETR-DC5+"), so the two papers' detectors share one criterion.
Names follow facebookresearch/detr, so its checkpoints load with strict=True.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .model import MLP, _detection_output
from .outputs import DetectionOutput


class DETREncoderLayer(nn.Module):
    """Dense self-attention over all S pixels (q = k = src + pos, v = src), FFN, post-norm."""

    def __init__(self, d_model, n_heads, d_ffn, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, padding_mask):
        """src, pos: (N, S, C); padding_mask: (N, S) True on padding."""
        q = k = src + pos
        attended = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DETRDecoderLayer(nn.Module):
    """Query self-attention, dense cross-attention (`multihead_attn`) to every pixel, FFN."""

    def __init__(self, d_model, n_heads, d_ffn, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout,
                                                    batch_first=True)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, memory, pos, padding_mask):
        """tgt, query_pos: (N, Q, C); memory, pos: (N, S, C); padding_mask: (N, S)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory,
                                       key_padding_mask=padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class _Layers(nn.Module):
    """A stack of layers under `layers.<i>` (and the decoder's final `norm`)."""

    def __init__(self, layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class DETRTransformer(nn.Module):
    """DETR's encoder-decoder: every decoder layer's output, through the shared final
    LayerNorm, is returned for the auxiliary losses."""

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 d_ffn=2048, dropout=0.1):
        super().__init__()
        self.encoder = _Layers(DETREncoderLayer(d_model, n_heads, d_ffn, dropout)
                               for _ in range(num_encoder_layers))
        self.decoder = _Layers((DETRDecoderLayer(d_model, n_heads, d_ffn, dropout)
                                for _ in range(num_decoder_layers)), nn.LayerNorm(d_model))

    def forward(self, src, pos, padding_mask, query_embed):
        """src, pos: (N, S, C); query_embed: (Q, C). Returns hs (layers, N, Q, C)."""
        for layer in self.encoder.layers:
            src = layer(src, pos, padding_mask)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        hs = []
        for layer in self.decoder.layers:
            tgt = layer(tgt, query_pos, src, pos, padding_mask)
            hs.append(self.decoder.norm(tgt))
        return torch.stack(hs)


class DETR(nn.Module):
    """DETR: backbone -> 1x1 input projection -> dense transformer -> class and box heads.

    no_object: the original softmax head with num_classes + 1 outputs (the last is
    "no object"); False: a sigmoid head of num_classes outputs with the focal-loss
    prior, as Deformable DETR's "DETR+" baselines.
    """

    def __init__(self, backbone, num_classes, num_queries=100, d_model=256, n_heads=8,
                 num_encoder_layers=6, num_decoder_layers=6, d_ffn=2048,
                 dropout=0.1, aux_loss=True, no_object=True):
        super().__init__()
        self.backbone, self.aux_loss, self.no_object = backbone, aux_loss, no_object
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], d_model, kernel_size=1)
        self.transformer = DETRTransformer(d_model, n_heads, num_encoder_layers,
                                           num_decoder_layers, d_ffn, dropout)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1 if no_object else num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        if no_object:  # the official init: Xavier on the transformer's matrices only
            matrices = self.transformer.parameters()
        else:  # DETR+, as this library's baseline always was: on every matrix but the backbone's
            matrices = (p for n, p in self.named_parameters() if not n.startswith("backbone"))
        for p in matrices:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if not no_object:  # focal loss: every query starts as background (p = 0.01)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, images, mask) -> DetectionOutput:
        """images (N, 3, H, W), mask (N, H, W) True on padding -> pred_logits (N, Q, classes),
        pred_boxes (N, Q, 4) cxcywh in [0, 1], and the earlier layers' as aux_outputs."""
        features, masks, pos = self.backbone(images, mask)
        src = self.input_proj(features[-1]).flatten(2).transpose(1, 2)  # (N, S, C)
        pos = pos[-1].flatten(2).transpose(1, 2)
        hs = self.transformer(src, pos, masks[-1].flatten(1), self.query_embed.weight)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        return _detection_output(logits, boxes, self.aux_loss)
