"""Configuration: the paper's defaults and named presets (what each field accepts is in
`config_rules.py`, `build_model` in `build.py`).

Only `build_*` functions read a config; modules take keyword arguments. A
`Config` checks itself when it is built (`check_config`): every field's type,
its allowed values, and the rules between fields, so a bad value stops a run
before any data is read, with one line naming the field, the value and what
was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .build import build_model, build_transforms  # re-exported: built from a Config
from .config_rules import CHOICES, RANGES, check_config  # re-exported: what a field accepts


@dataclass(frozen=True)
class Config:
    """Every setting of a run, with the paper's defaults. Frozen; `replace` gives a
    changed copy. Building one checks it (`check_config`): a wrong type raises
    TypeError, a value out of range or a rule between fields broken ValueError."""

    # --- model (paper Sec. 5 "Implementation details")
    model: str = "deformable"        # "deformable", "detr" (the dense DETR),
                                     # "conditional_detr", "efficient_detr", "anchor_detr"
                                     # "sparse_rcnn" or "dynamic_detr"
    backbone: str = "resnet50"       # resnet18 / resnet34 / resnet50 / resnet101
    backbone_width: int = 64         # base channels (64 = torchvision; 32 = a quarter the cost)
    dilation: bool = False           # DC5: dilate the last stage (C5 at stride 16)
    pretrained_backbone: str | None = None  # torchvision-format ResNet weights: a file or a
                                            # shipped name ("shapes_resnet18_w32")
    train_backbone: bool = True      # layer2-4 train (conv1 and layer1 never do, by default)
    backbone_norm: str = "frozen"    # "frozen" (ImageNet statistics) or "batch" (from scratch)
    train_backbone_stem: bool = False  # also train conv1 and layer1 (from scratch)
    num_feature_levels: int = 4      # L: C3-C5 plus one extra stride-2 level
    hidden_dim: int = 256            # C
    nheads: int = 8                  # M
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4            # K in the encoder
    cross_level_attention: bool = True  # Table 2 "MS attention"; False: encoder pixels
                                        # sample their own level only
    dec_n_points: int = 4            # K in the decoder
    num_queries: int = 300           # Q (also the number of two-stage proposals)
    num_classes: int = 91            # sigmoid classes; COCO's ids go up to 90
    aux_loss: bool = True            # losses on every decoder layer
    no_object: bool = False          # DETR's softmax head with a "no object" class (else
                                     # Deformable DETR's sigmoid focal head); model="detr"
    eos_coef: float = 0.1            # DETR: the no-object class's weight in the loss
    position_offset: float = 0.5     # sine positions: 0.5 (pixel centres) here, 0 in DETR
    with_box_refine: bool = False    # Sec. 4.2, iterative bounding box refinement
    two_stage: bool = False          # Sec. 4.2, two-stage (needs with_box_refine)
    op_backend: str = "auto"         # ms_deform_attn backend: auto / pytorch / cpu / cuda
    num_patterns: int = 3            # Anchor DETR: P pattern embeddings per anchor point
                                     # (num_queries anchors: num_patterns x num_queries boxes)
    dn_groups: int = 0               # DN-DETR: G groups of noised ground truth in training
                                     # (0: off; needs model="deformable", two_stage)
    dn_label_noise: float = 0.2      # DN: probability of flipping a dn query's label
    dn_box_noise: float = 0.4        # DN: box noise scale (centre +- s w/2, side x 1 +- s)
    hybrid_queries: int = 0          # H-DETR: Q_m one-to-many queries in training (0: off;
                                     # needs model="deformable", two_stage)
    hybrid_k: int = 6                # H-DETR: the ground truth repeated k times for them
    hybrid_weight: float = 1.0       # H-DETR: lambda, the one-to-many loss's weight
    dim_dynamic: int = 64            # Sparse R-CNN: D of the dynamic interaction's generated
                                     # (C x D) and (D x C) matrices (dec_layers: its stages)
    roi_canonical_size: float = 224.0  # Sparse R-CNN: a box of this side is pooled from P4
    # --- matcher and loss
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    num_select: int = 100            # detections kept per image by post-processing
    # --- training (official recipe)
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1  # sampling_offsets and reference_points
    weight_decay: float = 1e-4
    batch_size: int = 2
    epochs: int = 50
    lr_drop: int = 40
    clip_max_norm: float = 0.1
    warmup_steps: int = 0            # linear learning-rate warm-up (not in the paper: 0)
    # --- data augmentation: the paper's recipe (short side 480-800, max 1333, crops),
    # or, with image_size set, the same recipe scaled to images of that many pixels
    image_size: int | None = None
    # "paper", or "flip": flips only, at image_size (no multi-scale)
    augment: str = "paper"

    def __post_init__(self):
        check_config(self)

    def replace(self, **changes) -> "Config":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tiny() -> Config:
    """Small enough to train on a 2-core CPU in half an hour: a quarter-width ResNet-18
    (no ImageNet weights here, so it all trains, with BatchNorm), C=64, 2+2 layers,
    30 queries, box refinement and two-stage, 96-px images with flips only. The shipped
    tiny_shapes checkpoint is `train --config tiny --data data/shapes10k`: 9 epochs of
    10,000 shapes images (90,000 samples; with 2,000 images it overfits). Post-processing
    keeps the official top 100 of the 30 x 4 (query, class) scores."""
    return Config(backbone="resnet18", backbone_width=32, hidden_dim=64, nheads=4,
                  enc_layers=2, dec_layers=2, backbone_norm="batch", train_backbone_stem=True,
                  dim_feedforward=256, num_queries=30, num_classes=4,
                  dropout=0.0, with_box_refine=True, two_stage=True,
                  lr=1e-3, lr_backbone=1e-3, batch_size=16, epochs=9, lr_drop=8,
                  image_size=96, augment="flip")


def detr() -> Config:
    """The original DETR (facebookresearch/detr main.py defaults): softmax with a no-object
    class (eos 0.1), 100 queries, dense 6+6 layers with FFN 2048, one C5 map, matching
    and loss weights 1 / 5 / 2, lr 1e-4 (backbone 1e-5), 300 epochs with a drop at 200."""
    return Config(model="detr", no_object=True, eos_coef=0.1, position_offset=0.0,
                  num_feature_levels=1, num_queries=100, dim_feedforward=2048,
                  set_cost_class=1.0, cls_loss_coef=1.0, lr=1e-4, lr_backbone=1e-5,
                  epochs=300, lr_drop=200)


def tiny_pretrained() -> Config:
    """`tiny` fine-tuned from the shipped pretrained backbone the way the paper does:
    frozen BatchNorm statistics, the backbone's lr 0.1x the rest, conv1 and layer1
    frozen. The backbone is `shapes_resnet18_w32`, pretrained by `pretrain-backbone`
    on synthetic classification (see its card)."""
    return tiny().replace(pretrained_backbone="shapes_resnet18_w32", backbone_norm="frozen",
                          train_backbone_stem=False, lr_backbone=1e-4)  # tiny's lr is 1e-3


def tiny_shapes() -> Config:
    """The shipped model's recipe (its card: `shipped/tiny_shapes.md`): tiny_pretrained
    with the whole backbone trained, BatchNorm statistics included, at the transformer's
    lr 1e-3, on 128-px images; 20 epochs (drop after 16) on shapes10k, 90 minutes on the
    2-core CPU. `tiny_30min` is the same for 8 epochs (drop after 6): the 30-minute one."""
    return tiny_pretrained().replace(image_size=128, epochs=20, lr_drop=16,
                                     backbone_norm="batch", train_backbone_stem=True,
                                     lr_backbone=1e-3)


def conditional_detr() -> Config:
    """Conditional DETR (Atten4Vis/ConditionalDETR main.py defaults): DETR's dense 6+6
    layers (FFN 2048) on one C5 map, DETR's position code, 300 queries, the sigmoid focal
    head with costs and loss weights 2 / 5 / 2, lr 1e-4 (backbone 1e-5), 50 epochs with a
    drop at 40; post-processing keeps the top 100 (query, class) scores."""
    return Config(model="conditional_detr", position_offset=0.0, num_feature_levels=1,
                  num_queries=300, dim_feedforward=2048, lr=1e-4, lr_backbone=1e-5,
                  epochs=50, lr_drop=40)


def tiny_conditional_detr() -> Config:
    """Conditional DETR at tiny_pretrained's size and recipe: the shipped pretrained
    quarter-width ResNet-18 (frozen statistics), C=64, 4 heads, 2+2 layers, FFN 256,
    30 queries, 96-px images with flips; C5 only (stride 32: a 3x3 map at 96 px)."""
    return tiny_pretrained().replace(model="conditional_detr", position_offset=0.0,
                                     num_feature_levels=1, with_box_refine=False,
                                     two_stage=False)


def efficient_detr() -> Config:
    """Efficient DETR (Yao et al. 2021, no official code): ResNet-50, 4 levels, C=256,
    3 deformable encoder layers and 1 decoder layer, 100 queries from the dense part's
    top-100 tokens, box refinement, focal costs and loss weights 2 / 5 / 2; the rest
    is Deformable DETR's recipe (the paper's choices we could not confirm are listed in
    `efficient_detr.py`)."""
    return Config(model="efficient_detr", enc_layers=3, dec_layers=1, num_queries=100,
                  with_box_refine=True, two_stage=True)


def tiny_efficient_detr() -> Config:
    """Efficient DETR at tiny_pretrained's size and recipe: the shipped pretrained
    quarter-width ResNet-18 (frozen statistics), C=64, 4 heads, 3+1 layers, FFN 256,
    30 queries, 96-px images with flips."""
    return tiny_pretrained().replace(model="efficient_detr", enc_layers=3, dec_layers=1)


def anchor_detr() -> Config:
    """Anchor DETR (megvii-research/AnchorDETR main.py defaults, but C5: its released
    default is DC5, `anchor_detr_dc5`): 300 anchor points x 3 patterns = 900 queries,
    RCDA in 6+6 layers of FFN 1024, dropout 0, one map, focal loss 2 / 5 / 2, lr 1e-4
    (backbone 1e-5), 1 image per GPU, 50 epochs with a drop at 40. Its `--dilation` has no
    type, so `--dilation False` is the string 'False', which is true: main.py builds DC5."""
    return Config(model="anchor_detr", num_feature_levels=1, num_queries=300, num_patterns=3,
                  dropout=0.0, lr=1e-4, lr_backbone=1e-5, batch_size=1)


def tiny_anchor_detr() -> Config:
    """Anchor DETR at tiny_pretrained's size and recipe (the shipped pretrained backbone,
    frozen statistics, C=64, 2+2 layers), with 10 anchors x 3 patterns = 30 queries
    (tiny's count), one C5 map (stride 32: 3 x 3 at 96 px), no box refinement or
    two-stage (Anchor DETR has neither)."""
    return tiny_pretrained().replace(model="anchor_detr", num_feature_levels=1,
                                     num_queries=10, num_patterns=3, with_box_refine=False,
                                     two_stage=False)


def sparse_rcnn() -> Config:
    """Sparse R-CNN (PeizeSun/SparseR-CNN, R-50 3x config): ResNet-50 + FPN (P2-P5, C=256),
    100 learned proposals, 6 stages of 8-head self-attention, the dynamic interaction
    (D=64) and FFN 2048, dropout 0; focal costs and loss weights 2 / 5 / 2; AdamW lr
    2.5e-5 for everything (the backbone too), weight decay 1e-4, gradient clipping 1.0,
    16 images a batch, 36 epochs; its two drops (epochs 28 and 33) are one here, at 28."""
    return Config(model="sparse_rcnn", num_feature_levels=4, enc_layers=0, dec_layers=6,
                  num_queries=100, dim_feedforward=2048, dropout=0.0, dim_dynamic=64,
                  lr=2.5e-5, lr_backbone=2.5e-5, clip_max_norm=1.0,
                  batch_size=16, epochs=36, lr_drop=28)


def tiny_sparse_rcnn() -> Config:
    """Sparse R-CNN at tiny_pretrained's size and recipe (the shipped pretrained quarter-
    width ResNet-18, frozen statistics, C=64, 4 heads, FFN 256, 30 proposals) with the
    paper's 6 stages and D = C / 4 = 16, as the paper's 64 of 256. The pooler's canonical
    box is 32 px, not 224: 224 is ImageNet's object scale on ~800-px images; on 96-128 px
    images every box would fall on P2-P3 and P4-P5 would never be read. At 32, shapes'
    8-60 px objects spread over all four levels (< 16 px: P2, 16-32: P3, 32-64: P4)."""
    return tiny_pretrained().replace(model="sparse_rcnn", enc_layers=0, dec_layers=6,
                                     dim_dynamic=16, roi_canonical_size=32.0,
                                     with_box_refine=False, two_stage=False)


def dynamic_detr() -> Config:
    """Dynamic DETR (Dai et al. 2021, no official code): Deformable DETR's ResNet-50, 4
    levels, C=256, 6+6 layers, 300 queries and focal loss; a 3x3 (K=9) dynamic encoder;
    RoI dynamic attention with D=64; the 1x schedule (12 epochs, one drop, at 10)."""
    return Config(model="dynamic_detr", enc_n_points=9, with_box_refine=True, epochs=12,
                  lr_drop=10)


def tiny_dynamic_detr() -> Config:
    """Dynamic DETR at tiny_pretrained's size and recipe, D = C / 4 = 16, RoIs assigned
    with a 32-px canonical box (as tiny_sparse_rcnn)."""
    return tiny_pretrained().replace(model="dynamic_detr", enc_n_points=9, two_stage=False,
                                     dim_dynamic=16, roi_canonical_size=32.0)


PRESETS = {
    "paper": Config,
    "single_scale": lambda: Config(num_feature_levels=1),
    "dc5": lambda: Config(dilation=True),
    "box_refine": lambda: Config(with_box_refine=True),
    "two_stage": lambda: Config(with_box_refine=True, two_stage=True),
    "detr": detr,
    "detr_dc5": lambda: detr().replace(dilation=True),
    # Deformable DETR's Table 1 "DETR+" baselines: DETR with the focal head and
    # Deformable DETR's recipe, so the two differ only in attention and scales.
    "detr_plus": lambda: Config(model="detr", num_queries=100, dim_feedforward=2048),
    "detr_dc5_plus": lambda: Config(model="detr", num_queries=100, dim_feedforward=2048,
                                    dilation=True),
    "tiny": tiny,
    "tiny_pretrained": tiny_pretrained,
    "tiny_shapes": tiny_shapes,
    "tiny_30min": lambda: tiny_shapes().replace(epochs=8, lr_drop=6),
    "conditional_detr": conditional_detr,
    "conditional_detr_dc5": lambda: conditional_detr().replace(dilation=True),
    "tiny_conditional_detr": tiny_conditional_detr,
    "efficient_detr": efficient_detr,
    "tiny_efficient_detr": tiny_efficient_detr,
    "anchor_detr": anchor_detr,
    "anchor_detr_dc5": lambda: anchor_detr().replace(dilation=True),
    "tiny_anchor_detr": tiny_anchor_detr,
    # DN-DETR (Li et al. 2022) on two-stage Deformable DETR: 5 groups, noise 0.2 / 0.4.
    "dn_deformable_detr": lambda: Config(with_box_refine=True, two_stage=True, dn_groups=5),
    "tiny_dn_deformable_detr": lambda: tiny_pretrained().replace(dn_groups=5),
    # H-Deformable-DETR (Jia et al. 2023): 1500 one-to-many queries, k = 6, lambda = 1.
    "h_deformable_detr": lambda: Config(with_box_refine=True, two_stage=True,
                                        hybrid_queries=1500),
    "tiny_h_deformable_detr": lambda: tiny_pretrained().replace(hybrid_queries=150),
    "sparse_rcnn": sparse_rcnn,
    "tiny_sparse_rcnn": tiny_sparse_rcnn,
    "dynamic_detr": dynamic_detr,
    "tiny_dynamic_detr": tiny_dynamic_detr,
}


def get_config(name: str = "paper", **overrides) -> Config:
    """A named preset with field overrides, e.g. get_config("tiny", with_box_refine=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)


__all__ = ["Config", "CHOICES", "RANGES", "check_config", "get_config", "PRESETS", "build_model",
           "build_transforms"]
