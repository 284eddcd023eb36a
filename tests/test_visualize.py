"""The sampling-point visualizer: recorded sampling vs the attention module, the pixel
convention, the figures' artists, the explorer, the CLI, and errors."""

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.patches import Rectangle
from PIL import Image

from ddetr_tutorial import visualize as V
from ddetr_tutorial.attention import MSDeformAttn
from ddetr_tutorial.config import build_model, build_transforms, get_config
from ddetr_tutorial.data.shapes import render_image
from ddetr_tutorial.notebook import SHIPPED_MODEL, load_shipped_model
from ddetr_tutorial.ops import ms_deform_attn_pytorch
from ddetr_tutorial.recording import record_sampling


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def shipped():
    return load_shipped_model(device="cpu", op_backend="pytorch")


@pytest.fixture(scope="module")
def scene():
    """A generated shapes image and its target (cxcywh normalized, contiguous labels)."""
    pixels, objects = render_image(np.random.default_rng([0, 1, 3]), 128)
    xywh = torch.tensor([box for _, box in objects], dtype=torch.float32) / 128
    boxes = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], 1)
    labels = torch.tensor([category - 1 for category, _ in objects])
    return Image.fromarray(pixels), {"labels": labels, "boxes": boxes}


@pytest.fixture(scope="module")
def data(shipped, scene):
    model, cfg, _, meta = shipped
    image, target = scene
    return V.sampling_data(model, image, target=target, transform=build_transforms(cfg, "val"),
                           class_names=meta["class_names"])


def tiny_model(**overrides):
    """A fresh tiny model; plain unless told otherwise (the preset has refinement and
    two-stage on)."""
    torch.manual_seed(0)
    overrides = {"with_box_refine": False, "two_stage": False, **overrides}
    cfg = get_config("tiny", op_backend="pytorch", backbone_width=32, **overrides)
    model = build_model(cfg)[0].eval()
    return model, cfg


