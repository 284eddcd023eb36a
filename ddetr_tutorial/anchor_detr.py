"""Anchor DETR (Wang et al., AAAI 2022): object queries made of anchor points.

- Queries (Sec. 3.2): A learned anchor points (x, y) in [0, 1] (`transformer.
  position`, A x 2) times P pattern embeddings (`transformer.pattern`, P x C):
  each anchor with each pattern, Q = P * A predictions (300 x 3 = 900), query
  q = p * A + a. The pattern is the decoder's initial content; the anchor is
  its position and never moves (no refinement between layers).
- Positional query: an MLP (`adapt_pos2d`) of the anchor's 2-D sine encoding;
  for RCDA another MLP (`adapt_pos1d`) of the 1-D sine encodings of x and of
  y gives the row and column queries, and of the feature map's column and row
  positions the row and column keys.
- Row-column decoupled attention (`rcda.py`) in every encoder and decoder
  layer: weights cost O(N M Lq (H + W)) memory against dense O(N M Lq H W),
  where Lq = H W in the encoder and Q in the decoder.
- Heads: one class head and one box head, shared by every decoder layer; boxes
  are relative to the anchor: sigmoid(delta + [logit(x, y), 0, 0]).
One C5 map (stride 32; DC5: stride 16, the released default), post-norm
layers, sigmoid focal loss. Names follow megvii-research/AnchorDETR, so its
checkpoints load with strict=True.
Shapes: N batch, Q queries, A anchors, P patterns, S = H W pixels of the map,
C width, M heads, D = C / M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import MLP, _detection_output
from .outputs import DetectionOutput
from .rcda import RowColumnAttention
from .transformer import inverse_sigmoid


def sine_1d(pos: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """pos (...) in [0, 1] -> (..., num_feats): [sin(2 pi p / w_0), cos(2 pi p / w_0),
    sin(2 pi p / w_1), ...] with w_i = T^(2i / num_feats), as the official pos2posemb1d."""
    dim_t = torch.arange(num_feats, dtype=pos.dtype, device=pos.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    angles = pos[..., None] * (2 * math.pi) / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1).flatten(-2)


def sine_2d(points: Tensor, num_feats: int) -> Tensor:
    """points (..., 2) as (x, y) -> (..., 2 * num_feats): y's code, then x's."""
    return torch.cat((sine_1d(points[..., 1], num_feats), sine_1d(points[..., 0], num_feats)), -1)


def pixel_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask (N, H, W) True on padding -> the centres of the rows, y (N, H), and of the
    columns, x (N, W), in [0, 1] of the unpadded image (padded ones go beyond 1)."""
    rows = (~mask[:, :, 0]).cumsum(1, dtype=torch.float32)
    cols = (~mask[:, 0, :]).cumsum(1, dtype=torch.float32)
    return (rows - 0.5) / rows[:, -1:], (cols - 0.5) / cols[:, -1:]


def _position_mlp(d_model: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))


