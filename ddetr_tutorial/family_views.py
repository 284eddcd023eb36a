"""Where each DETR-family member looks, as data to draw (notebook 12), and DETR's
cross-attention logits split into their content and spatial terms (Conditional DETR).

    inputs, _ = cross_attention_inputs(detr, images, mask)         # c_q, p_q, c_k, p_k
    terms = logit_terms(detr.transformer.decoder.layers[-1].multihead_attn, ...)
    views = where_it_looks(model, images, mask, top=3)             # one dict per image
    save_views("views.json", views); views = load_views("views.json")

A view is a plain dict of tensors, ints and strings for one image and its k chosen
queries (the `top` best scores, or `queries`). Every view has member (the model's
class), kind, layer (the decoder layer drawn), image_size (h, w) of the unpadded
image, queries (k,), scores (k,), labels (k,) and boxes (k, 4) cxcywh of the image.
What else it holds depends on its kind:
  "attention"  DETR, Conditional DETR, Anchor DETR: attention (k, M, h, w), each
               head's weights over the valid cells of the feature map (sums to 1);
  "sampling"   Deformable DETR (and Efficient, DN-, H-): locations (k, M, L, K, 2) (x, y)
               and reference (k, 2|4), normalised to the image; weights (k, M, L, K);
               level_shapes (L, 2), the padded maps (H_l, W_l);
  "dynamic"    Dynamic DETR: rois (k, layers, 4) cxcywh, the box each decoder layer
               pools, and roi_levels (k, layers) (0 = P3); at the centre of the drawn
               layer's RoI, on its level (encoder_level (k,), encoder_pixel (k, 2) (x, y)),
               the last encoder layer's 3x3 kernel: encoder_locations (k, M, 3, K, 2),
               encoder_weights (k, M, 3, K); scales finer / same / coarser, 0 if absent;
  "rois"       Sparse R-CNN: rois (k, stages, 4) cxcywh, the box each stage pools, and
               roi_levels (k, stages) (0 = P2).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anchor_detr import AnchorDETR
from .box_ops import box_cxcywh_to_xyxy
from .conditional_detr import ConditionalDETR
from .detr import DETR, DETRDecoderLayer
from .dynamic_detr import DynamicDETR, DynamicEncoderLayer, masked_mean
from .model import DeformableDETR
from .rcda import RowColumnAttention, decoupled_weights
from .recording import record_sampling
from .roi_align import pyramid_levels
from .sparse_rcnn import SparseRCNN, image_whwh

FORMAT, VERSION = "ddetr_tutorial.family_views", 1
KINDS = {DETR: "attention", ConditionalDETR: "attention", AnchorDETR: "attention",
         DeformableDETR: "sampling", DynamicDETR: "dynamic", SparseRCNN: "rois"}
_DECODER_LAYER_SIGNATURE = inspect.signature(DETRDecoderLayer.forward)
_RCDA_SIGNATURE = inspect.signature(RowColumnAttention.forward)


# ----------------------------------------------------------------- DETR's four logit terms

class LogitTerms(NamedTuple):
    """(c_q + p_q)^T (c_k + p_k) / sqrt(D) per head, in four parts, each (N, M, Lq, S)."""

    content_content: Tensor
    content_spatial: Tensor
    spatial_content: Tensor
    spatial_spatial: Tensor

    def total(self) -> Tensor:
        """The logits the layer's softmax sees: the sum of the four terms."""
        return sum(self[1:], self[0])

    def weights(self, padding_mask: Tensor | None = None) -> Tensor:
        """softmax over the keys of the total, padded keys (N, S) True excluded."""
        logits = self.total()
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask[:, None, None], float("-inf"))
        return logits.softmax(-1)


