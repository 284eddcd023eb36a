"""Synthetic shapes: a small but real COCO-format detection dataset, made in seconds.

Plays the role of d2l's banana set or Matterport's shapes: it trains on a CPU
in minutes, yet goes through exactly the same files, pycocotools index and
COCOeval as COCO itself. Each image holds `min_objects..max_objects` circles,
squares, triangles and crosses of random colour, filled or outlined, on a plain
or gradient background with optional light noise. Object sizes are drawn so
that COCO's small (< 32² px), medium and large (> 96² px) buckets are all
populated at size=128 (measured: about 42 / 47 / 11 %). Shapes overlap, but
every one keeps at least three quarters of its pixels visible.

Boxes are measured, not predicted: each shape is rasterized, later shapes
paint over earlier ones, and a box is the pixel extent of what stays visible
of its shape (COCO boxes are the visible extent too). A pixel (col, row)
covers [col, col + 1) x [row, row + 1), so a box is
[x_min, y_min, x_max + 1 - x_min, y_max + 1 - y_min] in integer pixels.
`area` is the box area w*h (not a pixel count), so the small / medium / large
buckets follow box size; an outlined circle counts by its extent, not its ink.

Everything is drawn from `np.random.default_rng([seed, split, index])`, so the
same seed writes byte-identical PNGs and JSON, and images do not depend on
how many others are made.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
CATEGORIES = tuple({"id": i + 1, "name": name, "supercategory": "shape"}
                   for i, name in enumerate(SHAPE_NAMES))

# COCO's area ranges (pycocotools Params.areaRng), for the summary.
SMALL_MAX_AREA = 32 ** 2
MEDIUM_MAX_AREA = 96 ** 2

# Target extent (box side before rotation) as a fraction of the image side, per
# bucket, and how often each bucket is drawn. At size=128: 8-29 px, 36-87 px, 102-122 px.
EXTENT_RANGES = ((0.0625, 0.23), (0.28, 0.68), (0.8, 0.95))
BUCKET_PROBS = (0.25, 0.5, 0.25)

MIN_VISIBLE = 0.75       # every earlier shape keeps >= 3/4 of its pixels visible
MAX_TRUNCATION = 0.15    # a shape may stick out of the image by 15 % of its extent
MIN_BG_CONTRAST = 150    # L1 RGB distance between a shape's colour and the background mean
MIN_PAIR_CONTRAST = 100  # ... and between touching shapes, so they do not merge
GRADIENT_DELTA = 20      # gradient ends differ from the mean by <= 20 per channel
NOISE_AMPLITUDE = 6      # light noise: uniform integers in [-6, 6] per channel


def make_shapes(out_dir, num_train: int = 1000, num_val: int = 200, size: int = 128,
                seed: int = 0, min_objects: int = 1, max_objects: int = 12) -> dict:
    """Write a shapes dataset in the COCO layout and return a summary.

    Layout: out_dir/{train,val}/000000.png ... and
    out_dir/annotations/instances_{train,val}.json (COCO `images`, `annotations`,
    `categories`, plus `info` and `licenses`, which some pycocotools versions need).
    Category ids are 1..4 (see `CATEGORIES`); image ids equal the file number,
    annotation ids start at 1 (COCOeval treats a ground-truth id of 0 as unmatched).
    Returns {"out_dir", "categories", "train": stats, "val": stats}, where stats has
    images, objects, min/max objects per image, per_class, and small / medium / large
    counts (COCO buckets on `area`). Existing files are overwritten, others left alone.
    """
    _check_args(num_train, num_val, size, min_objects, max_objects)
    out_dir = Path(out_dir)
    summary = {"out_dir": str(out_dir), "categories": list(SHAPE_NAMES)}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        summary[split] = _write_split(out_dir, split, split_index, count, size, seed,
                                      min_objects, max_objects)
    return summary


def _check_args(num_train, num_val, size, min_objects, max_objects) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int >= 32 (pixels), got {size!r}")
    if not (isinstance(min_objects, int) and isinstance(max_objects, int)
            and 0 <= min_objects <= max_objects):
        raise ValueError(f"need ints 0 <= min_objects <= max_objects, "
                         f"got min_objects={min_objects!r}, max_objects={max_objects!r}")


def _write_split(out_dir: Path, split: str, split_index: int, count: int, size: int,
                 seed: int, min_objects: int, max_objects: int) -> dict:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_index, index])
        pixels, objects = render_image(rng, size, min_objects, max_objects)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG")
        images.append({"id": index, "file_name": file_name, "height": size, "width": size})
        for category_id, bbox in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index,
                                "category_id": category_id, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
    coco = {"info": {"description": f"ddetr-tutorial synthetic shapes ({split}, seed {seed})",
                     "version": "1.0"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [dict(c) for c in CATEGORIES]}
    with open(out_dir / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(coco, f)
    return _split_stats(images, annotations)


def _split_stats(images: list, annotations: list) -> dict:
    per_image = np.bincount([a["image_id"] for a in annotations], minlength=len(images))
    areas = np.array([a["area"] for a in annotations])
    per_class = {name: sum(a["category_id"] == i + 1 for a in annotations)
                 for i, name in enumerate(SHAPE_NAMES)}
    return {"images": len(images), "objects": len(annotations),
            "min_objects_per_image": int(per_image.min()) if len(images) else 0,
            "max_objects_per_image": int(per_image.max()) if len(images) else 0,
            "per_class": per_class,
            "small": int((areas < SMALL_MAX_AREA).sum()),
            "medium": int(((areas >= SMALL_MAX_AREA) & (areas < MEDIUM_MAX_AREA)).sum()),
            "large": int((areas >= MEDIUM_MAX_AREA).sum())}


def render_image(rng: np.random.Generator, size: int, min_objects: int = 1,
                 max_objects: int = 12) -> tuple[np.ndarray, list]:
    """Draw one image -> (pixels (size, size, 3) uint8, [(category_id, [x, y, w, h]), ...]).

    Shapes are placed largest first, so small ones land on top of big ones; a
    placement that would hide too much of an earlier shape is retried (and the
    shape shrunk after every 10 tries), so every object stays visible.
    """
    bg_mean, pixels = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object shows at each pixel
    painted, visible = np.zeros(0, np.int64), np.zeros(0, np.int64)  # (n,) pixel counts
    colours, kinds = [], []
    count = int(rng.integers(min_objects, max_objects + 1))
    for extent in _sample_extents(rng, size, count):
        kind = int(rng.integers(len(SHAPE_NAMES)))
        mask = _place(rng, kind, extent, size, owner, painted, visible)
        if mask is None:
            continue  # did not fit after all tries: rare, and the image just has one fewer
        colour = _pick_colour(rng, bg_mean, mask, owner, colours)
        visible = np.append(visible - _covered(mask, owner, len(kinds)), mask.sum())
        painted = np.append(painted, mask.sum())
        pixels[mask] = colour
        owner[mask] = len(kinds)
        colours.append(colour)
        kinds.append(kind)
    objects = [(kinds[k] + 1, _visible_box(owner == k)) for k in range(len(kinds))]
    return pixels, objects


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain or gradient colour, maybe lightly noisy -> (mean (3,), pixels (size, size, 3)
    uint8)."""
    # Keep the mean far enough from 0 and 255 that gradient + noise never clip: the
    # background then stays exactly "mean + linear ramp + noise", which tests rely on.
    edge = GRADIENT_DELTA + NOISE_AMPLITUDE
    mean = rng.integers(edge, 256 - edge, 3).astype(np.float64)
    image = np.broadcast_to(mean, (size, size, 3)).copy()
    if rng.random() < 0.5:
        delta = rng.uniform(-GRADIENT_DELTA, GRADIENT_DELTA, 3)
        angle = rng.uniform(0, 2 * math.pi)
        coords = (np.arange(size) + 0.5) / size - 0.5  # in [-0.5, 0.5]
        # t in [-1, 1] along the direction; the ends of the gradient are mean ± delta.
        t = (math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]) * math.sqrt(2)
        image += t[..., None] * delta
    if rng.random() < 0.5:
        image += rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, (size, size, 3))
    return mean, np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _sample_extents(rng: np.random.Generator, size: int, count: int) -> list:
    """`count` shape extents in px, largest first; at most one large (two would not fit)."""
    buckets = rng.choice(len(BUCKET_PROBS), size=count, p=BUCKET_PROBS)
    buckets[np.flatnonzero(buckets == 2)[1:]] = 1
    extents = [max(rng.uniform(*EXTENT_RANGES[b]) * size, 6.0) for b in buckets]
    return sorted(extents, reverse=True)


