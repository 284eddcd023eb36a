"""Building from a `Config`: the detector, its criterion and post-processor
(`build_model`), and the augmentation (`build_transforms`).

Only these functions read a config; the modules they build take keyword arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .anchor_detr import AnchorDETR
from .backbone import build_backbone
from .conditional_detr import ConditionalDETR
from .data import make_transforms, scale_for
from .data.transforms import PAPER_MAX_SIZE, PAPER_SCALES
from .denoising import Denoising, DenoisingCriterion, dn_weight_dict
from .detr import DETR
from .dynamic_detr import DynamicDETR
from .efficient_detr import EfficientDETR, EfficientTransformer
from .hybrid import HybridCriterion, hybrid_weight_dict
from .losses import SetCriterion, weight_dict
from .matcher import HungarianMatcher
from .model import DeformableDETR, PostProcess
from .sparse_rcnn import SparseRCNN
from .transformer import DeformableTransformer

if TYPE_CHECKING:  # config.py imports this module
    from .config import Config


def build_transforms(cfg: Config, split: str):
    """The augmentation of `split` ('train' or 'val') for `cfg`."""
    if cfg.augment == "flip":  # no multi-scale, no crops: train at the size it is tested at
        size = cfg.image_size or max(PAPER_SCALES)
        return make_transforms(split, scales=[size], crop=None,
                               max_size=round(size * PAPER_MAX_SIZE / max(PAPER_SCALES)))
    scale = (scale_for(cfg.image_size) if cfg.image_size
             else {"scales": PAPER_SCALES, "max_size": PAPER_MAX_SIZE})
    return make_transforms(split, **scale)


def build_model(cfg: Config):
    """-> (model, criterion, postprocessor) for `cfg` (a `Config`, checked when built)."""
    detr = cfg.model in ("detr", "conditional_detr")  # one map: C5 (or DC5)
    backbone = build_backbone(name=cfg.backbone, hidden_dim=cfg.hidden_dim,
                              position_offset=cfg.position_offset,
                              train_backbone=cfg.train_backbone,
                              return_interm_layers=cfg.num_feature_levels > 1 and not detr,
                              dilation=cfg.dilation, pretrained=cfg.pretrained_backbone,
                              norm=cfg.backbone_norm, train_stem=cfg.train_backbone_stem,
                              width=cfg.backbone_width,
                              levels=[0, 1, 2, 3] if cfg.model == "sparse_rcnn" else None)
    if cfg.model == "conditional_detr":
        model = ConditionalDETR(backbone, cfg.num_classes, cfg.num_queries,
                                d_model=cfg.hidden_dim, n_heads=cfg.nheads,
                                num_encoder_layers=cfg.enc_layers,
                                num_decoder_layers=cfg.dec_layers, d_ffn=cfg.dim_feedforward,
                                dropout=cfg.dropout, aux_loss=cfg.aux_loss)
    elif cfg.model == "anchor_detr":  # no position encoding in its backbone: `backbone[0]`
        model = AnchorDETR(backbone[0], cfg.num_classes, cfg.num_queries, cfg.num_patterns,
                           d_model=cfg.hidden_dim, n_heads=cfg.nheads,
                           num_encoder_layers=cfg.enc_layers, num_decoder_layers=cfg.dec_layers,
                           d_ffn=cfg.dim_feedforward, dropout=cfg.dropout, aux_loss=cfg.aux_loss)
    elif detr:
        model = DETR(backbone, cfg.num_classes, cfg.num_queries, d_model=cfg.hidden_dim,
                     n_heads=cfg.nheads, num_encoder_layers=cfg.enc_layers,
                     num_decoder_layers=cfg.dec_layers, d_ffn=cfg.dim_feedforward,
                     dropout=cfg.dropout, aux_loss=cfg.aux_loss, no_object=cfg.no_object)
    elif cfg.model == "efficient_detr":
        model = _build_efficient_detr(cfg, backbone)
    elif cfg.model == "dynamic_detr":
        model = DynamicDETR(backbone, cfg.num_classes, cfg.num_queries, cfg.num_feature_levels,
                            d_model=cfg.hidden_dim, n_heads=cfg.nheads,
                            num_encoder_layers=cfg.enc_layers, num_decoder_layers=cfg.dec_layers,
                            d_ffn=cfg.dim_feedforward, dropout=cfg.dropout,
                            n_points=cfg.enc_n_points, dim_dynamic=cfg.dim_dynamic,
                            canonical_size=cfg.roi_canonical_size, aux_loss=cfg.aux_loss,
                            backend=cfg.op_backend)
    elif cfg.model == "sparse_rcnn":  # C2-C5 into its FPN, no position encoding
        model = SparseRCNN(backbone[0], cfg.num_classes, cfg.num_queries, cfg.dec_layers,
                           d_model=cfg.hidden_dim, n_heads=cfg.nheads,
                           d_ffn=cfg.dim_feedforward, dropout=cfg.dropout,
                           dim_dynamic=cfg.dim_dynamic, aux_loss=cfg.aux_loss,
                           canonical_size=cfg.roi_canonical_size)
    else:
        transformer = DeformableTransformer(
            d_model=cfg.hidden_dim, n_heads=cfg.nheads, num_encoder_layers=cfg.enc_layers,
            num_decoder_layers=cfg.dec_layers, d_ffn=cfg.dim_feedforward,
            dropout=cfg.dropout, n_levels=cfg.num_feature_levels,
            dec_n_points=cfg.dec_n_points, enc_n_points=cfg.enc_n_points,
            two_stage=cfg.two_stage, two_stage_num_proposals=cfg.num_queries,
            backend=cfg.op_backend, cross_level=cfg.cross_level_attention)
        denoising = (Denoising(cfg.num_classes, cfg.hidden_dim, cfg.dn_groups,
                               cfg.dn_label_noise, cfg.dn_box_noise) if cfg.dn_groups else None)
        model = DeformableDETR(backbone, transformer, cfg.num_classes, cfg.num_queries,
                               n_levels=cfg.num_feature_levels, aux_loss=cfg.aux_loss,
                               with_box_refine=cfg.with_box_refine, two_stage=cfg.two_stage,
                               denoising=denoising, one2many=cfg.hybrid_queries)
    matcher = HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox,
                               cost_giou=cfg.set_cost_giou, focal_alpha=cfg.focal_alpha,
                               no_object=cfg.no_object)
    weights = weight_dict(cls=cfg.cls_loss_coef, bbox=cfg.bbox_loss_coef,
                          giou=cfg.giou_loss_coef, num_decoder_layers=cfg.dec_layers,
                          aux_loss=cfg.aux_loss, two_stage=cfg.two_stage)
    kind, extra = SetCriterion, {}
    if cfg.dn_groups:  # plus the reconstruction loss of the dn queries, on every layer
        weights = dn_weight_dict(weights, cfg.dec_layers, cfg.aux_loss)
        kind, extra = DenoisingCriterion, {"groups": cfg.dn_groups}
    if cfg.hybrid_queries:  # plus the one-to-many queries' set loss, k-fold ground truth
        weights = hybrid_weight_dict(weights, cfg.hybrid_weight)
        kind, extra = HybridCriterion, {"k": cfg.hybrid_k}
    criterion = kind(cfg.num_classes, matcher, weights, focal_alpha=cfg.focal_alpha,
                     no_object=cfg.no_object, eos_coef=cfg.eos_coef, **extra)
    return model, criterion, PostProcess(cfg.num_select, no_object=cfg.no_object)


def _build_efficient_detr(cfg: Config, backbone) -> EfficientDETR:
    transformer = EfficientTransformer(
        d_model=cfg.hidden_dim, n_heads=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, d_ffn=cfg.dim_feedforward, dropout=cfg.dropout,
        n_levels=cfg.num_feature_levels, dec_n_points=cfg.dec_n_points,
        enc_n_points=cfg.enc_n_points, two_stage_num_proposals=cfg.num_queries,
        backend=cfg.op_backend, cross_level=cfg.cross_level_attention)
    return EfficientDETR(backbone, transformer, cfg.num_classes, cfg.num_queries,
                         n_levels=cfg.num_feature_levels, aux_loss=cfg.aux_loss)