def logit_terms(attention: nn.MultiheadAttention, query_content: Tensor, query_pos: Tensor,
                key_content: Tensor, key_pos: Tensor) -> LogitTerms:
    """Split a DETR cross-attention's logits into content and spatial terms, per head.

    attention: the layer's nn.MultiheadAttention (packed in_proj, batch first); the
    query is c_q + p_q (query_content, query_pos: (N, Lq, C)), the key c_k + p_k
    (key_content, key_pos: (N, S, C)). The projections are linear, so W(c + p) + b =
    (W c + b) + W p: the biases go with the content, the position-free part.
    Returns `LogitTerms`, each (N, M, Lq, S), already divided by sqrt(D).
    """
    if not isinstance(attention, nn.MultiheadAttention) or attention.in_proj_weight is None:
        raise TypeError("attention must be an nn.MultiheadAttention with one packed in_proj "
                        f"(a DETR decoder layer's multihead_attn), got {type(attention).__name__}")
    if not attention.batch_first:
        raise ValueError("attention must be batch_first=True, as DETR's layers are")
    C, M = attention.embed_dim, attention.num_heads
    for name, x in (("query_content", query_content), ("query_pos", query_pos),
                    ("key_content", key_content), ("key_pos", key_pos)):
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != C:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be (N, L, C={C}), got {shape}")
    w_q, w_k = attention.in_proj_weight[:C], attention.in_proj_weight[C:2 * C]
    bias = attention.in_proj_bias
    b_q, b_k = (None, None) if bias is None else (bias[:C], bias[C:2 * C])

    def heads(x):  # (N, L, C) -> (N, M, L, D)
        return x.unflatten(-1, (M, C // M)).transpose(1, 2)

    c_q, p_q = heads(F.linear(query_content, w_q, b_q)), heads(F.linear(query_pos, w_q))
    c_k, p_k = heads(F.linear(key_content, w_k, b_k)), heads(F.linear(key_pos, w_k))
    scale = (C // M) ** -0.5
    return LogitTerms(*((q * scale) @ k.transpose(-1, -2)
                        for q, k in ((c_q, c_k), (c_q, p_k), (p_q, c_k), (p_q, p_k))))


def cross_attention_inputs(model: DETR, images: Tensor, mask: Tensor, layer: int = -1):
    """Run `model` once and keep what decoder layer `layer`'s cross-attention adds up.

    Returns (inputs, outputs): inputs holds query_content (N, Q, C) (the layer's
    embedding after its self-attention), query_pos (N, Q, C) (the object queries),
    key_content (N, S, C) (the encoder memory), key_pos (N, S, C) (the sine positions),
    padding_mask (N, S) and map_shape (H, W) of the feature map; outputs the model's.
    """
    if not isinstance(model, DETR):
        raise TypeError(f"cross_attention_inputs takes a DETR, got {type(model).__name__}")
    _check_batch(images, mask)
    layers = model.transformer.decoder.layers
    target = layers[_layer_index(layer, len(layers), "decoder layer")]
    inputs = {}

    def before_layer(module, args, kwargs):
        bound = _DECODER_LAYER_SIGNATURE.bind(module, *args, **kwargs).arguments
        inputs.update(query_pos=bound["query_pos"], key_content=bound["memory"],
                      key_pos=bound["pos"], padding_mask=bound["padding_mask"])

    def after_self_attention(module, args, output):  # norm1 closes the self-attention
        inputs["query_content"] = output

    def after_projection(module, args, output):
        inputs["map_shape"] = tuple(output.shape[-2:])

    handles = [target.register_forward_pre_hook(before_layer, with_kwargs=True),
               target.norm1.register_forward_hook(after_self_attention),
               model.input_proj.register_forward_hook(after_projection)]
    try:
        outputs = model(images, mask)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def term_magnitudes(terms: LogitTerms, padding_mask: Tensor | None = None) -> dict:
    """Per term: mean_abs, the mean |term| over the valid (image, head, query, key)
    cells, and key_std, its standard deviation over the valid keys (what moves the
    softmax: a part constant over the keys changes no weight), averaged. -> floats."""
    out = {}
    for name, t in zip(LogitTerms._fields, terms):
        valid = torch.ones_like(t) if padding_mask is None else \
            (~padding_mask)[:, None, None, :].expand_as(t).to(t.dtype)
        count = valid.sum(-1)
        mean = (t * valid).sum(-1) / count
        var = ((t - mean[..., None]) ** 2 * valid).sum(-1) / count
        out[name] = {"mean_abs": float((t.abs() * valid).sum() / valid.sum()),
                     "key_std": float(var.sqrt().mean())}
    return out


# ----------------------------------------------------------------- other members' weights

def rcda_weights(attention: RowColumnAttention, query_row: Tensor, query_col: Tensor,
                 key_row: Tensor, key_col: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """RCDA's attention as one map: a_col[y] * a_row[x], (N, M, Lq, H, W), from the same
    inputs as `RowColumnAttention.forward` (queries (N, Lq, C), keys (N, H, W, C)).
    Summing value (N, M, H, W, D) under it gives `rcda.decoupled_attention`'s output."""
    if not isinstance(attention, RowColumnAttention):
        raise TypeError(f"attention must be a RowColumnAttention, got {type(attention).__name__}")
    q_row, q_col, k_row, k_col, _ = attention.project(query_row, query_col, key_row, key_col,
                                                      key_row)  # (the value goes unused)
    a_row, a_col = decoupled_weights(q_row, q_col, k_row, k_col, padding_mask)
    return a_col[..., :, None] * a_row[..., None, :]

def dynamic_sampling(layer: DynamicEncoderLayer, srcs: list[Tensor], masks: list[Tensor]):
    """Where a Dynamic DETR encoder layer samples, from its inputs (srcs: L maps (N, C,
    H_l, W_l), masks (N, H_l, W_l)). -> per level l: locations (N, H_l W_l, M, 3, K, 2)
    normalised to level l's padded map and weights (N, H_l W_l, M, 3, K) = modulation x
    scale attention; the 3 scales are l-1, l, l+1, a missing one with weight 0."""
    if not isinstance(layer, DynamicEncoderLayer):
        raise TypeError(f"layer must be a DynamicEncoderLayer, got {type(layer).__name__}")
    L = len(srcs)
    pooled = torch.stack([masked_mean(s, m) for s, m in zip(srcs, masks)], 1)  # (N, L, C)
    out = []
    for lvl, src in enumerate(srcs):
        slots = [j - lvl + 1 for j in (lvl - 1, lvl, lvl + 1) if 0 <= j < L]
        three = pooled.new_zeros(pooled.shape[0], 3, pooled.shape[2])
        three[:, slots] = pooled[:, [s + lvl - 1 for s in slots]]
        scale = layer.scale_attention(three)  # (N, 3)
        locations, modulation = layer.sampling(src, lvl, [0, 1, 2])
        present = torch.zeros(3, dtype=src.dtype, device=src.device)
        present[slots] = 1.0
        out.append((locations, modulation * (scale * present)[:, None, None, :, None]))
    return out


# ----------------------------------------------------------------- where_it_looks

def where_it_looks(model: nn.Module, images: Tensor, mask: Tensor, top: int = 3,
                   queries: Sequence[int] | None = None, layer: int = -1) -> list[dict]:
    """What `model` looks at for its best queries on each image (the module docstring
    lists the views). images (N, 3, H, W) normalised; mask (N, H, W) True on padding;
    top: how many queries, the highest scores first; queries: these indices instead;
    layer: the decoder layer (stage) drawn. Runs in eval mode without gradients."""
    kind = member_kind(model)
    _check_batch(images, mask)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _aux_outputs(model):
            outputs, index, extra = _LOOKS[kind](model, images, mask, layer)
    finally:
        model.train(was_training)
    scores, labels = _scores(model, outputs["pred_logits"])
    chosen = _choose(scores, top, queries)  # (N, k)
    hw = image_whwh(mask)[:, [1, 0]]
    views = []
    for i, q in enumerate(chosen):
        view = {"member": type(model).__name__, "kind": kind, "layer": index,
                "image_size": hw[i].clone(), "queries": q.clone(), "scores": scores[i, q],
                "labels": labels[i, q], "boxes": outputs["pred_boxes"][i, q]}
        view.update({name: value(i, q) for name, value in extra.items()})
        views.append(view)
    return views


def member_kind(model: nn.Module) -> str:
    """'attention', 'sampling', 'dynamic' or 'rois': what `where_it_looks` draws."""
    for cls, kind in KINDS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"where_it_looks does not know a {type(model).__name__}; it takes "
                    f"{', '.join(c.__name__ for c in KINDS)} (and their subclasses)")


def _attention_views(model, images, mask, layer):
    layers = model.transformer.decoder_layers if isinstance(model, AnchorDETR) else \
        model.transformer.decoder.layers
    index = _layer_index(layer, len(layers), "decoder layer")
    seen = {}
    if isinstance(model, DETR):
        inputs, outputs = cross_attention_inputs(model, images, mask, index)
        terms = logit_terms(layers[index].multihead_attn, inputs["query_content"],
                            inputs["query_pos"], inputs["key_content"], inputs["key_pos"])
        N, (H, W) = images.shape[0], inputs["map_shape"]
        weights = terms.weights(inputs["padding_mask"]).unflatten(-1, (H, W))
        feature_mask = inputs["padding_mask"].view(N, H, W)
    elif isinstance(model, ConditionalDETR):
        def keep(module, args, output):  # ProjectedAttention: (q, k, v, key_padding_mask)
            seen["weights"], seen["padding_mask"] = output[1], args[3]

        def keep_shape(module, args, output):
            seen["map_shape"] = tuple(output.shape[-2:])
        outputs = _run_with_hooks(model, images, mask, [
            (layers[index].cross_attn, "forward", keep),
            (model.input_proj, "forward", keep_shape)])
        N, (H, W) = images.shape[0], seen["map_shape"]
        weights = seen["weights"].unflatten(-1, (H, W))
        feature_mask = seen["padding_mask"].view(N, H, W)
    else:
        def keep_rcda(module, args, kwargs):
            bound = _RCDA_SIGNATURE.bind(module, *args, **kwargs).arguments
            seen["mask"] = bound["padding_mask"]  # AnchorTransformer always passes one
            seen["weights"] = rcda_weights(module, bound["query_row"], bound["query_col"],
                                           bound["key_row"], bound["key_col"], seen["mask"])
        outputs = _run_with_hooks(model, images, mask,
                                  [(layers[index].cross_attn, "pre_kwargs", keep_rcda)])
        weights, feature_mask = seen["weights"], seen["mask"]
    cells = image_whwh(feature_mask)  # valid (w, h, w, h) cells per image
    extra = {"attention": lambda i, q: weights[i][:, q, :cells[i, 1], :cells[i, 0]]
             .transpose(0, 1).contiguous()}
    return outputs, index, extra


def _sampling_views(model, images, mask, layer):
    with record_sampling(model) as rec:
        outputs = model(images, mask)
    decoder = rec.decoder
    index = _layer_index(layer, len(decoder), "decoder layer")
    record, ratios = decoder[index], rec.valid_ratios  # (N, L, 2) as (w, h)
    locations = record.sampling_locations / ratios[:, None, None, :, None, :]
    reference = record.reference_points[:, :, 0]  # (N, Q, 2|4) on level 0, its frame
    first = ratios[:, None, 0]
    reference = reference / (first if reference.shape[-1] == 2 else torch.cat([first, first], -1))
    shapes = rec.spatial_shapes.cpu().long()
    extra = {"locations": lambda i, q: locations[i, q], "weights":
             lambda i, q: record.attention_weights[i, q], "reference": lambda i, q: reference[i, q],
             "level_shapes": lambda i, q: shapes.clone()}
    return outputs, index, extra


def _dynamic_views(model, images, mask, layer):
    index = _layer_index(layer, len(model.decoder), "decoder layer")
    seen = {}

    def keep(module, args):
        seen["srcs"], seen["masks"] = args[0], args[1]
    outputs = _run_with_hooks(model, images, mask, [(model.encoder[-1], "pre", keep)])
    N = images.shape[0]
    start = model.query_boxes.weight.sigmoid()[None].expand(N, -1, -1)
    rois = torch.stack([start] + [a["pred_boxes"] for a in outputs["aux_outputs"]], 2)
    whwh = image_whwh(mask).to(rois.dtype)
    pixels = box_cxcywh_to_xyxy(rois) * whwh[:, None, None]
    levels = pyramid_levels(pixels.reshape(-1, 4), len(model.strides), 3,
                            model.canonical_size).view(rois.shape[:-1])  # (N, Q, D)
    srcs, masks = seen["srcs"], seen["masks"]
    sampling = dynamic_sampling(model.encoder[-1], srcs, masks)
    Q = rois.shape[1]
    enc_loc = rois.new_zeros(N, Q, model.encoder[-1].n_heads, 3, model.encoder[-1].n_points, 2)
    enc_w, pixel = enc_loc[..., 0].clone(), rois.new_zeros(N, Q, 2)
    for lvl, (locations, weights) in enumerate(sampling):
        H, W = srcs[lvl].shape[-2:]
        valid = image_whwh(masks[lvl])[:, :2].to(rois.dtype)  # (N, 2) valid (w, h) cells
        cell = (rois[:, :, index, :2] * valid[:, None]).floor().clamp(min=0)
        cell = torch.minimum(cell, valid[:, None] - 1).long()  # (N, Q, 2) as (x, y)
        token = cell[..., 1] * W + cell[..., 0]
        here = levels[:, :, index] == lvl
        ratio = valid / valid.new_tensor([W, H])
        picked = torch.gather(locations, 1, token[..., None, None, None, None].expand(
            -1, -1, *locations.shape[2:])) / ratio[:, None, None, None, None]
        enc_loc[here] = picked[here]
        enc_w[here] = torch.gather(weights, 1, token[..., None, None, None].expand(
            -1, -1, *weights.shape[2:]))[here]
        pixel[here] = ((cell.to(rois.dtype) + 0.5) / valid[:, None])[here]
    extra = {"rois": lambda i, q: rois[i, q], "roi_levels": lambda i, q: levels[i, q],
             "encoder_level": lambda i, q: levels[i, q, index], "encoder_pixel":
             lambda i, q: pixel[i, q], "encoder_locations": lambda i, q: enc_loc[i, q],
             "encoder_weights": lambda i, q: enc_w[i, q]}
    return outputs, index, extra


def _roi_views(model, images, mask, layer):
    index = _layer_index(layer, len(model.head.head_series), "stage")
    outputs = model(images, mask)
    N = images.shape[0]
    start = model.init_proposal_boxes.weight[None].expand(N, -1, -1)
    rois = torch.stack([start] + [a["pred_boxes"] for a in outputs["aux_outputs"]], 2)
    pixels = box_cxcywh_to_xyxy(rois) * image_whwh(mask).to(rois.dtype)[:, None, None]
    levels = pyramid_levels(pixels.reshape(-1, 4), len(model.head.strides), 2,
                            model.head.canonical_size).view(rois.shape[:-1])
    return outputs, index, {"rois": lambda i, q: rois[i, q],
                            "roi_levels": lambda i, q: levels[i, q]}


_LOOKS = {"attention": _attention_views, "sampling": _sampling_views, "dynamic": _dynamic_views,
          "rois": _roi_views}


# ----------------------------------------------------------------- save / load

def save_views(path, views: list[dict]) -> Path:
    """Write views (a list of dicts of tensors, ints, floats, strings) as JSON; tensors
    keep their dtype and shape, so `load_views` gives back equal views. -> the path."""
    if not isinstance(views, list) or not all(isinstance(v, dict) for v in views):
        raise TypeError(f"views must be a list of dicts (what where_it_looks returns), "
                        f"got {type(views).__name__}")
    encoded = [{key: _encode(key, value) for key, value in view.items()} for view in views]
    path = Path(path)
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "views": encoded}) + "\n")
    return path