def _place(rng, kind: int, extent: float, size: int, owner: np.ndarray,
           painted: np.ndarray, visible: np.ndarray) -> np.ndarray | None:
    """Find a position where each earlier shape keeps MIN_VISIBLE of its pixels -> bool mask or
    None.

    painted, visible: (n,) pixel counts of the earlier shapes, as drawn and as showing now.
    """
    filled = extent < 14 or rng.random() < 0.6  # outlines of tiny shapes would be unreadable
    for attempt in range(40):
        if attempt and attempt % 10 == 0:
            extent = max(extent * 0.7, 6.0)
        mask = _rasterize(rng, kind, extent, size, filled)
        if mask.any() and np.all(visible - _covered(mask, owner, len(visible))
                                 >= MIN_VISIBLE * painted):
            return mask
    return None


def _rasterize(rng, kind: int, extent: float, size: int, filled: bool) -> np.ndarray:
    """Draw one shape of about `extent` px at a random position -> bool mask (size, size)."""
    half = extent / 2
    # The unrotated box [c - half, c + half] may stick out by MAX_TRUNCATION * extent.
    margin = half - MAX_TRUNCATION * extent
    cx, cy = (rng.uniform(margin, size - margin, 2) if 2 * margin < size else (size / 2, size / 2))
    width = max(2, round(extent * 0.12))  # outline thickness
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    name = SHAPE_NAMES[kind]
    if name == "circle":
        xy = [cx - half, cy - half, cx + half, cy + half]
        draw.ellipse(xy, fill=255) if filled else draw.ellipse(xy, outline=255, width=width)
    else:
        points = _polygon(rng, name, half, cx, cy)
        draw.polygon(points, fill=255) if filled else draw.polygon(points, outline=255, width=width)
    return np.asarray(canvas) > 0


