"""Sparse R-CNN: each mechanism against a computation by hand (the dynamic interaction,
the box deltas, the FPN, the pyramid pooler), then the model's contracts: proposals
start as the whole image, boxes are detached between stages, each stage its own
weights, the set loss on every stage, and the config's rules."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.fpn import FPN
from ddetr_tutorial.losses import total_loss
from ddetr_tutorial.roi_align import pyramid_levels, pyramid_roi_align, roi_align_reference
from ddetr_tutorial.sparse_rcnn import DynamicConv, SparseRCNN, apply_deltas, image_whwh
from family_batch import assert_every_parameter_gets_a_gradient, padded_mixed_size_batch
from test_overfit import assert_memorises_two_images


def tiny(**overrides):
    return get_config("tiny_sparse_rcnn", pretrained_backbone=None, **overrides)


def test_dynamic_conv_is_two_generated_matrices_per_proposal():
    """The paper's Fig. 4 pseudo-code, one proposal at a time; as the official code, the
    final linear is followed by LayerNorm and ReLU (Fig. 4 stops at the linear)."""
    torch.manual_seed(0)
    C, D, B = 8, 3, 5
    conv = DynamicConv(C, D, pooler_resolution=2).double()
    pro, rois = torch.randn(1, B, C).double(), torch.randn(4, B, C).double()
    expected = []
    for b in range(B):  # by hand: this proposal's parameters, its own 2x2 RoI bins
        params = conv.dynamic_layer.weight @ pro[0, b] + conv.dynamic_layer.bias
        W1, W2 = params[:C * D].reshape(C, D), params[C * D:].reshape(D, C)
        x = rois[:, b]  # (S, C)
        x = F.relu(F.layer_norm(x @ W1, (D,), conv.norm1.weight, conv.norm1.bias))
        x = F.relu(F.layer_norm(x @ W2, (C,), conv.norm2.weight, conv.norm2.bias))
        y = conv.out_layer.weight @ x.flatten() + conv.out_layer.bias
        expected.append(F.relu(F.layer_norm(y, (C,), conv.norm3.weight, conv.norm3.bias)))
    torch.testing.assert_close(conv(pro, rois), torch.stack(expected))


def test_apply_deltas_by_hand():
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])  # w 40, h 20, centre (30, 30)
    assert torch.equal(apply_deltas(torch.zeros(1, 4), box), box)
    # dx = 1 moves the centre by w / 2 (weight 2); dw = log 2 doubles the width
    moved = apply_deltas(torch.tensor([[1.0, -2.0, math.log(2.0), 0.0]]), box)
    torch.testing.assert_close(moved, torch.tensor([[10.0, 0.0, 90.0, 20.0]]))
    huge = apply_deltas(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), box)
    assert torch.isfinite(huge).all()  # the w, h deltas are clamped before exp


def test_fpn_top_down_by_hand():
    torch.manual_seed(0)
    fpn = FPN([4, 6, 8], 5, strides=[8, 16, 32]).double()
    c = [torch.randn(1, 4, 9, 9).double(), torch.randn(1, 6, 5, 5).double(),
         torch.randn(1, 8, 3, 3).double()]
    lat = [fpn.lateral[i](c[i]) for i in range(3)]
    top5 = lat[2]
    top4 = lat[1] + F.interpolate(top5, size=(5, 5), mode="nearest")
    top3 = lat[0] + F.interpolate(top4, size=(9, 9), mode="nearest")
    expected = [fpn.output[0](top3), fpn.output[1](top4), fpn.output[2](top5)]
    for got, want in zip(fpn(c), expected):
        torch.testing.assert_close(got, want)


def test_pyramid_levels_follow_fpn_eq1():
    sides = torch.tensor([20.0, 56.0, 111.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    # floor(4 + log2(side / 224)) clamped to P2..P5, as indices from P2
    assert pyramid_levels(boxes, 4).tolist() == [0, 0, 0, 1, 2, 2, 3, 3]


def test_pyramid_roi_align_pools_each_box_from_its_level():
    torch.manual_seed(0)
    strides = [4, 8, 16, 32]
    maps = [torch.randn(2, 3, 256 // s, 192 // s).double() for s in strides]
    boxes = [torch.tensor([[0.0, 0.0, 192.0, 256.0], [10.0, 5.0, 30.0, 25.0]]).double(),
             torch.tensor([[-200.0, -200.0, 300.0, 300.0],  # crosses the border
                           [20.0, 20.0, 250.0, 250.0]]).double()]
    out = pyramid_roi_align(maps, boxes, strides, output_size=7, sampling_ratio=2)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)).double(), b], 1)
                      for i, b in enumerate(boxes)])
    levels = pyramid_levels(rois[:, 1:], 4)
    assert levels.tolist() == [1, 0, 3, 2]  # sides 222 -> P3, 20 -> P2, 500 -> P5, 230 -> P4
    for k in range(4):
        lvl = int(levels[k])
        want = roi_align_reference(maps[lvl], rois[k:k + 1], 7, 1.0 / strides[lvl], 2,
                                   aligned=True)
        torch.testing.assert_close(out[k:k + 1], want)


def test_proposals_start_as_the_whole_unpadded_image():
    torch.manual_seed(0)
    model = build_model(tiny())[0].eval()
    torch.testing.assert_close(model.init_proposal_boxes.weight,
                               torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(30, 4))
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 40:] = True
    mask[1, :, 72:] = True
    assert image_whwh(mask).tolist() == [[80, 64, 80, 64], [72, 40, 72, 40]]


def test_each_stage_has_its_own_initial_weights():
    model = build_model(tiny())[0]
    heads = model.head.head_series
    assert len(heads) == 6
    assert not torch.equal(heads[0].bboxes_delta.weight, heads[1].bboxes_delta.weight)
    prior = -math.log(0.99 / 0.01)
    for head in heads:
        torch.testing.assert_close(head.class_logits.bias, torch.full((4,), prior))


def _run(model, crit, keep):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    out = model(images, mask)
    losses = crit(out, targets)
    weights = {k: w for k, w in crit.weight_dict.items() if keep(k)}
    return out, total_loss(losses, weights)


def test_boxes_are_detached_between_stages():
    model, crit, _ = build_model(tiny())
    out, loss = _run(model, crit, keep=lambda k: k == "loss_bbox")  # the last stage only
    loss.backward()
    grad = model.init_proposal_boxes.weight.grad
    assert grad is None or not grad.any()  # no path back through the stages' boxes
    model.zero_grad()
    _, loss = _run(model, crit, keep=lambda k: k == "loss_bbox_0")  # the first stage
    loss.backward()
    assert model.init_proposal_boxes.weight.grad.abs().sum() > 0


def test_every_stage_is_supervised_and_outputs_are_relative():
    model, crit, post = build_model(tiny())
    out, loss = _run(model, crit, keep=lambda k: True)
    assert len(out.aux_outputs) == 5
    assert {f"loss_ce_{i}" for i in range(5)} <= set(crit.weight_dict)
    assert out.pred_logits.shape == (2, 30, 4) and out.pred_boxes.shape == (2, 30, 4)
    loss.backward()
    assert torch.isfinite(loss)
    for stage in model.head.head_series:
        assert stage.class_logits.weight.grad.abs().sum() > 0
    detections = post(out, torch.tensor([[64, 64], [64, 64]]))
    assert len(detections[0]["scores"]) == min(100, 30 * 4)  # top scores, no NMS


def test_two_stage_sparse_rcnn_memorises_two_images():
    """The cascade with two of its stages, so that the test stays short. The six-stage tiny
    model memorises them too, but slowly, stage after stage (1 thread, lr 2e-4; smallest
    matched IoU per stage): stages 1-2 >= 0.86 by step 100-200, stage 6 only 0.68 at step
    600; a loss spike near step 700 (2.6 to 6.5) set stages 3-6 back; at step 900 every
    stage is >= 0.80. At lr 1e-4 (2 threads, 0.12 s a step) the last stage oscillates: 0.85
    at step 800, 0.71 at 900, 0.89 at 1100. No fixed step count makes that a stable unit
    test; the traces are in the family issue's closing note. Two stages fit in 200 steps."""
    assert_memorises_two_images(get_config("tiny_sparse_rcnn", dec_layers=2), steps=400,
                                min_steps=200, lr=2e-4)


