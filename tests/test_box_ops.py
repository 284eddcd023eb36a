"""Box conversions, IoU and GIoU: known values, bad inputs, empty and degenerate boxes."""

import pytest
import torch

from ddetr_tutorial.box_ops import (
    batched_generalized_box_iou,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    paired_generalized_box_iou,
)

# Known GIoU losses (1 - GIoU), the cases torchvision checks:
#  identical -> 0; a box of a quarter of the area centred inside -> IoU 1/4, enclosing box
#  = the outer one, so 0.75; equal boxes side by side (touching) -> IoU 0, enclosing box
#  = union, so 1.0; equal boxes touching at one corner -> IoU 0, enclosing area 4, union 2,
#  GIoU = -1/2, so 1.5.
OUTER = [0.0, 0.0, 100.0, 100.0]
GIOU_LOSS_CASES = [
    (OUTER, OUTER, 0.0),
    (OUTER, [25.0, 25.0, 75.0, 75.0], 0.75),
    ([0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0], 1.0),
    ([0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0], 1.5),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12),
                                       (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("box1,box2,loss", GIOU_LOSS_CASES)
def test_giou_known_values(box1, box2, loss, dtype, tol):
    giou = generalized_box_iou(torch.tensor([box1], dtype=dtype), torch.tensor([box2], dtype=dtype))
    assert giou.shape == (1, 1)
    assert abs((1 - giou.item()) - loss) < tol
    # GIoU is symmetric.
    assert abs(generalized_box_iou(torch.tensor([box2], dtype=dtype),
                                   torch.tensor([box1], dtype=dtype)).item() - giou.item()) < tol


def test_iou_known_values_pairwise():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    boxes2 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    iou, union = box_iou(boxes1, boxes2)
    # Overlaps: box (1,1,3,3) with (0,0,2,2) -> 1 of union 7; with (1,0,3,2) -> 2 of union 6.
    expected_iou = torch.tensor([[1.0, 2 / 6, 0.0], [1 / 7, 2 / 6, 0.0]])
    expected_union = torch.tensor([[4.0, 6.0, 5.0], [7.0, 6.0, 5.0]])
    torch.testing.assert_close(iou, expected_iou)
    torch.testing.assert_close(union, expected_union)


def test_giou_equals_iou_when_enclosing_box_is_the_union():
    # Nested boxes: the enclosing box is the outer one, which is the union.
    boxes1 = torch.tensor([[0.1, 0.1, 0.9, 0.9]])
    boxes2 = torch.tensor([[0.2, 0.3, 0.5, 0.6], [0.1, 0.1, 0.9, 0.9]])
    iou, _ = box_iou(boxes1, boxes2)
    torch.testing.assert_close(generalized_box_iou(boxes1, boxes2), iou)


def test_giou_is_between_minus_one_and_iou():
    g = torch.Generator().manual_seed(0)
    boxes1 = box_cxcywh_to_xyxy(torch.rand(20, 4, generator=g))
    boxes2 = box_cxcywh_to_xyxy(torch.rand(30, 4, generator=g))
    iou, _ = box_iou(boxes1, boxes2)
    giou = generalized_box_iou(boxes1, boxes2)
    assert giou.shape == (20, 30)
    assert (giou >= -1).all() and (giou <= iou + 1e-6).all()


def test_paired_and_batched_giou_equal_the_pairwise_one():
    g = torch.Generator().manual_seed(1)
    boxes1 = box_cxcywh_to_xyxy(torch.rand(3, 7, 4, generator=g))
    boxes2 = box_cxcywh_to_xyxy(torch.rand(3, 5, 4, generator=g))
    batched = batched_generalized_box_iou(boxes1, boxes2)
    assert batched.shape == (3, 7, 5)
    for i in range(3):
        pairwise = generalized_box_iou(boxes1[i], boxes2[i])
        torch.testing.assert_close(batched[i], pairwise, rtol=0, atol=0)
        paired = paired_generalized_box_iou(boxes1[i, :5], boxes2[i])
        torch.testing.assert_close(paired, pairwise[:5].diagonal(), rtol=0, atol=0)
    # The known value: a quarter-area box centred inside the other has GIoU 1/4.
    outer, inner = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[0.5, 0.5, 1.5, 1.5]])
    assert paired_generalized_box_iou(outer, inner).item() == pytest.approx(0.25)


