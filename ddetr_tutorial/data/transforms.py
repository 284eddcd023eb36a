"""Joint image + box transforms: the Deformable DETR training recipe, without torchvision.

Every transform takes and returns `(image, target)`. Until `Normalize`, the
image is a PIL image and `target["boxes"]` holds absolute corner boxes
(x0, y0, x1, y1) in pixels, float32 (n, 4), with `target["labels"]` (n,);
geometric transforms also update `target["size"]` = (h, w). `Normalize` ends
the chain: it turns the boxes into (cx, cy, w, h) normalized by the image size,
the format the model predicts. `target` may be None (inference on an image).

Randomness comes from torch's generator (`torch.manual_seed` makes a run
repeatable, and DataLoader workers get distinct seeds automatically).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's recipe (official main.py / datasets/coco.py), for COCO-sized images.
PAPER_SCALES = tuple(range(480, 801, 32))   # short side during training: 480, 512, ..., 800
PAPER_MAX_SIZE = 1333                       # long side cap
PAPER_CROP_SCALES = (400, 500, 600)         # short side before the random crop
PAPER_CROP = (384, 600)                     # crop side range (min, max)
PAPER_REFERENCE_SIZE = 640                  # COCO's typical long side; see scale_for

# Per-box entries: a crop that removes a box removes its row in each of these.
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")


def _rand_int(low: int, high: int) -> int:
    """Uniform integer in [low, high], from torch's generator."""
    return int(torch.randint(low, high + 1, ()).item())


def _with(target: dict | None, **changes) -> dict | None:
    """A shallow copy of `target` with some entries replaced (transforms never mutate their
    input)."""
    return None if target is None else {**target, **changes}


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _check_pil(image, name: str) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} expects a PIL image (put it before ToTensor), "
                        f"got {type(image).__name__}")


# ----------------------------------------------------------------------------- functional


def hflip(image: Image.Image, target: dict | None):
    """Mirror left-right: a box (x0, y0, x1, y1) becomes (W - x1, y0, W - x0, y1)."""
    _check_pil(image, "hflip")
    width = image.width
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if target is None or "boxes" not in target:
        return flipped, target
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    return flipped, _with(target, boxes=torch.stack([width - x1, y0, width - x0, y1], dim=-1))


def resized_size(width: int, height: int, short: int,
                 max_size: int | None = None) -> tuple[int, int]:
    """(new_width, new_height) with the short side `short`, shrunk so the long side <= max_size.

    The official rule, to the pixel (DETR's get_size_with_aspect_ratio): the short side
    is an int, rounded when max_size shrinks it; the long side is truncated, so a
    640 x 480 COCO image becomes 1066 x 800, and evaluation sees what the official did.
    """
    low, high = min(width, height), max(width, height)
    if max_size is not None and high / low * short > max_size:
        short = max(1, int(round(max_size * low / high)))
    if low == short:
        return width, height
    long = int(short * high / low)
    return (short, long) if width < height else (long, short)


def resize(image: Image.Image, target: dict | None, short: int, max_size: int | None = None):
    """Bilinear resize to short side `short` (long side capped); boxes scale with each axis."""
    _check_pil(image, "resize")
    new_w, new_h = resized_size(image.width, image.height, short, max_size)
    # Boxes scale by the realized ratios, which rounding makes differ slightly per axis.
    ratio = torch.tensor([new_w / image.width, new_h / image.height] * 2, dtype=torch.float32)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if target is None:
        return resized, None
    changes = {"size": torch.tensor([new_h, new_w], dtype=torch.int64)}
    if "boxes" in target:
        # Clamp: in float32, x1 = W_old * (W_new / W_old) can land one ulp above W_new.
        limit = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float32)
        changes["boxes"] = torch.minimum(target["boxes"] * ratio, limit)
    if "area" in target:
        changes["area"] = target["area"] * (ratio[0] * ratio[1])
    return resized, _with(target, **changes)


def crop(image: Image.Image, target: dict | None, top: int, left: int, height: int, width: int):
    """Cut the region [left, left + width) x [top, top + height); clip boxes, drop those left empty.

    A box that no longer overlaps the region has zero width or height after
    clipping; it is removed together with its label (and area, iscrowd).
    """
    _check_pil(image, "crop")
    cropped = image.crop((left, top, left + width, top + height))
    changes = {"size": torch.tensor([height, width], dtype=torch.int64)}
    if target is None:
        return cropped, None
    if "boxes" in target:
        shift = torch.tensor([left, top, left, top], dtype=torch.float32)
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.minimum(target["boxes"] - shift, limit).clamp(min=0)  # (n, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (n,)
        changes.update({key: target[key][keep] for key in PER_BOX_KEYS if key in target})
        changes["boxes"] = boxes[keep]
    return cropped, _with(target, **changes)


