"""Batching images of different sizes: zero padding plus a mask that marks it.

Each image is padded at the bottom and right, so its pixels keep their
coordinates and its boxes (normalized to the unpadded image) stay valid. The
mask tells the backbone, position encoding and attention which pixels are
padding (True), as in DETR, but as a plain tensor rather than a NestedTensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def collate_fn(batch):
    """[(image (3, h_i, w_i), target), ...] -> (images (N, 3, H, W), mask (N, H, W) bool, targets).

    H, W are the largest height and width in the batch; mask is True on padding.
    Targets are returned unchanged, as a list.
    """
    if len(batch) == 0:
        raise ValueError("collate_fn got an empty batch")
    images = [image for image, _ in batch]
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise TypeError(f"collate_fn expects (C, H, W) image tensors (apply ToTensor first); "
                            f"item {i} is {got}")
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = images[0].new_zeros((len(images), channels, height, width))  # (N, C, H, W)
    mask = torch.ones((len(images), height, width), dtype=torch.bool)  # (N, H, W)
    for i, image in enumerate(images):
        if image.shape[0] != channels:
            raise ValueError(f"collate_fn: item {i} has {image.shape[0]} channels, "
                             f"item 0 has {channels}")
        h, w = image.shape[1:]
        padded[i, :, :h, :w] = image
        mask[i, :h, :w] = False
    return padded, mask, [target for _, target in batch]
