"""The set criterion: sigmoid focal loss (or DETR's softmax), L1 and GIoU on matched pairs.

After the matcher pairs queries with targets, every query is supervised:
matched ones towards their target's class and box, the others towards "no
object". DETR's softmax has an explicit no-object class, down-weighted by
eos_coef = 0.1 because most queries are unmatched. Deformable DETR replaces it
with a sigmoid focal loss (Lin et al., 2017), where "no object" means all class
probabilities low, and repeats the loss on every decoder layer (auxiliary
losses) and, in the two-stage variant, on the encoder's class-agnostic proposals.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou

LOSS_NAMES = ("labels", "boxes", "cardinality")


def sigmoid_focal_loss(logits: Tensor, targets_onehot: Tensor, num_boxes: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al., Eq. 5) -> scalar.

    logits, targets_onehot: (N, Q, num_classes). Scaled as the official code:
    mean over the Q queries, summed over the rest, divided by num_boxes (the
    criterion multiplies by Q again). alpha < 0 turns the alpha weighting off;
    alpha < 0 and gamma = 0 is plain binary cross-entropy.
    """
    if logits.dim() != 3 or targets_onehot.shape != logits.shape:
        raise ValueError(f"expected logits and targets_onehot of the same shape "
                         f"(N, Q, num_classes), "
                         f"got {tuple(logits.shape)} and {tuple(targets_onehot.shape)}")
    # float32 math: (1 - p_t)^gamma underflows in fp16 long before it matters in fp32.
    logits, targets_onehot = logits.float(), targets_onehot.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets_onehot, reduction="none")
    p_t = prob * targets_onehot + (1 - prob) * (1 - targets_onehot)  # prob of the right answer
    loss = ce * (1 - p_t) ** gamma  # easy examples (p_t near 1) are down-weighted
    if alpha >= 0:
        loss = (alpha * targets_onehot + (1 - alpha) * (1 - targets_onehot)) * loss
    return loss.mean(1).sum() / num_boxes


def average_num_boxes(targets: list[dict], device: torch.device | str = "cpu") -> float:
    """Targets per process, averaged over all processes, clamped to >= 1.

    Every process divides its box losses by the same number, so the gradients
    DDP averages weigh each box equally; the clamp keeps a batch of empty images
    from dividing by zero.
    """
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return max(float(num_boxes.item()), 1.0)


def _matched_queries(indices: list[tuple[Tensor, Tensor]], device) -> tuple[Tensor, Tensor]:
    """(image_idx, query_idx), each (T_matched,), of the matched queries of the batch."""
    image_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    query_idx = torch.cat([q for q, _ in indices])
    return image_idx.to(device), query_idx.to(device)


def _matched_targets(targets: list[dict], indices, key: str, device) -> Tensor:
    """targets[i][key] of the matched targets, in the order of `_matched_queries`."""
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices)]).to(device)