class FFN(nn.Module):
    """Linear-ReLU-Linear with its residual and post-norm (`norm2`, the official name)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.dropout(F.relu(self.linear1(x)))
        return self.norm2(x + self.dropout(self.linear2(hidden)))


class AnchorEncoderLayer(nn.Module):
    """RCDA self-attention among the S pixels, then the FFN; post-norm.

    src (N, H, W, C); pos_row (N, 1, W, C) codes each column's x, pos_col (N, H, 1, C)
    each row's y; mask (N, H, W). Row queries and keys are src + pos_row, column
    ones src + pos_col, values src.
    """

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float):
        super().__init__()
        self.self_attn = RowColumnAttention(d_model, n_heads, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos_row: Tensor, pos_col: Tensor, mask: Tensor) -> Tensor:
        row, col = src + pos_row, src + pos_col
        attended = self.self_attn(row.flatten(1, 2), col.flatten(1, 2), row, col, src, mask)
        src = self.norm1(src + self.dropout(attended.reshape(src.shape)))
        return self.ffn(src)


class AnchorDecoderLayer(nn.Module):
    """Self-attention among the Q queries (q = k = tgt + query_pos), RCDA cross-attention
    to the map (row query tgt + code(x), column query tgt + code(y)), FFN; post-norm.

    tgt, query_pos, query_x, query_y: (N, Q, C); memory (N, H, W, C); pos_row, pos_col,
    mask as in `AnchorEncoderLayer`.
    """

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float):
        super().__init__()
        self.cross_attn = RowColumnAttention(d_model, n_heads, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, query_x, query_y, memory, pos_row, pos_col, mask):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_x, tgt + query_y, memory + pos_row,
                                   memory + pos_col, memory, mask)
        tgt = self.norm1(tgt + self.dropout(attended))
        return self.ffn(tgt)


class AnchorTransformer(nn.Module):
    """Encoder and decoder of RCDA layers, the anchors and patterns, the position MLPs
    and the shared heads; `forward(src (N, C, H, W), mask (N, H, W))` -> per-layer
    logits (layers, N, Q, classes) and boxes (layers, N, Q, 4) cxcywh in [0, 1]."""

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 d_ffn=1024, dropout=0.0, num_anchors=300, num_patterns=3, num_classes=91):
        super().__init__()
        self.d_model = d_model
        self.encoder_layers = nn.ModuleList(
            AnchorEncoderLayer(d_model, n_heads, d_ffn, dropout) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            AnchorDecoderLayer(d_model, n_heads, d_ffn, dropout) for _ in range(num_decoder_layers))
        self.pattern = nn.Embedding(num_patterns, d_model)
        self.position = nn.Embedding(num_anchors, 2)
        nn.init.uniform_(self.position.weight, 0, 1)  # anchors spread over the image
        self.adapt_pos2d, self.adapt_pos1d = _position_mlp(d_model), _position_mlp(d_model)
        class_embed, bbox_embed = nn.Linear(d_model, num_classes), MLP(d_model, d_model, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal prior 0.01
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)  # w = h = sigmoid(-2) at first
        # One head for every layer, as the official code (its state dict names each copy).
        self.class_embed = nn.ModuleList([class_embed] * num_decoder_layers)
        self.bbox_embed = nn.ModuleList([bbox_embed] * num_decoder_layers)

    def queries(self, batch: int) -> tuple[Tensor, Tensor]:
        """-> anchors (N, Q, 2) and contents (N, Q, C), query q = p * A + a pairing
        pattern p with anchor a."""
        num_patterns = self.pattern.num_embeddings
        anchors = self.position.weight.repeat(num_patterns, 1)                      # (Q, 2)
        contents = self.pattern.weight.repeat_interleave(self.position.num_embeddings, 0)
        return (anchors.unsqueeze(0).expand(batch, -1, -1),
                contents.unsqueeze(0).expand(batch, -1, -1))

    def map_positions(self, mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """mask (N, H, W) -> pos_row (N, 1, W, C) from each column's x and pos_col
        (N, H, 1, C) from each row's y, through `adapt_pos1d`."""
        y, x = (p.to(dtype) for p in pixel_positions(mask))
        pos_row = self.adapt_pos1d(sine_1d(x, self.d_model))[:, None]
        pos_col = self.adapt_pos1d(sine_1d(y, self.d_model))[:, :, None]
        return pos_row, pos_col

    def forward(self, src: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        pos_row, pos_col = self.map_positions(mask, src.dtype)
        memory = src.permute(0, 2, 3, 1)  # (N, H, W, C)
        for layer in self.encoder_layers:
            memory = layer(memory, pos_row, pos_col, mask)
        anchors, tgt = self.queries(src.shape[0])
        # The anchors stay fixed, so every layer's positional queries are the same.
        query_pos = self.adapt_pos2d(sine_2d(anchors, self.d_model // 2))
        query_x = self.adapt_pos1d(sine_1d(anchors[..., 0], self.d_model))
        query_y = self.adapt_pos1d(sine_1d(anchors[..., 1], self.d_model))
        logits, boxes = [], []
        for layer, class_embed, bbox_embed in zip(self.decoder_layers, self.class_embed,
                                                  self.bbox_embed):
            tgt = layer(tgt, query_pos, query_x, query_y, memory, pos_row, pos_col, mask)
            logits.append(class_embed(tgt))
            boxes.append(relative_to_anchors(bbox_embed(tgt), anchors))
        return torch.stack(logits), torch.stack(boxes)


def relative_to_anchors(delta: Tensor, anchors: Tensor) -> Tensor:
    """Box head output (..., 4) and anchors (..., 2) in [0, 1] -> boxes (..., 4) cxcywh:
    the centre is sigmoid(delta_xy + logit(anchor)), the size sigmoid(delta_wh)."""
    offset = torch.cat((inverse_sigmoid(anchors), torch.zeros_like(anchors)), -1)
    return (delta + offset).sigmoid()


class AnchorDETR(nn.Module):
    """Anchor DETR: backbone (C5, or DC5) -> 1x1 conv + GroupNorm -> `AnchorTransformer`.

    backbone: a `Backbone` returning one map (official key `backbone.body.*`: no
    position encoding of its own, the transformer makes its own); the rest as
    `AnchorTransformer`. forward(images (N, 3, H, W), mask (N, H, W) True on padding)
    -> `DetectionOutput` with Q = num_patterns * num_anchors predictions.
    """

    def __init__(self, backbone, num_classes=91, num_anchors=300, num_patterns=3, d_model=256,
                 n_heads=8, num_encoder_layers=6, num_decoder_layers=6, d_ffn=1024,
                 dropout=0.0, aux_loss=True):
        super().__init__()
        self.transformer = AnchorTransformer(d_model, n_heads, num_encoder_layers,
                                             num_decoder_layers, d_ffn, dropout, num_anchors,
                                             num_patterns, num_classes)
        proj = nn.Sequential(nn.Conv2d(backbone.num_channels[-1], d_model, kernel_size=1),
                             nn.GroupNorm(32, d_model))
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
        self.input_proj = nn.ModuleList([proj])
        self.backbone, self.aux_loss = backbone, aux_loss

    def forward(self, images: Tensor, mask: Tensor) -> DetectionOutput:
        features, masks = self.backbone(images, mask)
        logits, boxes = self.transformer(self.input_proj[0](features[-1]), masks[-1])
        return _detection_output(logits, boxes, self.aux_loss)


__all__ = ["AnchorDETR", "AnchorTransformer", "AnchorEncoderLayer", "AnchorDecoderLayer",
           "relative_to_anchors", "pixel_positions", "sine_1d", "sine_2d"]
