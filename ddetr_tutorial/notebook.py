"""What the notebooks share: the fast switch and the shipped model.

`fast_mode()` is True when DDETR_FAST=1, or when CI is set and DDETR_FAST is not:
notebooks then shrink their sizes and steps so nbmake runs them all in minutes.
The shipped model is package data (`ddetr_tutorial/shipped/`), found without the
repository; `REPO` is only for notebooks that read the checkout's own files
(benchmarks/results) and means nothing in an installed copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from .model_files import load_model
from .shipped import SHIPPED, shipped_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = SHIPPED["tiny_shapes"]


def fast_mode() -> bool:
    value = os.environ.get("DDETR_FAST")
    if value is None:
        return bool(os.environ.get("CI"))
    if value not in ("0", "1"):
        raise ValueError(f"DDETR_FAST must be '0' or '1', got {value!r}")
    return value == "1"


def load_shipped_model(device="cpu", **overrides):
    """The tiny model trained on the shapes set (shipped as "tiny_shapes"), in eval
    mode: (model, cfg, postprocess, meta), as `model_files.load_model` returns."""
    return load_model(shipped_checkpoint("tiny_shapes"), device=device, **overrides)
