"""One query of a `sampling_data` record in image pixels, and the index checks.

Coordinates: the attention's points are normalized (x, y) on each level's
padded map; `to_pixels` divides by the level's valid ratio and scales by the
unpadded image's (w, h), so pixel (col, row) covers [col, col + 1) x [row, row + 1).
"""

from __future__ import annotations

import numpy as np

KINDS = ("encoder", "decoder")


def to_pixels(points, valid_ratio, image_size):
    """Normalized (x, y) on a level's padded map -> continuous pixels of the unpadded image.

    points: (..., 2); valid_ratio: (2,) as (w, h), or any shape broadcasting
    against points (e.g. (L, 1, 2) for points (M, L, K, 2)); image_size: (h, w).
    """
    h, w = image_size
    return np.asarray(points) / np.asarray(valid_ratio) * np.array([w, h], dtype=float)


def boxes_to_pixels(boxes_cxcywh, image_size):
    """(..., 4) cxcywh normalized to the image -> (..., 4) xyxy in pixels."""
    h, w = image_size
    cx, cy, bw, bh = np.moveaxis(np.asarray(boxes_cxcywh, dtype=float), -1, 0)
    return np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                     (cy + bh / 2) * h], -1)


def _check_index(name, value, size, what):
    """value as a non-negative index into `size` items (negatives count from the end)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not -size <= value < size:
        valid = f"0..{size - 1} (or -{size}..-1)" if size else "none"
        raise ValueError(f"{name}={value} is out of range: {what}, so valid values are {valid}")
    return int(value) % size


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    return kind


def _layer(data, kind, layer):
    layers = data[_check_kind(kind)]
    return _check_index("layer", layer, len(layers), f"the {kind} has {len(layers)} layers")


def _selection(name, value, size, what):
    """None (all), an int or a list of ints -> a sorted list of valid indices."""
    if value is None:
        return list(range(size))
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    return sorted({_check_index(name, v, size, what) for v in values})


def encoder_query(data, x, y, level: int = 0) -> int:
    """The encoder query (token index in [0, S)) of the level-`level` feature-map cell
    holding pixel (x, y) of the image."""
    h, w = data["image_size"]
    L = len(data["spatial_shapes"])
    level = _check_index("level", level, L, f"the model has {L} feature levels")
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"pixel ({x}, {y}) is outside the image: x must lie in [0, {w}) "
                         f"and y in [0, {h})")
    H_l, W_l = (int(v) for v in data["spatial_shapes"][level])
    ratio_w, ratio_h = data["valid_ratios"][level]
    # Map the pixel to the level's padded map (inverse of `to_pixels`), then to its cell.
    col = min(int(x / w * ratio_w * W_l), W_l - 1)
    row = min(int(y / h * ratio_h * H_l), H_l - 1)
    return int(data["level_start_index"][level]) + row * W_l + col


def token_level(data, token: int) -> int:
    """The feature level an encoder token (query index) belongs to."""
    return int(np.searchsorted(data["level_start_index"], token, side="right") - 1)


def default_query(data, kind: str) -> int:
    """Decoder: the top-scoring detection; encoder: the finest-level token at its box centre."""
    top = int(data["detections"]["query"][0])
    if _check_kind(kind) == "decoder":
        return top
    h, w = data["image_size"]
    cx, cy = data["decoder"][-1]["boxes"][top, :2]
    return encoder_query(data, min(max(cx * w, 0), w - 1e-3), min(max(cy * h, 0), h - 1e-3))


def query_points(data, kind: str = "decoder", layer: int = -1, query=None) -> dict:
    """Where one query of one layer sampled, in image pixels.

    Returns {"kind", "layer", "query", "locations" (M, L, K, 2) pixels, "weights"
    (M, L, K), "reference" (2,) pixels, "reference_box" (4,) xyxy pixels or None
    (box references: refinement, two-stage), "box" (4,) xyxy of the box this
    decoder layer predicts (None for the encoder), "score", "label", "level"
    (the encoder token's own level, None for the decoder)}.
    """
    kind = _check_kind(kind)
    layer = _layer(data, kind, layer)
    entry = data[kind][layer]
    n_queries = entry["sampling_locations"].shape[0]
    what = (f"the encoder has {n_queries} tokens (queries)" if kind == "encoder"
            else f"the decoder has {n_queries} object queries")
    query = default_query(data, kind) if query is None else query
    query = _check_index("query", query, n_queries, what)
    size = data["image_size"]
    ratios = data["valid_ratios"]  # (L, 2)
    locations = to_pixels(entry["sampling_locations"][query], ratios[None, :, None], size)
    reference = entry["reference_points"][query]  # (L, 2|4), level 0 is as good as any
    result = {"kind": kind, "layer": layer, "query": query, "locations": locations,
              "weights": entry["attention_weights"][query],
              "reference": to_pixels(reference[0, :2], ratios[0], size),
              "reference_box": None, "box": None, "score": None, "label": None, "level": None}
    if reference.shape[-1] == 4:
        result["reference_box"] = boxes_to_pixels(reference[0] / np.tile(ratios[0], 2), size)
    if kind == "decoder":
        result["box"] = boxes_to_pixels(entry["boxes"][query], size)
        result["score"] = float(entry["scores"][query].max())
        result["label"] = int(entry["scores"][query].argmax())
    else:
        result["level"] = token_level(data, query)
    return result
