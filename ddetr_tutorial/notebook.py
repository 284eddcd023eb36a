"""What the notebooks share: the fast switch and the shipped model.

`fast_mode()` is True when DDETR_FAST=1, or when CI is set and DDETR_FAST is not:
notebooks then shrink their sizes and steps so nbmake runs them all in minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "data" / "tiny_shapes.pth"


def fast_mode() -> bool:
    value = os.environ.get("DDETR_FAST")
    if value is None:
        return bool(os.environ.get("CI"))
    if value not in ("0", "1"):
        raise ValueError(f"DDETR_FAST must be '0' or '1', got {value!r}")
    return value == "1"


def load_shipped_model(device="cpu", **overrides):
    """The tiny model trained on the shapes set (data/tiny_shapes.pth), in eval mode:
    (model, cfg, postprocess, meta), as `checkpoints.load_model` returns."""
    from .checkpoints import load_model

    if not SHIPPED_MODEL.is_file():
        raise FileNotFoundError(f"the shipped model is missing: expected {SHIPPED_MODEL} "
                                f"(it is committed with the repository)")
    return load_model(SHIPPED_MODEL, device=device, **overrides)
