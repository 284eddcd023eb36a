"""family_views: DETR's four logit terms add up to the logits its layer uses, each
member's view matches what its layer computed (attention weights, sampling locations,
the RoIs each stage pools), views survive a save and load, and bad input is refused
with an error naming the value."""

import json

import pytest
import torch

from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.family_views import (
    LogitTerms,
    cross_attention_inputs,
    dynamic_sampling,
    load_views,
    logit_terms,
    member_kind,
    rcda_weights,
    save_views,
    term_magnitudes,
    where_it_looks,
)
from ddetr_tutorial.ops import ms_deform_attn
from ddetr_tutorial.rcda import RowColumnAttention
from ddetr_tutorial.recording import record_sampling
from ddetr_tutorial.sparse_rcnn import image_whwh
from family_batch import padded_mixed_size_batch

DETR_OVERRIDES = {"model": "detr", "no_object": True, "position_offset": 0.0,
                  "num_feature_levels": 1, "with_box_refine": False, "two_stage": False}


def member(preset, **overrides):
    torch.manual_seed(0)
    cfg = get_config(preset, pretrained_backbone=None, op_backend="pytorch", **overrides)
    return build_model(cfg)[0].eval()


@pytest.fixture(scope="module")
def batch():
    images, mask, _ = padded_mixed_size_batch()  # 96x64 and 64x96 padded to 96x96
    return images, mask


def unpadded_weights(mha, inputs):
    """The layer's own per-head weights (N, M, Q, S): nn.MultiheadAttention on c + p."""
    return mha(inputs["query_content"] + inputs["query_pos"],
               inputs["key_content"] + inputs["key_pos"], inputs["key_content"],
               key_padding_mask=inputs["padding_mask"], need_weights=True,
               average_attn_weights=False)[1]


# ------------------------------------------------------------------ the four terms

def test_four_terms_sum_to_the_logits_of_the_projected_sum():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    torch.nn.init.normal_(mha.in_proj_bias)  # biases must land in the content terms
    c_q, p_q = torch.randn(2, 5, 16).double(), torch.randn(2, 5, 16).double()
    c_k, p_k = torch.randn(2, 7, 16).double(), torch.randn(2, 7, 16).double()
    terms = logit_terms(mha, c_q, p_q, c_k, p_k)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = ((c_q + p_q) @ w[:16].T + b[:16]).view(2, 5, 4, 4).transpose(1, 2)
    k = ((c_k + p_k) @ w[16:32].T + b[16:32]).view(2, 7, 4, 4).transpose(1, 2)
    torch.testing.assert_close(terms.total(), q @ k.transpose(-1, -2) / 2.0)  # sqrt(D) = 2
    # each term on its own: content-spatial is the projected content against the projected position
    cq = (c_q @ w[:16].T + b[:16]).view(2, 5, 4, 4).transpose(1, 2)
    pk = (p_k @ w[16:32].T).view(2, 7, 4, 4).transpose(1, 2)
    torch.testing.assert_close(terms.content_spatial, cq @ pk.transpose(-1, -2) / 2.0)
    assert LogitTerms._fields == ("content_content", "content_spatial", "spatial_content",
                                  "spatial_spatial")


def test_detr_terms_give_the_layers_own_attention_weights(batch):
    model = member("tiny_pretrained", **DETR_OVERRIDES)
    with torch.no_grad():
        for layer in (0, -1):
            inputs, _ = cross_attention_inputs(model, *batch, layer=layer)
            mha = model.transformer.decoder.layers[layer].multihead_attn
            terms = logit_terms(mha, inputs["query_content"], inputs["query_pos"],
                                inputs["key_content"], inputs["key_pos"])
            weights = terms.weights(inputs["padding_mask"])
            torch.testing.assert_close(weights, unpadded_weights(mha, inputs))
            assert (weights[1][..., inputs["padding_mask"][1]] == 0).all()  # padding unseen
            assert inputs["map_shape"] == (3, 3)  # C5 of 96 px


