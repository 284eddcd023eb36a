"""Plots: detections, and the sampling-point visualizer (the paper's Fig. 6, Appendix A.6).

`sampling_data(model, image)` runs a Deformable DETR once with
`return_sampling=True` and returns a plain dict of numpy arrays: for every
encoder and decoder layer, where each query's deformable attention sampled
and with which weights. The `plot_*` functions draw that dict and return a
matplotlib Figure (they never call `plt.show()`, so scripts, tests and
notebooks can all use them); `explorer_figure(data, state)` is the one
`SamplingExplorer` (ipywidgets) redraws on every change.

Coordinates. The attention's reference points and sampling locations are
normalized (x, y) on each level's *padded* feature map: 0 and 1 are the map's
outer edges (grid_sample with align_corners=False). In a padded batch the image
fills only the fraction `valid_ratios[l]` = (w, h) of map l, so a location is,
in pixels of the unpadded image of size (h, w),

    pixel = location / valid_ratios[l] * (w, h)                     (`to_pixels`)

Pixels are continuous: (0, 0) is the image's top-left corner and pixel
(col, row) covers [col, col + 1) x [row, row + 1); images are drawn with
extent (0, w, h, 0) so that points land where they belong. Boxes (the model's
cxcywh, normalized to the unpadded image) become xyxy in the same pixels.
"""

from __future__ import annotations

import base64
import io

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

PALETTE = plt.get_cmap("tab10")
# Heads get distinct colours that avoid green, the colour of the query's own
# reference cross and box (as in the paper's Fig. 6).
HEAD_COLOURS = ("#e6194b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                "#ffe119", "#9a6324", "#000075", "#800000", "#808000", "#fabed4")
QUERY_COLOUR = "lime"
KINDS = ("encoder", "decoder")
STATE_KEYS = ("kind", "layer", "head", "level", "query", "pixel", "query_level")


def draw_detections(image, boxes_xyxy, labels, scores=None, class_names=None, ax=None,
                    title=None):
    """Draw boxes (k, 4) in pixels with their class and score on `image`
    (a PIL image or an (H, W, 3) array). Returns the Figure."""
    image = np.asarray(image)
    if ax is None:
        height, width = image.shape[:2]
        fig, ax = plt.subplots(figsize=(4, 4 * height / max(width, 1)))
    else:
        fig = ax.figure
    ax.imshow(image)
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    scores = None if scores is None else np.asarray(scores, dtype=float).reshape(-1)
    for i, ((x0, y0, x1, y1), label) in enumerate(zip(boxes_xyxy, labels)):
        colour = PALETTE(int(label) % 10)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=1.5))
        name = class_names[int(label)] if class_names else str(int(label))
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        ax.text(x0, y0, text, fontsize=7, color="white", va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- coordinates

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


def head_colours(n_heads: int) -> list:
    """One distinct RGBA colour per attention head."""
    if n_heads <= len(HEAD_COLOURS):
        return [to_rgba(c) for c in HEAD_COLOURS[:n_heads]]
    return [plt.get_cmap("hsv")(m / n_heads) for m in range(n_heads)]


# ----------------------------------------------------------------------------- the data

def sampling_data(model, image, mask=None, index: int = 0, target=None, transform=None,
                  class_names=None, matcher=None) -> dict:
    """Run `model` once with `return_sampling=True`; return one image's record as numpy.

    image: a PIL image or (H, W, 3) array (passed through `transform`, by default
    ToTensor + Normalize, e.g. `build_transforms(cfg, "val")` to resize too), or
    the model's input itself: a normalized tensor (3, H, W), or a padded batch
    (N, 3, H, W) with `mask` (N, H, W) (True on padding) and `index` choosing the
    image. target: optional {"labels" (T,), "boxes" (T, 4) cxcywh normalized} of
    that image; then the Hungarian assignment (`matcher`, default the official
    costs) is computed too. Returns a dict (shapes: S tokens, Q queries, M heads,
    L levels, K points; E, D encoder / decoder layers):
      image (h, w, 3) in [0, 1]; image_size (h, w); spatial_shapes (L, 2) rows (H_l, W_l);
      level_start_index (L,); valid_ratios (L, 2) as (w, h);
      encoder / decoder: lists of E / D layer dicts with reference_points
        (S|Q, L, 2|4), sampling_locations (S|Q, M, L, K, 2), attention_weights
        (S|Q, M, L, K), all in the attention's normalized coordinates (see the
        module docstring), and for the decoder boxes (Q, 4) cxcywh and scores
        (Q, classes) (sigmoid) of that layer;
      detections: {"query", "score", "label"} (Q,) every query by its best class,
        highest score first; class_names; target and matching ({"query", "target",
        "cost" (Q, T)}) or None.
    """
    import torch

    from .model import DETR, DeformableDETR

    if isinstance(model, DETR):
        raise ValueError("the DETR baseline uses dense attention over every pixel: it has no "
                         "sampling points to draw (use a DeformableDETR)")
    if not isinstance(model, DeformableDETR):
        raise TypeError(f"sampling_data needs a DeformableDETR, got {type(model).__name__}")
    images, mask, index = _model_input(image, mask, index, transform)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(images.to(device), mask.to(device), return_sampling=True)
    finally:
        model.train(was_training)
    record = out["sampling"]

    def pick(t):  # one image of the batch, as numpy
        return t[index].detach().cpu().float().numpy()

    valid = ~mask[index]
    h, w = int(valid[:, 0].sum()), int(valid[0, :].sum())  # padding is bottom and right
    data = {
        "image": _display_image(images[index, :, :h, :w]),
        "image_size": (h, w),
        "spatial_shapes": record["spatial_shapes"].cpu().numpy(),
        "level_start_index": record["level_start_index"].cpu().numpy(),
        "valid_ratios": pick(record["valid_ratios"]),
        "encoder": [{k: pick(v) for k, v in layer.items()} for layer in record["encoder"]],
        "decoder": [{k: pick(v) for k, v in layer.items() if k != "logits"}
                    | {"scores": pick(layer["logits"].sigmoid())} for layer in record["decoder"]],
        "class_names": list(class_names) if class_names else None,
        "target": None,
        "matching": None,
    }
    scores = data["decoder"][-1]["scores"]  # (Q, classes)
    order = np.argsort(-scores.max(1), kind="stable")
    data["detections"] = {"query": order, "score": scores.max(1)[order],
                          "label": scores.argmax(1)[order]}
    if target is not None:
        data["target"], data["matching"] = _match(out, index, target, matcher)
    return data


def _model_input(image, mask, index, transform):
    """Whatever `sampling_data` accepts -> (images (N, 3, H, W), mask (N, H, W), index)."""
    import torch
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3), got shape {image.shape}")
        pixels = image if image.dtype == np.uint8 else \
            (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels)
    if isinstance(image, Image.Image):
        if transform is None:
            from .data.transforms import Compose, Normalize, ToTensor
            transform = Compose([ToTensor(), Normalize()])
        image, _ = transform(image.convert("RGB"), None)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, an (H, W, 3) array or a tensor, "
                        f"got {type(image).__name__}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must be a normalized (3, H, W) tensor or an (N, 3, H, W) "
                         f"batch, got shape {tuple(image.shape)}")
    if image.dim() == 3:
        image = image[None]
    N, _, H, W = image.shape
    if mask is None:
        mask = torch.zeros(N, H, W, dtype=torch.bool)
    if tuple(mask.shape) != (N, H, W):
        raise ValueError(f"mask must be (N, H, W) = ({N}, {H}, {W}), got {tuple(mask.shape)}")
    index = _check_index("index", index, N, f"the batch has {N} image(s)")
    return image.float(), mask.cpu().bool(), index


