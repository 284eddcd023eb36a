"""Conditional DETR: Atten4Vis/ConditionalDETR's keys, and its three mechanisms (the spatial
query T * sine(s), the per-head concatenation of content and spatial parts in the
cross-attention, boxes relative to s), each recomputed by hand in float64."""

import argparse
import json
import math

import pytest
import torch

from ddetr_tutorial import cli
from ddetr_tutorial.conditional_detr import ConditionalDecoder, sine_embedding
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.data import make_shapes
from ddetr_tutorial.losses import total_loss
from ddetr_tutorial.model_files import init_from, load_model, read_model_file
from ddetr_tutorial.transformer import inverse_sigmoid
from family_batch import assert_every_parameter_gets_a_gradient, padded_mixed_size_batch
from official import CONDITIONAL_DETR_PRESET_KEYS, official_keys, synthetic_official
from test_overfit import assert_memorises_two_images

C, M, Q, LAYERS = 32, 4, 5, 3


@pytest.mark.parametrize("preset", sorted(CONDITIONAL_DETR_PRESET_KEYS))
def test_keys_and_shapes_equal_the_official_conditional_detr(preset):
    model, _, post = build_model(get_config(preset, op_backend="pytorch"))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == list(official_keys(CONDITIONAL_DETR_PRESET_KEYS[preset]).items())  # in order
    assert model.backbone[0].strides[-1] == (16 if preset.endswith("dc5") else 32)
    cfg = get_config(preset)
    assert (cfg.num_queries, cfg.num_select, cfg.no_object, cfg.position_offset) == \
        (300, 100, False, 0.0)
    assert (cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou) == (2, 5, 2)