def test_cross_attention_inputs_are_what_the_layer_adds_up(batch):
    model = member("tiny_pretrained", **DETR_OVERRIDES)
    seen = {}
    mha = model.transformer.decoder.layers[-1].multihead_attn
    handle = mha.register_forward_pre_hook(lambda m, args: seen.update(q=args[0], k=args[1],
                                                                       v=args[2]))
    with torch.no_grad():
        inputs, outputs = cross_attention_inputs(model, *batch)
    handle.remove()
    torch.testing.assert_close(inputs["query_content"] + inputs["query_pos"], seen["q"])
    torch.testing.assert_close(inputs["key_content"] + inputs["key_pos"], seen["k"])
    torch.testing.assert_close(inputs["key_content"], seen["v"])
    assert outputs["pred_logits"].shape == (2, 30, 5)


def test_term_magnitudes_skip_padding_and_see_only_what_varies_over_keys():
    t = torch.tensor([[[[1.0, -3.0, 100.0]]]])  # (N=1, M=1, Lq=1, S=3), the last key padded
    constant = torch.full_like(t, 2.0)
    terms = LogitTerms(t, constant, -t, torch.zeros_like(t))
    padding = torch.tensor([[False, False, True]])
    stats = term_magnitudes(terms, padding)
    assert stats["content_content"]["mean_abs"] == pytest.approx(2.0)  # (1 + 3) / 2
    assert stats["content_content"]["key_std"] == pytest.approx(2.0)  # std of (1, -3)
    assert stats["content_spatial"] == {"mean_abs": pytest.approx(2.0), "key_std": 0.0}
    assert stats["spatial_content"]["key_std"] == pytest.approx(2.0)
    assert term_magnitudes(terms)["content_content"]["mean_abs"] == pytest.approx(104 / 3)


# ------------------------------------------------------------------ the views

def test_dense_views_are_the_layers_weights_over_valid_cells(batch):
    images, mask = batch
    model = member("tiny_pretrained", **DETR_OVERRIDES)
    views = where_it_looks(model, images, mask, top=3)
    with torch.no_grad():
        inputs, outputs = cross_attention_inputs(model, images, mask)
    logits = outputs["pred_logits"]
    weights = unpadded_weights(model.transformer.decoder.layers[-1].multihead_attn, inputs)
    weights = weights.unflatten(-1, (3, 3))  # (N, M, Q, 3, 3)
    for i, (h, w) in enumerate([(3, 2), (2, 3)]):  # 96x64 -> 3x2 cells, 64x96 -> 2x3
        view = views[i]
        assert view["kind"] == "attention" and view["attention"].shape == (3, 4, h, w)
        torch.testing.assert_close(view["attention"],
                                   weights[i][:, view["queries"], :h, :w].transpose(0, 1))
        torch.testing.assert_close(view["attention"].sum((-1, -2)), torch.ones(3, 4))
        scores = logits[i].softmax(-1)[:, :-1].max(-1).values  # DETR's softmax head
        assert view["queries"].tolist() == scores.topk(3).indices.tolist()
        torch.testing.assert_close(view["scores"], scores.topk(3).values)


def test_conditional_views_are_the_cross_attention_weights(batch):
    images, mask = batch
    model = member("tiny_conditional_detr")
    seen = {}
    attention = model.transformer.decoder.layers[0].cross_attn
    handle = attention.register_forward_hook(lambda m, a, out: seen.update(w=out[1]))
    views = where_it_looks(model, images, mask, queries=[4, 0], layer=0)
    handle.remove()
    expected = seen["w"].unflatten(-1, (3, 3))[0][:, [4, 0], :3, :2].transpose(0, 1)
    torch.testing.assert_close(views[0]["attention"], expected)
    for view in views:
        torch.testing.assert_close(view["attention"].sum((-1, -2)), torch.ones(2, 4))
        assert view["queries"].tolist() == [4, 0] and view["layer"] == 0


@pytest.mark.parametrize("H, W", [(3, 5), (6, 2)])
def test_rcda_map_reproduces_the_module(H, W):
    torch.manual_seed(0)
    attention = RowColumnAttention(16, 4).double()
    q_row, q_col = torch.randn(2, 7, 16).double(), torch.randn(2, 7, 16).double()
    k_row, k_col, value = (torch.randn(2, H, W, 16).double() for _ in range(3))
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[1, H - 1:, :] = True
    mask[1, :, W - 1:] = True
    weights = rcda_weights(attention, q_row, q_col, k_row, k_col, mask)  # (N, M, Lq, H, W)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 4, 7).double())
    assert (weights[1][..., mask[1]] == 0).all()
    v = value @ attention.in_proj_weight[64:].T + attention.in_proj_bias[64:]
    v = v.unflatten(-1, (4, 4)).movedim(-2, 1)  # (N, M, H, W, D)
    mixed = torch.einsum("nmqyx,nmyxd->nmqd", weights, v)
    out = attention.out_proj(mixed.movedim(1, -2).flatten(-2))
    torch.testing.assert_close(out, attention(q_row, q_col, k_row, k_col, value, mask))


