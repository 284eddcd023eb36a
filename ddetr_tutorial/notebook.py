"""What the notebooks share: the fast switch, the shipped model and two small helpers.

`fast_mode()` is True when DDETR_FAST=1, or when CI is set and DDETR_FAST is not:
notebooks then shrink their sizes and steps so nbmake runs them all in minutes.
The shipped model is package data (`ddetr_tutorial/shipped/`), found without the
repository; `REPO` is only for notebooks that read the checkout's own files
(benchmarks/results) and means nothing in an installed copy. `to_rgb` and `bilinear`
are written once here: notebook 02 builds bilinear sampling by hand and checks it
against this one, later notebooks import it. `your_explorer` opens notebook 09's
explorer on weights and photos of your own (an official checkpoint, a HuggingFace
folder) when $DDETR_CHECKPOINT names them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .model_files import load_model
from .predict import image_files
from .shipped import SHIPPED, shipped_checkpoint
from .visualize import SamplingExplorer

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


def to_rgb(image):
    """Undo the ImageNet normalization of a model input for display:
    (3, H, W) normalized tensor -> (H, W, 3) numpy array in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype)[:, None, None]
    return (image.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def bilinear(feature, loc):
    """Bilinear sampling of a map at normalized points, zeros outside (notebook 02).

    feature: (H, W, D); loc: (P, 2) normalized (x, y), (0, 0) the map's top-left corner
    and pixel centres at (j + 0.5) / W -> (P, D). This is `F.grid_sample` with
    align_corners=False and zero padding, the convention of the official code.
    """
    grid = (2 * loc - 1).view(1, 1, -1, 2)  # grid_sample's [-1, 1] coordinates, (1, 1, P, 2)
    sampled = F.grid_sample(feature.permute(2, 0, 1)[None], grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)  # (1, D, 1, P)
    return sampled[0, :, 0].T


MAX_PHOTOS = 8  # the explorer computes each image's sampling data once, on first view


def your_explorer(checkpoint=None, images=None, device="cpu", **kwargs):
    """Notebook 09's explorer on your weights and photos, or None without weights.

    checkpoint: any file `model_files.load_model` reads (ours, the official
    `r50_deformable_detr-checkpoint.pth`, a HuggingFace folder); default
    $DDETR_CHECKPOINT. images: image files or folders (a string may list several,
    separated by os.pathsep); default $DDETR_IMAGES; the first MAX_PHOTOS are used.
    The model runs with its own evaluation transform and class names (COCO's for
    91-class heads). Returns None when no checkpoint is given, so the notebook falls
    back to the shipped model; a checkpoint without images is an error naming both.
    """
    checkpoint = checkpoint or os.environ.get("DDETR_CHECKPOINT") or None
    if checkpoint is None:
        return None
    images = images if images is not None else os.environ.get("DDETR_IMAGES")
    if not images:
        raise ValueError(f"checkpoint {checkpoint} given but no images: set DDETR_IMAGES to a "
                         "folder of photos (or pass images=)")
    if isinstance(images, (str, os.PathLike)):
        images = [p for p in os.fspath(images).split(os.pathsep) if p]
    files = image_files(images)
    if not files:
        raise ValueError(f"no image files (.jpg, .png, ...) in {', '.join(map(str, images))}")
    return SamplingExplorer.from_checkpoint(checkpoint, [str(f) for f in files[:MAX_PHOTOS]],
                                            device=device, **kwargs)