def _polygon(rng, name: str, half: float, cx: float, cy: float) -> list:
    """Vertices of a square, triangle or cross of half-extent `half`, rotated a little."""
    if name == "square":
        unit = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        angle = rng.uniform(-15, 15)
    elif name == "triangle":
        unit = [(0, -1), (1, 1), (-1, 1)]
        angle = 90 * int(rng.integers(4)) + rng.uniform(-15, 15)  # points up, right, down or left
    else:  # cross: a plus sign with arms 0.36 of the extent wide
        a = 0.36
        unit = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
                (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
        angle = rng.uniform(-15, 15)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + half * (c * u - s * v), cy + half * (s * u + c * v)) for u, v in unit]


def _covered(mask: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """(n,) pixels of each earlier shape that `mask` would paint over."""
    return np.bincount(owner[mask] + 1, minlength=n + 1)[1:]


def _pick_colour(rng, bg_mean: np.ndarray, mask: np.ndarray, owner: np.ndarray,
                 colours: list) -> np.ndarray:
    """A random RGB colour far from the background and from the shapes this one touches."""
    touched = np.unique(owner[_dilate(mask)])
    neighbours = [colours[k] for k in touched if k >= 0]
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if (np.abs(colour - bg_mean).sum() >= MIN_BG_CONTRAST
                and all(np.abs(colour - c).sum() >= MIN_PAIR_CONTRAST for c in neighbours)):
            return colour.astype(np.uint8)
    # Nearly never reached; the background contrast must hold, so take its opposite corner.
    return np.where(bg_mean < 128, 255, 0).astype(np.uint8)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a bool mask by one pixel (4-neighbourhood)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _visible_box(visible: np.ndarray) -> list:
    """Tight [x, y, w, h] around the True pixels of a (size, size) mask, in integer pixels."""
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    return [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0]
