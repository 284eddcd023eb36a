"""What each `Config` field accepts, and the rules between fields (`check_config`).

Every message names the field, the value and what was expected, in one line, so a bad
value stops a run before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING

from .backbone import RESNETS
from .ops import BACKEND_CHOICES

if TYPE_CHECKING:  # config.py imports this module
    from .config import Config


# --- what each field accepts (the types come from the annotations above)

CHOICES = {
    "model": ("deformable", "detr",
              "conditional_detr", "efficient_detr", "anchor_detr", "sparse_rcnn",
              "dynamic_detr"),
    "backbone": tuple(RESNETS),
    "backbone_norm": ("frozen", "batch"),
    "op_backend": tuple(BACKEND_CHOICES),
    "augment": ("paper", "flip"),
}
# (lowest, highest, whether the lowest itself is allowed); the highest never is; None: no bound
RANGES = {
    "backbone_width": (8, None, True),  # the ResNet's stem channels
    "num_feature_levels": (1, None, True),
    "hidden_dim": (32, None, True),
    "nheads": (1, None, True),
    "enc_layers": (0, None, True),  # 0: no encoder (the backbone features go to the decoder)
    "dec_layers": (1, None, True),
    "dim_feedforward": (1, None, True),
    "dropout": (0.0, 1.0, True),  # a probability; 1 would zero every activation
    "enc_n_points": (1, None, True),
    "dec_n_points": (1, None, True),
    "num_queries": (1, None, True),
    "num_patterns": (1, None, True),
    "dn_groups": (0, None, True),
    "dn_label_noise": (0.0, 1.0, True),
    "dn_box_noise": (0.0, None, True),
    "dim_dynamic": (1, None, True),
    "hybrid_queries": (0, None, True),
    "hybrid_k": (1, None, True),
    "hybrid_weight": (0.0, None, True),
    "roi_canonical_size": (0.0, None, False),
    "num_classes": (1, None, True),
    "set_cost_class": (0.0, None, True),
    "set_cost_bbox": (0.0, None, True),
    "set_cost_giou": (0.0, None, True),
    "cls_loss_coef": (0.0, None, True),
    "bbox_loss_coef": (0.0, None, True),
    "giou_loss_coef": (0.0, None, True),
    "focal_alpha": (0.0, 1.0, True),
    "eos_coef": (0.0, None, True),
    "position_offset": (0.0, 1.0, True),
    "num_select": (1, None, True),
    "lr": (0.0, None, False),
    "lr_backbone": (0.0, None, True),
    "lr_linear_proj_mult": (0.0, None, True),
    "weight_decay": (0.0, None, True),
    "batch_size": (1, None, True),
    "epochs": (1, None, True),
    "lr_drop": (1, None, True),  # StepLR's step_size; beyond `epochs` means no drop
    "clip_max_norm": (0.0, None, True),  # 0: no clipping
    "warmup_steps": (0, None, True),
    "image_size": (8, None, True),  # None: the paper's sizes
}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def check_config(cfg: Config) -> None:
    """Raise TypeError / ValueError, naming the field, the value and what is
    expected, unless every field of `cfg` has its annotated type and an allowed
    value and the fields agree with each other. Ints in float fields become floats."""
    for field in dataclasses.fields(cfg):
        value = _checked_type(field, getattr(cfg, field.name))
        object.__setattr__(cfg, field.name, value)  # frozen: the one write, at construction
        _check_value(field.name, value)
    _check_together(cfg)


def _checked_type(field: dataclasses.Field, value):
    """`value` as the annotated type of `field` ("int", "float", "str | None", ...)."""
    annotation = field.type if isinstance(field.type, str) else field.type.__name__
    name, _, optional = annotation.partition(" | ")
    if value is None and optional == "None":
        return None
    kind = _TYPES[name]
    # bool is an int subclass, but True is no count; an int is a fine float.
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        wanted = numbers.Integral if kind is int else numbers.Real
        ok = isinstance(value, wanted) and not isinstance(value, bool)
    if not ok:
        expected = {"bool": "true or false", "int": "an integer", "float": "a number",
                    "str": "a string"}[name] + (" or None" if optional else "")
        raise TypeError(f"config field {field.name}={value!r} ({type(value).__name__}): "
                        f"expected {expected}")
    return kind(value)


def _check_value(name: str, value) -> None:
    if value is None:
        return
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"config field {name}={value!r}: expected one of "
                         f"{', '.join(map(repr, CHOICES[name]))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config field {name}={value!r}: expected a finite number")
    if name not in RANGES:
        return
    low, high, low_allowed = RANGES[name]
    if (value < low if low_allowed else value <= low) or (high is not None and value >= high):
        kind = "an integer" if isinstance(value, int) else "a number"
        bounds = (f">= {low}" if low_allowed else f"> {low}") + (f" and < {high}" if high else "")
        raise ValueError(f"config field {name}={value!r}: expected {kind} {bounds}")


def _check_together(cfg: Config) -> None:
    """The rules between fields; each message names the field to change."""
    if cfg.hidden_dim % 32:
        raise ValueError(f"config field hidden_dim={cfg.hidden_dim}: expected a multiple of 32 "
                         f"(GroupNorm(32) in the input projections)")
    if cfg.hidden_dim % cfg.nheads:
        raise ValueError(f"config field nheads={cfg.nheads}: expected a divisor of "
                         f"hidden_dim={cfg.hidden_dim} (each of the M heads gets D = C / M "
                         f"channels)")
    if cfg.two_stage and not cfg.with_box_refine:
        raise ValueError("config field two_stage=True needs with_box_refine=True, got "
                         "with_box_refine=False (the two-stage proposals are refined by "
                         "per-layer box heads)")
    if cfg.model == "detr" and (cfg.with_box_refine or cfg.two_stage):
        raise ValueError(f"config field model='detr': expected with_box_refine=False and "
                         f"two_stage=False (the DETR baseline has neither), got "
                         f"with_box_refine={cfg.with_box_refine}, two_stage={cfg.two_stage}")
    if cfg.model == "conditional_detr":
        _check_conditional_detr(cfg)
    if cfg.model == "efficient_detr":
        _check_efficient_detr(cfg)
    if cfg.no_object and cfg.model != "detr":
        raise ValueError(f"config field no_object=True needs model='detr', got "
                         f"model={cfg.model!r} (Deformable DETR's head is sigmoid focal)")
    _check_anchor_detr(cfg)
    _check_sparse_rcnn(cfg)
    _check_dynamic_detr(cfg)
    if cfg.dn_groups and (cfg.model != "deformable" or not cfg.two_stage):
        raise ValueError(f"config field dn_groups={cfg.dn_groups}: denoising needs "
                         f"model='deformable' with two_stage=True (its noised boxes are 4-d "
                         f"reference boxes), got model={cfg.model!r}, two_stage={cfg.two_stage}")
    if cfg.hybrid_queries and (cfg.model != "deformable" or not cfg.two_stage or cfg.dn_groups):
        raise ValueError(f"config field hybrid_queries={cfg.hybrid_queries}: hybrid matching "
                         f"needs model='deformable' with two_stage=True and dn_groups=0 (its "
                         f"queries are the next-best proposals), got model={cfg.model!r}, "
                         f"two_stage={cfg.two_stage}, dn_groups={cfg.dn_groups}")
    if not (cfg.set_cost_class or cfg.set_cost_bbox or cfg.set_cost_giou):
        raise ValueError("config fields set_cost_class, set_cost_bbox, set_cost_giou are all 0: "
                         "expected at least one > 0 (else every matching costs the same)")


def _expect_fields(cfg: Config, wanted: dict) -> None:
    """Each `field: (value, why)` of `wanted` must hold for `cfg.model`; the message names
    the field, its value, the expected one and why."""
    for name, (value, why) in wanted.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"config field {name}={getattr(cfg, name)!r}: expected {value!r} "
                             f"with model={cfg.model!r} ({why})")


def _check_conditional_detr(cfg: Config) -> None:
    """Conditional DETR decodes one map with a sigmoid focal head and no refinement."""
    _expect_fields(cfg, {
        "num_feature_levels": (1, "one map, C5 or DC5, as DETR's"),
        "with_box_refine": (False, "its boxes are relative to the fixed reference s"),
        "two_stage": (False, "its queries are learned embeddings"),
        "no_object": (False, "its head is sigmoid focal, no 'no object' class")})


def _check_efficient_detr(cfg: Config) -> None:
    """Efficient DETR's dense part is the two-stage proposal head, refined by the decoder."""
    why = ("its queries and reference boxes are the dense part's top-K tokens, refined by the "
           "decoder")
    _expect_fields(cfg, {"two_stage": (True, why), "with_box_refine": (True, why)})