def sine_by_hand(point, F):
    """One (x, y) -> [PE(y); PE(x)], PE(p)_2i = sin(2 pi p / T^(2i/F)), _2i+1 = cos(same)."""
    code = []
    for p in (point[1], point[0]):
        for j in range(F):
            angle = 2 * math.pi * p / 10000 ** (2 * (j // 2) / F)
            code.append(math.sin(angle) if j % 2 == 0 else math.cos(angle))
    return torch.tensor(code, dtype=torch.float64)


def mlp_by_hand(mlp, x):
    *hidden, last = mlp.layers
    for layer in hidden:
        x = (x @ layer.weight.T + layer.bias).clamp(min=0)
    return x @ last.weight.T + last.bias


def test_sine_embedding_by_hand():
    points = torch.rand(2, 3, 2, dtype=torch.float64)
    got = sine_embedding(points, 8)
    assert got.shape == (2, 3, 16)
    for n in range(2):
        for q in range(3):
            torch.testing.assert_close(got[n, q], sine_by_hand(points[n, q].tolist(), 8))


@pytest.fixture(scope="module")
def decoder_run():
    """A float64 conditional decoder on a padded batch, with what each layer received and
    what each cross-attention returned."""
    torch.manual_seed(0)
    decoder = ConditionalDecoder(C, M, LAYERS, 48, dropout=0.0).double().eval()
    N, S = 2, 7
    query_pos = torch.randn(Q, C, dtype=torch.float64).expand(N, Q, C)
    memory, pos = torch.randn(N, S, C, dtype=torch.float64), torch.randn(N, S, C,
                                                                          dtype=torch.float64)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[1, 4:] = True
    inputs, weights = [], []
    hooks = [layer.register_forward_pre_hook(lambda _, args: inputs.append(args))
             for layer in decoder.layers]
    hooks += [layer.cross_attn.register_forward_hook(lambda _, a, out: weights.append(out[1]))
              for layer in decoder.layers]
    with torch.no_grad():
        hs, reference = decoder(query_pos, memory, pos, padding)
    for hook in hooks:
        hook.remove()
    return decoder, (query_pos, memory, pos, padding), inputs, weights, hs, reference


def test_conditional_spatial_query_by_hand(decoder_run):
    decoder, (query_pos, *_), inputs, _, hs, reference = decoder_run
    s = mlp_by_hand(decoder.ref_point_head, query_pos).sigmoid()  # (N, Q, 2)
    torch.testing.assert_close(reference, s)
    for i, (tgt, _, spatial, *_) in enumerate(inputs):
        sine = torch.stack([torch.stack([sine_by_hand(s[n, q].tolist(), C // 2)
                                         for q in range(Q)]) for n in range(2)])
        # T = FFN(decoder embedding), elementwise; the first layer has no T (its input is 0)
        T = 1 if i == 0 else mlp_by_hand(decoder.query_scale, tgt)
        torch.testing.assert_close(spatial, sine * T, rtol=1e-12, atol=1e-12)
    assert inputs[0][0].abs().max() == 0  # decoded from zeros, as DETR
    assert not torch.allclose(inputs[1][2], inputs[2][2])  # T differs between layers


def test_self_attention_projects_content_and_position_apart(decoder_run):
    decoder, (query_pos, *_), inputs, _, _, _ = decoder_run
    layer, tgt = decoder.layers[1], inputs[1][0]
    lin = lambda module, x: x @ module.weight.T + module.bias  # noqa: E731
    q = lin(layer.sa_qcontent_proj, tgt) + lin(layer.sa_qpos_proj, query_pos)
    k = lin(layer.sa_kcontent_proj, tgt) + lin(layer.sa_kpos_proj, query_pos)
    v, D = lin(layer.sa_v_proj, tgt), C // M
    heads = []
    for h in range(M):
        part = slice(h * D, (h + 1) * D)
        w = (q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(D)).softmax(-1)
        heads.append(w @ v[..., part])
    with torch.no_grad():
        got = layer.self_attn(q, k, v)[0]
    torch.testing.assert_close(got, lin(layer.self_attn.out_proj, torch.cat(heads, -1)))


@pytest.mark.parametrize("layer_index", [0, 1])
def test_cross_attention_adds_content_and_spatial_logits_per_head(decoder_run, layer_index):
    decoder, (query_pos, memory, pos, padding), inputs, weights, _, _ = decoder_run
    layer, (tgt, _, spatial, *_) = decoder.layers[layer_index], inputs[layer_index]
    tgt = layer.norm1(tgt + layer.self_attn(  # the cross-attention's input: after self-attn
        layer.sa_qcontent_proj(tgt) + layer.sa_qpos_proj(query_pos),
        layer.sa_kcontent_proj(tgt) + layer.sa_kpos_proj(query_pos), layer.sa_v_proj(tgt))[0])
    lin = lambda module, x: x @ module.weight.T + module.bias  # noqa: E731
    c_q, c_k = lin(layer.ca_qcontent_proj, tgt), lin(layer.ca_kcontent_proj, memory)
    p_q, p_k = lin(layer.ca_qpos_sine_proj, spatial), lin(layer.ca_kpos_proj, pos)
    if layer_index == 0:  # only the first layer adds the positional query to the content
        c_q, c_k = c_q + lin(layer.ca_qpos_proj, query_pos), c_k + p_k
    D = C // M
    v = lin(layer.ca_v_proj, memory)
    attended = torch.zeros(2, Q, C, dtype=torch.float64)
    for h in range(M):
        part = slice(h * D, (h + 1) * D)
        # [c_q; p_q] . [c_k; p_k] = c_q . c_k + p_q . p_k, scaled for the head dim 2D
        logits = (c_q[..., part] @ c_k[..., part].transpose(1, 2)
                  + p_q[..., part] @ p_k[..., part].transpose(1, 2)) / math.sqrt(2 * D)
        w = logits.masked_fill(padding[:, None], -math.inf).softmax(-1)  # (N, Q, S)
        torch.testing.assert_close(weights[layer_index][:, h], w, rtol=1e-12, atol=1e-12)
        attended[..., part] = w @ v[..., part]
    assert weights[layer_index][1, :, :, 4:].abs().max() == 0  # padding gets no attention
    with torch.no_grad():
        got = layer.cross_attn(*layer.cross_query_key(tgt, query_pos, spatial, memory, pos),
                               v, padding)[0]
    torch.testing.assert_close(got, lin(layer.cross_attn.out_proj, attended))


def test_boxes_are_relative_to_the_reference_point():
    torch.manual_seed(1)
    model, _, _ = build_model(get_config("tiny_conditional_detr", pretrained_backbone=None))
    model = model.double().eval()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        fresh = model(images, mask)
        s = mlp_by_hand(model.transformer.decoder.ref_point_head, model.query_embed.weight)
        s = s.sigmoid().expand(2, -1, -1)
        # the box head's last layer starts at zero: every first box is centred on s
        torch.testing.assert_close(fresh["pred_boxes"][..., :2], s)
        torch.testing.assert_close(fresh["pred_boxes"][..., 2:], torch.full((2, 30, 2), 0.5,
                                                                           dtype=torch.float64))
        for p in model.bbox_embed.parameters():
            p.normal_(0, 0.5)
        captured = []
        hook = model.transformer.register_forward_hook(lambda _, a, out: captured.append(out))
        out = model(images, mask)
        hook.remove()
    hs, reference = captured[0]
    torch.testing.assert_close(reference, s)
    for layer, boxes in enumerate([a["pred_boxes"] for a in out["aux_outputs"]]
                                  + [out["pred_boxes"]]):
        raw = mlp_by_hand(model.bbox_embed, hs[layer])
        logit_s = torch.log(s / (1 - s))
        by_hand = torch.cat([raw[..., :2] + logit_s, raw[..., 2:]], -1).sigmoid()
        torch.testing.assert_close(boxes, by_hand)
    torch.testing.assert_close(inverse_sigmoid(s), torch.log(s / (1 - s)))


def test_trains_on_a_padded_mixed_size_batch():
    torch.manual_seed(0)
    model, criterion, post = build_model(get_config("tiny_conditional_detr"))
    images, mask, targets = padded_mixed_size_batch()
    outputs = model(images, mask)
    assert outputs["pred_logits"].shape == (2, 30, 4) and len(outputs["aux_outputs"]) == 1
    loss = total_loss(criterion(outputs, targets), criterion.weight_dict)
    assert_every_parameter_gets_a_gradient(model, loss)
    # the conditional parts learn: the spatial query's scale, the reference head, the sine proj
    for name in ("transformer.decoder.query_scale.layers.0.weight",
                 "transformer.decoder.ref_point_head.layers.1.weight",
                 "transformer.decoder.layers.1.ca_qpos_sine_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert post(outputs, torch.tensor([[96, 64], [64, 96]]))[0]["boxes"].shape == (100, 4)


def test_tiny_conditional_detr_memorises_two_images():
    assert_memorises_two_images(get_config("tiny_conditional_detr", num_classes=3))


@pytest.mark.parametrize("change, message", [
    (dict(num_feature_levels=4), "num_feature_levels=4: expected 1 with model='conditional_detr'"),
    (dict(with_box_refine=True), "with_box_refine=True: expected False with model='cond"),
    (dict(with_box_refine=True, two_stage=True), "with_box_refine=True: expected False"),
    (dict(no_object=True), "no_object=True: expected False with model='conditional_detr'"),
    (dict(model="conditional-detr"), "model='conditional-detr': expected one of"),
])
def test_bad_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny_conditional_detr", **change)


def conditional_args(**changes):
    """Atten4Vis/ConditionalDETR main.py's argparse defaults that name the model."""
    fields = dict(lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, epochs=50,
                  lr_drop=40, clip_max_norm=0.1, backbone="resnet50", dilation=False,
                  position_embedding="sine", enc_layers=6, dec_layers=6, dim_feedforward=2048,
                  hidden_dim=256, dropout=0.1, nheads=8, num_queries=300, pre_norm=False,
                  masks=False, aux_loss=True, set_cost_class=2, set_cost_bbox=5,
                  set_cost_giou=2, cls_loss_coef=2, bbox_loss_coef=5, giou_loss_coef=2,
                  focal_alpha=0.25, dataset_file="coco")
    fields.update(changes)
    return argparse.Namespace(**fields)


@pytest.fixture(scope="module")
def official_dc5(tmp_path_factory):
    """A synthetic ConditionalDETR_r50dc5 checkpoint saved as its main.py does, biased to
    "dog"."""
    state = synthetic_official(official_keys("conditional_detr_r50_dc5"))
    state["class_embed.bias"][18] += 10.0  # COCO's "dog"
    path = tmp_path_factory.mktemp("cond") / "ConditionalDETR_r50dc5_epoch50.pth"
    torch.save({"model": state, "args": conditional_args(dilation=True), "epoch": 49}, path)
    return path, state


def test_official_conditional_detr_checkpoint_is_recognised_and_loads(official_dc5, tmp_path):
    path, state = official_dc5
    found = read_model_file(path)
    assert found.describe().startswith(
        f"{path}: official Conditional DETR checkpoint, model=conditional_detr (focal), "
        f"resnet50-DC5, single-scale, 300 queries, 91 classes (COCO)")
    assert found.cfg == get_config("conditional_detr_dc5")
    model, cfg, _, _ = load_model(path, device="cpu")
    reference, _, _ = build_model(get_config("conditional_detr_dc5"))
    reference.load_state_dict(state, strict=True)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        got, expected = model(images, mask), reference.eval()(images, mask)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)

    torch.save(state, tmp_path / "bare.pth")  # no args: the keys, DC5 unknown
    found = read_model_file(tmp_path / "bare.pth")
    assert found.found_in == "its keys" and found.cfg == get_config("conditional_detr")


def test_official_conditional_detr_predicts_coco_names(official_dc5, tmp_path, capsys):
    make_shapes(tmp_path / "data", num_train=1, num_val=1, size=64, seed=9)
    assert cli.main(["predict", "--checkpoint", str(official_dc5[0]),
                     str(tmp_path / "data" / "val"), "--out", str(tmp_path / "pred"),
                     "--threshold", "0", "--device", "cpu"]) == 0
    assert "official Conditional DETR checkpoint" in capsys.readouterr().out
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(predictions) == 100  # the top 100 (query, class) pairs
    top = max(predictions, key=lambda p: p["score"])
    assert (top["category_id"], top["category_name"]) == (18, "dog")


def test_fine_tuning_from_it_reinitialises_the_class_head(official_dc5):
    model, _, _ = build_model(get_config("conditional_detr_dc5", num_classes=4))
    report = init_from(model, official_dc5[0])
    assert report.reinitialised == ["class_embed.bias", "class_embed.weight"]
    assert report.skipped == report.missing == report.unexpected == []
    torch.testing.assert_close(model.state_dict()["query_embed.weight"],
                               official_dc5[1]["query_embed.weight"])
