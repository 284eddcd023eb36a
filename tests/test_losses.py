"""Focal loss, SetCriterion (labels, boxes, aux and encoder losses), weights and num_boxes."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddetr_tutorial.losses import (
    SetCriterion,
    average_num_boxes,
    sigmoid_focal_loss,
    total_loss,
    weight_dict,
)
from ddetr_tutorial.matcher import HungarianMatcher

C = 4  # classes


def make_criterion(**kw):
    return SetCriterion(C, HungarianMatcher(), weight_dict(num_decoder_layers=3, two_stage=True),
                        **kw)


def make_outputs(N=2, Q=6, seed=0, aux=0, enc=False):
    g = torch.Generator().manual_seed(seed)

    def layer():
        return {"pred_logits": torch.randn(N, Q, C, generator=g).requires_grad_(),
                "pred_boxes": (0.2 + 0.5 * torch.rand(N, Q, 4, generator=g)).requires_grad_()}
    outputs = layer()
    if aux:
        outputs["aux_outputs"] = [layer() for _ in range(aux)]
    if enc:
        outputs["enc_outputs"] = layer()
    return outputs


def make_targets(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, C, (T,), generator=g),
             "boxes": 0.2 + 0.5 * torch.rand(T, 4, generator=g)} for T in sizes]


# ---------------- sigmoid focal loss ----------------

def test_focal_loss_without_alpha_and_gamma_is_bce():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 5, 3, generator=g)
    onehot = (torch.rand(2, 5, 3, generator=g) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    expected = bce.mean(1).sum() / 2.5  # mean over the queries, summed, / num_boxes
    loss = sigmoid_focal_loss(logits, onehot, num_boxes=2.5, alpha=-1, gamma=0)
    torch.testing.assert_close(loss, expected)


def test_focal_loss_known_values():
    # logit 0 -> p = 0.5, BCE = ln 2 either way, (1 - p_t)^2 = 1/4.
    #   positive: 0.25 * 1/4 * ln 2;  negative: 0.75 * 1/4 * ln 2.
    # logit ln 3 -> p = 3/4; positive: BCE = ln(4/3), (1/4)^2 -> 0.25 * 1/16 * ln(4/3);
    #   negative: BCE = ln 4, (3/4)^2 -> 0.75 * 9/16 * ln 4.
    logits = torch.tensor([[[0.0], [0.0], [math.log(3)], [math.log(3)]]])  # (1, Q=4, 1)
    onehot = torch.tensor([[[1.0], [0.0], [1.0], [0.0]]])
    per_query = [0.25 / 4 * math.log(2), 0.75 / 4 * math.log(2),
                 0.25 / 16 * math.log(4 / 3), 0.75 * 9 / 16 * math.log(4)]
    expected = sum(per_query) / 4 / 2  # mean over Q = 4, num_boxes = 2
    assert (sigmoid_focal_loss(logits, onehot, num_boxes=2).item()
            == pytest.approx(expected, rel=1e-6))


def test_focal_loss_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match=r"same shape \(N, Q, num_classes\)"):
        sigmoid_focal_loss(torch.zeros(1, 3, 2), torch.zeros(1, 3, 3), 1)


# ---------------- SetCriterion ----------------

def test_losses_are_finite_and_gradients_reach_both_heads():
    outputs = make_outputs(aux=2, enc=True)
    targets = make_targets([3, 1])
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v).all() for v in losses.values())
    total_loss(losses, criterion.weight_dict).backward()
    for layer in [outputs, *outputs["aux_outputs"], outputs["enc_outputs"]]:
        for key in ("pred_logits", "pred_boxes"):
            grad = layer[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_keys_for_aux_and_encoder_outputs():
    losses = make_criterion()(make_outputs(aux=2, enc=True), make_targets([2, 2]))
    base = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]
    expected = {"class_error", *base}
    for suffix in ("_0", "_1", "_enc"):
        expected |= {name + suffix for name in base}
    assert set(losses) == expected  # class_error is logged for the last layer only


def test_losses_subset():
    losses = make_criterion(losses=("boxes",))(make_outputs(), make_targets([2, 2]))
    assert set(losses) == {"loss_bbox", "loss_giou"}
    with pytest.raises(ValueError, match="unknown losses \\['masks'\\]"):
        make_criterion(losses=("labels", "masks"))


def perfect_outputs(targets, Q=5):
    """Queries 0..T-1 predict the targets exactly and confidently; the rest predict nothing."""
    logits = torch.full((len(targets), Q, C), -30.0)
    boxes = torch.full((len(targets), Q, 4), 0.5)
    for i, t in enumerate(targets):
        T = len(t["labels"])
        boxes[i, :T] = t["boxes"]
        logits[i, torch.arange(T), t["labels"]] = 30.0
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_perfect_predictions_give_near_zero_losses():
    targets = make_targets([3, 1, 2])
    losses = make_criterion()(perfect_outputs(targets), targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert 0 <= losses[name].item() < 1e-6, name
    assert losses["class_error"].item() == 0


def test_wrong_class_costs_more_than_right_class():
    targets = make_targets([2])
    right = perfect_outputs(targets)
    wrong = {k: v.clone() for k, v in right.items()}
    wrong["pred_logits"][0, :2] = wrong["pred_logits"][0, :2].roll(1, dims=-1)
    criterion = make_criterion()
    loss_wrong = criterion(wrong, targets)
    assert loss_wrong["loss_ce"] > criterion(right, targets)["loss_ce"] + 1
    assert loss_wrong["class_error"].item() == 100


def test_loss_values_on_a_hand_made_match():
    # One image, one target, two queries; query 1 is the obvious match.
    target = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    logits = torch.tensor([[[-5.0, -5.0, -5.0, -5.0], [-5.0, -5.0, 2.0, -5.0]]])
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.4]]])  # half the width
    losses = make_criterion()({"pred_logits": logits, "pred_boxes": boxes}, target)
    assert losses["loss_bbox"].item() == pytest.approx(0.2, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.5, abs=1e-6)  # IoU 1/2, nested
    onehot = torch.zeros(1, 2, C)
    onehot[0, 1, 2] = 1
    expected_ce = sigmoid_focal_loss(logits, onehot, 1.0) * 2
    torch.testing.assert_close(losses["loss_ce"], expected_ce)


def test_all_images_empty_gives_finite_loss_with_zero_box_terms():
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    outputs = make_outputs(aux=1, enc=True)
    criterion = make_criterion()
    losses = criterion(outputs, [empty, dict(empty)])
    for suffix in ("", "_0", "_enc"):
        assert losses["loss_bbox" + suffix].item() == 0
        assert losses["loss_giou" + suffix].item() == 0
        assert losses["loss_ce" + suffix].item() > 0  # every query is a negative
    total = total_loss(losses, criterion.weight_dict)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    # num_boxes clamps to 1: loss_ce is the plain focal sum over all-negative targets.
    expected = sigmoid_focal_loss(outputs["pred_logits"], torch.zeros(2, 6, C), 1.0) * 6
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_image_without_objects_among_others():
    targets = make_targets([0, 3])
    outputs = make_outputs()
    losses = make_criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["cardinality_error"].item() >= 0


def test_box_losses_are_divided_by_num_boxes():
    targets = make_targets([3, 1])
    outputs = make_outputs()
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    indices = criterion.matcher(outputs, targets)
    raw = criterion.loss_boxes(outputs, targets, indices, num_boxes=1.0)
    torch.testing.assert_close(losses["loss_bbox"], raw["loss_bbox"] / 4)
    torch.testing.assert_close(losses["loss_giou"], raw["loss_giou"] / 4)


def test_encoder_loss_is_class_agnostic():
    # Encoder logits that score "object" on class 0 only, at the target boxes: near-zero
    # loss, although the targets' own labels are 1..3.
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                      [0.7, 0.6, 0.3, 0.4]])}]
    outputs = perfect_outputs(targets)
    enc = perfect_outputs([{"labels": torch.zeros(2, dtype=torch.int64),
                            "boxes": targets[0]["boxes"]}])
    losses = make_criterion()({**outputs, "enc_outputs": enc}, targets)
    assert losses["loss_ce_enc"].item() < 1e-6 and losses["loss_giou_enc"].item() < 1e-6


def test_cardinality_error_follows_the_official_rule():
    # A query counts as a detection when its top logit is not the last class, whatever
    # its probability (a "probability > 0.5" rule would count 4 here, not 3).
    logits = torch.full((1, 5, C), -5.0)
    logits[0, 0, 0] = logits[0, 1, 1] = 1.0  # top class not the last: counted
    logits[0, 2:4, C - 1] = 1.0  # top class the last: not counted
    # query 4: all logits equal, argmax is class 0: counted
    targets = make_targets([1])
    boxes = torch.full((1, 5, 4), 0.5)
    losses = make_criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["cardinality_error"].item() == 2.0  # |3 - 1|
    assert not losses["cardinality_error"].requires_grad


def test_wrong_number_of_classes_is_a_value_error():
    outputs = make_outputs()
    with pytest.raises(ValueError, match="3 classes, the criterion expects num_classes=4"):
        make_criterion()({k: v[..., :3] if k == "pred_logits" else v for k, v in outputs.items()},
                         make_targets([1, 1]))


def test_half_precision_outputs():
    outputs = {k: v.detach().half().requires_grad_() for k, v in make_outputs().items()}
    losses = make_criterion()(outputs, make_targets([2, 1]))
    total = total_loss(losses, weight_dict(aux_loss=False))
    assert torch.isfinite(total)
    total.backward()
    assert outputs["pred_boxes"].grad.dtype == torch.float16


# ---------------- num_boxes, weights, total ----------------

def test_average_num_boxes_clamps_to_one():
    assert average_num_boxes(make_targets([0, 0])) == 1.0
    assert average_num_boxes([]) == 1.0
    assert average_num_boxes(make_targets([3, 2])) == 5.0


def test_average_num_boxes_in_a_process_group(tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert average_num_boxes(make_targets([3, 2])) == 5.0
        assert average_num_boxes(make_targets([0])) == 1.0
    finally:
        dist.destroy_process_group()


def test_weight_dict_six_layers():
    weights = weight_dict()
    base = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    expected = dict(base)
    for i in range(5):
        expected.update({f"{k}_{i}": v for k, v in base.items()})
    assert weights == expected
    assert len(weights) == 18 and "loss_ce_5" not in weights


def test_weight_dict_two_stage_and_no_aux():
    weights = weight_dict(two_stage=True)
    assert len(weights) == 21
    assert {k: weights[k] for k in ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc")} == \
        {"loss_ce_enc": 2.0, "loss_bbox_enc": 5.0, "loss_giou_enc": 2.0}
    assert weight_dict(aux_loss=False) == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert weight_dict(cls=1.0, num_decoder_layers=2)["loss_ce_0"] == 1.0


def test_total_loss_weighs_the_shared_keys():
    losses = {"loss_ce": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0),
              "class_error": torch.tensor(50.0)}
    assert total_loss(losses, {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}).item() == 12.0
    with pytest.raises(ValueError, match="no loss in"):
        total_loss({"class_error": torch.tensor(1.0)}, {"loss_ce": 2.0})