def load_views(path) -> list[dict]:
    """Read a file written by `save_views` -> the list of view dicts, tensors restored."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a views file: not JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a views file: format {found!r}, expected {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: views version {data.get('version')!r}, this library "
                         f"reads version {VERSION}")
    return [{key: _decode(key, value, path) for key, value in view.items()}
            for view in data["views"]]


def _encode(key, value):
    if isinstance(value, Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in ("float32", "float64", "int64", "bool"):
            raise TypeError(f"view entry {key!r}: tensors of {value.dtype} are not saved "
                            "(float32, float64, int64, bool are)")
        return {"dtype": dtype, "shape": list(value.shape),
                "data": value.detach().cpu().flatten().tolist()}
    if isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"view entry {key!r} is a {type(value).__name__}; a view holds "
                    "tensors, ints, floats and strings")


def _decode(key, value, path):
    if not isinstance(value, dict):
        return value
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if dtype not in ("float32", "float64", "int64", "bool") or not isinstance(data, list):
        raise ValueError(f"{path}: view entry {key!r} is not a saved tensor ({value!r:.80})")
    tensor = torch.tensor(data, dtype=getattr(torch, dtype))
    if tensor.numel() != int(torch.tensor(shape).prod()):
        raise ValueError(f"{path}: view entry {key!r} holds {tensor.numel()} numbers for "
                         f"shape {shape}")
    return tensor.reshape(shape)


# ----------------------------------------------------------------- helpers

def _check_batch(images, mask) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) \
            else type(images).__name__
        raise ValueError(f"images must be a floating (N, 3, H, W) tensor, got {got}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (N, H, W), True on padding, got {got}")
    N, _, H, W = images.shape
    if tuple(mask.shape) != (N, H, W):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but images {tuple(images.shape)} "
                         f"need ({N}, {H}, {W})")


def _layer_index(layer, count: int, what: str) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int, got {layer!r}")
    if not -count <= layer < count:
        raise ValueError(f"layer={layer}: the model has {count} {what}s "
                         f"(0..{count - 1}, or negative from the last)")
    return layer % count


def _scores(model, logits):
    """(N, Q, classes) -> each query's best class probability and that class."""
    if getattr(model, "no_object", False):  # DETR's softmax: the last class is "no object"
        return logits.softmax(-1)[..., :-1].max(-1)
    return logits.sigmoid().max(-1)


