"""Synthetic object-centric classification: the miniature of the paper's ImageNet step.

The paper's backbone starts from ImageNet classification weights; here a
ResNet first learns to name the single object of a small image among
`len(CLASS_NAMES)` = 20 classes: ten filled shapes the detector never sees
(star, hexagon, ...), six outlined ones (outline versus fill is a separate
class), and four textures (stripes, checkerboard, dots, waves) filling a
region. Every image has clutter (thin strokes and small marks), a plain or
gradient background from `shapes._background`, and jitter in scale, rotation,
aspect, position and colour. The detector's own classes (circle, square,
triangle, cross) are never a class; ellipses are kept clearly elongated and
diamonds clearly flat, so none of them is a circle or a square.

Image `index` of `split` is drawn from
`np.random.default_rng([seed, index, PRETRAIN_SALT, split_code])` (split_code:
train 1, val 2), and its label is `index % 20`, so classes are exactly
balanced and an image does not depend on how many others are made. The
detection generator keys its images by `[seed, split, index]`, split in {0, 1}:
numpy hashes a 3-word key as if padded with a 0, and a seed >= 2**32 takes
two words. Our 4th word is never 0 and our 3rd word is the salt (> 1), so no
classification key equals any detection key (for detection seeds < 2**64):
the two sets are disjoint by seed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .shapes import MIN_BG_CONTRAST, MIN_PAIR_CONTRAST, _background

FILLED = ("star", "hexagon", "pentagon", "ellipse", "diamond", "heart", "arrow", "crescent",
          "l_shape", "trapezoid")
OUTLINED = ("star_outline", "hexagon_outline", "pentagon_outline", "ellipse_outline",
            "diamond_outline", "heart_outline")
TEXTURES = ("stripes", "checkerboard", "dots", "waves")
CLASS_NAMES = FILLED + OUTLINED + TEXTURES

PRETRAIN_SALT = 0x5EED_C1A5  # the 3rd word of every key: never a detection split (0 or 1)
SPLIT_CODES = {"train": 1, "val": 2}  # the 4th word: never 0 (numpy's padding of 3-word keys)
EXTENT_RANGE = (0.35, 0.9)  # the object's side before rotation, as a fraction of the image


def classification_key(seed: int, split: str, index: int) -> list:
    """The numpy rng key of one image: [seed, index, PRETRAIN_SALT, split code]."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    for name, value in (("seed", seed), ("index", index)):
        if not isinstance(value, (int, np.integer)) or not 0 <= value < 2 ** 32:
            raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")
    return [int(seed), int(index), PRETRAIN_SALT, SPLIT_CODES[split]]


def classification_image(seed: int, split: str, index: int, size: int = 64
                         ) -> tuple[np.ndarray, int]:
    """Image `index` of `split` -> (pixels (size, size, 3) uint8, label in [0, 20))."""
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16 (pixels), got {size!r}")
    rng = np.random.default_rng(classification_key(seed, split, index))
    label = index % len(CLASS_NAMES)
    return render_classification(rng, CLASS_NAMES[label], size), label


