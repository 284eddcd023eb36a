"""The detector: official state-dict layout, every variant trains, padding, errors."""


import pytest
import torch

from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.losses import total_loss
from ddetr_tutorial.model import PostProcess
from ddetr_tutorial.recording import record_sampling
from official import PRESET_KEYS, official_keys

OFFICIAL = PRESET_KEYS
PLAIN = {"with_box_refine": False, "two_stage": False}  # the tiny preset has both on
VARIANTS = {
    "plain": PLAIN,
    "single_scale": {**PLAIN, "num_feature_levels": 1},
    "box_refine": {"with_box_refine": True, "two_stage": False},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "dc5": {**PLAIN, "dilation": True},
    "detr": {**PLAIN, "model": "detr"},
    "detr_dc5": {**PLAIN, "model": "detr", "dilation": True},
    "per_level_k1": {**PLAIN, "cross_level_attention": False, "enc_n_points": 1,
                     "dec_n_points": 1},
}


@pytest.mark.parametrize("preset", list(OFFICIAL))
def test_state_dict_matches_official_layout(preset):
    torch.manual_seed(0)
    model, _, _ = build_model(get_config(preset))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = official_keys(OFFICIAL[preset])
    assert sorted(set(ours) - set(theirs)) == []
    assert sorted(set(theirs) - set(ours)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    # A checkpoint in that layout loads strictly and lands where it should.
    synthetic = {k: torch.randn(s) if s else torch.randn(()) for k, s in theirs.items()}
    model.load_state_dict(synthetic, strict=True)
    for key in ("transformer.level_embed", "input_proj.0.1.bias",
                "backbone.0.body.layer4.2.conv3.weight"):
        torch.testing.assert_close(model.state_dict()[key], synthetic[key])


def batch(sizes=((96, 128), (80, 100)), seed=0):
    """Images of mixed sizes padded into one batch, and their targets."""
    g = torch.Generator().manual_seed(seed)
    H = max(h for h, _ in sizes)
    W = max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, H, W)
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    targets = [
        {"labels": torch.tensor([0, 2]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ][:len(sizes)]
    return images, mask, targets


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains(variant):
    torch.manual_seed(0)
    model, criterion, post = build_model(get_config("tiny", **VARIANTS[variant]))
    images, mask, targets = batch()
    outputs = model(images, mask)
    assert outputs["pred_logits"].shape == (2, 30, 4)
    assert outputs["pred_boxes"].shape == (2, 30, 4)
    assert len(outputs["aux_outputs"]) == 1  # 2 decoder layers in the tiny config
    assert ("enc_outputs" in outputs) == (variant == "two_stage")
    losses = criterion(outputs, targets)
    loss = total_loss(losses, criterion.weight_dict)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("layer2" not in n and "layer3" not in n for n in frozen)
    detections = post(outputs, torch.tensor([[96, 128], [80, 100]]))
    # the top 100 of the 30 x 4 (query, class) pairs, as the official PostProcess
    assert detections[0]["boxes"].shape == (100, 4)


def test_eval_forward_is_deterministic():
    torch.manual_seed(0)
    model, _, _ = build_model(get_config("tiny", with_box_refine=True, two_stage=False))
    model.eval()
    images, mask, _ = batch()
    with torch.no_grad():
        first, second = model(images, mask), model(images, mask)
    assert torch.equal(first["pred_logits"], second["pred_logits"])
    assert torch.equal(first["pred_boxes"], second["pred_boxes"])


@pytest.mark.parametrize("variant", ["plain", "box_refine"])
def test_padding_barely_changes_predictions(variant):
    """An image alone and the same image padded inside a batch give close outputs.

    Not identical: the official design normalizes the input projections with
    GroupNorm over the padded maps and the backbone's convolutions see the
    padding at the border, so padding shifts features slightly. (Two-stage is
    left out: its queries are the top-k proposals, whose order such small
    shifts can permute at initialization.)
    """
    torch.manual_seed(0)
    model, _, _ = build_model(get_config("tiny", **VARIANTS[variant]))
    model.eval()
    images, mask, _ = batch(sizes=((96, 128), (128, 160)))
    with torch.no_grad():
        padded = model(images, mask)
        alone = model(images[:1, :, :96, :128], mask[:1, :96, :128])
    boxes_err = (padded["pred_boxes"][0] - alone["pred_boxes"][0]).abs().max()
    probs_err = (padded["pred_logits"][0].sigmoid() - alone["pred_logits"][0].sigmoid()).abs().max()
    assert boxes_err < 0.05 and probs_err < 0.05, (boxes_err, probs_err)


def test_two_stage_needs_box_refinement():
    with pytest.raises(ValueError, match="two_stage=True needs with_box_refine=True"):
        build_model(get_config("tiny", with_box_refine=False, two_stage=True))


def test_more_proposals_than_tokens():
    model, _, _ = build_model(get_config("tiny", with_box_refine=True, two_stage=True,
                                         num_queries=500))
    images, mask, _ = batch(sizes=((64, 64),))
    with pytest.raises(ValueError, match="two_stage_num_proposals=500 is more than the 85 "
                                         "encoder tokens"):
        model(images, mask)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['layers'\]"):
        get_config("tiny", layers=3)


def test_postprocess_scales_boxes():
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 1, 2] = 10.0  # query 1, class 2
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2]]])
    out = PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes},
                                    torch.tensor([[100, 200]]))[0]
    assert out["labels"][0] == 2
    torch.testing.assert_close(out["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))
    with pytest.raises(ValueError, match=r"target_sizes must be \(N, 2\) = \(1, 2\)"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))


def test_per_level_attention_is_an_ablation_not_new_weights():
    # Table 2 without "MS attention": the same parameters, the encoder used differently
    torch.manual_seed(0)
    plain, _, _ = build_model(get_config("tiny", **PLAIN))
    torch.manual_seed(0)
    per_level, _, _ = build_model(get_config("tiny", **PLAIN, cross_level_attention=False))
    assert list(plain.state_dict()) == list(per_level.state_dict())
    per_level.load_state_dict(plain.state_dict())
    images, mask, _ = batch()
    plain.eval(), per_level.eval()
    with torch.no_grad(), record_sampling(plain) as a, record_sampling(per_level) as b:
        plain(images, mask)
        per_level(images, mask)
    # the finest level's pixels (the first tokens) put no weight on levels 1..3
    first = b.encoder[0].attention_weights[:, :10]  # (N, 10, M, L, K)
    assert torch.all(first[..., 1:, :] == 0)
    assert torch.all(a.encoder[0].attention_weights[:, :10] > 0)
