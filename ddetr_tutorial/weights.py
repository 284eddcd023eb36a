"""Weight layouts: load official Deformable DETR weights and HuggingFace-format weights.

Official files come from fundamentalvision/Deformable-DETR's `main.py`, which
saves `{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}`. Our state-dict
keys equal theirs, so loading one is a check, not a conversion. transformers'
`DeformableDetrForObjectDetection` names the same tensors differently;
`official_to_hf` and `hf_to_official` translate between the two layouts.

Files are read with `torch.load(weights_only=True)`: a checkpoint is data, and
unpickling arbitrary objects can run code (`checkpoints.read_torch_file`).
Nothing is downloaded. Training checkpoints of this package are `checkpoints`'.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .checkpoints import read_torch_file

try:  # optional: only .safetensors files need it
    from safetensors.torch import load_file as _load_safetensors
except ImportError:
    _load_safetensors = None

StateDict = dict[str, torch.Tensor]

# thop's profiler registers these two buffers on every module it counts; some
# released checkpoints carry them, and the official main.py drops them too.
_PROFILER_SUFFIXES = ("total_params", "total_ops")


class LoadResult(NamedTuple):
    """What did not match between a checkpoint and the model (all empty after a strict load)."""

    missing: list[str]        # in the model, not in the checkpoint (left as they were)
    unexpected: list[str]     # in the checkpoint, not in the model (ignored)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, checkpoint, model shape)


# ------------------------------------------------------------------------- reading files

def _read_safetensors(path: Path) -> StateDict:
    if _load_safetensors is None:
        raise ImportError(f"reading {os.fspath(path)!r} needs the `safetensors` package "
                          f"(pip install safetensors); or pass a .bin / .pt file")
    return _load_safetensors(os.fspath(path), device="cpu")


def _unwrap(obj: object, source: str) -> tuple[StateDict, object]:
    """A checkpoint dict -> (state dict, its 'args' or None). Accepts {'model': sd, ...}
    or a bare state dict; strips the `module.` prefix that DDP-wrapped saves carry."""
    args = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj, args = obj["model"], obj.get("args")
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = (f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise ValueError(f"{source} holds {what}; expected a state dict (names -> tensors) "
                         f"or a checkpoint dict with a 'model' entry")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, args


def _source(path_or_state) -> str:
    if isinstance(path_or_state, (str, os.PathLike)):
        return repr(os.fspath(path_or_state))
    return "the given state"


# ------------------------------------------------------------- matching a state dict to a model

def _shared_groups(model: nn.Module) -> list[list[str]]:
    """Names under which the model registers one tensor more than once: the heads
    shared by all decoder layers, or the refinement heads that the decoder also holds."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    return [names for names in names_of.values() if len(names) > 1]


def _listing(what: str, items: list[str], limit: int = 10) -> str:
    """'2 missing keys: a, b' with at most `limit` names shown."""
    if len(items) != 1:
        what += "es" if what.endswith("h") else "s"
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {what}: {', '.join(items[:limit])}{more}"


def _shape(shape) -> str:
    return str(list(shape))


def _hints(missing, unexpected, mismatched) -> list[str]:
    """What a key mismatch most likely means, in terms of config fields."""
    hints = []
    for prefix, field in (("transformer.decoder.bbox_embed.", "with_box_refine"),
                          ("transformer.enc_output", "two_stage")):
        if any(k.startswith(prefix) for k in unexpected):
            hints.append(f"the checkpoint has {prefix}*: build the model with {field}=True")
        if any(k.startswith(prefix) for k in missing):
            hints.append(f"the checkpoint has no {prefix}*: build the model with {field}=False")
    shapes = {k: (ck, ours) for k, ck, ours in mismatched}
    if "transformer.level_embed" in shapes:
        ck, ours = shapes["transformer.level_embed"]
        hints.append(f"num_feature_levels differs: checkpoint {ck[0]}, model {ours[0]}")
    if "class_embed.0.weight" in shapes:
        ck, ours = shapes["class_embed.0.weight"]
        hints.append(f"num_classes differs: checkpoint {ck[0]}, model {ours[0]} (to fine-tune "
                     f"on other classes, pass strict=False: mis-shaped heads keep their init)")
    if any(k.startswith("model.") for k in unexpected):
        hints.append("keys start with 'model.': this looks like a HuggingFace checkpoint, "
                     "use load_hf_checkpoint")
    if any(".conv_encoder.model.embedder." in k or k.startswith("backbone.0.body.embedder.")
           for k in unexpected):
        hints.append("the backbone uses transformers' own ResNet names (use_timm_backbone="
                     "False); only the timm/torchvision layout of the released models is mapped")
    return hints


def _describe_args(args) -> str:
    """The variant an official checkpoint was trained as, from its saved argparse args."""
    fields = ("backbone", "num_feature_levels", "dilation", "with_box_refine", "two_stage",
              "num_queries")
    known = [f"{f}={getattr(args, f)!r}" for f in fields if hasattr(args, f)]
    return f"its saved args say {', '.join(known)}" if known else ""


