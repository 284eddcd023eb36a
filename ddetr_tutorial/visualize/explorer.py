"""The sampling-point explorer: `explorer_figure(data, state)` and the ipywidgets
app `SamplingExplorer` that redraws it on every change (paper Appendix A.6)."""

from __future__ import annotations

import base64
import io

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..config import build_transforms
from ..data import read_rgb
from ..model_files import load_model
from .figures import (
    _box,
    _class_name,
    _draw_query,
    _new_figure,
    _query_title,
    _resolve_query,
    _show_image,
    head_colours,
)
from .queries import KINDS, _check_index, _check_kind, _layer, boxes_to_pixels, query_points
from .sampling import sampling_data

try:  # the [notebooks] extra; everything but SamplingExplorer works without it
    import ipywidgets as widgets
except ImportError:  # pragma: no cover - exercised only without the extra
    widgets = None

STATE_KEYS = ("kind", "layer", "head", "level", "query", "pixel", "query_level")


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
        if widgets is None:
            raise ImportError("SamplingExplorer needs ipywidgets: pip install "
                              "'ddetr-tutorial[notebooks]'")
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

    @classmethod
    def from_checkpoint(cls, checkpoint, images, device="cpu", **kwargs) -> "SamplingExplorer":
        """An explorer over any checkpoint (ours, an official .pth, a HuggingFace folder;
        see `model_files.load_model`), with its evaluation transform and class names.
        images: image files or PIL images (one or a list); kwargs: as the constructor."""
        model, cfg, _, meta = load_model(checkpoint, device=device)
        single = not isinstance(images, (list, tuple))
        loaded = [read_rgb(im, "image") if not hasattr(im, "size") else im
                  for im in ([images] if single else images)]
        kwargs.setdefault("transform", build_transforms(cfg, "val"))
        kwargs.setdefault("class_names", meta.get("class_names") or None)
        explorer = cls(model, loaded[0] if single else loaded, **kwargs)
        explorer.detected = meta["detected"]
        return explorer

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
            "query": widgets.Dropdown(description="detection",
                                      layout=widgets.Layout(width="320px")),
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
    backend = matplotlib.get_backend().lower()
    return "ipympl" in backend or backend == "widget"
