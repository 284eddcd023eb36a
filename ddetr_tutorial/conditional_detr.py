"""Conditional DETR (Meng et al., ICCV 2021): DETR whose cross-attention is told where to look.

DETR's cross-attention adds the query's position to its content, so one dot product
has to find both what and where, and training is slow. Conditional DETR keeps them
apart, per head, by concatenation:
- cross-attention query [c_q; p_q] and key [c_k; p_k], each (M, 2D), so that per head
  [c_q; p_q] . [c_k; p_k] = c_q . c_k + p_q . p_k (content and spatial attention add,
  the head dim is 2D, the softmax scale 1 / sqrt(2D)); the values stay (M, D);
- the spatial query p_q = ca_qpos_sine_proj(T * sine(s)): s (N, Q, 2) is a reference
  point, sigmoid(ref_point_head(query embedding)), sine(s) its sine embedding, and
  T = query_scale(decoder embedding) an elementwise scale (Sec. 3.3); T is not applied
  in the first layer, which also adds DETR's positional query (ca_qpos_proj) to c_q;
- boxes relative to s: the box head's (x, y) outputs are offsets in logit space,
  box = sigmoid(bbox_embed(f) + [logit(s), 0, 0]) (Sec. 3.2).
The encoder is DETR's; the head is the sigmoid focal one of Deformable DETR (300 queries).
Names follow Atten4Vis/ConditionalDETR, so its checkpoints load with strict=True.
Shapes: N batch, Q queries, S tokens, C width, M heads, D = C / M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .detr import DETREncoderLayer, _Layers
from .model import MLP, _detection_output
from .outputs import DetectionOutput
from .transformer import inverse_sigmoid


def sine_embedding(points, num_feats: int, temperature: float = 10000.0):
    """points (N, Q, 2) as (x, y) in [0, 1] -> (N, Q, 2F): F features per axis, y first,
    sin and cos interleaved, as the feature map's position code (positions times 2 pi)."""
    i = torch.arange(num_feats, dtype=points.dtype, device=points.device)
    wavelengths = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    angles = points[..., None] * (2 * math.pi) / wavelengths  # (N, Q, 2, F)
    codes = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(-2)
    return torch.cat([codes[..., 1, :], codes[..., 0, :]], -1)  # (y, x)