def _display_image(image):
    """Undo Normalize: (3, h, w) tensor -> (h, w, 3) array in [0, 1]."""
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    pixels = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    return np.clip(pixels * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)


def _match(out, index, target, matcher):
    """The Hungarian assignment of this image's final predictions to its target."""
    import torch

    from .matcher import HungarianMatcher

    matcher = matcher or HungarianMatcher()
    outputs = {"pred_logits": out["pred_logits"][index:index + 1].cpu(),
               "pred_boxes": out["pred_boxes"][index:index + 1].cpu()}
    target = {"labels": torch.as_tensor(target["labels"]).long().cpu(),
              "boxes": torch.as_tensor(target["boxes"]).float().cpu().reshape(-1, 4)}
    query, target_idx = matcher(outputs, [target])[0]
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], [target])
    return ({"labels": target["labels"].numpy(), "boxes": target["boxes"].numpy()},
            {"query": query.numpy(), "target": target_idx.numpy(), "cost": cost.numpy()})


# ----------------------------------------------------------------------------- one query

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


# ----------------------------------------------------------------------------- drawing helpers

def _show_image(ax, data):
    h, w = data["image_size"]
    ax.imshow(data["image"], extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _box(ax, xyxy, colour=QUERY_COLOUR, **kwargs):
    x0, y0, x1, y1 = xyxy
    kwargs = {"fill": False, "edgecolor": colour, "linewidth": 1.5} | kwargs
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, **kwargs))


def _class_name(data, label):
    names = data["class_names"]
    return names[label] if names and 0 <= label < len(names) else str(label)


