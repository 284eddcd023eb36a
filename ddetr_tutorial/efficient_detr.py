"""Efficient DETR (Yao et al. 2021, "Efficient DETR: Improving End-to-End Object Detector
with Dense Prior"): a dense part initialises the object queries of a 1-layer sparse part.

A re-implementation from the paper: there is no official code. The dense part is a
deformable encoder (3 layers) with a class and a box head on every one of its S tokens;
the top-K tokens by class score give both the decoder's reference boxes (their dense
box predictions) and its content queries (those tokens' encoder features themselves,
Fig. 5). The sparse part is a deformable decoder of 1 layer with box refinement. Both
parts are trained with the set loss (the dense one as two-stage's `_enc` terms).
Everything else is our Deformable DETR with two-stage (`model.py`, `transformer.py`):
only the choice of the decoder's queries differs, in `EfficientTransformer.two_stage_queries`.

Choices where the paper is silent (or where the notes we work from do not say):
- Sec. 3 (dense part): one proposal per encoder token, two-stage's box of side
  0.05 * 2^l on level l, instead of anchors; its class head scores "object" with the
  first logit, class-agnostic as in Deformable DETR's two-stage (the notes' score map
  is [2, h, w]: object or not), so the dense loss is the criterion's `_enc` loss.
- Sec. 3 (query initialisation): the content query is the encoder's output (the memory)
  at the selected token, not its `enc_output` projection, and it is not detached, so
  the sparse loss trains the encoder through it too; the reference boxes are detached,
  as in two-stage.
- Sec. 3 (positional query): the deformable decoder needs one; it is the sine
  embedding of the reference box, Linear(2C -> C) and LayerNorm (two-stage's
  `pos_trans` with only its position half).
- Sec. 4 (queries): K = Q = 100 top-scoring tokens; heads, points, FFN width and the
  training recipe are Deformable DETR's (lr 2e-4, 50 epochs, costs and weights 2/5/2).
- Sec. 3 (top-K): tokens without a proposal (padding, or too near the border) are
  never chosen while others remain; the dense loss still sees them, as two-stage's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .model import DeformableDETR
from .transformer import DeformableTransformer


class EfficientTransformer(DeformableTransformer):
    """Deformable encoder + decoder whose queries come from the dense part (Fig. 5).

    Takes DeformableTransformer's arguments (two_stage is always on: the dense part is
    its per-token proposal head); `two_stage_num_proposals` is K = Q, the queries kept.
    `pos_trans` maps the boxes' sine code (2C) to the positional query (C).
    """

    def __init__(self, **kwargs):
        kwargs["two_stage"] = True
        super().__init__(**kwargs)
        C = self.d_model
        self.pos_trans = nn.Linear(2 * C, C)
        self.pos_trans_norm = nn.LayerNorm(C)
        nn.init.xavier_uniform_(self.pos_trans.weight)
        nn.init.zeros_(self.pos_trans.bias)

    def two_stage_queries(self, memory, mask, spatial_shapes, extra: int = 0):
        """Score all S encoder tokens; the top K are the decoder's queries.

        memory: (N, S, C); mask: (N, S) True on padding. Returns query_pos (N, K, C),
        tgt (N, K, C) = memory at the top-K tokens, reference boxes (N, K, 4) in [0, 1],
        and the dense predictions: class logits (N, S, classes), boxes before the
        sigmoid (N, S, 4), the ones the dense loss sees.
        """
        if extra:
            raise ValueError("Efficient DETR has no one-to-many queries (hybrid matching)")
        dense_class, dense_boxes = self.dense_predictions(memory, mask, spatial_shapes)
        topk = self.select(dense_class, dense_boxes)  # (N, K)
        tgt = torch.gather(memory, 1, topk[..., None].expand(-1, -1, memory.shape[-1]))
        boxes = torch.gather(dense_boxes, 1, topk[..., None].expand(-1, -1, 4)).detach()
        embed = self.proposal_pos_embed(boxes, num_pos_feats=self.d_model // 2)  # (N, K, 2C)
        query_pos = self.pos_trans_norm(self.pos_trans(embed))
        return query_pos, tgt, boxes.sigmoid(), dense_class, dense_boxes

    def dense_predictions(self, memory, mask, spatial_shapes):
        """The dense part's heads on every token (the extra last heads of the decoder's
        lists): class logits (N, S, classes) and boxes (N, S, 4) in logit space, offsets
        from each token's proposal; padding and border tokens get +inf boxes."""
        output_memory, proposals = self.encoder_proposals(memory, mask, spatial_shapes)
        heads = self.decoder.num_layers
        dense_class = self.decoder.class_embed[heads](output_memory)
        dense_boxes = self.decoder.bbox_embed[heads](output_memory) + proposals
        return dense_class, dense_boxes

    def select(self, dense_class, dense_boxes):
        """Indices (N, K) of the K tokens of highest "object" score (logit 0), among those
        with a proposal: padding and border tokens (+inf boxes) come last."""
        k = self.two_stage_num_proposals
        if k > dense_class.shape[1]:
            raise ValueError(f"num_queries={k} is more than the {dense_class.shape[1]} encoder "
                             "tokens of this input; use fewer queries or larger images")
        score = dense_class[..., 0].masked_fill(dense_boxes.isinf().any(-1), -math.inf)
        return torch.topk(score, k, dim=1).indices


class EfficientDETR(DeformableDETR):
    """Efficient DETR: backbone -> input projections -> deformable encoder -> dense heads
    -> top-K tokens as queries and boxes -> decoder (1 layer) with box refinement -> heads.

    backbone: a `Joiner`; transformer: an `EfficientTransformer`; num_classes: sigmoid
    classes; num_queries: Q (= K, the tokens kept); n_levels: L. Returns DeformableDETR's
    `DetectionOutput`, its enc_outputs being the dense part's predictions (N, S, ...).
    """

    def __init__(self, backbone, transformer: EfficientTransformer, num_classes: int,
                 num_queries: int, n_levels: int, aux_loss: bool = True):
        if not isinstance(transformer, EfficientTransformer):
            raise TypeError(f"transformer: expected an EfficientTransformer, got "
                            f"{type(transformer).__name__}")
        if transformer.two_stage_num_proposals != num_queries:
            raise ValueError(f"num_queries={num_queries} but the transformer keeps "
                             f"{transformer.two_stage_num_proposals} tokens")
        super().__init__(backbone, transformer, num_classes, num_queries, n_levels,
                         aux_loss=aux_loss, with_box_refine=True, two_stage=True)
