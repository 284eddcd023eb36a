"""The tiny detector, DETR+ and the original DETR on the same backbone, can memorize one
batch: the end-to-end check that the model, matcher and loss fit together (a bug in
any of them stalls this)."""

import pytest
import torch

from ddetr_tutorial.box_ops import box_cxcywh_to_xyxy, box_iou
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.losses import total_loss

SIZE = 64
COLORS = torch.tensor([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0]])


def two_synthetic_images():
    """Two images with coloured rectangles, one class per colour."""
    boxes = [torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.7, 0.65, 0.35, 0.45]]),
             torch.tensor([[0.5, 0.45, 0.5, 0.4]])]
    labels = [torch.tensor([0, 1]), torch.tensor([2])]
    images = torch.zeros(2, 3, SIZE, SIZE)
    for i in range(2):
        for box, label in zip(boxes[i], labels[i]):
            x0, y0, x1, y1 = (box_cxcywh_to_xyxy(box) * SIZE).round().int().tolist()
            images[i, :, y0:y1, x0:x1] = COLORS[label][:, None, None]
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    return images, mask, [{"labels": lab, "boxes": b} for lab, b in zip(labels, boxes)]


# The original DETR: its softmax head with a no-object class, its costs and position code.
ORIGINAL_DETR = dict(model="detr", no_object=True, set_cost_class=1.0, cls_loss_coef=1.0,
                     position_offset=0.0)


def assert_memorises_two_images(cfg, steps=300, fraction=0.1, min_steps=0, lr=2e-4):
    """`cfg`'s model fits two images: the loss falls to `fraction` of its first value within
    `steps` AdamW steps (lr 2e-4 unless given, clip 0.1; at least `min_steps`), and every
    matched box then has IoU > 0.7 with its target."""
    torch.manual_seed(0)
    images, mask, targets = two_synthetic_images()
    model, criterion, _ = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    first = None
    for step in range(steps):
        loss = total_loss(criterion(model(images, mask), targets), criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        first = first if first is not None else loss.item()
        if loss.item() <= fraction * first and step + 1 >= min_steps:
            break
    assert loss.item() <= fraction * first, f"loss fell from {first:.3f} to {loss.item():.3f} only"

    model.eval()
    with torch.no_grad():
        outputs = model(images, mask)
    for i, (queries, gts) in enumerate(criterion.matcher(outputs, targets)):
        predicted = box_cxcywh_to_xyxy(outputs["pred_boxes"][i, queries])
        truth = box_cxcywh_to_xyxy(targets[i]["boxes"][gts])
        iou = box_iou(predicted, truth)[0].diag()
        assert (iou > 0.7).all(), f"image {i}: matched IoU {iou.tolist()}"


@pytest.mark.parametrize("kind", [dict(model="deformable"), dict(model="detr"), ORIGINAL_DETR],
                         ids=["deformable", "detr_plus", "detr"])
def test_tiny_model_overfits_one_batch(kind):
    assert_memorises_two_images(get_config("tiny", **kind, with_box_refine=False,
                                           two_stage=False))
