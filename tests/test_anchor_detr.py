"""Anchor DETR: megvii-research/AnchorDETR's keys, row-column decoupled attention
against dense attention and against a loop by hand, the anchor x pattern queries,
boxes relative to the anchors, training on a padded batch, memorising two images
and its config checks."""

import argparse
import itertools
import math
import re

import pytest
import torch

from ddetr_tutorial.anchor_detr import pixel_positions, relative_to_anchors, sine_1d, sine_2d
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.losses import total_loss
from ddetr_tutorial.rcda import RowColumnAttention, decoupled_attention
from ddetr_tutorial.weights import load_official_checkpoint
from official import official_keys, random_value
from test_model import batch
from test_overfit import assert_memorises_two_images

ANCHOR_PRESET_KEYS = {"anchor_detr": "anchor_detr_r50", "anchor_detr_dc5": "anchor_detr_r50_dc5"}


@pytest.mark.parametrize("preset", sorted(ANCHOR_PRESET_KEYS))
def test_keys_and_shapes_equal_the_official_anchor_detr(preset):
    model, _, _ = build_model(get_config(preset))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys(ANCHOR_PRESET_KEYS[preset])
    assert model.backbone.strides == [16 if preset.endswith("dc5") else 32]
    heads = model.transformer.class_embed
    assert all(head is heads[0] for head in heads)  # one head, named once per layer


