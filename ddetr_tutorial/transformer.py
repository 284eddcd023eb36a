"""The deformable transformer: encoder, decoder, reference points, two-stage proposals.

Paper Sec. 4.1: the encoder replaces self-attention over feature maps by
multi-scale deformable attention (each pixel is a query whose reference
point is itself); the decoder keeps self-attention between object queries and
replaces cross-attention by deformable attention around a reference point
predicted from each query. Sec. 4.2 adds iterative box refinement (each layer
refines the previous layer's boxes) and two-stage (encoder pixels propose the
initial boxes).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MSDeformAttn
from .hybrid import hybrid_attn_mask
from .ops import level_tensors


def inverse_sigmoid(x, eps: float = 1e-5):
    """logit(x), clamped so that 0 and 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class DecoderOutput(NamedTuple):
    """What the decoder returns, per layer: hs (layers, N, Q, C) and the reference
    after each layer, references (layers, N, Q, 2|4)."""

    hs: Tensor
    references: Tensor


class TransformerOutput(NamedTuple):
    """What `DeformableTransformer.forward` returns (the official code's five items).

    hs (layers, N, Q, C): every decoder layer's output; init_reference (N, Q, 2|4):
    the decoder's first reference; references (layers, N, Q, 2|4): the reference
    after each layer; enc_outputs_class (N, S, classes) and enc_outputs_coord_unact
    (N, S, 4): the encoder's proposals, two-stage only (else None).
    """

    hs: Tensor
    init_reference: Tensor
    references: Tensor
    enc_outputs_class: Tensor | None
    enc_outputs_coord_unact: Tensor | None


def host_shapes(spatial_shapes) -> list[tuple[int, int]]:
    """(H_l, W_l) rows as host ints: a list is taken as is, a tensor is read back
    (one device sync; the transformer passes its host list down to avoid it)."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def valid_ratios(mask):
    """Fraction of each padded map that holds the image: (N, H, W) -> (N, 2) as (w, h)."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / H
    valid_w = (~mask[:, 0, :]).sum(1).float() / W
    return torch.stack([valid_w, valid_h], -1)


class DeformableEncoderLayer(nn.Module):
    """Multi-scale deformable self-attention + FFN, each with residual and post-norm."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, backend="auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask=None, query_level=None):
        """src, pos: (N, S, C); reference_points: (N, S, L, 2). Returns (N, S, C).
        query_level (S,): see `MSDeformAttn.forward` (per-level attention, the
        Table 2 ablation)."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                  level_start_index, padding_mask, query_level=query_level)
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(hidden))


class DeformableEncoder(nn.Module):
    """A stack of encoder layers. cross_level=False is the paper's Table 2 ablation
    without "MS attention": each pixel samples only its own level's map, so the
    levels exchange no information in the encoder."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int, cross_level: bool = True):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.cross_level = cross_level

    @staticmethod
    def reference_points(spatial_shapes, ratios, device):
        """Every pixel centre, normalized to the valid part of its own level, then
        seen on every level: (N, S, L, 2) as (x, y).

        spatial_shapes: (L, 2) tensor or host list of (H_l, W_l); ratios: (N, L, 2)
        valid (w, h) fraction per level.
        """
        points = []
        for lvl, (H, W) in enumerate(host_shapes(spatial_shapes)):
            ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=device) + 0.5,
                                    torch.arange(W, dtype=torch.float32, device=device) + 0.5,
                                    indexing="ij")
            x = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * W)  # (N, H*W)
            y = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * H)
            points.append(torch.stack([x, y], -1))
        points = torch.cat(points, 1)  # (N, S, 2), relative to the valid image
        return points[:, :, None] * ratios[:, None]  # (N, S, L, 2)

    def forward(self, src, spatial_shapes, level_start_index, ratios, pos, padding_mask=None,
                level_shapes=None):
        """src, pos: (N, S, C); ratios: (N, L, 2). Returns the memory (N, S, C).

        level_shapes: the (H_l, W_l) of spatial_shapes as host ints, when the caller
        has them (the transformer does): then no layer reads spatial_shapes back."""
        shapes = host_shapes(spatial_shapes if level_shapes is None else level_shapes)
        reference_points = self.reference_points(shapes, ratios, src.device)
        query_level = None
        if not self.cross_level:  # (S,): the level of every flattened pixel
            sizes = [H * W for H, W in shapes]
            query_level = torch.repeat_interleave(
                torch.arange(len(shapes), device=src.device),
                torch.tensor(sizes, device=src.device), output_size=sum(sizes))
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask, query_level=query_level)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention between queries, deformable cross-attention into the memory, FFN.

    Norm names follow the official code: norm2 after self-attention, norm1
    after cross-attention, norm3 after the FFN.
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, backend="auto"):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout,
                                               batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes,
                level_start_index, padding_mask=None, self_attn_mask=None):
        """tgt, query_pos: (N, Q, C); reference_points: (N, Q, L, 2 or 4);
        memory: (N, S, C); self_attn_mask: (Q, Q) bool, True = blocked (DN).
        Returns (N, Q, C)."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                                   level_start_index, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        hidden = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(hidden))


class DeformableDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output and reference points.

    With iterative box refinement the detector sets `bbox_embed` (one head per
    layer): layer l's box prediction, added to the logit of its reference box,
    becomes layer l+1's reference, detached so that each layer learns its own
    correction (paper Sec. 4.2). Two-stage also sets `class_embed`, whose
    extra last head scores the encoder's proposals.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed = None
        self.class_embed = None

    def forward(self, tgt, reference_points, memory, spatial_shapes, level_start_index,
                ratios, query_pos, padding_mask=None, self_attn_mask=None) -> DecoderOutput:
        """tgt, query_pos: (N, Q, C); reference_points: (N, Q, 2 or 4) in [0, 1] of the
        valid image; ratios: (N, L, 2); self_attn_mask: (Q, Q) bool, True = blocked
        (the denoising mask). Returns every layer's output hs
        (layers, N, Q, C) and the reference after each layer (layers, N, Q, 2|4):
        refined boxes with `bbox_embed`, else the initial reference repeated."""
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            # Scale to each level's padded map: the image fills only part of it.
            scale = ratios if reference_points.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            points = reference_points[:, :, None] * scale[:, None]  # (N, Q, L, 2|4)
            tgt = layer(tgt, query_pos, points, memory, spatial_shapes, level_start_index,
                        padding_mask, self_attn_mask=self_attn_mask)
            if self.bbox_embed is not None:
                reference_points = self.refine(self.bbox_embed[lid](tgt), reference_points)
            outputs.append(tgt)
            references.append(reference_points)
        return DecoderOutput(torch.stack(outputs), torch.stack(references))

    @staticmethod
    def refine(delta, reference_points):
        """New reference boxes = sigmoid(delta + logit(reference)), detached."""
        if reference_points.shape[-1] == 4:
            new = delta + inverse_sigmoid(reference_points)
        else:
            centres = delta[..., :2] + inverse_sigmoid(reference_points)
            new = torch.cat([centres, delta[..., 2:]], -1)
        return new.sigmoid().detach()


