"""Plots: detections drawn on an image (the sampling-point visualizer joins later).

Render functions return a matplotlib Figure and never call `plt.show()`, so
scripts, tests and notebooks can all use them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

PALETTE = plt.get_cmap("tab10")


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