def _draw_query(ax, data, points, heads, levels, color_by="head", scale=None):
    """Reference cross, box and the sampling points of `heads` on `levels`: one
    scatter per head (gid 'head m'), marker size and opacity growing with weight."""
    locations, weights = points["locations"], points["weights"]  # (M, L, K, 2), (M, L, K)
    M = weights.shape[0]
    scale = float(weights.max()) if scale is None else scale
    colours = head_colours(M)
    cmap = plt.get_cmap("plasma")
    for m in heads:
        xy = locations[m, levels].reshape(-1, 2)
        strength = weights[m, levels].reshape(-1) / max(scale, 1e-12)  # in [0, 1]
        if color_by == "weight":
            rgba = cmap(strength)
        else:
            rgba = np.tile(colours[m], (len(strength), 1))
        rgba[:, 3] = 0.25 + 0.75 * strength
        ax.scatter(xy[:, 0], xy[:, 1], s=10 + 110 * strength, c=rgba, edgecolors="white",
                   linewidths=0.4, zorder=3, gid=f"head {m}", label=f"head {m}")
    if points["reference_box"] is not None:
        _box(ax, points["reference_box"], linestyle="--", linewidth=1.0)
    if points["box"] is not None:
        _box(ax, points["box"])
        x0, y0 = points["box"][:2]
        ax.text(x0, y0, f"{_class_name(data, points['label'])} {points['score']:.2f}",
                fontsize=7, color="black", va="bottom",
                bbox={"facecolor": QUERY_COLOUR, "alpha": 0.8, "pad": 1, "linewidth": 0})
    ax.plot(*points["reference"], marker="+", color=QUERY_COLOUR, markersize=12,
            markeredgewidth=2.5, zorder=4, gid="reference")


def _head_legend(ax):
    legend = ax.legend(loc="lower left", fontsize=6, markerscale=0.6, framealpha=0.6)
    for handle in getattr(legend, "legend_handles", []):  # opaque, whatever the weights
        handle.set_alpha(1.0)


def _query_title(data, points):
    if points["kind"] == "decoder":
        return (f"decoder layer {points['layer']}, query {points['query']} "
                f"({_class_name(data, points['label'])} {points['score']:.2f})")
    x, y = points["reference"]
    return (f"encoder layer {points['layer']}, query {points['query']} "
            f"(level {points['level']} pixel at x={x:.1f}, y={y:.1f})")


def _resolve_query(data, kind, query, pixel, query_level):
    if pixel is not None:
        if kind != "encoder":
            raise ValueError("pixel=(x, y) picks an encoder query; for the decoder give query=")
        return encoder_query(data, *pixel, level=query_level)
    return query


def _new_figure(n_axes, width_per_axes, data, fig=None, **kwargs):
    h, w = data["image_size"]
    if fig is None:
        fig = plt.figure(figsize=(width_per_axes * n_axes, width_per_axes * h / w + 0.6))
    else:
        fig.clear()
    axes = fig.subplots(1, n_axes, squeeze=False, **kwargs)[0]
    return fig, list(axes)


# ----------------------------------------------------------------------------- figures

def plot_sampling_points(data, kind: str = "decoder", query=None, layer: int = -1, pixel=None,
                         query_level: int = 0, per_level: bool = True, heads=None, levels=None,
                         color_by: str = "head"):
    """One query's sampling points (paper Fig. 6): a green cross at its reference
    point, its box for a decoder query, and for each head (one colour each) its
    K points per level, marker size and opacity growing with attention weight.

    kind: 'encoder' (query = token index, or pixel=(x, y) with query_level) or
    'decoder' (query = object query; default the top detection). per_level: one
    panel per level (K points per head each), else all levels on one image
    (L*K points per head). heads / levels: None (all), an int or a list.
    color_by: 'head', or 'weight' (a colour map, as in the paper).
    """
    if color_by not in ("head", "weight"):
        raise ValueError(f"color_by must be 'head' or 'weight', got {color_by!r}")
    points = query_points(data, kind, layer, _resolve_query(data, kind, query, pixel, query_level))
    M, L = points["weights"].shape[:2]
    heads = _selection("head", heads, M, f"the model has {M} heads")
    levels = _selection("level", levels, L, f"the model has {L} feature levels")
    panels = [[lvl] for lvl in levels] if per_level else [levels]
    fig, axes = _new_figure(len(panels), 3.0 if per_level else 4.5, data)
    scale = float(points["weights"].max())  # one scale for all panels
    for ax, panel in zip(axes, panels):
        _show_image(ax, data)
        _draw_query(ax, data, points, heads, panel, color_by, scale)
        if per_level:
            H_l, W_l = data["spatial_shapes"][panel[0]]
            stride = data["image_size"][1] / (W_l * data["valid_ratios"][panel[0], 0])
            share = points["weights"][heads][:, panel].sum() / len(heads)
            ax.set_title(f"level {panel[0]}: {H_l}x{W_l} map, stride {stride:.0f}\n"
                         f"{share:.0%} of the attention", fontsize=8)
    if color_by == "head":
        _head_legend(axes[0])
    fig.suptitle(_query_title(data, points), fontsize=9)
    fig.tight_layout()
    if color_by == "weight":  # after tight_layout, which cannot place it
        shown = plt.cm.ScalarMappable(cmap="plasma", norm=plt.Normalize(0, scale))
        fig.colorbar(shown, ax=axes, fraction=0.046, pad=0.02, label="attention weight")
    return fig


