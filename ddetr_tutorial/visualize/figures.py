"""The figures: detections, one query's sampling points (paper Fig. 6), every layer,
attention heat maps, box refinement and the Hungarian assignment.

Each takes a `sampling_data` record (except `draw_detections`) and returns a
matplotlib Figure; none calls `plt.show()`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from ..box_ops import box_iou
from .queries import (
    _check_index,
    _check_kind,
    _layer,
    _selection,
    boxes_to_pixels,
    encoder_query,
    query_points,
    to_pixels,
)

PALETTE = plt.get_cmap("tab10")
# Heads get distinct colours that avoid green, the colour of the query's own
# reference cross and box (as in the paper's Fig. 6).
HEAD_COLOURS = ("#e6194b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                "#ffe119", "#9a6324", "#000075", "#800000", "#808000", "#fabed4")
QUERY_COLOUR = "lime"


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


def head_colours(n_heads: int) -> list:
    """One distinct RGBA colour per attention head."""
    if n_heads <= len(HEAD_COLOURS):
        return [to_rgba(c) for c in HEAD_COLOURS[:n_heads]]
    return [plt.get_cmap("hsv")(m / n_heads) for m in range(n_heads)]


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
    n_queries = data["decoder"][0]["boxes"].shape[0]
    if queries is None:
        queries = data["detections"]["query"][:top]
    queries = [_check_index("query", q, n_queries, f"the decoder has {n_queries} object queries")
               for q in np.atleast_1d(queries)]
    n_layers = len(data["decoder"])
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
        for layer in range(n_layers):
            box = boxes_to_pixels(data["decoder"][layer]["boxes"][q], data["image_size"])
            _box(ax, box, colour, alpha=0.3 + 0.7 * (layer + 1) / n_layers,
                 linestyle="-" if layer == n_layers - 1 else "--", linewidth=0.8 + layer / n_layers)
        points = query_points(data, "decoder", -1, q)
        ax.text(box[0], box[1], f"q{q} {_class_name(data, points['label'])} "
                f"{points['score']:.2f}", fontsize=7, color="white", va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
    ax.set_title(f"reference (+), then layers 0..{n_layers - 1} (dashed -> solid)", fontsize=9)
    if has_target:
        truth = torch.as_tensor(boxes_to_pixels(data["target"]["boxes"], data["image_size"]))
        for i, q in enumerate(queries):
            boxes = np.stack([boxes_to_pixels(data["decoder"][layer]["boxes"][q],
                                              data["image_size"]) for layer in range(n_layers)])
            iou = box_iou(torch.as_tensor(boxes), truth)[0].numpy()  # (n_layers, T)
            best = iou[-1].argmax()
            axes[1].plot(range(n_layers), iou[:, best], marker="o", color=PALETTE(i % 10),
                         label=f"q{q} vs gt {best}")
        axes[1].set_xticks(range(n_layers))
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
