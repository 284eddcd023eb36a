"""`sampling_data`: run a detector once under the sampling recorder and keep one
image's record as plain numpy arrays, the input of every figure and the explorer."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, ToTensor
from ..matcher import HungarianMatcher
from ..recording import record_sampling
from .queries import _check_index


def sampling_data(model, image, mask=None, index: int = 0, target=None, transform=None,
                  class_names=None, matcher=None) -> dict:
    """Run `model` once under `record_sampling`; return one image's record as numpy.

    image: a PIL image or (H, W, 3) array (passed through `transform`, by default
    ToTensor + Normalize, e.g. `build_transforms(cfg, "val")` to resize too), or
    the model's input itself: a normalized tensor (3, H, W), or a padded batch
    (N, 3, H, W) with `mask` (N, H, W) (True on padding) and `index` choosing the
    image. target: optional {"labels" (T,), "boxes" (T, 4) cxcywh normalized} of
    that image; then the Hungarian assignment (`matcher`, default the official
    costs) is computed too. model: any detector with MSDeformAttn modules whose
    output has pred_logits, pred_boxes and aux_outputs. Returns a dict (shapes:
    S tokens, Q queries, M heads, L levels, K points, T targets):
      image (h, w, 3) in [0, 1]; image_size (h, w); spatial_shapes (L, 2) rows (H_l, W_l);
      level_start_index (L,); valid_ratios (L, 2) as (w, h);
      encoder / decoder: lists of layer dicts, first to last, with reference_points
        (S|Q, L, 2|4), sampling_locations (S|Q, M, L, K, 2), attention_weights
        (S|Q, M, L, K), all in the attention's normalized coordinates (see the
        module docstring), and for the decoder boxes (Q, 4) cxcywh and scores
        (Q, classes) (sigmoid) of that layer;
      detections: {"query", "score", "label"} (Q,) every query by its best class,
        highest score first; class_names; target and matching ({"query", "target",
        "cost" (Q, T)}) or None.
    """
    images, mask, index = _model_input(image, mask, index, transform)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_sampling(model) as record:
            out = model(images.to(device), mask.to(device))
    finally:
        model.train(was_training)
    if len(record.boxes) != len(record.decoder):
        raise ValueError(f"the model's output has boxes for {len(record.boxes)} of its "
                         f"{len(record.decoder)} decoder layers; the visualizer draws every "
                         "layer's (build it with aux_loss=True)")

    def pick(t):  # one image of the batch, as numpy
        return t[index].detach().cpu().float().numpy()

    def layer_dict(layer):
        return {"reference_points": pick(layer.reference_points),
                "sampling_locations": pick(layer.sampling_locations),
                "attention_weights": pick(layer.attention_weights)}

    valid = ~mask[index]
    h, w = int(valid[:, 0].sum()), int(valid[0, :].sum())  # padding is bottom and right
    data = {
        "image": _display_image(images[index, :, :h, :w]),
        "image_size": (h, w),
        "spatial_shapes": record.spatial_shapes.cpu().numpy(),
        "level_start_index": record.level_start_index.cpu().numpy(),
        "valid_ratios": pick(record.valid_ratios),
        "encoder": [layer_dict(layer) for layer in record.encoder],
        "decoder": [layer_dict(layer) | {"boxes": pick(boxes), "scores": pick(logits.sigmoid())}
                    for layer, boxes, logits in zip(record.decoder, record.boxes,
                                                    record.logits)],
        "class_names": list(class_names) if class_names else None,
        "target": None,
        "matching": None,
    }
    scores = data["decoder"][-1]["scores"]  # (Q, classes)
    order = np.argsort(-scores.max(1), kind="stable")
    data["detections"] = {"query": order, "score": scores.max(1)[order],
                          "label": scores.argmax(1)[order]}
    if target is not None:
        data["target"], data["matching"] = _match(out, index, target, matcher)
    return data


def _model_input(image, mask, index, transform):
    """Whatever `sampling_data` accepts -> (images (N, 3, H, W), mask (N, H, W), index)."""

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3), got shape {image.shape}")
        pixels = image if image.dtype == np.uint8 else \
            (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels)
    if isinstance(image, Image.Image):
        if transform is None:
            transform = Compose([ToTensor(), Normalize()])
        image, _ = transform(image.convert("RGB"), None)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, an (H, W, 3) array or a tensor, "
                        f"got {type(image).__name__}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must be a normalized (3, H, W) tensor or an (N, 3, H, W) "
                         f"batch, got shape {tuple(image.shape)}")
    if image.dim() == 3:
        image = image[None]
    N, _, H, W = image.shape
    if mask is None:
        mask = torch.zeros(N, H, W, dtype=torch.bool)
    if tuple(mask.shape) != (N, H, W):
        raise ValueError(f"mask must be (N, H, W) = ({N}, {H}, {W}), got {tuple(mask.shape)}")
    index = _check_index("index", index, N, f"the batch has {N} image(s)")
    return image.float(), mask.cpu().bool(), index


def _display_image(image):
    """Undo Normalize: (3, h, w) tensor -> (h, w, 3) array in [0, 1]."""
    pixels = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    return np.clip(pixels * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)


def _match(out, index, target, matcher):
    """The Hungarian assignment of this image's final predictions to its target."""
    matcher = matcher or HungarianMatcher()
    outputs = {"pred_logits": out["pred_logits"][index:index + 1].cpu(),
               "pred_boxes": out["pred_boxes"][index:index + 1].cpu()}
    target = {"labels": torch.as_tensor(target["labels"]).long().cpu(),
              "boxes": torch.as_tensor(target["boxes"]).float().cpu().reshape(-1, 4)}
    query, target_idx = matcher(outputs, [target])[0]
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], [target])
    return ({"labels": target["labels"].numpy(), "boxes": target["boxes"].numpy()},
            {"query": query.numpy(), "target": target_idx.numpy(), "cost": cost.numpy()})
