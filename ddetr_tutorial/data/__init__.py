"""Data: synthetic shapes (COCO files), a COCO detection dataset, transforms, batching.

A batch is `images (N, 3, H, W)` normalized, `mask (N, H, W)` bool with True on
padding, and `targets`, a list of dicts with `labels` int64 (n,), `boxes`
float32 (n, 4) cxcywh normalized to the unpadded image, `image_id`,
`orig_size` and `size` (h, w).
"""

from .coco import CocoDetection, build_dataset
from .collate import collate_fn
from .image_files import read_rgb
from .shapes import make_shapes
from .transforms import make_transforms, scale_for

__all__ = ["CocoDetection", "build_dataset", "collate_fn", "make_shapes", "make_transforms",
           "read_rgb", "scale_for"]
