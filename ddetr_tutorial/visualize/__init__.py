"""Plots: detections, and the sampling-point visualizer (the paper's Fig. 6, Appendix A.6).

`sampling_data(model, image)` runs a detector once under the sampling recorder
(`ddetr_tutorial.recording`) and returns a plain dict of numpy arrays: for every
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

Modules: `sampling` (the record), `queries` (one query in pixels, index
checks), `figures` (the plots), `explorer` (the widget app).
"""

from .explorer import STATE_KEYS, SamplingExplorer, explorer_figure, resolve_state
from .figures import (
                      HEAD_COLOURS,
                      PALETTE,
                      QUERY_COLOUR,
                      attention_heatmap,
                      draw_detections,
                      head_colours,
                      plot_attention_heatmap,
                      plot_hungarian,
                      plot_refinement,
                      plot_sampling_layers,
                      plot_sampling_points,
)
from .queries import (
                      KINDS,
                      boxes_to_pixels,
                      default_query,
                      encoder_query,
                      query_points,
                      to_pixels,
                      token_level,
)
from .sampling import sampling_data

__all__ = [
    "HEAD_COLOURS", "KINDS", "PALETTE", "QUERY_COLOUR", "STATE_KEYS", "SamplingExplorer",
    "attention_heatmap", "boxes_to_pixels", "default_query", "draw_detections",
    "encoder_query", "explorer_figure", "head_colours", "plot_attention_heatmap",
    "plot_hungarian", "plot_refinement", "plot_sampling_layers", "plot_sampling_points",
    "query_points", "resolve_state", "sampling_data", "to_pixels", "token_level",
]