def _synthetic_official(name):
    """Random tensors under the official names; the shared heads hold one tensor each."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in official_keys(name).items():  # layer i's head tensor is layer 0's
        source = re.sub(r"^(transformer\.(?:class|bbox)_embed)\.\d+\.", r"\1.0.", key)
        state[key] = state[source] if source in state else random_value(key, shape, g)
    return state


def test_official_checkpoint_loads_strictly_and_runs():
    state = _synthetic_official("anchor_detr_r50_dc5")
    model, _, _ = build_model(get_config("anchor_detr_dc5"))
    # the released main.py saves its args; --dilation defaults to True there (DC5)
    result = load_official_checkpoint(model, {"model": state,
                                              "args": argparse.Namespace(dilation=True)})
    assert (result.missing, result.unexpected, result.mismatched) == ([], [], [])
    torch.testing.assert_close(model.state_dict()["transformer.position.weight"],
                               state["transformer.position.weight"])
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert out["pred_logits"].shape == (1, 900, 91) and torch.isfinite(out["pred_boxes"]).all()
    c5, _, _ = build_model(get_config("anchor_detr"))  # same keys, wrong stride: refused
    with pytest.raises(ValueError, match="dilation=True but the model's backbone has"):
        load_official_checkpoint(c5, {"model": state, "args": argparse.Namespace(dilation=True)})


def _dense_attention(q_row, q_col, k_row, k_col, value, mask):
    """Ordinary softmax attention over all H x W keys, whose key at (y, x) is
    [k_row[x], k_col[y]] and query [q_row, q_col]: its logit is the sum of a row
    part and a column part, so its weights factorise over rows and columns."""
    N, M, H, W, D = value.shape
    q = torch.cat((q_row, q_col), -1)                                         # (N, M, Lq, 2D)
    k = torch.cat((k_row[:, :, None].expand(-1, -1, H, -1, -1),
                   k_col[:, :, :, None].expand(-1, -1, -1, W, -1)), -1).flatten(2, 3)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)                             # (N, M, Lq, HW)
    logits = logits.masked_fill(mask.flatten(1)[:, None, None], float("-inf"))
    return logits.softmax(-1) @ value.flatten(2, 3)


@pytest.mark.parametrize("H, W", [(3, 5), (5, 3), (4, 4)])
def test_rcda_equals_dense_attention_with_factorised_weights(H, W):
    torch.manual_seed(0)
    N, M, Lq, D = 2, 2, 6, 4
    q_row, q_col = torch.randn(2, N, M, Lq, D, dtype=torch.float64)
    k_row = torch.randn(N, M, W, D, dtype=torch.float64)
    k_col = torch.randn(N, M, H, D, dtype=torch.float64)
    value = torch.randn(N, M, H, W, D, dtype=torch.float64)
    mask = torch.zeros(N, H, W, dtype=torch.bool)
    mask[1, H - 1:] = True  # image 1: its last row and column are padding
    mask[1, :, W - 1:] = True
    ours = decoupled_attention(q_row, q_col, k_row, k_col, value, mask)
    torch.testing.assert_close(ours, _dense_attention(q_row, q_col, k_row, k_col, value, mask))
    # ... and the dense weights are the outer product of the two softmaxes
    a_row = (q_row @ k_row.transpose(-1, -2) / math.sqrt(D)).masked_fill(
        mask[:, None, None, 0, :], float("-inf")).softmax(-1)
    a_col = (q_col @ k_col.transpose(-1, -2) / math.sqrt(D)).masked_fill(
        mask[:, None, None, :, 0], float("-inf")).softmax(-1)
    outer = (a_col[..., :, None] * a_row[..., None, :]).flatten(-2)            # (N, M, Lq, HW)
    torch.testing.assert_close(ours, outer @ value.flatten(2, 3))


@pytest.mark.parametrize("H, W", [(3, 4), (4, 3)])
def test_rcda_module_by_hand(H, W):
    """The module on a tiny input against loops: project, average the row keys over
    y and the column keys over x, two softmaxes, weight v[y, x] by both, out_proj."""
    torch.manual_seed(1)
    C, M, Lq = 4, 2, 2
    D = C // M
    attn = RowColumnAttention(C, M).double()
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    qr, qc = torch.randn(2, 1, Lq, C, dtype=torch.float64)
    kr, kc, v = torch.randn(3, 1, H, W, C, dtype=torch.float64)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, :, W - 1] = True  # the last column and row are padding
    mask[0, H - 1] = True
    w, b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
    proj = [lambda x, i=i: w[i * C:(i + 1) * C] @ x + b[i * C:(i + 1) * C] for i in range(5)]
    out = torch.zeros(Lq, C, dtype=torch.float64)
    for q, m in itertools.product(range(Lq), range(M)):
        heads = slice(m * D, (m + 1) * D)
        q_row, q_col = proj[0](qr[0, q])[heads], proj[1](qc[0, q])[heads]
        row_logits = torch.stack([q_row @ sum(proj[2](kr[0, y, x])[heads] for y in range(H)) / H
                                  for x in range(W)]) / math.sqrt(D)
        col_logits = torch.stack([q_col @ sum(proj[3](kc[0, y, x])[heads] for x in range(W)) / W
                                  for y in range(H)]) / math.sqrt(D)
        row_logits[W - 1] = col_logits[H - 1] = -math.inf
        a_row, a_col = row_logits.softmax(0), col_logits.softmax(0)
        out[q, heads] = sum(a_col[y] * a_row[x] * proj[4](v[0, y, x])[heads]
                            for y in range(H) for x in range(W))
    by_hand = out @ attn.out_proj.weight.detach().T + attn.out_proj.bias.detach()
    torch.testing.assert_close(attn(qr, qc, kr, kc, v, mask)[0], by_hand)


def test_queries_pair_every_anchor_with_every_pattern():
    model, _, _ = build_model(get_config("tiny_anchor_detr"))
    transformer = model.transformer
    A, P = transformer.position.num_embeddings, transformer.pattern.num_embeddings
    assert (A, P) == (10, 3)
    anchors, contents = transformer.queries(2)
    assert anchors.shape == (2, 30, 2) and contents.shape == (2, 30, 64)
    for n, p, a in itertools.product(range(2), range(P), range(A)):
        assert torch.equal(anchors[n, p * A + a], transformer.position.weight[a])
        assert torch.equal(contents[n, p * A + a], transformer.pattern.weight[p])
    pairs = {(tuple(anchors[0, q].tolist()), tuple(contents[0, q].tolist())) for q in range(30)}
    assert len(pairs) == 30  # each (anchor, pattern) once


def test_sine_codes_and_pixel_positions_by_hand():
    x = torch.tensor([0.0, 0.25, 0.7], dtype=torch.float64)
    code = sine_1d(x, 8)
    for i in range(8):
        angle = 2 * math.pi * x / 10000 ** (2 * (i // 2) / 8)
        torch.testing.assert_close(code[:, i], angle.sin() if i % 2 == 0 else angle.cos())
    points = torch.tensor([[0.2, 0.9]], dtype=torch.float64)
    torch.testing.assert_close(sine_2d(points, 4), torch.cat((sine_1d(points[:, 1], 4),
                                                               sine_1d(points[:, 0], 4)), -1))
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 2] = True        # the last row is padding: 2 valid rows
    mask[0, :, 3] = True     # the last column too: 3 valid columns
    y, x = pixel_positions(mask)
    torch.testing.assert_close(y, torch.tensor([[0.25, 0.75, 0.75]]))
    torch.testing.assert_close(x, torch.tensor([[1 / 6, 0.5, 5 / 6, 5 / 6]]))


def test_positional_query_is_the_mlp_of_the_anchor_sine_code():
    """adapt_pos2d of [code(y), code(x)] of each anchor, by hand through its two layers."""
    model, _, _ = build_model(get_config("tiny_anchor_detr"))
    t = model.transformer
    anchors, _ = t.queries(1)
    codes = torch.cat((sine_1d(anchors[..., 1], 32), sine_1d(anchors[..., 0], 32)), -1)
    first, second = t.adapt_pos2d[0], t.adapt_pos2d[2]
    by_hand = torch.relu(codes @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(t.adapt_pos2d(sine_2d(anchors, 32)), by_hand)


def test_boxes_are_relative_to_the_anchors():
    delta = torch.tensor([[0.3, -0.2, 0.1, -1.0]], dtype=torch.float64)
    anchor = torch.tensor([[0.2, 0.6]], dtype=torch.float64)
    logit = torch.log(anchor / (1 - anchor))
    by_hand = torch.cat((torch.sigmoid(delta[:, :2] + logit), torch.sigmoid(delta[:, 2:])), -1)
    torch.testing.assert_close(relative_to_anchors(delta, anchor), by_hand)
    # At initialisation the box head outputs 0 for the centre: every box sits on its anchor.
    model, _, _ = build_model(get_config("tiny_anchor_detr"))
    images, mask, _ = batch()
    with torch.no_grad():
        boxes = model(images, mask)["pred_boxes"]
    anchors, _ = model.transformer.queries(2)
    torch.testing.assert_close(boxes[..., :2], anchors.clamp(1e-5, 1 - 1e-5))
    torch.testing.assert_close(boxes[..., 2:], torch.full_like(boxes[..., 2:],
                                                               torch.sigmoid(torch.tensor(-2.0))))


def test_trains_on_a_padded_mixed_size_batch():
    torch.manual_seed(0)
    model, criterion, post = build_model(get_config("tiny_anchor_detr"))
    images, mask, targets = batch()
    outputs = model(images, mask)
    assert outputs["pred_logits"].shape == (2, 30, 4) and len(outputs["aux_outputs"]) == 1
    loss = total_loss(criterion(outputs, targets), criterion.weight_dict)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert post(outputs, torch.tensor([[96, 128], [80, 100]]))[0]["boxes"].shape == (100, 4)


def test_padding_is_not_attended():
    """Changing the padded pixels' features leaves the RCDA output of a padded image
    unchanged when the keys are the same (the row and column weights of padded
    columns / rows are 0)."""
    torch.manual_seed(2)
    attn = RowColumnAttention(8, 2).double()
    q = torch.randn(1, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[0, 3] = True
    mask[0, :, 4] = True
    v = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    changed = v.clone()
    changed[mask] = 100.0
    torch.testing.assert_close(attn(q, q, k, k, v, mask), attn(q, q, k, k, changed, mask))


def test_tiny_anchor_detr_memorises_two_images():
    assert_memorises_two_images(get_config("tiny_anchor_detr"))


@pytest.mark.parametrize("change, message", [
    (dict(num_patterns=0), "num_patterns=0: expected an integer >= 1"),
    (dict(num_feature_levels=4), "num_feature_levels=4: model='anchor_detr' expects 1"),
    (dict(with_box_refine=True), "model='anchor_detr': expected with_box_refine=False"),
    (dict(nheads=3), "nheads=3: expected a divisor of hidden_dim=64"),
])
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny_anchor_detr", **change)
    with pytest.raises(TypeError, match="num_patterns=2.5"):
        get_config("anchor_detr", num_patterns=2.5)