def _load_state(model: nn.Module, state: StateDict, strict: bool, *, fill_shared: bool = False,
                note: str = "") -> LoadResult:
    """Check `state` against the model's keys and shapes, then copy what matches."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items()
             if not k.endswith(_PROFILER_SUFFIXES)
             # FrozenBatchNorm2d keeps no step counter; nn.BatchNorm2d saves one.
             and (k in expected or not k.endswith("num_batches_tracked"))}
    for key in expected:
        # ...and a trainable BatchNorm's counter is absent from frozen-BN files: keep ours.
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, expected[key])
    groups = _shared_groups(model)
    if fill_shared:
        # safetensors cannot store one tensor under two names, so HF's saving keeps
        # one name per shared tensor; the others are that same tensor.
        for names in groups:
            present = [n for n in names if n in state]
            for name in names if present else []:
                state.setdefault(name, state[present[0]])

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape]
    if strict and (missing or unexpected or mismatched):
        shapes = [f"{k} checkpoint {_shape(ck)} vs model {_shape(ours)}"
                  for k, ck, ours in mismatched]
        parts = [_listing(what, items) for what, items in (
            ("missing key", missing), ("unexpected key", unexpected), ("shape mismatch", shapes))
            if items]
        hints = _hints(missing, unexpected, mismatched) + ([note] if note else [])
        raise ValueError("the checkpoint does not fit the model: " + "; ".join(parts)
                         + "".join(f"\n  hint: {h}" for h in hints)
                         + "\n  (strict=False loads the keys that fit and returns these lists)")

    # Several names for one tensor in this model must carry one value, else
    # load_state_dict would silently keep whichever name comes last.
    bad = {k for k, *_ in mismatched}
    for names in groups:
        present = [n for n in names if n in state and n not in bad]
        for other in present[1:]:
            if not torch.equal(state[other], state[present[0]]):
                raise ValueError(
                    f"the checkpoint has different values for {present[0]} and {other}, which "
                    f"are one shared tensor in this model: it was probably trained with "
                    f"with_box_refine=True (one head per decoder layer); build the model the "
                    f"same way" + (f" ({note})" if note else ""))

    model.load_state_dict({k: v for k, v in state.items() if k in expected and k not in bad},
                          strict=False)
    return LoadResult(missing, unexpected, mismatched)


# ------------------------------------------------------------------- official checkpoints

def load_official_checkpoint(model: nn.Module, path_or_state, strict: bool = True) -> LoadResult:
    """Load fundamentalvision/Deformable-DETR weights into `model`.

    path_or_state: a `.pth` saved by the official main.py (a dict with 'model',
    'optimizer', 'lr_scheduler', 'epoch', 'args'), a dict with 'model', or a
    bare state dict. strict: missing / unexpected keys or shape mismatches raise
    a ValueError listing them; with strict=False what fits is loaded and the
    lists are returned (LoadResult). thop's total_params/total_ops are ignored.
    Different values under names the model shares (one head for every decoder
    layer) are an error either way: only one of them could be loaded.
    """
    obj = (read_torch_file(path_or_state) if isinstance(path_or_state, (str, os.PathLike))
           else path_or_state)
    state, args = _unwrap(obj, _source(path_or_state))
    _check_dilation(model, args, strict)
    return _load_state(model, state, strict, note=_describe_args(args))


def _check_dilation(model: nn.Module, args, strict: bool) -> None:
    """DC5 and plain checkpoints have the same keys and shapes; only the saved
    args tell them apart, and C5 at the wrong stride gives wrong predictions."""
    trained = getattr(args, "dilation", None)
    strides = getattr(getattr(model, "backbone", None), "strides", None)
    if trained is None or not strides or bool(trained) == (strides[-1] == 16):
        return
    message = (f"the checkpoint's saved args say dilation={bool(trained)} but the model's "
               f"backbone has dilation={not trained} (C5 stride {strides[-1]}); the keys match "
               f"but the predictions would not: build the model with dilation={bool(trained)}")
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------- HuggingFace layout
#
# transformers' layout, from its conversion script (convert_deformable_detr_to_pytorch.py)
# and modeling_deformable_detr.py: the body lives under `model.`, the heads keep
# their names, the backbone is a timm ResNet whose names equal torchvision's.

# Whole-model prefixes, official -> HF, checked in this order (the generic
# `transformer.` <-> `model.` last).
_PREFIXES = (("backbone.0.body.", "model.backbone.conv_encoder.model."),
             ("query_embed.", "model.query_position_embeddings."),
             ("input_proj.", "model.input_proj."),
             ("transformer.", "model."))
# Sub-modules of one encoder / decoder layer, official -> HF. HF names the norms
# after what they follow: the official decoder has norm2 after self-attention,
# norm1 after cross-attention (HF's encoder_attn), norm3 after the FFN.
_LAYER_NAMES = {
    "encoder": {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm",
                "linear1": "fc1", "linear2": "fc2"},
    "decoder": {"cross_attn": "encoder_attn", "norm1": "encoder_attn_layer_norm",
                "norm2": "self_attn_layer_norm", "norm3": "final_layer_norm",
                "linear1": "fc1", "linear2": "fc2"},
}
_LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.([^.]+)\.(.+)$")
_PACKED_QKV = re.compile(r"^(.*decoder\.layers\.\d+\.self_attn\.)in_proj_(weight|bias)$")
_SPLIT_QKV = re.compile(r"^(.*decoder\.layers\.\d+\.self_attn\.)([qkv])_proj\.(weight|bias)$")
# transformers 5 renames a few modules in memory (its conversion_mapping.py maps
# the hub files' names, which are the ones above, to these); read those too.
_TRANSFORMERS_5 = ((re.compile(r"^model\.backbone\.model\."), "model.backbone.conv_encoder.model."),
                   (re.compile(r"\.self_attn\.o_proj\."), ".self_attn.out_proj."),
                   (re.compile(r"\.layers\.(\d+)\.mlp\.(fc[12])\."), r".layers.\1.\2."))


def _rename(key: str, to_hf: bool) -> str:
    """One key, official <-> HF, except the q/k/v packing. Unknown keys pass unchanged."""
    for official, hf in _PREFIXES:
        src, dst = (official, hf) if to_hf else (hf, official)
        if key.startswith(src):
            rest = key[len(src):]
            if src in ("transformer.", "model."):
                rest = _rename_in_layer(rest, to_hf)
            return dst + rest
    return key  # the heads (class_embed, bbox_embed) have one name in both layouts


def _rename_in_layer(rest: str, to_hf: bool) -> str:
    match = _LAYER_KEY.match(rest)
    if match is None:
        return rest
    stack, index, module, tail = match.groups()
    names = _LAYER_NAMES[stack]
    if not to_hf:
        names = {hf: official for official, hf in names.items()}
    return f"{stack}.layers.{index}.{names.get(module, module)}.{tail}"


def official_to_hf(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official key layout -> transformers' DeformableDetrForObjectDetection layout.

    The decoder self-attention's packed `in_proj_weight` (3C, C) / `in_proj_bias`
    (3C,) become `q_proj`, `k_proj`, `v_proj` (rows [q; k; v], as nn.MultiheadAttention packs them).
    """
    out = {}
    for key, value in state_dict.items():
        key = _rename(key, to_hf=True)
        packed = _PACKED_QKV.match(key)
        if packed is None:
            out[key] = value
            continue
        prefix, kind = packed.groups()
        for name, part in zip("qkv", value.chunk(3)):
            out[f"{prefix}{name}_proj.{kind}"] = part.clone()  # own storage: safetensors-safe
    return out


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers' DeformableDetrForObjectDetection layout -> official key layout.

    The inverse of `official_to_hf`: q/k/v projections are packed back into
    `in_proj_weight` / `in_proj_bias`; `num_batches_tracked` is dropped.
    Names of transformers 5's in-memory layout (`mlp.fc1`, `o_proj`) are accepted too.
    """
    state = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue  # HF's frozen BatchNorm ignores it too
        for pattern, replacement in _TRANSFORMERS_5:
            key = pattern.sub(replacement, key)
        state[key] = value

    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        split = _SPLIT_QKV.match(key)
        if split is not None:
            prefix, name, kind = split.groups()
            parts.setdefault((prefix, kind), {})[name] = value

    out = {}
    for key, value in state.items():
        split = _SPLIT_QKV.match(key)
        if split is None:
            out[_rename(key, to_hf=False)] = value
            continue
        prefix, name, kind = split.groups()
        group = parts[(prefix, kind)]
        if set(group) != set("qkv"):  # incomplete: keep them, the loader will name them
            out[_rename(key, to_hf=False)] = value
        elif name == next(iter(group)):  # emit the packed tensor once, where the group starts
            packed = torch.cat([group["q"], group["k"], group["v"]])
            out[_rename(f"{prefix}in_proj_{kind}", to_hf=False)] = packed
    return out


def _read_hf(path) -> object:
    """A transformers weights file, or a save_pretrained folder holding one."""
    path = Path(path)
    if path.is_dir():
        names = ("model.safetensors", "pytorch_model.bin")
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{os.fspath(path)!r} has neither model.safetensors nor "
                                    f"pytorch_model.bin")
        path = found[0]
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return read_torch_file(path)


def load_hf_checkpoint(model: nn.Module, path_or_state, strict: bool = True) -> LoadResult:
    """Load HuggingFace-format weights (e.g. SenseTime/deformable-detr's) into `model`.

    path_or_state: a pytorch_model.bin / .pt file, a .safetensors file (needs the
    `safetensors` package), a save_pretrained folder, or a state dict. Names are
    translated by `hf_to_official`; names HF stores only once for a tensor the
    model shares (tied heads) fill the others. strict: as `load_official_checkpoint`.
    """
    is_path = isinstance(path_or_state, (str, os.PathLike))
    obj = _read_hf(path_or_state) if is_path else path_or_state
    state, _ = _unwrap(obj, _source(path_or_state))
    return _load_state(model, hf_to_official(state), strict, fill_shared=True)


__all__ = [
    "LoadResult",
    "hf_to_official",
    "load_hf_checkpoint",
    "load_official_checkpoint",
    "official_to_hf",
]