def make_classification(count: int, size: int = 64, seed: int = 0, split: str = "train",
                        labels=None) -> tuple[np.ndarray, np.ndarray]:
    """`count` images in memory -> (pixels (count, size, size, 3) uint8, labels (count,) int64).

    `labels`: class indices to keep (default all 20); the images are then those of
    the first matching indices, so a subset set is a subset of the full one.
    """
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    keep = range(len(CLASS_NAMES)) if labels is None else sorted(set(labels))
    if not keep or any(not 0 <= k < len(CLASS_NAMES) for k in keep):
        raise ValueError(f"labels must be class indices in [0, {len(CLASS_NAMES)}), got {labels!r}")
    # image i of the subset is the (i // k)-th cycle's image of class keep[i % k]
    indices = [(i // len(keep)) * len(CLASS_NAMES) + keep[i % len(keep)] for i in range(count)]
    pixels = np.zeros((count, size, size, 3), np.uint8)
    out_labels = np.zeros(count, np.int64)
    for i, index in enumerate(indices):
        pixels[i], out_labels[i] = classification_image(seed, split, index, size)
    return pixels, out_labels


def render_classification(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """Draw one image of class `name` -> pixels (size, size, 3) uint8.

    Order: background, clutter behind, the object, and sometimes one stroke across it.
    """
    bg_mean, pixels = _background(rng, size)
    _clutter(rng, pixels, size, strokes=int(rng.integers(0, 4)), marks=int(rng.integers(0, 9)))
    colour = _contrasting(rng, [bg_mean], MIN_BG_CONTRAST)
    extent = rng.uniform(*EXTENT_RANGE) * size
    if name in TEXTURES:
        region = _mask(rng, rng.choice(["rect", "ellipse"]), extent, size, filled=True)
        second = _contrasting(rng, [colour], MIN_PAIR_CONTRAST)
        pixels[region] = second
        pixels[region & _pattern(rng, name, size)] = colour
    else:
        filled = not name.endswith("_outline")
        pixels[_mask(rng, name.removesuffix("_outline"), extent, size, filled)] = colour
    if rng.random() < 0.3:
        _clutter(rng, pixels, size, strokes=1, marks=0)
    return pixels


def _contrasting(rng, others: list, contrast: int) -> np.ndarray:
    """A random RGB colour at L1 distance >= `contrast` from each colour in `others`."""
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if all(np.abs(colour - np.asarray(o, float)).sum() >= contrast for o in others):
            return colour.astype(np.uint8)
    return np.where(np.asarray(others[0]) < 128, 255, 0).astype(np.uint8)


def _clutter(rng, pixels: np.ndarray, size: int, strokes: int, marks: int) -> None:
    """Paint thin random line segments and small dots (distractors, no class) in place."""
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    for _ in range(strokes):
        a, b = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        draw.line([tuple(a), tuple(b)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 3)))
    for _ in range(marks):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.5, 0.03 * size + 0.5)
        draw.ellipse([x - r, y - r, x + r, y + r],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels[...] = np.asarray(canvas)


def _mask(rng, kind: str, extent: float, size: int, filled: bool) -> np.ndarray:
    """One shape of side about `extent` px, rotated and placed at random -> bool (size, size)."""
    half = extent / 2
    margin = 0.8 * half  # the shape may stick out a little, never lose its middle
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(extent * 0.1))  # outline thickness
    for k, unit in enumerate(_unit_polygons(rng, kind)):
        points = [(cx + half * (c * u - s * v), cy + half * (s * u + c * v)) for u, v in unit]
        ink = 255 if k == 0 else 0  # a second polygon is cut out (the crescent's bite)
        if filled:
            draw.polygon(points, fill=ink)
        else:
            draw.polygon(points, outline=ink, width=width)
    return np.asarray(canvas) > 0


def _unit_polygons(rng, kind: str) -> list:
    """Vertices in [-1, 1]^2 of one shape: [outline] or [outline, cut-out]."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    if kind in ("star", "hexagon", "pentagon"):
        n = {"star": 10, "hexagon": 6, "pentagon": 5}[kind]
        radii = np.ones(n)
        if kind == "star":
            radii[1::2] = rng.uniform(0.38, 0.5)  # inner corners of a five-pointed star
        a = np.arange(n) * 2 * math.pi / n
        return [list(zip(radii * np.cos(a), radii * np.sin(a)))]
    if kind == "ellipse":
        ratio = rng.uniform(0.4, 0.7)  # never round: a circle is a detector class
        return [list(zip(np.cos(t), ratio * np.sin(t)))]
    if kind == "diamond":
        a = rng.uniform(0.45, 0.7)  # a flat rhombus, never a square
        return [[(0, -1), (a, 0), (0, 1), (-a, 0)]]
    if kind == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [list(zip(x / 17, (y + 2.5) / 15))]
    if kind == "arrow":
        w, head = rng.uniform(0.2, 0.35), rng.uniform(0.55, 0.8)
        return [[(-1, -w), (0.1, -w), (0.1, -head), (1, 0), (0.1, head), (0.1, w), (-1, w)]]
    if kind == "crescent":
        r, shift = rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.55)
        return [list(zip(np.cos(t), np.sin(t))), list(zip(shift + r * np.cos(t), r * np.sin(t)))]
    if kind == "l_shape":
        w = rng.uniform(0.5, 0.8)  # arm thickness
        return [[(-1, -1), (-1 + w, -1), (-1 + w, 1 - w), (0.6, 1 - w), (0.6, 1), (-1, 1)]]
    if kind == "trapezoid":
        top, h = rng.uniform(0.35, 0.65), rng.uniform(0.5, 0.8)  # never a triangle
        return [[(-top, -h), (top, -h), (1, h), (-1, h)]]
    if kind == "rect":  # a texture's region
        h = rng.uniform(0.6, 1.0)
        return [[(-1, -h), (1, -h), (1, h), (-1, h)]]
    raise ValueError(f"unknown shape {kind!r}")


def _pattern(rng, name: str, size: int) -> np.ndarray:
    """A texture over the whole image -> bool (size, size): True where the first colour goes."""
    period = rng.uniform(4, 9)
    angle = rng.uniform(0, math.pi)
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    u = math.cos(angle) * cols + math.sin(angle) * rows  # across the pattern
    v = -math.sin(angle) * cols + math.cos(angle) * rows  # along it
    u, v = u + rng.uniform(0, period), v + rng.uniform(0, period)
    if name == "stripes":
        return (u / period) % 1 < 0.5
    if name == "waves":  # stripes bent by a sine at least half a period high
        bend = rng.uniform(0.5, 0.9) * period * np.sin(2 * math.pi * v / rng.uniform(10, 18))
        return ((u + bend) / period) % 1 < 0.5
    if name == "checkerboard":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if name == "dots":
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return du ** 2 + dv ** 2 < rng.uniform(0.22, 0.32) ** 2
    raise ValueError(f"unknown texture {name!r}")
