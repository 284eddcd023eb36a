"""The official model's state-dict layout, and synthetic official / HF weights, for the tests.

tests/reference/official_keys_{base,single_scale,box_refine,two_stage}.txt list
every key and shape of the four official variants, made by instantiating the
official code (fundamentalvision/Deformable-DETR @ 11169a6);
official_keys_detr_r50[_dc5].txt those of DETR (facebookresearch/detr, named on
their first line), official_keys_conditional_detr_r50[_dc5].txt Conditional DETR's
(Atten4Vis/ConditionalDETR, named on their `#` first line).
"""

import ast
import math
import re
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parent / "reference"
# config preset -> key-list name
PRESET_KEYS = {"paper": "base", "single_scale": "single_scale", "box_refine": "box_refine",
               "two_stage": "two_stage"}
# facebookresearch/detr @ 29901c5 (first line of each file): config preset -> key-list name
DETR_PRESET_KEYS = {"detr": "detr_r50", "detr_dc5": "detr_r50_dc5"}
# Atten4Vis/ConditionalDETR @ 8ea7c3f (first line of each file)
CONDITIONAL_DETR_PRESET_KEYS = {"conditional_detr": "conditional_detr_r50",
                                "conditional_detr_dc5": "conditional_detr_r50_dc5"}


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of one official variant, in file order."""
    keys = {}
    for line in (REFERENCE / f"official_keys_{name}.txt").read_text().splitlines():
        if line.startswith("#"):  # the newer files name the repository, commit and args
            continue
        key, shape = line.split("\t")
        keys[key] = tuple(ast.literal_eval(shape))
    return keys


def shared_source(key, refine):
    """The key whose tensor `key` also is in an official checkpoint, or None.

    Without refinement class_embed.0..5 (and bbox_embed.0..5) are one module; with
    it, transformer.decoder.bbox_embed.i (two-stage: also class_embed.i) is bbox_embed.i.
    """
    if refine:
        match = re.fullmatch(r"transformer\.decoder\.((?:bbox|class)_embed\..+)", key)
        return match and match[1]
    match = re.fullmatch(r"(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    return f"{match[1]}.0.{match[3]}" if match and match[2] != "0" else None


def random_value(key, shape, generator):
    """Random values that keep a 50-layer forward pass finite."""
    if key.endswith("running_var"):
        return torch.rand(shape, generator=generator) + 0.5
    value = torch.randn(shape, generator=generator)
    return value / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.1 * value


def synthetic_official(keys, seed=0):
    refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)
    g = torch.Generator().manual_seed(seed)
    own = {k: random_value(k, s, g) for k, s in keys.items() if shared_source(k, refine) is None}
    return {k: own[shared_source(k, refine) or k] for k in keys}  # the file's key order


def transformers_layout(official):
    """transformers' conversion (convert_deformable_detr_to_pytorch.py) restated from
    its rules, as an oracle independent of ours: substring renames in its order, then
    q/k/v split out of in_proj, then the `model.` prefix on everything but the heads."""
    out = {}
    for key, value in official.items():
        key = key.replace("backbone.0.body", "backbone.conv_encoder.model")
        key = key.replace("transformer.", "")
        if "norm1" in key:
            key = key.replace("norm1", "self_attn_layer_norm" if "encoder" in key
                              else "encoder_attn_layer_norm")
        if "norm2" in key:
            key = key.replace("norm2", "final_layer_norm" if "encoder" in key
                              else "self_attn_layer_norm")
        for old, new in (("norm3", "final_layer_norm"), ("linear1", "fc1"), ("linear2", "fc2"),
                         ("query_embed", "query_position_embeddings"),
                         ("cross_attn", "encoder_attn")):
            key = key.replace(old, new)
        if ".self_attn.in_proj_" in key:
            stem, kind = key.split(".in_proj_")
            for name, part in zip("qkv", value.chunk(3)):
                out[f"model.{stem}.{name}_proj.{kind}"] = part
            continue
        out[key if key.startswith(("class_embed", "bbox_embed")) else "model." + key] = value
    return out


def deduplicated(hf, keep):
    """What safetensors-style saving keeps: one name per shared tensor (`keep` picks it)."""
    names_of = {}
    for key, value in hf.items():
        names_of.setdefault(id(value), []).append(key)
    return {keep(sorted(names)): hf[names[0]].clone() for names in names_of.values()}