def padded_batch(sizes=((64, 80), (48, 64)), seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    images, mask = torch.zeros(len(sizes), 3, H, W), torch.ones(len(sizes), H, W, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


def scatters(ax):
    return [c for c in ax.collections if isinstance(c, PathCollection)]


# ----------------------------------------------------------------------------- the recording

@pytest.mark.parametrize("variant", [{}, {"with_box_refine": True},
                                     {"with_box_refine": True, "two_stage": True}],
                         ids=["plain", "box_refine", "two_stage"])
def test_recorded_sampling_equals_the_attention_module(variant):
    """Oracle: every MSDeformAttn's projections applied by hand (paper Eq. 2, or
    the box version) to the inputs it received, captured by a pre-hook in the test;
    and the recorded locations and weights, fed to the reference op, give the
    module's own output."""
    model, _ = tiny_model(num_queries=10, **variant)
    images, mask = padded_batch()
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn):
            module.register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: calls.append((name, mod, args, kwargs)),
                with_kwargs=True)
    with torch.no_grad():
        with record_sampling(model) as record:
            out = model(images, mask)
        assert len(calls) == len(record.layers) == 4  # 2 encoder + 2 decoder layers
        assert [layer.part for layer in record.layers] == ["encoder"] * 2 + ["decoder"] * 2
        for (name, module, args, kwargs), layer in zip(calls, record.layers):
            query, ref, feats, shapes, starts, padding = args
            N, Lq, _ = query.shape
            M, L, K = module.n_heads, module.n_levels, module.n_points
            offsets = module.sampling_offsets(query).view(N, Lq, M, L, K, 2)
            weights = module.attention_weights(query).view(N, Lq, M, L * K).softmax(-1)
            if ref.shape[-1] == 2:  # offsets in pixels of each level
                locations = (ref[:, :, None, :, None]
                             + offsets / shapes.flip(-1)[None, None, None, :, None])
            else:  # offsets relative to the box
                locations = (ref[:, :, None, :, None, :2]
                             + offsets / K * ref[:, :, None, :, None, 2:] * 0.5)
            assert layer.name == name
            torch.testing.assert_close(layer.sampling_locations, locations)
            torch.testing.assert_close(layer.attention_weights, weights.view(N, Lq, M, L, K))
            torch.testing.assert_close(layer.reference_points, ref)
            value = module.value_proj(feats).masked_fill(padding[..., None], 0.0)
            value = value.view(N, -1, M, value.shape[-1] // M)
            replay = module.output_proj(ms_deform_attn_pytorch(
                value, shapes, starts, layer.sampling_locations, layer.attention_weights))
            torch.testing.assert_close(replay, module(*args, **kwargs))
        # The record's levels and valid ratios are the transformer's.
        torch.testing.assert_close(record.spatial_shapes, calls[0][2][3])
        h, w = (~mask).sum(1).amax(1), (~mask).sum(2).amax(1)
        assert torch.all(record.valid_ratios[:, 0, 0] == w / mask.shape[2])
        assert torch.all(record.valid_ratios[:, 0, 1] == h / mask.shape[1])
        # The per-layer decoder boxes are the ones the model predicts.
        torch.testing.assert_close(record.boxes[-1], out["pred_boxes"])
        torch.testing.assert_close(record.boxes[0], out["aux_outputs"][0]["pred_boxes"])
        torch.testing.assert_close(record.logits[0], out["aux_outputs"][0]["pred_logits"])
        # Recording changes nothing else.
        plain = model(images, mask)
    assert set(plain) == set(out)
    assert torch.equal(plain["pred_logits"], out["pred_logits"])
    assert torch.equal(plain["pred_boxes"], out["pred_boxes"])


def test_sampling_data_layout(shipped, data):
    _, cfg, _, _ = shipped
    M, L, K = cfg.nheads, cfg.num_feature_levels, cfg.dec_n_points
    S = int(np.prod(data["spatial_shapes"], 1).sum())
    h, w = data["image_size"]
    side = build_transforms(cfg, "val")(Image.new("RGB", (128, 128)), None)[0].shape[-1]
    assert data["image"].shape == (h, w, 3) and (h, w) == (side, side)  # the val transform
    assert len(data["encoder"]) == cfg.enc_layers and len(data["decoder"]) == cfg.dec_layers
    assert data["encoder"][0]["sampling_locations"].shape == (S, M, L, cfg.enc_n_points, 2)
    assert data["decoder"][-1]["attention_weights"].shape == (cfg.num_queries, M, L, K)
    for layer in data["encoder"] + data["decoder"]:  # softmax over the L*K points of a head
        np.testing.assert_allclose(layer["attention_weights"].sum((-1, -2)), 1, atol=1e-5)
    assert np.all(np.diff(data["detections"]["score"]) <= 0)
    assert len(data["matching"]["query"]) == len(data["target"]["labels"])


# ----------------------------------------------------------------------------- pixels

def test_to_pixels_by_hand():
    # Half the padded map is image: normalized 0.25 is halfway across the image.
    np.testing.assert_allclose(V.to_pixels([0.25, 0.5], [0.5, 1.0], (100, 200)), [100, 50])
    np.testing.assert_allclose(V.to_pixels([[0.0, 0.0], [0.5, 0.25]], [0.5, 0.5], (10, 20)),
                               [[0, 0], [20, 5]])
    np.testing.assert_allclose(V.boxes_to_pixels([0.5, 0.5, 0.2, 0.4], (100, 200)),
                               [80, 30, 120, 70])


def test_pixels_agree_between_an_image_alone_and_padded_in_a_batch():
    """The same 64x128 image alone and padded into a 128x192 batch: the normalized
    locations differ (the image fills part of each padded map), the pixels must not."""
    model, _ = tiny_model()
    images, mask = padded_batch(((64, 128), (128, 192)))
    alone = V.sampling_data(model, images[0, :, :64, :128])
    padded = V.sampling_data(model, images, mask, index=0)
    size = (64, 128)
    assert padded["image_size"] == alone["image_size"] == size
    assert np.all(padded["valid_ratios"] < 1) and np.all(alone["valid_ratios"] == 1)
    # Encoder: each level's in-image tokens sit on the same pixel centres.
    for lvl, (H, W) in enumerate(alone["spatial_shapes"]):
        H_p, W_p = padded["spatial_shapes"][lvl]
        start, start_p = alone["level_start_index"][lvl], padded["level_start_index"][lvl]
        ref = alone["encoder"][0]["reference_points"][start:start + H * W, lvl]
        ref_p = padded["encoder"][0]["reference_points"][start_p:start_p + H_p * W_p, lvl]
        ref_p = ref_p.reshape(H_p, W_p, 2)[:H, :W].reshape(-1, 2)
        assert not np.allclose(ref, ref_p)
        px = V.to_pixels(ref, alone["valid_ratios"][lvl], size)
        np.testing.assert_allclose(V.to_pixels(ref_p, padded["valid_ratios"][lvl], size),
                                   px, atol=1e-3)
        stride = 128 / W
        np.testing.assert_allclose(px[:W, 0], (np.arange(W) + 0.5) * stride, atol=1e-3)
        token = V.encoder_query(padded, *px[-1], level=lvl)  # the last in-image cell
        assert token == start_p + (H - 1) * W_p + W - 1
    # Decoder layer 0: learned reference points, the same pixel on every level.
    first = V.query_points(alone, "decoder", 0, 3)
    first_p = V.query_points(padded, "decoder", 0, 3)
    np.testing.assert_allclose(first_p["reference"], first["reference"], atol=1e-3)
    ref = padded["decoder"][0]["reference_points"][3]  # (L, 2), one per level
    per_level = V.to_pixels(ref, padded["valid_ratios"], size)
    np.testing.assert_allclose(per_level, np.broadcast_to(per_level[0], per_level.shape),
                               atol=1e-3)


def test_heatmap_splats_weights_bilinearly():
    """A hand-made record: two points of one query, in a padded map half filled by
    a 10x20 image; the heat lands where the pixel convention says."""
    ratio = np.array([[0.5, 0.5]])
    points_px = np.array([[3.5, 2.5], [8.0, 6.5]])  # a pixel centre; between two centres
    locations = points_px / [20, 10] * ratio[0]
    data = {"image_size": (10, 20), "valid_ratios": ratio,
            "encoder": [{"sampling_locations": locations.reshape(1, 1, 1, 2, 2),
                         "attention_weights": np.array([0.7, 0.3]).reshape(1, 1, 1, 2),
                         "reference_points": np.zeros((1, 1, 2))}]}
    heat = V.attention_heatmap(data, "encoder", queries=[0])
    expected = np.zeros((10, 20))
    expected[2, 3] = 0.7
    expected[6, 7] = expected[6, 8] = 0.15
    np.testing.assert_allclose(heat, expected, atol=1e-12)


def test_heatmap_of_the_shipped_model_keeps_the_mass_inside(data):
    heat = V.attention_heatmap(data, "decoder", -1, queries=[int(data["detections"]["query"][0])])
    points = V.query_points(data, "decoder", -1)
    h, w = data["image_size"]
    xy, weights = points["locations"].reshape(-1, 2), points["weights"].reshape(-1)
    inner = ((xy >= 0.5) & (xy <= [w - 0.5, h - 0.5])).all(1)
    inside = ((xy > -0.5) & (xy < [w + 0.5, h + 0.5])).all(1)
    assert weights[inner].sum() - 1e-6 <= heat.sum() <= weights[inside].sum() + 1e-6
    assert heat.sum() > 0.5 * weights.sum()


# ----------------------------------------------------------------------------- figures

@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_per_level_figure_has_a_panel_per_level_and_K_points_per_head(data, kind):
    fig = V.plot_sampling_points(data, kind=kind, per_level=True)
    points = V.query_points(data, kind, -1)
    M, L, K = points["weights"].shape
    assert len(fig.axes) == L
    for lvl, ax in enumerate(fig.axes):
        heads = scatters(ax)
        assert [c.get_gid() for c in heads] == [f"head {m}" for m in range(M)]
        for m, collection in enumerate(heads):
            np.testing.assert_allclose(collection.get_offsets(), points["locations"][m, lvl])
            assert len(np.unique(collection.get_sizes())) > 1 or K == 1  # size follows weight
        colours = {tuple(np.round(c.get_facecolors()[0, :3], 3)) for c in heads}
        assert len(colours) == M
        cross = [line for line in ax.get_lines() if line.get_gid() == "reference"]
        np.testing.assert_allclose(np.ravel(cross[0].get_xydata()), points["reference"])
        boxes = [p for p in ax.patches
                 if isinstance(p, Rectangle) and p.get_linestyle() in ("-", "solid")]
        if kind == "decoder":
            x0, y0, x1, y1 = points["box"]
            assert any(np.allclose([b.get_x(), b.get_y(), b.get_width(), b.get_height()],
                                   [x0, y0, x1 - x0, y1 - y0]) for b in boxes)


def test_all_levels_figure_has_L_times_K_points_per_head(data):
    fig = V.plot_sampling_points(data, per_level=False, heads=[0, 2])
    points = V.query_points(data, "decoder", -1)
    _, L, K = points["weights"].shape
    (ax,) = fig.axes
    heads = scatters(ax)
    assert [c.get_gid() for c in heads] == ["head 0", "head 2"]
    assert all(len(c.get_offsets()) == L * K for c in heads)
    # The biggest marker of head 0 is its highest-weight point.
    biggest = heads[0].get_offsets()[np.argmax(heads[0].get_sizes())]
    flat = points["weights"][0].reshape(-1)
    np.testing.assert_allclose(biggest, points["locations"][0].reshape(-1, 2)[flat.argmax()])


def test_encoder_pixel_query_is_the_cell_under_the_pixel(data):
    h, w = data["image_size"]
    for level, (H, W) in enumerate(data["spatial_shapes"]):
        token = V.encoder_query(data, 50.3, 70.9, level=level)
        assert V.token_level(data, token) == level
        reference = V.query_points(data, "encoder", 0, token)["reference"]
        half_cell = np.array([w / W, h / H]) / 2
        assert np.all(np.abs(reference - [50.3, 70.9]) <= half_cell + 1e-4)


def test_layers_refinement_and_hungarian_figures(data):
    D = len(data["decoder"])
    assert len(V.plot_sampling_layers(data).axes) == D
    assert len(V.plot_sampling_layers(data, "encoder", pixel=(10, 10)).axes) == len(data["encoder"])
    fig = V.plot_refinement(data, top=2)
    boxes = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    references = 2 * (data["decoder"][0]["reference_points"].shape[-1] == 4)
    assert len(boxes) == 2 * D + references
    assert len(fig.axes[1].get_lines()) == 2  # IoU per layer, one line per query
    fig = V.plot_hungarian(data)
    T = len(data["target"]["labels"])
    assert len(fig.axes[0].get_lines()) == T  # one link per matched pair
    assert sum(p.get_edgecolor()[:3] == (1, 1, 1) for p in fig.axes[1].patches) == T
    heat = V.plot_attention_heatmap(data)
    assert heat.axes[0].get_images()[-1].get_array().shape == data["image_size"]


def test_explorer_figure_for_several_states(data):
    M, L, K = data["encoder"][0]["attention_weights"].shape[1:]
    states = [({}, M, L),
              ({"kind": "encoder", "pixel": (10.5, 80.2), "layer": 0, "head": 1}, 1, L),
              ({"kind": "decoder", "query": 3, "level": 2, "layer": -2}, M, 1),
              ({"kind": "encoder", "query": 5, "head": -1, "level": 0}, 1, 1)]
    for state, heads, levels in states:
        resolved = V.resolve_state(data, state)
        assert set(resolved) == set(V.STATE_KEYS) and resolved["layer"] >= 0
        fig = V.explorer_figure(data, state)
        image_ax, mass_ax = fig.axes
        drawn = scatters(image_ax)
        assert len(drawn) == heads and all(len(c.get_offsets()) == levels * K for c in drawn)
        assert len(mass_ax.texts) == M * L
    assert V.resolve_state(data, {"kind": "encoder", "pixel": (10.5, 80.2)})["query"] == \
        V.encoder_query(data, 10.5, 80.2)
    fig = plt.figure()
    assert V.explorer_figure(data, {"layer": 0}, fig=fig) is fig and len(fig.axes) == 2


def test_explorer_widget_follows_its_controls(shipped, scene):
    model, cfg, _, meta = shipped
    image, target = scene
    # No transform: the images go in at their own sizes, 128 and 64 pixels.
    explorer = V.SamplingExplorer(model, [image, image.resize((64, 64))], targets=[target, None],
                                  class_names=meta["class_names"])
    assert explorer._view.value[:4] == b"\x89PNG"
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "image/png" in bundle
    controls = explorer._controls
    controls["head"].value = 2
    assert explorer.state["head"] == 2
    controls["kind"].value = "encoder"
    assert explorer.state["kind"] == "encoder" and controls["layer"].max == cfg.enc_layers - 1
    controls["x"].value = 30  # the pixel picker: x and y sliders
    y = controls["y"].value
    assert explorer.state["query"] == V.encoder_query(explorer.data, 30.5, y + 0.5)
    explorer.click(100.0, 20.0)
    assert explorer.state["query"] == V.encoder_query(explorer.data, 100.0, 20.0)
    explorer.update(kind="decoder")
    top = V.query_points(explorer.data, "decoder", -1)
    x0, y0, x1, y1 = top["box"]
    explorer.click((x0 + x1) / 2, (y0 + y1) / 2)
    box = V.query_points(explorer.data, "decoder", -1, explorer.state["query"])["box"]
    assert box[0] <= (x0 + x1) / 2 <= box[2] and box[1] <= (y0 + y1) / 2 <= box[3]
    # With ipympl the figure is live and a click on the image picks (not elsewhere).
    explorer._fig = V.explorer_figure(explorer.data, explorer.state)
    chosen = explorer.state["query"]
    explorer._on_mpl_click(SimpleNamespace(inaxes=explorer._fig.axes[1], xdata=1.0, ydata=1.0))
    assert explorer.state["query"] == chosen
    explorer._on_mpl_click(SimpleNamespace(inaxes=explorer._fig.axes[0], xdata=box[0] + 0.5,
                                           ydata=box[1] + 0.5))
    assert explorer.state["kind"] == "decoder" and explorer._controls["query"].value == \
        explorer.state["query"]
    before = explorer._view.value
    controls["image"].value = 1
    assert explorer.image_index == 1 and explorer._view.value != before
    with pytest.raises(ValueError, match="layer=9 is out of range"):
        explorer.update(layer=9)


# ----------------------------------------------------------------------------- CLI and errors

def test_cli_visualize_writes_a_png(tmp_path, scene, monkeypatch):
    from ddetr_tutorial.cli import main

    monkeypatch.setenv("DDETR_BACKEND", "pytorch")
    scene[0].save(tmp_path / "shapes.png")
    out = tmp_path / "figs" / "sampling.png"
    assert main(["visualize", "--checkpoint", str(SHIPPED_MODEL), "--image",
                 str(tmp_path / "shapes.png"), "--out", str(out), "--dpi", "40"]) == 0
    assert Image.open(out).format == "PNG"
    with pytest.raises(SystemExit, match=r"level=7 is out of range.*valid values are 0\.\.3"):
        main(["visualize", "--checkpoint", str(SHIPPED_MODEL), "--image",
              str(tmp_path / "shapes.png"), "--pixel", "64", "30", "--level", "7", "--out",
              str(out)])


def test_bad_input_names_the_value_and_the_range(shipped, data):
    model = shipped[0]
    with pytest.raises(ValueError, match=r"query=30 is out of range: the decoder has 30 object "
                                         r"queries, so valid values are 0\.\.29"):
        V.plot_sampling_points(data, query=30)
    with pytest.raises(ValueError, match=r"layer=2 is out of range: the encoder has 2 layers"):
        V.plot_sampling_points(data, kind="encoder", layer=2)
    with pytest.raises(ValueError, match=r"layer=-3 is out of range.*-2\.\.-1"):
        V.explorer_figure(data, {"layer": -3})
    with pytest.raises(ValueError, match=r"head=4 is out of range.*0\.\.3"):
        V.explorer_figure(data, {"head": 4})
    with pytest.raises(ValueError, match=r"pixel \(130, 5\) is outside the image"):
        V.encoder_query(data, 130, 5)
    with pytest.raises(ValueError, match="unknown explorer state key"):
        V.resolve_state(data, {"layers": 1})
    with pytest.raises(ValueError, match="kind must be 'encoder' or 'decoder'"):
        V.query_points(data, "backbone")
    with pytest.raises(ValueError, match=r"got shape \(1, 64, 64\)"):
        V.sampling_data(model, torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\), got shape \(64, 64\)"):
        V.sampling_data(model, np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"index=2 is out of range: the batch has 2 image"):
        V.sampling_data(model, torch.zeros(2, 3, 64, 64), index=2)
    with pytest.raises(ValueError, match="no ground truth"):
        V.plot_hungarian({**data, "matching": None})
    detr, _ = tiny_model(model="detr")
    with pytest.raises(ValueError, match="dense attention"):
        V.sampling_data(detr, torch.zeros(3, 64, 64))