def test_anchor_views_sum_to_one_over_valid_cells(batch):
    images, mask = batch
    model = member("tiny_anchor_detr")
    views = where_it_looks(model, images, mask, top=2)
    assert [tuple(v["attention"].shape) for v in views] == [(2, 4, 3, 2), (2, 4, 2, 3)]
    for view in views:
        torch.testing.assert_close(view["attention"].sum((-1, -2)), torch.ones(2, 4))


def test_sampling_views_are_the_recorded_locations_in_image_coordinates(batch):
    images, mask = batch
    model = member("tiny_pretrained")
    views = where_it_looks(model, images, mask, top=4, layer=0)
    with torch.no_grad(), record_sampling(model) as rec:
        model(images, mask)
    record, ratios = rec.decoder[0], rec.valid_ratios
    for i, view in enumerate(views):
        q = view["queries"]
        torch.testing.assert_close(view["locations"] * ratios[i, None, None, :, None, :],
                                   record.sampling_locations[i, q])
        torch.testing.assert_close(view["weights"], record.attention_weights[i, q])
        torch.testing.assert_close(view["weights"].sum((-1, -2)), torch.ones(4, 4))
        assert view["level_shapes"].tolist() == rec.spatial_shapes.tolist()
    assert not torch.allclose(ratios[0], torch.ones_like(ratios[0]))  # the test sees padding


def test_sparse_rcnn_rois_are_the_boxes_each_stage_pools(batch):
    images, mask = batch
    model = member("tiny_sparse_rcnn", dec_layers=3)
    pooled = []
    handles = [stage.register_forward_pre_hook(lambda m, args: pooled.append(args[1]))
               for stage in model.head.head_series]
    views = where_it_looks(model, images, mask, top=3)
    for h in handles:
        h.remove()
    whwh = image_whwh(mask).float()
    for i, view in enumerate(views):
        for s in range(3):
            x0, y0, x1, y1 = (pooled[s][i, view["queries"]] / whwh[i]).unbind(-1)
            cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
            torch.testing.assert_close(view["rois"][:, s], cxcywh)
    assert views[0]["rois"][:, 0].tolist() == [[0.5, 0.5, 1.0, 1.0]] * 3  # learned, untrained


