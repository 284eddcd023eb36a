"""Box formats, IoU and generalized IoU (Rezatofighi et al., CVPR 2019).

The model predicts boxes as (cx, cy, w, h) normalized to [0, 1]; areas and
overlaps are easiest in corner form (x0, y0, x1, y1). Every tensor name says
its format. torchvision is not importable here, so these are written by hand.

The pairwise functions check their inputs: a NaN box raises a ValueError that
says NaN (in DETR the "degenerate boxes" assert nearly always meant NaN, detr
#285), and an inverted box raises one that shows the row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """(..., 4) centre-size boxes (cx, cy, w, h) -> (..., 4) corners (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """(..., 4) corners (x0, y0, x1, y1) -> (..., 4) centre-size boxes (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """(..., 4) corner boxes -> (...,) areas. Not validated: inverted boxes give negative areas."""
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def check_boxes_xyxy(boxes_xyxy: Tensor, name: str) -> None:
    """Raise ValueError if `boxes_xyxy` is not (B, 4), holds NaN or inf, or has x1 < x0 or
    y1 < y0."""
    if boxes_xyxy.dim() != 2 or boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (B, 4) in (x0, y0, x1, y1) format, "
                         f"got shape {tuple(boxes_xyxy.shape)}")
    not_finite = ~torch.isfinite(boxes_xyxy).all(-1)  # (B,)
    if not_finite.any():
        row = int(not_finite.nonzero()[0])
        kind = "NaN" if torch.isnan(boxes_xyxy[row]).any() else "inf"
        raise ValueError(f"{name} contains {kind} "
                         f"(first at row {row}: {boxes_xyxy[row].tolist()}); "
                         f"{kind} predictions usually mean training diverged "
                         f"(try a lower learning rate)")
    inverted = (boxes_xyxy[:, 2:] < boxes_xyxy[:, :2]).any(-1)  # (B,)
    if inverted.any():
        row = int(inverted.nonzero()[0])
        raise ValueError(f"{name} must be in (x0, y0, x1, y1) format with x1 >= x0 and y1 >= y0, "
                         f"but row {row} is {boxes_xyxy[row].tolist()} "
                         f"({int(inverted.sum())} inverted rows in all)")


def _upcast(boxes: Tensor) -> Tensor:
    # Areas of fp16/bf16 boxes in pixels overflow or lose precision: work in float32.
    return boxes.float() if boxes.dtype in (torch.float16, torch.bfloat16) else boxes


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    # Two zero-area boxes have union 0 (and intersection 0): answer 0, not 0/0.
    # Replacing the denominator (not the quotient) keeps the gradient finite too.
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def _iou_broadcast(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of corner boxes (..., 4) that broadcast against each other -> (...)."""
    area1, area2 = box_area(boxes1_xyxy), box_area(boxes2_xyxy)
    top_left = torch.max(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])
    bottom_right = torch.min(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
    overlap_wh = (bottom_right - top_left).clamp(min=0)  # disjoint boxes overlap by 0
    inter = overlap_wh[..., 0] * overlap_wh[..., 1]
    union = area1 + area2 - inter
    return _safe_divide(inter, union), union


def _giou_broadcast(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """GIoU of corner boxes (..., 4) that broadcast against each other -> (...).
    Unchecked: the public functions below check their inputs first."""
    iou, union = _iou_broadcast(boxes1_xyxy, boxes2_xyxy)
    top_left = torch.min(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])
    bottom_right = torch.max(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
    enclosing_wh = bottom_right - top_left  # never negative for valid boxes
    enclosing = enclosing_wh[..., 0] * enclosing_wh[..., 1]
    return iou - _safe_divide(enclosing - union, enclosing)


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (B1, 4) and (B2, 4) corner boxes -> (iou, union), each (B1, B2).

    Boxes with union 0 (both zero-area) get IoU 0. fp16/bf16 inputs compute in float32.
    """
    check_boxes_xyxy(boxes1_xyxy, "boxes1")
    check_boxes_xyxy(boxes2_xyxy, "boxes2")
    return _iou_broadcast(_upcast(boxes1_xyxy)[:, None], _upcast(boxes2_xyxy)[None, :])


def generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise generalized IoU of (B1, 4) and (B2, 4) corner boxes -> (B1, B2) in [-1, 1].

    GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest box enclosing A and B
    (Rezatofighi et al., Eq. 1). Unlike IoU it still ranks disjoint boxes by how
    far apart they are, so 1 - GIoU is a useful loss even without overlap.
    """
    check_boxes_xyxy(boxes1_xyxy, "boxes1")
    check_boxes_xyxy(boxes2_xyxy, "boxes2")
    return _giou_broadcast(_upcast(boxes1_xyxy)[:, None], _upcast(boxes2_xyxy)[None, :])


def paired_generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """GIoU of each box with its partner: (B, 4) and (B, 4) corner boxes -> (B,).
    The diagonal of `generalized_box_iou`, without computing the B x B rest."""
    check_boxes_xyxy(boxes1_xyxy, "boxes1")
    check_boxes_xyxy(boxes2_xyxy, "boxes2")
    if boxes1_xyxy.shape != boxes2_xyxy.shape:
        raise ValueError(f"paired boxes need equal shapes, got {tuple(boxes1_xyxy.shape)} "
                         f"and {tuple(boxes2_xyxy.shape)}")
    return _giou_broadcast(_upcast(boxes1_xyxy), _upcast(boxes2_xyxy))


def batched_generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise GIoU within each of N images: (N, B1, 4) and (N, B2, 4) -> (N, B1, B2)."""
    if boxes1_xyxy.dim() != 3 or boxes2_xyxy.dim() != 3 or len(boxes1_xyxy) != len(boxes2_xyxy):
        raise ValueError(f"expected (N, B1, 4) and (N, B2, 4) boxes, got "
                         f"{tuple(boxes1_xyxy.shape)} and {tuple(boxes2_xyxy.shape)}")
    check_boxes_xyxy(boxes1_xyxy.reshape(-1, boxes1_xyxy.shape[-1]), "boxes1")
    check_boxes_xyxy(boxes2_xyxy.reshape(-1, boxes2_xyxy.shape[-1]), "boxes2")
    return _giou_broadcast(_upcast(boxes1_xyxy)[:, :, None], _upcast(boxes2_xyxy)[:, None, :])
