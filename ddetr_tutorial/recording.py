"""The sampling recorder: what every deformable attention of a model sampled.

    with record_sampling(model) as rec:
        outputs = model(images, mask)
    rec.encoder[0].sampling_locations      # (N, S, M, L, K, 2)
    rec.decoder[-1].attention_weights      # (N, Q, M, L, K)

Forward hooks observe, the forward signatures carry no flags: a pre-hook on
each `MSDeformAttn` sees its reference points and padding mask, a hook on its
parameter-free `sample` submodule sees the sampling locations and attention
weights it hands to the op. Any model holding `MSDeformAttn` modules works;
layers are named by their module path, and a path through a module named
`encoder` / `decoder` puts the layer in `rec.encoder` / `rec.decoder`. The
hooks are removed when the `with` ends, also on an exception.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attention import MSDeformAttn
from .transformer import host_shapes, valid_ratios

_ATTENTION_SIGNATURE = inspect.signature(MSDeformAttn.forward)


@dataclass
class AttentionRecord:
    """One deformable attention call (shapes: Lq queries, M heads, L levels, K points).

    name: the MSDeformAttn's module path, e.g. 'transformer.decoder.layers.0.cross_attn';
    reference_points (N, Lq, L, 2|4), sampling_locations (N, Lq, M, L, K, 2) and
    attention_weights (N, Lq, M, L, K), in the attention's coordinates: each level's
    padded map, normalized (x, y).
    """

    name: str
    reference_points: Tensor
    sampling_locations: Tensor
    attention_weights: Tensor

    @property
    def part(self) -> str:
        """'encoder', 'decoder' or 'other': the first of the two in the module path."""
        return _part(self.name)


@dataclass
class SamplingRecord:
    """What one forward's deformable attentions sampled (the last forward in the `with`).

    layers: every MSDeformAttn call in call order; spatial_shapes (L, 2) rows
    (H_l, W_l) and level_start_index (L,) as the first call received them;
    valid_ratios (N, L, 2) as (w, h), from its padding mask (ones without one);
    logits (N, Q, classes) and boxes (N, Q, 4) cxcywh of each decoder layer, from the
    model's output (aux_outputs, then the final prediction; empty if it has none).
    """

    layers: list[AttentionRecord] = field(default_factory=list)
    spatial_shapes: Tensor | None = None
    level_start_index: Tensor | None = None
    valid_ratios: Tensor | None = None
    logits: list[Tensor] = field(default_factory=list)
    boxes: list[Tensor] = field(default_factory=list)

    @property
    def encoder(self) -> list[AttentionRecord]:
        """The encoder's layers, first to last."""
        return [layer for layer in self.layers if layer.part == "encoder"]

    @property
    def decoder(self) -> list[AttentionRecord]:
        """The decoder's layers, first to last."""
        return [layer for layer in self.layers if layer.part == "decoder"]

    def clear(self):
        self.layers, self.logits, self.boxes = [], [], []
        self.spatial_shapes = self.level_start_index = self.valid_ratios = None


def _part(name: str) -> str:
    for piece in name.split("."):
        if piece in ("encoder", "decoder"):
            return piece
    return "other"


@contextmanager
def record_sampling(model: nn.Module, detach: bool = True) -> Iterator[SamplingRecord]:
    """Record what every `MSDeformAttn` inside `model` samples while the `with` runs.

    Yields a `SamplingRecord`, filled by each forward of `model` (a new forward
    starts it afresh). detach: store detached tensors (default), else keep the
    graph. Raises ValueError if `model` has no MSDeformAttn.
    """
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, MSDeformAttn)}
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no MSDeformAttn module: dense "
                         "attention (as in DETR) has no sampling points to record")
    record = SamplingRecord()
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    pending: dict[str, tuple] = {}  # attention name -> what its pre-hook saw

    def before_attention(name):
        def hook(module, args, kwargs):
            bound = _ATTENTION_SIGNATURE.bind(module, *args, **kwargs).arguments
            pending[name] = (bound["reference_points"], bound["spatial_shapes"],
                             bound["level_start_index"], bound.get("padding_mask"))
        return hook

    def after_sample(name):
        def hook(module, args, kwargs, output):
            reference_points, spatial_shapes, level_start_index, mask = pending.pop(name)
            locations = args[3] if len(args) > 3 else kwargs["sampling_locations"]
            weights = args[4] if len(args) > 4 else kwargs["attention_weights"]
            if record.spatial_shapes is None:
                record.spatial_shapes, record.level_start_index = spatial_shapes, level_start_index
                record.valid_ratios = _valid_ratios(mask, spatial_shapes, locations)
            record.layers.append(AttentionRecord(name, keep(reference_points), keep(locations),
                                                 keep(weights)))
        return hook

    def before_model(module, args):
        record.clear()
        pending.clear()

    def after_model(module, args, output):
        if isinstance(output, Mapping) and "pred_logits" in output and "pred_boxes" in output:
            layers = list(output.get("aux_outputs") or []) + [output]
            record.logits = [keep(layer["pred_logits"]) for layer in layers]
            record.boxes = [keep(layer["pred_boxes"]) for layer in layers]

    handles = [model.register_forward_pre_hook(before_model),
               model.register_forward_hook(after_model)]
    try:
        for name, attention in attentions.items():
            handles.append(attention.register_forward_pre_hook(before_attention(name),
                                                               with_kwargs=True))
            handles.append(attention.sample.register_forward_hook(after_sample(name),
                                                                  with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _valid_ratios(mask, spatial_shapes, locations) -> Tensor:
    """(N, L, 2) valid (w, h) fractions from a flattened padding mask (N, S): the
    same numbers as the transformer's, computed level by level."""
    shapes = host_shapes(spatial_shapes)
    N = locations.shape[0]
    if mask is None:
        return torch.ones(N, len(shapes), 2, device=locations.device)
    ratios, start = [], 0
    for H, W in shapes:
        ratios.append(valid_ratios(mask[:, start:start + H * W].view(N, H, W)))
        start += H * W
    return torch.stack(ratios, 1)