def _choose(scores, top, queries) -> Tensor:
    """(N, Q) scores -> (N, k) query indices: the top k, or the given ones."""
    N, Q = scores.shape
    if queries is not None:
        chosen = torch.as_tensor(list(queries), dtype=torch.long)
        if chosen.dim() != 1 or chosen.numel() == 0 or chosen.min() < 0 or chosen.max() >= Q:
            raise ValueError(f"queries={list(queries)}: expected indices in [0, {Q})")
        return chosen.expand(N, -1)
    if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= Q:
        raise ValueError(f"top={top!r}: expected an int from 1 to the {Q} queries")
    return scores.topk(top, dim=1).indices


def _run_with_hooks(model, images, mask, hooks):
    """model(images, mask) with hooks attached meanwhile: (module, when, hook), when one
    of "pre", "pre_kwargs" (a pre-hook that also sees the keyword arguments), "forward"."""
    handles = []
    try:
        for module, when, hook in hooks:
            if when == "forward":
                handles.append(module.register_forward_hook(hook))
            else:
                handles.append(module.register_forward_pre_hook(
                    hook, with_kwargs=when == "pre_kwargs"))
        return model(images, mask)
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _aux_outputs(model):
    """Every decoder layer's predictions: the RoIs of the later layers are in them."""
    had, model.aux_loss = model.aux_loss, True
    try:
        yield
    finally:
        model.aux_loss = had