def test_padded_mixed_size_batch_trains_every_parameter():
    torch.manual_seed(0)
    model, criterion, post = build_model(tiny())
    assert isinstance(model, SparseRCNN)
    images, mask, targets = padded_mixed_size_batch()
    outputs = model(images, mask)
    loss = total_loss(criterion(outputs, targets), criterion.weight_dict)
    assert_every_parameter_gets_a_gradient(model, loss)
    assert model.backbone.body.layer1[0].conv1.weight.grad is None  # C2's stage stays frozen
    # the second image is 64 wide: its whole-image proposals end at x = 64, not 96
    assert image_whwh(mask).tolist() == [[64, 96, 64, 96], [96, 64, 96, 64]]
    assert post(outputs, torch.tensor([[96, 64], [64, 96]]))[0]["boxes"].shape == (100, 4)


@pytest.mark.parametrize("field,value", [("num_feature_levels", 3), ("enc_layers", 2),
                                         ("with_box_refine", True), ("dilation", True)])
def test_config_rules(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


def test_presets():
    paper = get_config("sparse_rcnn")
    assert (paper.num_queries, paper.dec_layers, paper.hidden_dim, paper.dim_dynamic,
            paper.dim_feedforward, paper.lr) == (100, 6, 256, 64, 2048, 2.5e-5)
    model = build_model(paper.replace(num_classes=80))[0]
    n = sum(p.numel() for name, p in model.named_parameters() if name.startswith("head."))
    # per stage: attention 4C^2+4C, dynamic C*2CD+2CD, out 49C^2+C, FFN 2*C*2048+2048+C,
    # 3 + 3 LayerNorms, 4 x (C^2 + 2C) in the cls / reg modules, class 80C+80, box 4C+4
    C, D = 256, 64
    per_stage = (4 * C * C + 4 * C + C * 2 * C * D + 2 * C * D + 2 * D + 2 * C + 49 * C * C + C
                 + 2 * C + 2 * C * 2048 + 2048 + C + 6 * C + 4 * (C * C + 2 * C)
                 + 80 * C + 80 + 4 * C + 4)
    assert n == 6 * per_stage
