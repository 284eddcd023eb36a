"""Hybrid matching (H-Deformable-DETR): the mask and the k-fold ground truth by hand;
the one-to-one part is exactly the plain model (the one-to-many queries cannot leak
into it); the one-to-many loss is the set loss against the repeated targets; at
inference the model is plain Deformable DETR with the same keys."""

import pytest
import torch

from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.hybrid import hybrid_attn_mask, repeat_targets
from ddetr_tutorial.losses import total_loss
from family_batch import assert_every_parameter_gets_a_gradient, padded_mixed_size_batch
from test_overfit import assert_memorises_two_images


def test_mask_and_repeated_targets_by_hand():
    mask = hybrid_attn_mask(2, 3)
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    t = {"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.1] * 4, [0.2] * 4]),
         "image_id": 7}
    (r,) = repeat_targets([t], 3)
    assert r["labels"].tolist() == [3, 1, 3, 1, 3, 1] and r["image_id"] == 7
    assert r["boxes"][:, 0].tolist() == pytest.approx([0.1, 0.2] * 3)


def _models():
    torch.manual_seed(0)
    hybrid, criterion, _ = build_model(get_config("tiny_h_deformable_detr",
                                                  pretrained_backbone=None))
    plain, plain_criterion, _ = build_model(get_config("tiny_pretrained",
                                                       pretrained_backbone=None))
    assert list(hybrid.state_dict()) == list(plain.state_dict())  # no extra parameters
    plain.load_state_dict(hybrid.state_dict())
    return hybrid, criterion, plain, plain_criterion


def test_the_one_to_one_part_is_exactly_the_plain_model():
    hybrid, _, plain, _ = _models()
    hybrid.train()
    plain.train()  # dropout is 0 in tiny, the backbone's statistics frozen
    images, mask, _ = padded_mixed_size_batch()
    out, ref = hybrid(images, mask), plain(images, mask)
    assert out.one2many_outputs.pred_logits.shape == (2, 150, 4)
    assert len(out.one2many_outputs.aux_outputs) == 1
    torch.testing.assert_close(out.pred_logits, ref.pred_logits)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes)
    torch.testing.assert_close(out.aux_outputs[0].pred_boxes, ref.aux_outputs[0].pred_boxes)
    # and the one-to-many queries are the next-best proposals, after the first 30
    enc = out.enc_outputs.pred_logits[..., 0]
    assert torch.equal(enc, ref.enc_outputs.pred_logits[..., 0])


def test_inference_is_the_plain_model():
    hybrid, _, plain, _ = _models()
    hybrid.eval()
    plain.eval()
    images, mask, _ = padded_mixed_size_batch()
    out, ref = hybrid(images, mask), plain(images, mask)
    assert out.one2many_outputs is None and out.pred_logits.shape == (2, 30, 4)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes)


def test_one_to_many_loss_is_the_set_loss_on_repeated_targets():
    hybrid, criterion, _, plain_criterion = _models()
    images, mask, targets = padded_mixed_size_batch()
    out = hybrid.train()(images, mask)
    losses = criterion(out, targets)
    by_hand = plain_criterion(out.one2many_outputs, repeat_targets(targets, 6))
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_0"):
        torch.testing.assert_close(losses[f"{name}_one2many"], by_hand[name])
    assert "loss_ce_enc_one2many" not in criterion.weight_dict  # the encoder counts once
    assert criterion.weight_dict["loss_bbox_one2many"] == criterion.weight_dict["loss_bbox"]
    # each object is matched by k = 6 distinct one-to-many queries
    (queries, gts), _ = criterion.matcher(out.one2many_outputs, repeat_targets(targets, 6))
    assert len(set(queries.tolist())) == 12 and sorted(gts.tolist()) == list(range(12))
    loss = total_loss(losses, criterion.weight_dict)
    assert_every_parameter_gets_a_gradient(hybrid, loss)


def test_tiny_h_deformable_detr_memorises_two_images():
    # 64-px images have 85 encoder tokens: 30 + 40 proposals fit
    assert_memorises_two_images(get_config("tiny_h_deformable_detr", num_classes=3,
                                           hybrid_queries=40))


@pytest.mark.parametrize("change", [dict(two_stage=False, with_box_refine=True),
                                    dict(dn_groups=5), dict(model="efficient_detr")])
def test_bad_configs_raise_clear_errors(change):
    with pytest.raises(ValueError, match="hybrid_queries=150: hybrid matching needs"):
        get_config("tiny_h_deformable_detr", **change)


def test_paper_preset():
    cfg = get_config("h_deformable_detr")
    assert (cfg.num_queries, cfg.hybrid_queries, cfg.hybrid_k, cfg.hybrid_weight,
            cfg.two_stage) == (300, 1500, 6, 1.0, True)
