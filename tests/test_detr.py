"""The original DETR: facebookresearch/detr's keys, its softmax head with a no-object
class, its matching cost, its post-processing and its position code, each checked
against the official key lists or a computation by hand."""

import argparse
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ddetr_tutorial import cli
from ddetr_tutorial.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.data import make_shapes
from ddetr_tutorial.losses import SetCriterion
from ddetr_tutorial.matcher import HungarianMatcher
from ddetr_tutorial.model import PostProcess
from ddetr_tutorial.model_files import load_model, read_model_file
from ddetr_tutorial.position_encoding import PositionEmbeddingSine
from ddetr_tutorial.weights import load_official_checkpoint
from official import DETR_PRESET_KEYS, official_keys, random_value


@pytest.mark.parametrize("preset", sorted(DETR_PRESET_KEYS))
def test_keys_and_shapes_equal_the_official_detr(preset):
    model, _, _ = build_model(get_config(preset, op_backend="pytorch"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys(DETR_PRESET_KEYS[preset])
    assert model.class_embed.out_features == 92  # 91 COCO ids + "no object"
    assert model.backbone[0].strides[-1] == (16 if preset == "detr_dc5" else 32)


def test_plus_presets_keep_the_focal_head():
    for preset in ("detr_plus", "detr_dc5_plus"):
        cfg = get_config(preset)
        assert cfg.model == "detr" and not cfg.no_object and cfg.position_offset == 0.5
    with pytest.raises(ValueError, match="no_object=True needs model='detr'"):
        get_config("paper", no_object=True)


def test_softmax_loss_equals_weighted_cross_entropy_by_hand():
    torch.manual_seed(0)
    num_classes, eos = 3, 0.1
    logits = torch.randn(1, 4, num_classes + 1)
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[.3, .3, .2, .2],
                                                                     [.7, .6, .3, .2]])}]
    criterion = SetCriterion(num_classes, HungarianMatcher(1, 5, 2, no_object=True),
                             {"loss_ce": 1}, no_object=True, eos_coef=eos)
    boxes = torch.rand(1, 4, 4) * 0.5 + 0.25
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    (queries, gts), = criterion.matcher(outputs, targets)
    wanted = torch.full((4,), num_classes)  # "no object" ...
    wanted[queries] = targets[0]["labels"][gts]  # ... except the matched queries
    log_p = logits[0].log_softmax(-1)
    weights = torch.tensor([1.0 if c < num_classes else eos for c in wanted.tolist()])
    by_hand = -(weights * log_p[torch.arange(4), wanted]).sum() / weights.sum()
    torch.testing.assert_close(criterion(outputs, targets)["loss_ce"], by_hand)


def test_softmax_matching_is_the_cheapest_assignment():
    torch.manual_seed(1)
    logits, boxes = torch.randn(1, 5, 4), torch.rand(1, 5, 4) * 0.4 + 0.3
    labels = torch.tensor([0, 2, 1])
    target_boxes = torch.rand(3, 4) * 0.4 + 0.3
    matcher = HungarianMatcher(1, 5, 2, no_object=True)
    (queries, gts), = matcher({"pred_logits": logits, "pred_boxes": boxes},
                              [{"labels": labels, "boxes": target_boxes}])
    prob = logits[0].softmax(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[0]), box_cxcywh_to_xyxy(target_boxes))
    cost = (-prob[:, labels] + 5 * torch.cdist(boxes[0], target_boxes, p=1) - 2 * giou)
    best = min(itertools.permutations(range(5), 3),
               key=lambda qs: sum(cost[q, t] for t, q in enumerate(qs)))
    assert dict(zip(gts.tolist(), queries.tolist())) == dict(enumerate(best))


