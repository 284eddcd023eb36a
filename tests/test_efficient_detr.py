"""Efficient DETR: the dense part's top-K encoder tokens ARE the decoder's content queries,
their dense boxes its reference boxes (recomputed by hand in float64 from the encoder's
memory), one decoder layer refines them; it trains, memorises two images, and bad
configs say what is wrong."""

import math

import pytest
import torch

from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.data import collate_fn
from ddetr_tutorial.efficient_detr import EfficientDETR
from ddetr_tutorial.losses import total_loss
from ddetr_tutorial.model_files import load_model
from ddetr_tutorial.transformer import DeformableTransformer
from family_batch import assert_every_parameter_gets_a_gradient, padded_mixed_size_batch
from test_overfit import assert_memorises_two_images

K = 30  # tiny_efficient_detr's queries


def linear(module, x):
    return x @ module.weight.T + module.bias


def layer_norm(module, x):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def mlp(head, x):
    *hidden, last = head.layers
    for layer in hidden:
        x = linear(layer, x).clamp(min=0)
    return linear(last, x)


def proposals_by_hand(image_sizes, padded, shapes):
    """Per image, every token's proposal box (cx, cy, w, h) in [0, 1] of the image, or
    None on padding and where a coordinate leaves (0.01, 0.99): (S,) lists. A level's
    mask is the image's, sampled nearest: row i of H shows padded row floor(i * H_pad / H)."""
    out = []
    for h_img, w_img in image_sizes:
        boxes = []
        for lvl, (H, W) in enumerate(shapes):
            valid_h = sum(math.floor(i * padded[0] / H) < h_img for i in range(H))
            valid_w = sum(math.floor(j * padded[1] / W) < w_img for j in range(W))
            for i in range(H):
                for j in range(W):
                    box = ((j + 0.5) / valid_w, (i + 0.5) / valid_h, 0.05 * 2 ** lvl,
                           0.05 * 2 ** lvl)
                    inside = i < valid_h and j < valid_w and all(0.01 < v < 0.99 for v in box)
                    boxes.append(box if inside else None)
        out.append(boxes)
    return out


@pytest.fixture(scope="module")
def run():
    """The tiny model in float64 on a padded batch (96x64 and 64x96), with the encoder's
    memory and the decoder's inputs captured."""
    torch.manual_seed(0)
    model, _, _ = build_model(get_config("tiny_efficient_detr", pretrained_backbone=None,
                                         op_backend="pytorch"))
    model = model.double().eval()
    images, mask, _ = collate_fn([(torch.randn(3, 96, 64), None), (torch.randn(3, 64, 96), None)])
    seen = {}
    hooks = [model.transformer.encoder.register_forward_hook(
                 lambda _, a, out: seen.update(memory=out)),
             model.transformer.decoder.register_forward_pre_hook(
                 lambda _, args: seen.update(decoder=args)),
             model.transformer.decoder.register_forward_hook(
                 lambda _, a, out: seen.update(hs=out.hs))]
    with torch.no_grad():
        out = model(images.double(), mask)
    for hook in hooks:
        hook.remove()
    return model, mask, seen, out


def test_queries_are_the_top_k_encoder_tokens_and_their_boxes(run):
    model, mask, seen, out = run
    transformer, memory = model.transformer, seen["memory"]  # (N, S, C)
    tgt, reference, _, shapes, *_, query_pos, padding = seen["decoder"]
    shapes = [tuple(s) for s in shapes.tolist()]
    proposals = proposals_by_hand([(96, 64), (64, 96)], mask.shape[1:], shapes)
    dense_class, dense_boxes = transformer.decoder.class_embed[1], transformer.decoder.bbox_embed[1]
    assert tgt.shape == (2, K, 64) and reference.shape == (2, K, 4)
    for n in range(2):
        valid = torch.tensor([p is not None for p in proposals[n]])
        # at these sizes no proposal reaches the border: the invalid tokens are the padding
        assert torch.equal(valid, ~padding[n]) and not valid.all()
        features = layer_norm(transformer.enc_output_norm,
                              linear(transformer.enc_output, memory[n] * valid[:, None]))
        score = linear(dense_class, features)[:, 0]  # (S,) "object" logit
        order = score.masked_fill(~valid, -math.inf).argsort(descending=True)[:K]
        # the content queries are those tokens' encoder features themselves ...
        torch.testing.assert_close(tgt[n], memory[n, order], rtol=0, atol=0)
        # ... and the reference boxes their dense boxes: offsets from the proposals
        logit_proposal = torch.tensor([proposals[n][i] for i in order.tolist()],
                                      dtype=torch.float64).logit()
        boxes = (mlp(dense_boxes, features[order]) + logit_proposal).sigmoid()
        torch.testing.assert_close(reference[n], boxes)
        # the dense part's predictions are what the dense loss sees
        torch.testing.assert_close(out["enc_outputs"]["pred_logits"][n, :, 0], score)
        torch.testing.assert_close(out["enc_outputs"]["pred_boxes"][n, order], boxes)
        assert valid[order].all() and not valid.all()  # padding tokens are never chosen
        # the positional query: the boxes' sine code, Linear(2C -> C), LayerNorm
        sine = DeformableTransformer.proposal_pos_embed(boxes.logit()[None], 32)[0]
        torch.testing.assert_close(query_pos[n], layer_norm(
            transformer.pos_trans_norm, linear(transformer.pos_trans, sine)))