def test_dynamic_sampling_reproduces_the_encoder_layer():
    torch.manual_seed(0)
    model = member("tiny_dynamic_detr")
    layer = model.encoder[-1].double()
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.05)  # taps off the grid
    shapes = [(8, 6), (4, 3), (2, 2)]
    srcs = [torch.randn(2, 64, h, w).double() for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    for m in masks:
        m[1, :, -1:] = True
    expected = layer(srcs, masks)
    sampling = dynamic_sampling(layer, srcs, masks)
    for lvl, (locations, weights) in enumerate(sampling):
        levels = [j for j in (lvl - 1, lvl, lvl + 1) if 0 <= j < 3]
        slots = [j - lvl + 1 for j in levels]
        absent = [s for s in range(3) if s not in slots]
        assert (weights[:, :, :, absent] == 0).all()
        value = torch.cat([layer.value_proj(srcs[j].flatten(2).transpose(1, 2)).masked_fill(
            masks[j].flatten(1)[..., None], 0.0) for j in levels], 1).unflatten(-1, (4, 16))
        level_shapes = torch.tensor([shapes[j] for j in levels])
        starts = torch.cat([torch.zeros(1, dtype=torch.long),
                            level_shapes.prod(1).cumsum(0)[:-1]])
        sampled = ms_deform_attn(value, level_shapes, starts, locations[:, :, :, slots],
                                 weights[:, :, :, slots], backend="pytorch")
        y = layer.output_proj(sampled).transpose(1, 2).reshape(srcs[lvl].shape)
        torch.testing.assert_close(layer.activation(layer.norm(srcs[lvl] + y), masks[lvl]),
                                   expected[lvl])


def test_dynamic_views_hold_rois_and_the_kernel_at_their_centre(batch):
    images, mask = batch
    model = member("tiny_dynamic_detr")
    views = where_it_looks(model, images, mask, top=3, layer=0)
    for view in views:
        torch.testing.assert_close(view["rois"][:, 0], model.query_boxes.weight[
            view["queries"]].sigmoid())  # the first layer pools the learned boxes
        assert view["encoder_locations"].shape == (3, 4, 3, 9, 2)
        w = view["encoder_weights"]
        assert ((w >= 0) & (w <= 1)).all() and (w.sum((1, 3)) > 0).any()
        centre = view["rois"][:, 0, :2]  # the kernel sits on the cell holding the RoI centre
        assert (view["encoder_pixel"] - centre).abs().max() <= 0.5


def test_every_member_has_a_kind():
    kinds = {"tiny_pretrained": "sampling", "tiny_efficient_detr": "sampling",
             "tiny_dn_deformable_detr": "sampling", "tiny_h_deformable_detr": "sampling",
             "tiny_conditional_detr": "attention", "tiny_anchor_detr": "attention",
             "tiny_sparse_rcnn": "rois", "tiny_dynamic_detr": "dynamic"}
    for preset, kind in kinds.items():
        assert member_kind(member(preset)) == kind, preset
    assert member_kind(member("tiny_pretrained", **DETR_OVERRIDES)) == "attention"


# ------------------------------------------------------------------ save and load

def test_views_round_trip_through_json(tmp_path, batch):
    views = where_it_looks(member("tiny_dynamic_detr"), *batch, top=2)
    views[0]["checkpoint"], views[0]["step"], views[0]["note"] = "runs/x.pth", 1200, 0.25
    path = save_views(tmp_path / "views.json", views)
    assert json.loads(path.read_text())["format"] == "ddetr_tutorial.family_views"
    back = load_views(path)
    assert [sorted(v) for v in back] == [sorted(v) for v in views]
    for a, b in zip(views, back):
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
            else:
                assert value == b[key] and type(value) is type(b[key]), key


# ------------------------------------------------------------------ bad input

def test_bad_input_is_refused_naming_the_value(tmp_path, batch):
    images, mask = batch
    model = member("tiny_conditional_detr")
    with pytest.raises(TypeError, match="does not know a Linear"):
        where_it_looks(torch.nn.Linear(2, 2), images, mask)
    with pytest.raises(ValueError, match="top=0: expected an int from 1 to the 30 queries"):
        where_it_looks(model, images, mask, top=0)
    with pytest.raises(ValueError, match=r"queries=\[30\]: expected indices in \[0, 30\)"):
        where_it_looks(model, images, mask, queries=[30])
    with pytest.raises(ValueError, match="layer=2: the model has 2 decoder layers"):
        where_it_looks(model, images, mask, layer=2)
    with pytest.raises(TypeError, match="mask must be a bool tensor .* got torch.float32"):
        where_it_looks(model, images, mask.float())
    with pytest.raises(ValueError, match=r"mask has shape \(2, 96, 95\)"):
        where_it_looks(model, images, mask[:, :, :95])
    with pytest.raises(ValueError, match=r"images must be a floating \(N, 3, H, W\)"):
        where_it_looks(model, images[:, :1], mask)
    with pytest.raises(TypeError, match="cross_attention_inputs takes a DETR, got Conditional"):
        cross_attention_inputs(model, images, mask)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r"key_pos must be \(N, L, C=8\), got \(1, 3, 4\)"):
        logit_terms(mha, x, x, x, x[..., :4])
    with pytest.raises(TypeError, match="view entry 'rois' is a list"):
        save_views(tmp_path / "v.json", [{"rois": [1, 2]}])
    with pytest.raises(TypeError, match="views must be a list of dicts"):
        save_views(tmp_path / "v.json", {"rois": 1})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something else", "views": []}))
    with pytest.raises(ValueError, match="format 'something else', expected"):
        load_views(other)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "ddetr_tutorial.family_views", "version": 1,
                                  "views": [{"a": {"dtype": "float32", "shape": [2, 2],
                                                   "data": [1.0] * 3}}]}))
    with pytest.raises(ValueError, match="entry 'a' holds 3 numbers for shape"):
        load_views(broken)