class SetCriterion(nn.Module):
    """Matches outputs to targets and returns the unweighted losses (a dict).

    Keys: loss_ce, loss_bbox, loss_giou, cardinality_error, class_error (the last
    two for logging only); then the same with suffix `_{i}` for aux_outputs[i],
    and `_enc` for the two-stage encoder proposals. Weigh them with `total_loss`.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float],
                 losses=LOSS_NAMES, focal_alpha: float = 0.25, no_object: bool = False,
                 eos_coef: float = 0.1):
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; choose from {LOSS_NAMES}")
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, dict(weight_dict)
        self.losses, self.focal_alpha = tuple(losses), focal_alpha
        self.no_object = no_object  # DETR's softmax head: num_classes + 1 logits
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef  # most queries are "no object": weigh them less
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """outputs: `pred_logits` (N, Q, num_classes), `pred_boxes` (N, Q, 4), optional
        `aux_outputs` and `enc_outputs`; targets: N dicts of `labels` (T_i,), `boxes` (T_i, 4)."""
        num_classes = outputs["pred_logits"].shape[-1] - self.no_object
        if num_classes != self.num_classes:
            raise ValueError(f"pred_logits has {num_classes + self.no_object} classes, the "
                             f"criterion expects num_classes={self.num_classes}"
                             + (" + 1 (no object)" if self.no_object else ""))
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self.layer_losses(outputs, targets, num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.layer_losses(aux, targets, num_boxes, suffix=f"_{i}"))
        if "enc_outputs" in outputs:
            # Encoder proposals only have to find objects, not name them: every
            # target becomes class 0 and the proposals' first logit learns "object".
            class_agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self.layer_losses(outputs["enc_outputs"], class_agnostic, num_boxes,
                                            suffix="_enc"))
        return losses

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float,
                     log: bool = False, suffix: str = "") -> dict[str, Tensor]:
        """Match one layer's outputs and compute its losses, keys ending in `suffix`."""
        indices = self.matcher(outputs, targets)
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        if "cardinality" in self.losses:
            losses.update(self.loss_cardinality(outputs, targets))
        return {name + suffix: value for name, value in losses.items()}

    def loss_labels(self, outputs, targets, indices, num_boxes, log=False) -> dict[str, Tensor]:
        """Focal loss on every (query, class): 1 for matched queries' labels, 0 everywhere
        else. Softmax head: cross-entropy of every query against its matched label or
        "no object" (the last class), weighted mean over the queries as in DETR."""
        logits = outputs["pred_logits"]  # (N, Q, num_classes [+ 1])
        image_idx, query_idx = _matched_queries(indices, logits.device)
        labels = _matched_targets(targets, indices, "labels", logits.device).long()  # (T_matched,)
        if self.no_object:
            target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long,
                                        device=logits.device)  # (N, Q): "no object" ...
            target_classes[image_idx, query_idx] = labels  # ... but for the matched queries
            loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes,
                                      self.empty_weight.to(logits.device))
        else:
            onehot = torch.zeros_like(logits)
            onehot[image_idx, query_idx, labels] = 1
            # Times Q: undoes the mean over queries inside the focal loss, as official.
            loss_ce = (sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha)
                       * logits.shape[1])
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = _class_error(logits[image_idx, query_idx].detach(), labels)
        return losses

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict[str, Tensor]:
        """L1 on cxcywh and 1 - GIoU of the matched pairs, each summed and divided by num_boxes."""
        pred_boxes = outputs["pred_boxes"]  # (N, Q, 4)
        image_idx, query_idx = _matched_queries(indices, pred_boxes.device)
        pred_cxcywh = pred_boxes[image_idx, query_idx]  # (T_matched, 4)
        target_cxcywh = _matched_targets(targets, indices, "boxes",
                                         pred_boxes.device).to(pred_cxcywh)
        loss_bbox = F.l1_loss(pred_cxcywh, target_cxcywh, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred_cxcywh),
                                          box_cxcywh_to_xyxy(target_cxcywh))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets) -> dict[str, Tensor]:
        """Logging only: mean |predicted - true| object count per image.

        As in the official code, a query counts as a detection when its top
        logit is not the last class. That rule comes from DETR's softmax head,
        whose last class is "no object"; a sigmoid head has no such class, so the
        number is kept only to compare logs with the official ones.
        """
        logits = outputs["pred_logits"]  # (N, Q, num_classes)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # (N,)
        true = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, true)}


def _class_error(matched_logits: Tensor, labels: Tensor) -> Tensor:
    """100 - top-1 accuracy (%) of matched queries; 100 when nothing is matched (as official)."""
    if labels.numel() == 0:
        return torch.tensor(100.0, device=matched_logits.device)
    accuracy = (matched_logits.argmax(-1) == labels).float().mean() * 100
    return 100 - accuracy


def weight_dict(cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0, num_decoder_layers: int = 6,
                aux_loss: bool = True, two_stage: bool = False) -> dict[str, float]:
    """The official loss weights: loss_ce, loss_bbox, loss_giou, plus copies with suffix
    `_0`..`_{num_decoder_layers - 2}` (aux_loss, one per earlier decoder layer) and
    `_enc` (two_stage)."""
    base = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(base)
    if aux_loss:
        for i in range(num_decoder_layers - 1):
            weights.update({f"{name}_{i}": w for name, w in base.items()})
    # The official build adds `_enc` whenever aux_loss is on; it only matters in two-stage.
    if two_stage:
        weights.update({f"{name}_enc": w for name, w in base.items()})
    return weights


def total_loss(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """Sum of losses[k] * weight_dict[k] over the keys in both (logging terms have no weight)."""
    terms = [losses[name] * weight for name, weight in weight_dict.items() if name in losses]
    if not terms:
        raise ValueError(f"no loss in {sorted(losses)} has a weight in {sorted(weight_dict)}")
    return sum(terms)