def test_postprocess_takes_each_querys_best_real_class():
    logits = torch.tensor([[[0.0, 3.0, 5.0],     # "no object" wins, class 1 is its best real
                            [4.0, 0.0, 0.0]]])   # class 0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5]]])
    out, = PostProcess(num_select=100, no_object=True)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    prob = logits[0].softmax(-1)
    assert out["labels"].tolist() == [0, 1]  # sorted by score: the second query first
    torch.testing.assert_close(out["scores"], torch.stack([prob[1, 0], prob[0, 1]]))
    torch.testing.assert_close(out["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 50.0]))


def test_position_code_has_no_half_pixel_offset():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # a padded column
    code = PositionEmbeddingSine(8, offset=0.0)(mask)
    # Positions count valid pixels (a padded pixel's row count is 0, its column count
    # stays at the last valid one), divided by the valid height / width, times 2 pi.
    y = torch.arange(1, 4.0)[:, None].repeat(1, 4)
    y[:, 3] = 0
    y = y / 3 * 2 * math.pi
    x = torch.tensor([1.0, 2.0, 3.0, 3.0])[None].expand(3, 4) / 3 * 2 * math.pi
    torch.testing.assert_close(code[0, 0], y.sin(), atol=1e-5, rtol=0)  # DETR: p / h * 2pi
    torch.testing.assert_close(code[0, 8], x.sin(), atol=1e-5, rtol=0)
    assert get_config("detr").position_offset == 0.0


def detr_args(**changes):
    """facebookresearch/detr main.py's argparse defaults that name the model."""
    fields = dict(lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, epochs=300,
                  lr_drop=200, clip_max_norm=0.1, backbone="resnet50", dilation=False,
                  position_embedding="sine", enc_layers=6, dec_layers=6, dim_feedforward=2048,
                  hidden_dim=256, dropout=0.1, nheads=8, num_queries=100, pre_norm=False,
                  masks=False, aux_loss=True, set_cost_class=1, set_cost_bbox=5,
                  set_cost_giou=2, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1,
                  dataset_file="coco")
    fields.update(changes)
    return argparse.Namespace(**fields)


@pytest.fixture(scope="module")
def official_detr_dc5(tmp_path_factory):
    """A synthetic detr-r50-dc5 checkpoint saved as DETR's main.py does, biased to "dog"."""
    g = torch.Generator().manual_seed(0)
    state = {k: random_value(k, s, g) for k, s in official_keys("detr_r50_dc5").items()}
    state["class_embed.bias"][18] += 10.0  # COCO's "dog"
    path = tmp_path_factory.mktemp("detr") / "detr-r50-dc5.pth"
    torch.save({"model": state, "args": detr_args(dilation=True), "epoch": 499}, path)
    return path, state


def test_official_detr_checkpoint_is_recognised_and_loads(official_detr_dc5, tmp_path):
    path, state = official_detr_dc5
    found = read_model_file(path)
    assert found.describe().startswith(f"{path}: official DETR checkpoint, model=detr "
                                       f"(softmax + no-object), resnet50-DC5")
    cfg = found.cfg
    assert (cfg.no_object, cfg.dilation, cfg.num_classes, cfg.position_offset) == \
        (True, True, 91, 0.0)
    model, _, _, meta = load_model(path, device="cpu", op_backend="pytorch")
    reference, _, _ = build_model(get_config("detr_dc5", op_backend="pytorch"))
    load_official_checkpoint(reference, {"model": state, "args": detr_args(dilation=True)})
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        got, expected = model(images, mask), reference.eval()(images, mask)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)

    torch.save(state, tmp_path / "bare.pth")  # no args: the keys, DC5 unknown
    found = read_model_file(tmp_path / "bare.pth")
    assert found.cfg.no_object and not found.cfg.dilation and found.found_in == "its keys"


def test_official_detr_predicts_coco_names(official_detr_dc5, tmp_path, capsys):
    make_shapes(tmp_path / "data", num_train=1, num_val=1, size=64, seed=9)
    assert cli.main(["predict", "--checkpoint", str(official_detr_dc5[0]),
                     str(tmp_path / "data" / "val"), "--out", str(tmp_path / "pred"),
                     "--threshold", "0", "--device", "cpu"]) == 0
    assert "official DETR checkpoint" in capsys.readouterr().out
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(predictions) == 100  # one per query, none of them "no object"
    top = max(predictions, key=lambda p: p["score"])
    assert (top["category_id"], top["category_name"]) == (18, "dog")


def test_detr_loss_ignores_no_object_weight_for_matched_queries():
    # eos_coef only weighs the no-object targets: with every query matched it is inert.
    logits = torch.randn(1, 2, 3)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[.3, .3, .2, .2],
                                                                     [.7, .7, .2, .2]])}]
    outputs = {"pred_logits": logits, "pred_boxes": targets[0]["boxes"][None].clone()}
    losses = [SetCriterion(2, HungarianMatcher(1, 5, 2, no_object=True), {"loss_ce": 1},
                           no_object=True, eos_coef=eos)(outputs, targets)["loss_ce"]
              for eos in (0.1, 0.9)]
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], F.cross_entropy(logits[0], torch.tensor([0, 1])))
