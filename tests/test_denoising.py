"""DN-Deformable-DETR: the denoising queries cannot leak into the matching part, the
attention mask, the noising and the reconstruction loss by hand, nothing of DN at
inference, and it trains."""

import pytest
import torch

from ddetr_tutorial.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.data import collate_fn
from ddetr_tutorial.denoising import (
    DenoisingCriterion,
    attention_mask,
    denoising_losses,
    dn_indices,
    noise_boxes,
    noise_labels,
)
from ddetr_tutorial.engine import train_step
from ddetr_tutorial.losses import total_loss
from family_batch import assert_every_parameter_gets_a_gradient
from test_overfit import two_synthetic_images

TARGETS = [{"labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def tiny_dn(**changes):
    return build_model(get_config("tiny_dn_deformable_detr", pretrained_backbone=None,
                                  op_backend="pytorch", **changes))


def outputs_with(model, dn, images, mask):
    """The model's training outputs with the dn queries `dn` in place of noised ones."""
    original = model.denoising.queries
    model.denoising.queries = lambda *args, **kwargs: dn
    try:
        return model(images, mask, targets=TARGETS)
    finally:
        model.denoising.queries = original


def layers(output):
    return [output] + list(output.aux_outputs)


def test_perturbing_dn_queries_leaves_matching_outputs_exactly_unchanged():
    torch.manual_seed(0)
    model, _, _ = tiny_dn()
    model.train()
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    dn = model.denoising.queries(TARGETS, model.num_queries)
    G, P = model.denoising.groups, 2
    assert dn.tgt.shape == (2, G * P, 64) and dn.reference_points.shape == (2, G * P, 4)
    # Every dn query changed: other contents, other boxes.
    other = dn._replace(tgt=torch.randn_like(dn.tgt),
                        reference_points=torch.rand_like(dn.reference_points) * 0.8 + 0.1)
    # Only group 1 changed: group 0 must not see it.
    group1 = slice(P, 2 * P)
    one = dn.tgt.clone(), dn.reference_points.clone()
    one[0][:, group1] = torch.randn_like(one[0][:, group1])
    one[1][:, group1] = torch.rand_like(one[1][:, group1]) * 0.8 + 0.1
    with torch.no_grad():
        base = outputs_with(model, dn, images, mask)
        changed = outputs_with(model, other, images, mask)
        changed_one = outputs_with(model, dn._replace(tgt=one[0], reference_points=one[1]),
                                   images, mask)
    assert len(layers(base)) == 2
    for a, b in zip(layers(base), layers(changed)):
        assert torch.equal(a.pred_logits, b.pred_logits)
        assert torch.equal(a.pred_boxes, b.pred_boxes)
    for a, b in zip(layers(base.dn_outputs), layers(changed.dn_outputs)):
        assert not torch.equal(a.pred_boxes, b.pred_boxes)  # the dn part did change
    for a, b in zip(layers(base.dn_outputs), layers(changed_one.dn_outputs)):
        for g in range(G):
            part = slice(g * P, (g + 1) * P)
            same = torch.equal(a.pred_boxes[:, part], b.pred_boxes[:, part]) and \
                torch.equal(a.pred_logits[:, part], b.pred_logits[:, part])
            assert same == (g != 1), f"group {g}"


def test_attention_mask_by_hand():
    # Q = 2 matching queries, then G = 2 groups of P = 2 dn queries; 1 = blocked.
    expected = torch.tensor([[0, 0, 1, 1, 1, 1],
                             [0, 0, 1, 1, 1, 1],
                             [0, 0, 0, 0, 1, 1],
                             [0, 0, 0, 0, 1, 1],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(attention_mask(2, 2, 2), expected)
    assert attention_mask(3, 1, 3).shape == (6, 6)
    assert attention_mask(3, 1, 3)[3:].int().sum(1).tolist() == [2, 2, 2]


def test_label_noise_by_hand():
    labels = torch.arange(4).repeat(5000)  # 20,000 labels of 4 classes
    assert torch.equal(noise_labels(labels, 0.0, 4), labels)
    g = torch.Generator().manual_seed(0)
    noised = noise_labels(labels, 0.2, 4, generator=g)
    g = torch.Generator().manual_seed(0)
    flip = torch.rand(labels.shape, generator=g) < 0.2
    random = torch.randint(0, 4, labels.shape, generator=g)
    assert torch.equal(noised, torch.where(flip, random, labels))
    assert ((noised >= 0) & (noised < 4)).all()
    # A flip draws any class, the same one included: 0.2 * 3 / 4 of labels change.
    assert abs((noised != labels).float().mean().item() - 0.15) < 0.01


def test_box_noise_by_hand():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 1.0, 1.0]])
    boxes = boxes.repeat(1000, 1)
    assert torch.equal(noise_boxes(boxes, 0.0), boxes)
    g = torch.Generator().manual_seed(0)
    noised = noise_boxes(boxes, 0.4, generator=g)
    u = torch.rand(boxes.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w, h = boxes[:, 2], boxes[:, 3]
    by_hand = torch.stack([boxes[:, 0] + u[:, 0] * 0.4 * w / 2, boxes[:, 1] + u[:, 1] * 0.4 * h / 2,
                           w + u[:, 2] * 0.4 * w, h + u[:, 3] * 0.4 * h], 1).clamp(0, 1)
    torch.testing.assert_close(noised, by_hand, rtol=0, atol=1e-6)
    assert ((noised >= 0) & (noised <= 1)).all()
    shift = (noised[:, :2] - boxes[:, :2]).abs()
    assert (shift <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all()
    inside = (boxes[:, :2] - boxes[:, 2:] > 0).all(1) & (boxes[:, :2] + boxes[:, 2:] < 1).all(1)
    ratio = noised[inside, 2:] / boxes[inside, 2:]
    assert ((ratio >= 0.6 - 1e-6) & (ratio <= 1.4 + 1e-6)).all()
    assert (noised[:, 0] < 0.1).any() and (noised[:, 0] > 0.1).any()
    assert (noised == 1).any()  # the whole-image boxes grow past 1 and are clipped


def test_dn_loss_by_hand_for_one_layer():
    torch.manual_seed(0)
    G, P, classes = 3, 2, 4
    logits = torch.randn(2, G * P, classes, dtype=torch.float64)
    boxes = torch.rand(2, G * P, 4, dtype=torch.float64) * 0.4 + 0.3
    targets = [{k: v.double() if k == "boxes" else v for k, v in t.items()} for t in TARGETS]
    losses = denoising_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, G)
    ce = l1 = giou = 0.0
    real = 0
    for i, t in enumerate(targets):
        for g in range(G):
            for j in range(len(t["labels"])):  # query g * P + j reconstructs target j
                q = g * P + j
                p = logits[i, q].sigmoid()
                onehot = torch.zeros(classes, dtype=torch.float64)
                onehot[t["labels"][j]] = 1
                p_t = torch.where(onehot == 1, p, 1 - p)
                alpha_t = torch.where(onehot == 1, 0.25, 0.75)
                ce = ce + (-alpha_t * (1 - p_t) ** 2 * p_t.log()).sum()
                l1 = l1 + (boxes[i, q] - t["boxes"][j]).abs().sum()
                giou = giou + 1 - generalized_box_iou(box_cxcywh_to_xyxy(boxes[i, q][None]),
                                                      box_cxcywh_to_xyxy(t["boxes"][j][None]))[0, 0]
                real += 1
    assert real == 9
    # The focal term is computed in float32, as the set criterion's.
    torch.testing.assert_close(losses["loss_ce"].double(), ce / real, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_bbox"], l1 / real)
    torch.testing.assert_close(losses["loss_giou"], giou / real)
    assert [q.tolist() for q, _ in dn_indices(targets, G)] == [[0, 1, 2, 3, 4, 5], [0, 2, 4]]


def test_criterion_adds_the_dn_loss_of_every_layer():
    model, criterion, _ = tiny_dn()
    assert isinstance(criterion, DenoisingCriterion)
    model.train()
    torch.manual_seed(0)
    outputs = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool),
                    targets=TARGETS)
    losses = criterion(outputs, TARGETS)
    layers = (("_dn", outputs.dn_outputs), ("_dn_0", outputs.dn_outputs.aux_outputs[0]))
    for suffix, layer in layers:
        by_hand = denoising_losses(layer, TARGETS, 5)
        for name in ("loss_ce", "loss_bbox", "loss_giou"):
            assert torch.equal(losses[name + suffix], by_hand[name])
            assert criterion.weight_dict[name + suffix] == criterion.weight_dict[name]
    plain = build_model(get_config("tiny_pretrained", pretrained_backbone=None))[1]
    assert set(criterion.weight_dict) - set(plain.weight_dict) == {
        f"{n}{s}" for n in ("loss_ce", "loss_bbox", "loss_giou") for s in ("_dn", "_dn_0")}


def test_no_dn_at_eval_and_outputs_equal_a_plain_model():
    torch.manual_seed(0)
    model, _, _ = tiny_dn()
    plain, _, _ = build_model(get_config("tiny_pretrained", pretrained_backbone=None,
                                         op_backend="pytorch"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("denoising.")}
    assert set(model.state_dict()) - set(state) == {"denoising.label_embed.weight"}
    plain.load_state_dict(state, strict=True)
    model.eval(), plain.eval()
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        ours, theirs = model(images, mask, targets=TARGETS), plain(images, mask)
    assert ours.dn_outputs is None and "dn_outputs" not in ours
    assert ours.pred_logits.shape[1] == model.num_queries
    for a, b in zip(layers(ours) + [ours.enc_outputs], layers(theirs) + [theirs.enc_outputs]):
        assert torch.equal(a.pred_logits, b.pred_logits)
        assert torch.equal(a.pred_boxes, b.pred_boxes)


def test_trains_on_a_padded_mixed_size_batch():
    torch.manual_seed(0)
    model, criterion, post = build_model(get_config("tiny_dn_deformable_detr"))
    images, mask, _ = collate_fn([(torch.randn(3, 96, 64), None), (torch.randn(3, 64, 96), None)])
    model.train()
    outputs = model(images, mask, targets=TARGETS)
    losses = criterion(outputs, TARGETS)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0
               for k in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn_0"))
    loss = total_loss(losses, criterion.weight_dict)
    assert_every_parameter_gets_a_gradient(model, loss)
    assert model.denoising.label_embed.weight.grad.abs().sum() > 0
    assert post(outputs, torch.tensor([[96, 64], [64, 96]]))[0]["boxes"].shape == (100, 4)
    # A batch without any object has nothing to reconstruct: no dn queries.
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    outputs = model(images, mask, targets=empty)
    assert outputs.dn_outputs is None
    model.zero_grad()
    total_loss(criterion(outputs, empty), criterion.weight_dict).backward()
    # the embedding still takes part (a zero gradient), so DDP finds no unused parameter
    assert torch.equal(model.denoising.label_embed.weight.grad,
                       torch.zeros_like(model.denoising.label_embed.weight))


def test_train_step_gives_a_dn_model_its_targets():
    torch.manual_seed(0)
    model, criterion, _ = tiny_dn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    logs = train_step(model.train(), criterion, (images, mask, TARGETS), optimizer,
                      torch.device("cpu"))
    assert logs["loss_bbox_dn"] > 0 and logs["loss_ce_dn_0"] > 0


def test_tiny_dn_deformable_detr_memorises_two_images():
    torch.manual_seed(0)
    images, mask, targets = two_synthetic_images()
    model, criterion, _ = build_model(get_config("tiny_dn_deformable_detr", num_classes=3))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)
    # The matching part's set loss must fall as a plain model's does; the dn part's
    # has a floor (its noise is drawn anew every step) but must fall too.
    matching = {k: w for k, w in criterion.weight_dict.items() if "_dn" not in k}
    denoising = {k: w for k, w in criterion.weight_dict.items() if "_dn" in k}
    first = None
    for _ in range(300):
        losses = criterion(model(images, mask, targets=targets), targets)
        loss = total_loss(losses, criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        now = total_loss(losses, matching).item(), total_loss(losses, denoising).item()
        first = first if first is not None else now
        if now[0] <= 0.1 * first[0]:
            break
    assert now[0] <= 0.1 * first[0], f"set loss fell from {first[0]:.3f} to {now[0]:.3f} only"
    assert now[1] <= 0.75 * first[1], f"dn loss fell from {first[1]:.3f} to {now[1]:.3f} only"
    model.eval()
    with torch.no_grad():
        outputs = model(images, mask)
    for i, (queries, gts) in enumerate(criterion.matcher(outputs, targets)):
        iou = box_iou(box_cxcywh_to_xyxy(outputs["pred_boxes"][i, queries]),
                      box_cxcywh_to_xyxy(targets[i]["boxes"][gts]))[0].diag()
        assert (iou > 0.7).all(), f"image {i}: matched IoU {iou.tolist()}"


def test_presets():
    paper, tiny = get_config("dn_deformable_detr"), get_config("tiny_dn_deformable_detr")
    assert (paper.dn_groups, paper.dn_label_noise, paper.dn_box_noise) == (5, 0.2, 0.4)
    assert paper.two_stage and paper.with_box_refine and paper.hidden_dim == 256
    assert tiny.replace(dn_groups=0) == get_config("tiny_pretrained")
    assert get_config("paper").dn_groups == 0


@pytest.mark.parametrize("change, error, message", [
    (dict(dn_groups=-1), ValueError, "dn_groups=-1: expected an integer >= 0"),
    (dict(dn_groups=2.5), TypeError, "dn_groups=2.5"),
    (dict(dn_label_noise=1.5), ValueError, "dn_label_noise=1.5: expected a number >= 0.0"),
    (dict(dn_box_noise=-0.1), ValueError, "dn_box_noise=-0.1: expected a number >= 0.0"),
    (dict(two_stage=False), ValueError, "dn_groups=5: denoising needs model='deformable' with "
                                        "two_stage=True"),
    (dict(model="detr", two_stage=False, with_box_refine=False), ValueError,
     "dn_groups=5: denoising needs"),
])
def test_bad_configs_raise_clear_errors(change, error, message):
    with pytest.raises(error, match=message):
        get_config("tiny_dn_deformable_detr", **change)