def plot_sampling_layers(data, kind: str = "decoder", query=None, pixel=None,
                         query_level: int = 0, heads=None, levels=None):
    """The same query in every layer of the encoder or decoder, all levels on the
    image: how the sampling moves from layer to layer (with refinement, each
    decoder layer samples around the box the previous one predicted, dashed)."""
    kind = _check_kind(kind)
    query = _resolve_query(data, kind, query, pixel, query_level)
    n_layers = len(data[kind])
    fig, axes = _new_figure(n_layers, 3.2, data)
    for layer, ax in enumerate(axes):
        points = query_points(data, kind, layer, query)
        M, L = points["weights"].shape[:2]
        _show_image(ax, data)
        _draw_query(ax, data, points,
                    _selection("head", heads, M, f"the model has {M} heads"),
                    _selection("level", levels, L, f"the model has {L} feature levels"))
        ax.set_title(f"layer {layer}", fontsize=8)
    _head_legend(axes[0])
    fig.suptitle(_query_title(data, points).replace(f"layer {points['layer']}, ", "")
                 + ": every layer", fontsize=9)
    fig.tight_layout()
    return fig


def attention_heatmap(data, kind: str = "encoder", layer: int = -1, queries=None, heads=None,
                      levels=None) -> np.ndarray:
    """Attention weights splatted at their sampling locations: an (h, w) image.

    Each point adds its weight to the four pixel centres around it (bilinear),
    summed over `queries` (None: every encoder token inside the image, or every
    decoder query), `heads` and `levels`. Points outside the image are dropped,
    so the map's total is the weight that fell inside it.
    """
    kind = _check_kind(kind)
    entry = data[kind][_layer(data, kind, layer)]
    M, L = entry["attention_weights"].shape[1:3]
    h, w = data["image_size"]
    queries = _heat_queries(data, kind, entry, queries)
    heads = _selection("head", heads, M, f"the model has {M} heads")
    levels = _selection("level", levels, L, f"the model has {L} feature levels")
    locations = to_pixels(entry["sampling_locations"], data["valid_ratios"][None, None, :, None],
                          (h, w))
    xy = locations[queries][:, heads][:, :, levels].reshape(-1, 2)
    weights = entry["attention_weights"][queries][:, heads][:, :, levels].reshape(-1)
    return _splat(xy, weights, h, w)


def _heat_queries(data, kind, entry, queries):
    """The queries a heat map sums over: the given ones (checked), else all of them
    (for the encoder, all tokens whose pixel lies in the image, not on padding)."""
    n_queries = entry["attention_weights"].shape[0]
    if queries is not None:
        return _selection("query", queries, n_queries, f"the {kind} has {n_queries} queries")
    if kind == "decoder":
        return list(range(n_queries))
    h, w = data["image_size"]
    ref = to_pixels(entry["reference_points"][:, 0], data["valid_ratios"][0], (h, w))
    return np.flatnonzero((ref[:, 0] < w) & (ref[:, 1] < h)).tolist()