class DeformableTransformer(nn.Module):
    """Flatten the levels, encode them, then decode object queries (paper Fig. 1).

    d_model: C; n_heads: M; d_ffn: the FFN width; n_levels: L; enc/dec_n_points: K;
    two_stage: initial boxes come from the encoder's top-scoring proposals
    instead of learned queries, `two_stage_num_proposals` of them.
    cross_level=False: encoder pixels attend to their own level only (Table 2 ablation).
    """

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 d_ffn=1024, dropout=0.1, n_levels=4, dec_n_points=4, enc_n_points=4,
                 two_stage=False, two_stage_num_proposals=300, backend="auto",
                 cross_level=True):
        super().__init__()
        self.d_model, self.n_heads, self.n_levels = d_model, n_heads, n_levels
        self.two_stage, self.two_stage_num_proposals = two_stage, two_stage_num_proposals
        enc_layer = DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads,
                                           enc_n_points, backend)
        self.encoder = DeformableEncoder(enc_layer, num_encoder_layers, cross_level)
        dec_layer = DeformableDecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads,
                                           dec_n_points, backend)
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self):
        """Official init: xavier for every matrix, then MSDeformAttn's own init,
        N(0, 1) level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def check_levels(self, srcs, masks, pos_embeds):
        """Once per forward: L maps of width C, each with its mask and position
        embedding of the same (N, H_l, W_l). Returns the (H_l, W_l) as host ints."""
        L = self.n_levels
        if not len(srcs) == len(masks) == len(pos_embeds) == L:
            raise ValueError(f"the transformer was built for {L} levels but got {len(srcs)} "
                             f"maps, {len(masks)} masks and {len(pos_embeds)} position "
                             "embeddings")
        shapes = []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            N, C, H, W = src.shape
            if C != self.d_model or tuple(mask.shape) != (N, H, W) or pos.shape != src.shape:
                raise ValueError(f"level {lvl}: expected src (N, C={self.d_model}, H, W), mask "
                                 f"(N, H, W) and pos like src; got src {tuple(src.shape)}, "
                                 f"mask {tuple(mask.shape)}, pos {tuple(pos.shape)}")
            shapes.append((H, W))
        return shapes

    def flatten(self, srcs, masks, pos_embeds, shapes=None):
        """Per-level maps -> one token sequence (paper: the multi-scale feature maps
        {x_l}). shapes: their (H_l, W_l) as host ints (default: read from srcs).
        Returns src (N, S, C), mask (N, S), pos (N, S, C) with the level embedding
        added, spatial_shapes (L, 2), level_start_index (L,); the last two built from
        the host ints, so the op validates them without reading them back."""
        if shapes is None:
            shapes = [tuple(src.shape[-2:]) for src in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                         for lvl, p in enumerate(pos_embeds)], 1)
        spatial_shapes, level_start_index = level_tensors(shapes, src.device)
        return src, mask, pos, spatial_shapes, level_start_index

    def forward(self, srcs, masks, pos_embeds, query_embed=None, dn=None,
                one2many: int = 0) -> TransformerOutput:
        """srcs, pos_embeds: lists of (N, C, H_l, W_l); masks: lists of (N, H_l, W_l);
        query_embed: (Q, 2C) learned queries (position half, content half), unused
        with two-stage. Returns a `TransformerOutput`: hs (layers, N, Q, C),
        init_reference (N, Q, 2|4), references (layers, N, Q, 2|4), and the
        encoder's class logits and unactivated boxes (N, S, ...) for two-stage.
        dn: `denoising.DenoisingQueries`, appended after the Q queries (two-stage);
        one2many: extra two-stage queries, the next-best proposals, blind to the Q
        first ones and they to them (hybrid matching)."""
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage=True")
        shapes = self.check_levels(srcs, masks, pos_embeds)
        src, mask, pos, spatial_shapes, level_start_index = self.flatten(srcs, masks,
                                                                         pos_embeds, shapes)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # (N, L, 2)
        memory = self.encoder(src, spatial_shapes, level_start_index, ratios, pos, mask,
                              level_shapes=shapes)

        enc_class = enc_coord_unact = None
        if self.two_stage:
            query_pos, tgt, reference_points, enc_class, enc_coord_unact = \
                self.two_stage_queries(memory, mask, shapes, extra=one2many)
        else:
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            N = memory.shape[0]
            query_pos = query_pos.unsqueeze(0).expand(N, -1, -1)
            tgt = tgt.unsqueeze(0).expand(N, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()  # (N, Q, 2)
        attn_mask = None
        if one2many:
            attn_mask = hybrid_attn_mask(self.two_stage_num_proposals, one2many, memory.device)
        if dn is not None:
            query_pos, tgt, reference_points = self.append_denoising(query_pos, tgt,
                                                                     reference_points, dn)
            attn_mask = dn.attn_mask
        hs, references = self.decoder(tgt, reference_points, memory, spatial_shapes,
                                      level_start_index, ratios, query_pos, mask,
                                      self_attn_mask=attn_mask)
        return TransformerOutput(hs, reference_points, references, enc_class, enc_coord_unact)

    def append_denoising(self, query_pos, tgt, reference_points, dn):
        """The dn queries after the matching ones: their positional query made from
        their noised box as two-stage makes it from a proposal (sine, pos_trans)."""
        if not self.two_stage:
            raise ValueError("denoising queries need two_stage=True (4-d reference boxes)")
        embed = self.proposal_pos_embed(inverse_sigmoid(dn.reference_points),
                                        num_pos_feats=self.d_model // 2)
        dn_pos = self.pos_trans_norm(self.pos_trans(embed))[..., :self.d_model]
        return (torch.cat([query_pos, dn_pos], 1), torch.cat([tgt, dn.tgt], 1),
                torch.cat([reference_points, dn.reference_points], 1))

    # ------------------------------------------------------------------ two-stage

    def two_stage_queries(self, memory, mask, spatial_shapes, extra: int = 0):
        """Score every encoder token as a box proposal; the top-k become the decoder's
        reference boxes and, through their sine embedding, its queries.
        spatial_shapes: (H_l, W_l) as host ints (or an (L, 2) tensor, read back);
        extra: proposals kept beyond two_stage_num_proposals (hybrid matching)."""
        output_memory, proposals = self.encoder_proposals(memory, mask, spatial_shapes)
        heads = self.decoder.num_layers  # the extra last heads score proposals
        enc_class = self.decoder.class_embed[heads](output_memory)  # (N, S, classes)
        enc_coord_unact = self.decoder.bbox_embed[heads](output_memory) + proposals  # (N, S, 4)
        k = self.two_stage_num_proposals + extra
        if k > memory.shape[1]:
            kept = (f"two_stage_num_proposals={k}" if not extra else
                    f"{self.two_stage_num_proposals} + {extra} one-to-many = {k} proposals")
            raise ValueError(f"{kept} is more than the {memory.shape[1]} "
                             "encoder tokens of this input; use fewer queries or larger images")
        topk = torch.topk(enc_class[..., 0], k, dim=1).indices  # class-agnostic score
        coords_unact = torch.gather(enc_coord_unact, 1, topk[..., None].expand(-1, -1, 4))
        coords_unact = coords_unact.detach()
        embed = self.proposal_pos_embed(coords_unact, num_pos_feats=self.d_model // 2)  # (N, Q, 2C)
        embed = self.pos_trans_norm(self.pos_trans(embed))
        query_pos, tgt = embed.split(self.d_model, dim=2)
        return query_pos, tgt, coords_unact.sigmoid(), enc_class, enc_coord_unact

    def encoder_proposals(self, memory, mask, spatial_shapes):
        """One proposal per encoder token: a box centred on the pixel with side
        0.05 * 2^l on level l, in logit space; padding and boxes too close to
        the border get +inf. spatial_shapes: (H_l, W_l) as host ints (or an (L, 2)
        tensor, read back). Returns the projected memory (N, S, C) and the
        proposals (N, S, 4)."""
        N = memory.shape[0]
        proposals, start = [], 0
        for lvl, (H, W) in enumerate(host_shapes(spatial_shapes)):
            level_mask = mask[:, start:start + H * W].view(N, H, W)
            valid_h = (~level_mask[:, :, 0]).sum(1)
            valid_w = (~level_mask[:, 0, :]).sum(1)
            ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=memory.device),
                                    torch.arange(W, dtype=torch.float32, device=memory.device),
                                    indexing="ij")
            grid = torch.stack([xs, ys], -1)  # (H, W, 2)
            scale = torch.stack([valid_w, valid_h], -1).view(N, 1, 1, 2)
            centres = (grid.unsqueeze(0) + 0.5) / scale  # (N, H, W, 2)
            sizes = torch.full_like(centres, 0.05 * 2.0 ** lvl)
            proposals.append(torch.cat([centres, sizes], -1).view(N, -1, 4))
            start += H * W
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        output = memory.masked_fill(mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(output)), proposals

    @staticmethod
    def proposal_pos_embed(proposals, num_pos_feats=128, temperature=10000):
        """Sine embedding of unactivated boxes (N, Q, 4) -> (N, Q, 4 * num_pos_feats).

        The official code fixes num_pos_feats at 128 (C = 256); C / 2 keeps the
        embedding 2C wide for other widths too."""
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t  # (N, Q, 4, num_pos_feats)
        return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=4).flatten(2)