def test_one_decoder_layer_refines_the_dense_boxes(run):
    model, _, seen, out = run
    assert len(model.transformer.decoder.layers) == 1
    assert len(model.transformer.encoder.layers) == 3
    assert out["aux_outputs"] == []  # no earlier decoder layers to supervise
    reference, hs = seen["decoder"][1], seen["hs"]
    delta = mlp(model.bbox_embed[0], hs[0])
    torch.testing.assert_close(out["pred_boxes"], (delta + reference.logit()).sigmoid())
    torch.testing.assert_close(out["pred_logits"], linear(model.class_embed[0], hs[0]))
    for preset in ("efficient_detr", "tiny_efficient_detr"):
        cfg = get_config(preset)
        assert (cfg.model, cfg.enc_layers, cfg.dec_layers) == ("efficient_detr", 3, 1)
    cfg = get_config("efficient_detr")
    assert (cfg.backbone, cfg.hidden_dim, cfg.num_queries, cfg.num_feature_levels) == \
        ("resnet50", 256, 100, 4)
    assert (cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou) == (2, 5, 2)


def test_trains_on_a_padded_mixed_size_batch():
    torch.manual_seed(0)
    model, criterion, post = build_model(get_config("tiny_efficient_detr"))
    assert isinstance(model, EfficientDETR)
    images, mask, targets = padded_mixed_size_batch()
    outputs = model(images, mask)
    losses = criterion(outputs, targets)
    dense = ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc")  # the dense part's set loss
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in dense)
    assert set(dense) <= set(criterion.weight_dict)
    loss = total_loss(losses, criterion.weight_dict)
    assert_every_parameter_gets_a_gradient(model, loss)
    for name in ("transformer.pos_trans.weight", "transformer.decoder.class_embed.1.weight",
                 "transformer.encoder.layers.2.linear2.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert post(outputs, torch.tensor([[96, 64], [64, 96]]))[0]["boxes"].shape == (100, 4)


def test_tiny_efficient_detr_memorises_two_images():
    assert_memorises_two_images(get_config("tiny_efficient_detr", num_classes=3))


@pytest.mark.parametrize("change, message", [
    (dict(two_stage=False), "two_stage=False: expected True with model='efficient_detr'"),
    (dict(with_box_refine=False), "two_stage=True needs with_box_refine=True"),
    (dict(model="efficient-detr"), "model='efficient-detr': expected one of"),
    (dict(dec_layers=0), "dec_layers=0: expected an integer >= 1"),
])
def test_bad_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny_efficient_detr", **change)


def test_more_queries_than_tokens_is_a_clear_error():
    model, _, _ = build_model(get_config("tiny_efficient_detr", pretrained_backbone=None,
                                         num_queries=200))
    with pytest.raises(ValueError, match="num_queries=200 is more than the 85 encoder tokens"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    transformer = build_model(get_config("tiny"))[0].transformer
    with pytest.raises(TypeError, match="expected an EfficientTransformer, got "
                                        "DeformableTransformer"):
        EfficientDETR(None, transformer, 4, 30, 4)


def test_a_saved_model_loads_strictly_and_predicts_the_same(tmp_path):
    torch.manual_seed(3)
    cfg = get_config("tiny_efficient_detr", pretrained_backbone=None)
    model, _, _ = build_model(cfg)
    path = tmp_path / "efficient.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0, "step": 0},
               path)
    loaded, loaded_cfg, _, _ = load_model(path, device="cpu")
    assert isinstance(loaded, EfficientDETR) and loaded_cfg == cfg
    images, mask = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    with torch.no_grad():
        got, expected = loaded(images, mask), model.eval()(images, mask)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)