def _splat(xy, weights, h, w):
    """Bilinear splat of weighted points (continuous pixels) onto pixel centres."""
    u, v = xy[:, 0] - 0.5, xy[:, 1] - 0.5  # pixel centres sit at integer (u, v)
    c0, r0 = np.floor(u), np.floor(v)
    fu, fv = u - c0, v - r0
    heat = np.zeros((h, w))
    for dc, dr, share in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)),
                          (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        c, r = c0 + dc, r0 + dr
        inside = (c >= 0) & (c < w) & (r >= 0) & (r < h)
        np.add.at(heat, (r[inside].astype(int), c[inside].astype(int)), (weights * share)[inside])
    return heat


def _blur(heat, sigma):
    if sigma <= 0:
        return heat
    radius = min(int(3 * sigma + 0.5), (min(heat.shape) - 1) // 2)  # "same" keeps the shape
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    heat = np.apply_along_axis(np.convolve, 0, heat, kernel, mode="same")
    return np.apply_along_axis(np.convolve, 1, heat, kernel, mode="same")


def plot_attention_heatmap(data, kind: str = "encoder", layer: int = -1, queries=None,
                           heads=None, levels=None, blur: float = 1.0):
    """`attention_heatmap` over the image (Gaussian `blur` in pixels, 0 for none):
    where the layer's attention mass lands, summed over many queries."""
    heat = attention_heatmap(data, kind, layer, queries, heads, levels)
    layer = _layer(data, kind, layer)
    n_queries = len(_heat_queries(data, kind, data[kind][layer], queries))
    fig, (ax,) = _new_figure(1, 4.5, data)
    _show_image(ax, data)
    h, w = data["image_size"]
    shown = ax.imshow(_blur(heat, blur), extent=(0, w, h, 0), cmap="inferno", alpha=0.65)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="attention weight")
    ax.set_title(f"{kind} layer {layer}: attention of {n_queries} queries "
                 f"(total {heat.sum():.1f})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_refinement(data, queries=None, top: int = 3):
    """Boxes across the decoder layers (paper Sec. 4.2): for each query (default the
    `top` detections) its first reference (a cross, or a dashed box for two-stage
    proposals) and the box each layer predicts, fainter for earlier layers. With a
    target, a second panel gives each layer's IoU with the query's best ground truth."""
    import torch

    from .box_ops import box_iou

    n_queries = data["decoder"][0]["boxes"].shape[0]
    if queries is None:
        queries = data["detections"]["query"][:top]
    queries = [_check_index("query", q, n_queries, f"the decoder has {n_queries} object queries")
               for q in np.atleast_1d(queries)]
    D = len(data["decoder"])
    has_target = data["target"] is not None and len(data["target"]["labels"]) > 0
    fig, axes = _new_figure(2 if has_target else 1, 4.5, data)
    ax = axes[0]
    _show_image(ax, data)
    for i, q in enumerate(queries):
        colour = PALETTE(i % 10)
        first = query_points(data, "decoder", 0, q)
        if first["reference_box"] is not None:
            _box(ax, first["reference_box"], colour, linestyle=":", linewidth=1.0)
        ax.plot(*first["reference"], marker="+", color=colour, markersize=10, markeredgewidth=2)
        for layer in range(D):
            box = boxes_to_pixels(data["decoder"][layer]["boxes"][q], data["image_size"])
            _box(ax, box, colour, alpha=0.3 + 0.7 * (layer + 1) / D,
                 linestyle="-" if layer == D - 1 else "--", linewidth=0.8 + layer / D)
        points = query_points(data, "decoder", -1, q)
        ax.text(box[0], box[1], f"q{q} {_class_name(data, points['label'])} "
                f"{points['score']:.2f}", fontsize=7, color="white", va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
    ax.set_title(f"reference (+), then layers 0..{D - 1} (dashed -> solid)", fontsize=9)
    if has_target:
        truth = torch.as_tensor(boxes_to_pixels(data["target"]["boxes"], data["image_size"]))
        for i, q in enumerate(queries):
            boxes = np.stack([boxes_to_pixels(data["decoder"][layer]["boxes"][q],
                                              data["image_size"]) for layer in range(D)])
            iou = box_iou(torch.as_tensor(boxes), truth)[0].numpy()  # (D, T)
            best = iou[-1].argmax()
            axes[1].plot(range(D), iou[:, best], marker="o", color=PALETTE(i % 10),
                         label=f"q{q} vs gt {best}")
        axes[1].set_xticks(range(D))
        axes[1].set_xlabel("decoder layer")
        axes[1].set_ylabel("IoU with ground truth")
        axes[1].set_ylim(0, 1)
        axes[1].legend(fontsize=7)
        axes[1].set_title("refinement, layer by layer", fontsize=9)
    fig.tight_layout()
    return fig


def plot_hungarian(data, max_rows: int = 12):
    """The Hungarian assignment (DETR's set loss, paper Sec. 3) of the final predictions
    to the ground truth: matched pairs joined on the image (ground truth dashed),
    and the matching cost of the top queries (rows) to every target (columns)
    with the chosen pairs boxed."""
    if data["matching"] is None:
        raise ValueError("no ground truth in this data: pass target= to sampling_data")
    match, target = data["matching"], data["target"]
    size = data["image_size"]
    fig, (ax, ax_cost) = _new_figure(2, 4.5, data)
    _show_image(ax, data)
    truth = boxes_to_pixels(target["boxes"], size).reshape(-1, 4)
    for j, box in enumerate(truth):
        _box(ax, box, "white", linestyle="--", linewidth=1.2)
        ax.text(box[0], box[1], f"gt {j}: {_class_name(data, int(target['labels'][j]))}",
                fontsize=6, color="black", va="top",
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    final = data["decoder"][-1]
    for i, (q, j) in enumerate(zip(match["query"], match["target"])):
        colour = PALETTE(i % 10)
        box = boxes_to_pixels(final["boxes"][q], size)
        _box(ax, box, colour)
        centres = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
                            [(truth[j, 0] + truth[j, 2]) / 2, (truth[j, 1] + truth[j, 3]) / 2]])
        ax.plot(centres[:, 0], centres[:, 1], "-o", color=colour, markersize=3, linewidth=1)
        ax.text(box[0], box[1], f"q{q}", fontsize=6, color="white", va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
    ax.set_title(f"{len(match['query'])} of {final['boxes'].shape[0]} queries matched "
                 f"to {len(truth)} objects", fontsize=9)
    if len(truth) == 0:  # nothing to match: every query should predict "no object"
        ax_cost.set_axis_off()
        ax_cost.text(0.5, 0.5, "no objects:\nevery query is unmatched", ha="center")
        fig.tight_layout()
        return fig
    # Rows: the matched queries, then the best-scoring others, up to max_rows.
    rows = list(dict.fromkeys(match["query"].tolist() + data["detections"]["query"].tolist()))
    rows = rows[:max(max_rows, len(match["query"]))]
    shown = ax_cost.imshow(match["cost"][rows], cmap="viridis", aspect="auto")
    for q, j in zip(match["query"], match["target"]):
        ax_cost.add_patch(Rectangle((j - 0.5, rows.index(q) - 0.5), 1, 1, fill=False,
                                    edgecolor="white", linewidth=2))
    ax_cost.set_yticks(range(len(rows)), [f"q{q}" for q in rows], fontsize=6)
    ax_cost.set_xticks(range(len(truth)), [f"gt {j}" for j in range(len(truth))], fontsize=6,
                       rotation=90)
    ax_cost.set_title("matching cost (boxed: assigned)", fontsize=9)
    fig.colorbar(shown, ax=ax_cost, fraction=0.046, pad=0.02)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the explorer

def resolve_state(data, state=None) -> dict:
    """An explorer state with every key filled in and checked.

    state: {"kind": 'encoder'|'decoder', "layer": int, "head": int|None (all),
    "level": int|None (all), "query": int|None, "pixel": (x, y)|None,
    "query_level": int}. An encoder query comes from `pixel` (on level
    `query_level`) when given, else from `query`; a missing query is the
    default one (`default_query`). Layers and queries come back non-negative.
    """
    state = dict(state or {})
    unknown = sorted(set(state) - set(STATE_KEYS))
    if unknown:
        raise ValueError(f"unknown explorer state key(s) {unknown}; known: {list(STATE_KEYS)}")
    kind = _check_kind(state.get("kind", "decoder"))
    M, L = data[kind][0]["attention_weights"].shape[1:3]
    resolved = {"kind": kind, "layer": _layer(data, kind, state.get("layer", -1)),
                "head": state.get("head"), "level": state.get("level"),
                "pixel": state.get("pixel") if kind == "encoder" else None,
                "query_level": _check_index("query_level", state.get("query_level", 0), L,
                                            f"the model has {L} feature levels")}
    if resolved["head"] is not None:
        resolved["head"] = _check_index("head", resolved["head"], M, f"the model has {M} heads")
    if resolved["level"] is not None:
        resolved["level"] = _check_index("level", resolved["level"], L,
                                         f"the model has {L} feature levels")
    query = _resolve_query(data, kind, state.get("query"), resolved["pixel"],
                           resolved["query_level"])
    resolved["query"] = query_points(data, kind, resolved["layer"], query)["query"]
    return resolved


def explorer_figure(data, state=None, fig=None, score_threshold: float = 0.3):
    """The explorer's picture of `state` (see `resolve_state`): left, the query's
    sampling points on the image (only the chosen head / level, if any) with the
    other detections above `score_threshold` in grey; right, how the query's
    attention mass splits over heads (rows) and levels (columns). Draws into
    `fig` (cleared) when given, e.g. the explorer's live ipympl figure."""
    state = resolve_state(data, state)
    points = query_points(data, state["kind"], state["layer"], state["query"])
    M, L = points["weights"].shape[:2]
    heads = list(range(M)) if state["head"] is None else [state["head"]]
    levels = list(range(L)) if state["level"] is None else [state["level"]]
    fig, (ax, ax_mass) = _new_figure(2, 3.6, data, fig, width_ratios=[3, 2])
    _show_image(ax, data)
    if state["kind"] == "decoder":
        det = data["detections"]
        for q in det["query"][(det["score"] >= score_threshold)]:
            if q != state["query"]:
                _box(ax, boxes_to_pixels(data["decoder"][state["layer"]]["boxes"][q],
                                         data["image_size"]), "lightgrey", linewidth=0.8)
    _draw_query(ax, data, points, heads, levels, scale=float(points["weights"].max()))
    ax.set_title(_query_title(data, points), fontsize=8)
    mass = points["weights"].sum(-1)  # (M, L)
    ax_mass.imshow(mass, cmap="Greens", vmin=0, aspect="auto")
    for m in range(M):
        for lvl in range(L):
            chosen = m in heads and lvl in levels  # the shown points are bold
            ax_mass.text(lvl, m, f"{mass[m, lvl]:.2f}", ha="center", va="center", fontsize=7,
                         color="white" if mass[m, lvl] > 0.6 * mass.max() else "black",
                         fontweight="bold" if chosen else "normal", alpha=1 if chosen else 0.5)
    ax_mass.set_xticks(range(L), [f"L{lvl}" for lvl in range(L)], fontsize=7)
    ax_mass.set_yticks(range(M), [f"head {m}" for m in range(M)], fontsize=7)
    for tick, colour in zip(ax_mass.get_yticklabels(), head_colours(M)):
        tick.set_color(colour)
    ax_mass.set_title("attention mass per head and level", fontsize=8)
    fig.tight_layout()
    return fig


def _figure_png(fig, dpi: int = 90) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class SamplingExplorer:
    """Explore where Deformable DETR looks, in JupyterLab (ipywidgets).

    model: a DeformableDETR; images: one image or a list (anything
    `sampling_data` takes); targets: their targets (optional, same order);
    transform, class_names: passed to `sampling_data`. Controls: image,
    encoder/decoder, layer, head, level, and the query: a detection (decoder) or a
    pixel (encoder: x/y sliders and the level of the token). With the ipympl
    backend (`%matplotlib widget`) clicking the image picks the encoder query at
    that pixel or the detection under the cursor. Every change redraws through
    `explorer_figure`. Where widgets cannot render (nbconvert, GitHub, nbmake's
    saved outputs) the explorer shows its current figure as a PNG instead.
    """

    def __init__(self, model, images, targets=None, transform=None, class_names=None,
                 state=None, score_threshold: float = 0.3):
        import ipywidgets as widgets

        single = not isinstance(images, (list, tuple))
        self.images = [images] if single else list(images)
        if targets is not None:
            targets = [targets] if single else list(targets)
            if len(targets) != len(self.images):
                raise ValueError(f"got {len(targets)} targets for {len(self.images)} images")
        self.targets = targets
        self.model, self.transform, self.class_names = model, transform, class_names
        self.score_threshold = score_threshold
        self._cache: dict[int, dict] = {}
        self.image_index = 0
        self.state = resolve_state(self.data, state)
        self._syncing = False
        self._live = _ipympl_active()
        self._build(widgets)
        self.redraw()

    @property
    def data(self) -> dict:
        """The `sampling_data` of the current image (computed once per image)."""
        i = self.image_index
        if i not in self._cache:
            self._cache[i] = sampling_data(self.model, self.images[i],
                                           target=None if self.targets is None else self.targets[i],
                                           transform=self.transform, class_names=self.class_names)
        return self._cache[i]

    # --- state changes (the widgets call these; so can code and tests)

    def update(self, **changes) -> dict:
        """Change the state (keys of `resolve_state`, or `image`), sync the controls,
        redraw; returns the new state."""
        state, previous_image = {**self.state, **changes}, self.image_index
        if "image" in changes:
            image = _check_index("image", state.pop("image"), len(self.images),
                                 f"the explorer has {len(self.images)} image(s)")
            if image != self.image_index:  # queries and pixels of the old image mean nothing
                state = {k: state[k] for k in ("kind", "layer", "head", "level")}
            self.image_index = image
        if "kind" in changes and changes["kind"] != self.state["kind"]:
            # The other kind's layer, query and pixel mean nothing here: keep only what
            # this call sets, plus the head and level filters.
            kept = ("head", "level", "layer", "query", "pixel", "query_level")
            state = {"kind": changes["kind"], "head": state["head"], "level": state["level"],
                     **{k: v for k, v in changes.items() if k in kept}}
        if "query" in changes and "pixel" not in changes:
            state["pixel"] = None
        try:
            self.state = resolve_state(self.data, state)
        except ValueError:
            self.image_index = previous_image  # a bad change leaves the explorer as it was
            raise
        self._sync_controls()
        self.redraw()
        return self.state

    def click(self, x: float, y: float) -> dict:
        """Pick at image pixel (x, y): the encoder query there, or the decoder
        detection under it (the best-scoring box holding the point, else the
        nearest box centre among the detections)."""
        if self.state["kind"] == "encoder":
            return self.update(pixel=(float(x), float(y)))
        det = self.data["detections"]
        candidates = det["query"][det["score"] >= self.score_threshold]
        if len(candidates) == 0:
            candidates = det["query"][:1]
        boxes = boxes_to_pixels(self.data["decoder"][self.state["layer"]]["boxes"][candidates],
                                self.data["image_size"])
        inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
        if inside.any():
            query = candidates[np.flatnonzero(inside)[0]]  # candidates are sorted by score
        else:
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            query = candidates[np.argmin(((centres - [x, y]) ** 2).sum(1))]
        return self.update(query=int(query))

    def figure(self):
        """A new Figure of the current state."""
        return explorer_figure(self.data, self.state, score_threshold=self.score_threshold)

    def redraw(self):
        if self._live:
            explorer_figure(self.data, self.state, fig=self._fig,
                            score_threshold=self.score_threshold)
            self._fig.canvas.draw_idle()
        else:
            self._view.value = self.png()

    def png(self) -> bytes:
        """The current state drawn as PNG bytes, off-screen (no pyplot figure is made)."""
        from matplotlib.figure import Figure

        h, w = self.data["image_size"]
        fig = Figure(figsize=(7.2, 3.6 * h / w + 0.6))
        explorer_figure(self.data, self.state, fig=fig, score_threshold=self.score_threshold)
        return _figure_png(fig)

    # --- widgets

    def _build(self, widgets):
        data = self.data
        M, L = data["encoder"][0]["attention_weights"].shape[1:3]
        h, w = data["image_size"]
        layout = widgets.Layout(width="260px")
        self._controls = {
            "image": widgets.Dropdown(description="image", layout=layout,
                                      options=[(f"image {i}", i) for i in range(len(self.images))]),
            "kind": widgets.ToggleButtons(options=list(KINDS), description="attention"),
            "layer": widgets.IntSlider(description="layer", min=0, layout=layout),
            "head": widgets.Dropdown(description="head", layout=layout,
                                     options=[("all", None)] + [(str(m), m) for m in range(M)]),
            "level": widgets.Dropdown(description="level", layout=layout,
                                      options=[("all", None)] + [(str(lv), lv) for lv in range(L)]),
            "query": widgets.Dropdown(description="detection", layout=widgets.Layout(width="320px")),
            "x": widgets.IntSlider(description="pixel x", min=0, max=w - 1, layout=layout),
            "y": widgets.IntSlider(description="pixel y", min=0, max=h - 1, layout=layout),
            "query_level": widgets.Dropdown(description="query level", layout=layout,
                                            options=[(str(lv), lv) for lv in range(L)]),
        }
        for name, control in self._controls.items():
            control.observe(lambda change, name=name: self._on_control(name, change["new"]),
                            names="value")
        if self._live:
            with plt.ioff():
                self._fig = plt.figure(figsize=(7.5, 3.6))
            self._fig.canvas.mpl_connect("button_press_event", self._on_mpl_click)
            self._view = self._fig.canvas
        else:
            self._view = widgets.Image(format="png")
        self._encoder_row = widgets.HBox([self._controls["x"], self._controls["y"],
                                          self._controls["query_level"]])
        hint = "click the image to pick a query" if self._live else \
            "pick with the controls (clicking needs ipympl: %matplotlib widget)"
        rows = [widgets.HBox([self._controls["image"], self._controls["kind"]]),
                widgets.HBox([self._controls["layer"], self._controls["head"],
                              self._controls["level"]]),
                widgets.HBox([self._controls["query"]]), self._encoder_row,
                widgets.HTML(f"<small>{hint}</small>"), self._view]
        self.widget = widgets.VBox(rows)
        self._sync_controls()

    def _sync_controls(self):
        """Make the controls show `self.state` without triggering updates."""
        data, state, c = self.data, self.state, self._controls
        self._syncing = True
        try:
            c["image"].value = self.image_index
            c["kind"].value = state["kind"]
            c["layer"].max = len(data[state["kind"]]) - 1
            c["layer"].value = state["layer"]
            c["head"].value, c["level"].value = state["head"], state["level"]
            det = data["detections"]
            c["query"].options = [(f"q{q}: {_class_name(data, int(lab))} {s:.2f}", int(q))
                                  for q, s, lab in zip(det["query"], det["score"], det["label"])]
            h, w = data["image_size"]
            c["x"].max, c["y"].max = w - 1, h - 1
            encoder = state["kind"] == "encoder"
            if encoder:
                points = query_points(data, "encoder", state["layer"], state["query"])
                x, y = state["pixel"] if state["pixel"] is not None else points["reference"]
                c["x"].value, c["y"].value = min(int(x), w - 1), min(int(y), h - 1)
                c["query_level"].value = state["query_level"]
            else:
                c["query"].value = state["query"]
            c["query"].layout.display = "none" if encoder else None
            self._encoder_row.layout.display = None if encoder else "none"
        finally:
            self._syncing = False

    def _on_control(self, name, value):
        if self._syncing:
            return
        if name in ("x", "y"):
            x, y = self._controls["x"].value, self._controls["y"].value
            self.update(pixel=(x + 0.5, y + 0.5))
        elif name == "query_level":
            x, y = self._controls["x"].value, self._controls["y"].value
            self.update(pixel=(x + 0.5, y + 0.5), query_level=value)
        else:
            self.update(**{name: value})

    def _on_mpl_click(self, event):
        if event.inaxes is not None and event.inaxes is self._fig.axes[0] \
                and event.xdata is not None:
            self.click(event.xdata, event.ydata)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        # The static fallback, for frontends that cannot render widgets.
        bundle["image/png"] = base64.b64encode(self.png()).decode("ascii")
        return bundle


def _ipympl_active() -> bool:
    """True when matplotlib draws into ipympl widgets (`%matplotlib widget`)."""
    import matplotlib

    backend = matplotlib.get_backend().lower()
    return "ipympl" in backend or backend == "widget"