# ----------------------------------------------------------------------------- transforms


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        inner = "".join(f"\n{_indent(repr(t))}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class RandomHorizontalFlip:
    """Flip left-right with probability p."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, image, target=None):
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the short side to a size drawn uniformly from `sizes`, the long side <= max_size."""

    def __init__(self, sizes, max_size: int | None = None):
        self.sizes = _positive_ints(sizes, "sizes")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
        self.max_size = max_size

    def __call__(self, image, target=None):
        short = self.sizes[_rand_int(0, len(self.sizes) - 1)]
        return resize(image, target, short, self.max_size)

    def __repr__(self):
        return f"RandomResize(sizes={list(self.sizes)}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region, each side drawn from [min_size, max_size] and at most the image side.

    Unlike DETR's version, an image smaller than min_size is not an error: the
    side is then capped at the image side.
    """

    def __init__(self, min_size: int, max_size: int):
        if not (isinstance(min_size, int) and isinstance(max_size, int)
                and 1 <= min_size <= max_size):
            raise ValueError(f"need ints 1 <= min_size <= max_size, got {min_size!r}, {max_size!r}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target=None):
        _check_pil(image, "RandomSizeCrop")
        width = _rand_int(min(self.min_size, image.width), min(image.width, self.max_size))
        height = _rand_int(min(self.min_size, image.height), min(image.height, self.max_size))
        top = _rand_int(0, image.height - height)
        left = _rand_int(0, image.width - width)
        return crop(image, target, top, left, height, width)

    def __repr__(self):
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply transforms1 with probability p, else transforms2."""

    def __init__(self, transforms1, transforms2, p: float = 0.5):
        self.transforms1, self.transforms2, self.p = transforms1, transforms2, p

    def __call__(self, image, target=None):
        if torch.rand(()).item() < self.p:
            return self.transforms1(image, target)
        return self.transforms2(image, target)

    def __repr__(self):
        return (f"RandomSelect(p={self.p},\n{_indent(repr(self.transforms1))},"
                f"\n{_indent(repr(self.transforms2))}\n)")


class ToTensor:
    """PIL image -> float32 tensor (3, H, W) in [0, 1]; the target passes through."""

    def __call__(self, image, target=None):
        _check_pil(image, "ToTensor")
        pixels = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255), target

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    """Standardize channels and turn boxes into (cx, cy, w, h) normalized by the image (W, H).

    image: (3, H, W) float tensor in [0, 1] -> (image - mean) / std.
    boxes: (n, 4) absolute (x0, y0, x1, y1) -> (n, 4) cxcywh in [0, 1].
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean_values, self.std_values = tuple(mean), tuple(std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # (3, 1, 1)

    def __call__(self, image, target=None):
        if (not isinstance(image, Tensor) or image.dim() != 3
                or image.shape[0] != self.mean.shape[0]):
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise TypeError(f"Normalize expects a ({self.mean.shape[0]}, H, W) tensor "
                            f"(put ToTensor first), got {got}")
        image = (image - self.mean) / self.std
        if target is None or "boxes" not in target:
            return image, target
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return image, _with(target, boxes=box_xyxy_to_cxcywh(target["boxes"]) / scale)

    def __repr__(self):
        return f"Normalize(mean={self.mean_values}, std={self.std_values})"


# ----------------------------------------------------------------------------- recipes


def _positive_ints(values, name: str) -> tuple:
    values = tuple(values) if isinstance(values, (list, tuple, range)) else None
    if not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return values


def make_transforms(split: str, scales=PAPER_SCALES, max_size: int | None = PAPER_MAX_SIZE,
                    crop: tuple[int, int] | None = PAPER_CROP,
                    crop_scales=PAPER_CROP_SCALES) -> Compose:
    """The official augmentation recipe, scaled by its arguments.

    train: flip, then with probability 1/2 either resize(scales), or
           resize(crop_scales) -> random crop of side in `crop` -> resize(scales);
           `crop=None` keeps only the first branch. Then ToTensor + Normalize.
    val / test: resize the short side to max(scales), then ToTensor + Normalize.
    The defaults are the paper's (COCO); for small images use `**scale_for(size)`.
    """
    scales = _positive_ints(scales, "scales")
    if split == "train":
        resize_scales = RandomResize(scales, max_size=max_size)
        if crop is None:
            augment = resize_scales
        else:
            if not (isinstance(crop, (list, tuple)) and len(crop) == 2):
                raise ValueError(f"crop must be (min_size, max_size) or None, got {crop!r}")
            crop_min, crop_max = crop
            augment = RandomSelect(resize_scales, Compose([
                RandomResize(_positive_ints(crop_scales, "crop_scales")),
                RandomSizeCrop(crop_min, crop_max),
                resize_scales]))
        return Compose([RandomHorizontalFlip(), augment, ToTensor(), Normalize()])
    if split in ("val", "test"):
        return Compose([RandomResize([max(scales)], max_size=max_size), ToTensor(), Normalize()])
    raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")


def scale_for(image_size: int) -> dict:
    """Arguments for `make_transforms` with the paper's recipe scaled to images of `image_size` px.

    Everything is multiplied by image_size / 640 (COCO's typical long side), so
    scale_for(640) gives the paper's values and scale_for(128) (shapes) gives
    scales 96..160, max_size 267, crop_scales (80, 100, 120), crop (77, 120).
    Use as `make_transforms("train", **scale_for(128))`.
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (pixels), got {image_size!r}")
    factor = image_size / PAPER_REFERENCE_SIZE

    def scaled(values):
        return tuple(sorted({max(1, round(v * factor)) for v in values}))

    crop_min, crop_max = (max(1, round(v * factor)) for v in PAPER_CROP)
    return {"scales": scaled(PAPER_SCALES), "max_size": max(1, round(PAPER_MAX_SIZE * factor)),
            "crop": (crop_min, crop_max), "crop_scales": scaled(PAPER_CROP_SCALES)}