def test_paired_and_batched_giou_reject_bad_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        paired_generalized_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(N, B1, 4\) and \(N, B2, 4\)"):
        batched_generalized_box_iou(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match="contains NaN"):
        batched_generalized_box_iou(torch.full((1, 2, 4), float("nan")), torch.zeros(1, 2, 4))


def test_cxcywh_xyxy_round_trip_and_known_value():
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    g = torch.Generator().manual_seed(0)
    boxes_cxcywh = torch.rand(2, 10, 4, generator=g)  # any leading shape
    round_trip = box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes_cxcywh))
    assert round_trip.shape == (2, 10, 4)
    assert (round_trip - boxes_cxcywh).abs().max() < 1e-6


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 0.0]))


@pytest.mark.parametrize("which", ["boxes1", "boxes2"])
@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
def test_nan_is_reported_as_nan(fn, which):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.4]])
    bad = good.clone()
    bad[1, 2] = float("nan")
    args = (bad, good) if which == "boxes1" else (good, bad)
    with pytest.raises(ValueError, match=f"{which} contains NaN"):
        fn(*args)


def test_inf_is_reported():
    boxes = torch.tensor([[0.0, 0.0, float("inf"), 1.0]])
    with pytest.raises(ValueError, match="boxes1 contains inf"):
        generalized_box_iou(boxes, boxes.clone().nan_to_num(posinf=1.0))


@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
def test_inverted_box_names_tensor_and_row(fn):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    inverted = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.25, 1.0]])  # x1 < x0
    with pytest.raises(ValueError, match=r"boxes2 must be in \(x0, y0, x1, y1\).*row 1 is \[0.5"):
        fn(good, inverted)
    with pytest.raises(ValueError, match="boxes1 must be"):
        fn(torch.tensor([[0.0, 0.6, 1.0, 0.5]]), good)  # y1 < y0


def test_wrong_shape_is_a_value_error():
    with pytest.raises(ValueError, match=r"boxes1 must have shape \(B, 4\).*\(3, 5\)"):
        generalized_box_iou(torch.zeros(3, 5), torch.zeros(2, 4))


@pytest.mark.parametrize("fn", [lambda a, b: box_iou(a, b)[0], generalized_box_iou])
def test_empty_inputs_give_empty_results(fn):
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    empty = torch.zeros(0, 4)
    assert fn(empty, boxes).shape == (0, 3)
    assert fn(boxes, empty).shape == (3, 0)
    assert fn(empty, empty).shape == (0, 0)


def test_empty_giou_loss_is_zero_and_backward_works():
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = (1 - generalized_box_iou(pred, torch.zeros(0, 4)).diagonal()).sum()
    loss.backward()
    assert loss.item() == 0 and pred.grad is not None and pred.grad.shape == (0, 4)


def test_zero_area_boxes_stay_finite_with_finite_gradients():
    # Two identical points (union 0, enclosing area 0), a zero-width box vs a normal
    # box, and two collinear zero-height segments: no 0/0 anywhere.
    boxes1 = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.1, 0.2, 0.6], [0.1, 0.3, 0.2, 0.3]],
                          requires_grad=True)
    boxes2 = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.4, 0.6], [0.4, 0.3, 0.6, 0.3]],
                          requires_grad=True)
    giou = generalized_box_iou(boxes1, boxes2)
    iou, _ = box_iou(boxes1, boxes2)
    assert torch.isfinite(giou).all() and torch.isfinite(iou).all()
    assert giou[0, 0] == 0  # undefined overlap of two points is reported as 0, not NaN
    # A zero-width box inside a normal one: IoU 0, enclosing box = the normal box = union.
    assert giou[1, 1].item() == pytest.approx(0.0, abs=1e-7)
    (1 - giou.diagonal()).sum().backward()
    assert torch.isfinite(boxes1.grad).all() and torch.isfinite(boxes2.grad).all()


def test_half_precision_pixel_boxes_do_not_overflow():
    # 300 x 300 pixel boxes: area 90000 > fp16 max (65504); the functions upcast.
    boxes = torch.tensor([[0.0, 0.0, 300.0, 300.0], [150.0, 0.0, 450.0, 300.0]],
                         dtype=torch.float16)
    iou, union = box_iou(boxes, boxes)
    assert iou.dtype == torch.float32 and torch.isfinite(union).all()
    assert iou[0, 1].item() == pytest.approx(1 / 3, abs=1e-3)
    assert torch.isfinite(generalized_box_iou(boxes, boxes)).all()