def concat_heads(content, spatial, n_heads: int):
    """content, spatial (N, L, C) -> (N, L, 2C) laid out as M heads of [content; spatial],
    each 2D wide: what lets the attention logit split into a content and a spatial term."""
    N, L, C = content.shape
    both = torch.stack([content.view(N, L, n_heads, C // n_heads),
                        spatial.view(N, L, n_heads, C // n_heads)], 3)  # (N, L, M, 2, D)
    return both.flatten(2)


class ProjectedAttention(nn.Module):
    """Multi-head attention over inputs already projected: only `out_proj` is learned
    (the official attention.py, whose q/k/v projections are the layer's sa_*/ca_* Linears).

    forward(q (N, Lq, M*Dk), k (N, S, M*Dk), v (N, S, C), key_padding_mask (N, S) True on
    padding) -> (output (N, Lq, C), weights (N, M, Lq, S)); logits scaled by 1 / sqrt(Dk).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.out_proj.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q, k, v, key_padding_mask=None):
        N, Lq, S, M = q.shape[0], q.shape[1], k.shape[1], self.n_heads
        q = q.view(N, Lq, M, -1).transpose(1, 2)  # (N, M, Lq, Dk)
        k = k.view(N, S, M, -1).transpose(1, 2)  # (N, M, S, Dk)
        v = v.view(N, S, M, -1).transpose(1, 2)  # (N, M, S, D)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (N, M, Lq, S)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None], float("-inf"))
        weights = logits.softmax(-1)
        out = (self.dropout(weights) @ v).transpose(1, 2).flatten(2)  # (N, Lq, C)
        return self.out_proj(out), weights


class ConditionalDecoderLayer(nn.Module):
    """Self-attention, conditional cross-attention, FFN; post-norm, as DETR's.

    Content and position get projections of their own (sa_* / ca_*). is_first: the
    first layer keeps DETR's positional query (ca_qpos_proj); the later ones have none.
    """

    def __init__(self, d_model, n_heads, d_ffn, dropout, is_first: bool):
        super().__init__()
        self.n_heads, self.is_first = n_heads, is_first
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj",
                     "sa_v_proj"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.self_attn = ProjectedAttention(d_model, n_heads, dropout)
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        if is_first:
            self.ca_qpos_proj = nn.Linear(d_model, d_model)
        for name in ("ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.cross_attn = ProjectedAttention(d_model, n_heads, dropout)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, spatial_query, memory, pos, padding_mask):
        """tgt, query_pos, spatial_query (T * sine(s)): (N, Q, C); memory, pos: (N, S, C);
        padding_mask: (N, S). Returns the decoder embedding (N, Q, C)."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, self.sa_v_proj(tgt))[0]))
        attended = self.cross_attn(*self.cross_query_key(tgt, query_pos, spatial_query,
                                                         memory, pos),
                                   self.ca_v_proj(memory), padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))

    def cross_query_key(self, tgt, query_pos, spatial_query, memory, pos):
        """The cross-attention's query (N, Q, 2C) and key (N, S, 2C): per head
        [c_q; p_q] and [c_k; p_k], with p_q = ca_qpos_sine_proj(spatial_query)."""
        q_content, k_content = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.is_first:  # the official first layer also adds the positions to the content
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q_spatial = self.ca_qpos_sine_proj(spatial_query)
        return (concat_heads(q_content, q_spatial, self.n_heads),
                concat_heads(k_content, k_pos, self.n_heads))


class ConditionalDecoder(nn.Module):
    """The layers, their shared final LayerNorm (`norm`), `ref_point_head` (query
    embedding -> s) and `query_scale` (decoder embedding -> T)."""

    def __init__(self, d_model, n_heads, num_layers, d_ffn, dropout):
        super().__init__()
        self.layers = nn.ModuleList(ConditionalDecoderLayer(d_model, n_heads, d_ffn, dropout,
                                                            is_first=i == 0)
                                    for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(self, query_pos, memory, pos, padding_mask):
        """query_pos (N, Q, C), memory and pos (N, S, C) -> hs (layers, N, Q, C), every
        layer's output through `norm`, and the reference points s (N, Q, 2) as (x, y)."""
        reference = self.ref_point_head(query_pos).sigmoid()
        tgt = torch.zeros_like(query_pos)  # DETR decodes from zeros
        hs = []
        for i, layer in enumerate(self.layers):
            spatial = self.spatial_query(reference, tgt, i)
            tgt = layer(tgt, query_pos, spatial, memory, pos, padding_mask)
            hs.append(self.norm(tgt))
        return torch.stack(hs), reference

    def spatial_query(self, reference, tgt, layer_index: int):
        """T * sine(s), (N, Q, C): T = query_scale(tgt), the decoder embedding entering
        the layer; the first layer's embedding holds no content yet, so it is unscaled."""
        sine = sine_embedding(reference, tgt.shape[-1] // 2)
        return sine if layer_index == 0 else sine * self.query_scale(tgt)


class ConditionalTransformer(nn.Module):
    """DETR's encoder, then the conditional decoder. Xavier on every matrix (official)."""

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 d_ffn=2048, dropout=0.1):
        super().__init__()
        self.d_model = d_model
        self.encoder = _Layers(DETREncoderLayer(d_model, n_heads, d_ffn, dropout)
                               for _ in range(num_encoder_layers))
        self.decoder = ConditionalDecoder(d_model, n_heads, num_decoder_layers, d_ffn, dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, pos, padding_mask, query_embed):
        """src, pos: (N, S, C); padding_mask (N, S); query_embed: (Q, C).
        Returns hs (layers, N, Q, C) and the reference points s (N, Q, 2)."""
        for layer in self.encoder.layers:
            src = layer(src, pos, padding_mask)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        return self.decoder(query_pos, src, pos, padding_mask)


class ConditionalDETR(nn.Module):
    """Conditional DETR: backbone -> 1x1 input projection -> DETR encoder -> conditional
    decoder -> class head (sigmoid, focal prior) and box head relative to s.

    backbone: a `Joiner` (ResNet + sine positions) whose last map is used (C5 or DC5);
    num_classes: sigmoid classes; num_queries: Q; the rest as DETR's.
    """

    def __init__(self, backbone, num_classes, num_queries=300, d_model=256, n_heads=8,
                 num_encoder_layers=6, num_decoder_layers=6, d_ffn=2048, dropout=0.1,
                 aux_loss=True):
        super().__init__()
        self.aux_loss = aux_loss
        self.transformer = ConditionalTransformer(d_model, n_heads, num_encoder_layers,
                                                  num_decoder_layers, d_ffn, dropout)
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], d_model, kernel_size=1)
        self.backbone = backbone
        prior = 0.01  # focal loss: every query starts as background
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)  # the first boxes sit on s
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, images, mask) -> DetectionOutput:
        """images (N, 3, H, W), mask (N, H, W) True on padding -> pred_logits (N, Q, classes),
        pred_boxes (N, Q, 4) cxcywh in [0, 1], and the earlier layers' as aux_outputs."""
        features, masks, pos = self.backbone(images, mask)
        src = self.input_proj(features[-1]).flatten(2).transpose(1, 2)  # (N, S, C)
        pos = pos[-1].flatten(2).transpose(1, 2).to(src.dtype)
        hs, reference = self.transformer(src, pos, masks[-1].flatten(1), self.query_embed.weight)
        return _detection_output(self.class_embed(hs), self.predict_boxes(hs, reference),
                                 self.aux_loss)

    def predict_boxes(self, hs, reference):
        """hs (layers, N, Q, C), s (N, Q, 2) -> boxes (layers, N, Q, 4) cxcywh: the centre
        is an offset from s in logit space, the size is predicted outright."""
        raw = self.bbox_embed(hs)
        centre = raw[..., :2] + inverse_sigmoid(reference)
        return torch.cat([centre, raw[..., 2:]], -1).sigmoid()