def _check_anchor_detr(cfg: Config) -> None:
    """Anchor DETR as built here: one feature map, fixed anchors, the sigmoid head."""
    if cfg.model != "anchor_detr":
        return
    if cfg.num_feature_levels != 1:
        raise ValueError(f"config field num_feature_levels={cfg.num_feature_levels}: "
                         f"model='anchor_detr' expects 1 (one C5 / DC5 map, the released "
                         f"default; its multi-level variant is not built here)")
    if cfg.with_box_refine or cfg.two_stage:
        raise ValueError(f"config field model='anchor_detr': expected with_box_refine=False "
                         f"and two_stage=False (its anchors stay fixed), got with_box_refine="
                         f"{cfg.with_box_refine}, two_stage={cfg.two_stage}")


def _check_sparse_rcnn(cfg: Config) -> None:
    """Sparse R-CNN as built here: P2-P5, no encoder, learned proposals, the focal head."""
    if cfg.model != "sparse_rcnn":
        return
    _expect_fields(cfg, {
        "num_feature_levels": (4, "its FPN's P2-P5, the levels its boxes are pooled from"),
        "enc_layers": (0, "it has no encoder; dec_layers is its number of stages"),
        "with_box_refine": (False, "every stage refines its boxes already"),
        "two_stage": (False, "its proposals are learned boxes"),
        "dilation": (False, "its FPN takes C2-C5 at strides 4-32")})


def _check_dynamic_detr(cfg: Config) -> None:
    """Dynamic DETR: a square encoder kernel, refined boxes, learned queries."""
    if cfg.model != "dynamic_detr":
        return
    if math.isqrt(cfg.enc_n_points) ** 2 != cfg.enc_n_points:
        raise ValueError(f"config field enc_n_points={cfg.enc_n_points}: expected a square "
                         f"with model='dynamic_detr' (its encoder kernel, 9 for 3x3)")
    if not cfg.with_box_refine or cfg.two_stage:
        raise ValueError(f"config field with_box_refine={cfg.with_box_refine}, two_stage="
                         f"{cfg.two_stage}: model='dynamic_detr' expects True and False (its "
                         f"decoder refines its learned boxes layer by layer)")
