"""Model files of every kind: this package's, the official Deformable DETR's (and DETR's,
Conditional DETR's), HuggingFace's.

`read_model_file(path)` tells which kind a file (or folder) is, reads the variant
it was trained as (from our saved config, the official `args`, HuggingFace's
`config.json`, or, failing those, from the shapes of its keys) and returns its
weights in our key layout, which is the official one. On top of it:
`load_model` (evaluate, predict, visualize), `init_from` (fine-tuning: the class
head is re-initialised when the number of classes differs) and `export_model`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .backbone import RESNETS, BasicBlock
from .checkpoints import read_torch_file, save_checkpoint
from .config import Config, build_model, get_config
from .data.coco_categories import COCO_NUM_CLASSES, UNUSED, coco_label_space
from .shipped import resolve_checkpoint
from .weights import _check_dilation, _load_state, _read_safetensors, _unwrap, hf_to_official

StateDict = dict[str, torch.Tensor]
SAVED = ("epoch", "step", "step_in_epoch", "best_ap", "versions")  # of our files, besides meta
KINDS = {"ours": "ddetr_tutorial checkpoint", "official": "official Deformable DETR checkpoint",
         "hf": "HuggingFace Deformable DETR weights"}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Heads whose rows are the classes: re-initialised when fine-tuning on other classes
# (one per decoder layer in Deformable DETR; one shared, unnumbered, in the dense DETRs).
CLASS_HEAD = re.compile(r"^(transformer\.decoder\.)?class_embed(\.\d+)?\.(weight|bias)$")


@dataclass(frozen=True)
class ModelFile:
    """One checkpoint, read: its kind, the config of the model it fits, its weights in
    our key layout, its label space (`meta`: category_ids, class_names) and where the
    variant was read from (`found_in`), with anything that had to be assumed (`notes`)."""

    kind: str           # "ours", "official" or "hf"
    path: Path
    cfg: Config
    state: StateDict = dataclasses.field(repr=False)
    meta: dict = dataclasses.field(repr=False)
    found_in: str       # "its saved config", "its saved args", "config.json", "its keys"
    notes: tuple[str, ...] = ()
    args: object = dataclasses.field(default=None, repr=False)  # official argparse args
    saved: dict = dataclasses.field(default_factory=dict)  # epoch, step, best_ap, versions

    def describe(self) -> str:
        """One line: what was detected, e.g. for --checkpoint."""
        cfg = self.cfg
        parts = [cfg.backbone + ("-DC5" if cfg.dilation else ""),
                 "single-scale" if cfg.num_feature_levels == 1
                 else f"{cfg.num_feature_levels} levels"]
        parts += [name for name, on in (("box refinement", cfg.with_box_refine),
                                        ("two-stage", cfg.two_stage)) if on]
        coco = " (COCO)" if self.meta.get("category_ids") == coco_label_space()[0] else ""
        queries = (f"{cfg.num_queries} anchors x {cfg.num_patterns} patterns"
                   if cfg.model == "anchor_detr" else f"{cfg.num_queries} queries")
        parts += [queries, f"{cfg.num_classes} classes{coco}"]
        kind = KINDS[self.kind]
        if cfg.model == "detr":
            head = "softmax + no-object" if cfg.no_object else "focal"
            kind = kind.replace("Deformable DETR", "DETR") if self.kind == "official" else kind
            parts.insert(0, f"model=detr ({head})")
        elif cfg.model == "conditional_detr":
            if self.kind == "official":
                kind = kind.replace("Deformable DETR", "Conditional DETR")
            parts.insert(0, "model=conditional_detr (focal)")
        elif cfg.model in ("anchor_detr", "efficient_detr"):
            parts.insert(0, f"model={cfg.model} (focal)")
        assumed = f"; assumed {', '.join(self.notes)}" if self.notes else ""
        return (f"{os.fspath(self.path)}: {kind}, {', '.join(parts)} "
                f"(variant from {self.found_in}{assumed})")


# ------------------------------------------------------------------------- reading

def read_model_file(path) -> ModelFile:
    """Read any checkpoint: a shipped name, one of our training or exported files, an
    official `.pth` ({'model', 'args', ...} or a bare state dict), or HuggingFace weights
    (a save_pretrained folder, or its model.safetensors / pytorch_model.bin, with the
    config.json beside it when there is one). A ModelFile is returned as it is."""
    if isinstance(path, ModelFile):
        return path
    path = resolve_checkpoint(path)
    if path.is_dir():
        found = [path / name for name in HF_WEIGHTS if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{os.fspath(path)} is a folder without "
                                    f"{' or '.join(HF_WEIGHTS)}; expected a HuggingFace "
                                    f"save_pretrained folder, or a checkpoint file")
        return _huggingface(path, _read_weights(found[0]))  # named by its folder
    if path.suffix == ".safetensors":
        return _huggingface(path, _read_safetensors(path))
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and "config" in obj and isinstance(obj.get("model"), Mapping):
        return _ours(path, obj)
    state, args = _unwrap(obj, repr(os.fspath(path)))
    if any(k.startswith("model.") for k in state):  # transformers names the body `model.`
        return _huggingface(path, state)
    return _official(path, state, args, epoch=obj.get("epoch") if isinstance(obj, Mapping)
                     else None)


def _read_weights(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    state, _ = _unwrap(read_torch_file(path), repr(os.fspath(path)))
    return state


def _ours(path: Path, obj: Mapping) -> ModelFile:
    missing = [k for k in ("epoch", "step") if k not in obj]
    if missing:
        raise ValueError(f"{os.fspath(path)} has a 'config' and a 'model' but lacks {missing}: "
                         f"not a checkpoint written by this package's train or export")
    try:
        cfg = Config(**obj["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{os.fspath(path)}: its saved config is not valid here: {err}") from err
    saved = {k: obj[k] for k in SAVED if k in obj}
    return ModelFile("ours", path, cfg, dict(obj["model"]), dict(obj.get("meta") or {}),
                     "its saved config", saved=saved)


def _official(path: Path, state: StateDict, args, epoch=None) -> ModelFile:
    found, notes = variant_from_keys(state, path)
    # DETR's files come from facebookresearch/detr, Conditional DETR's from
    # Atten4Vis/ConditionalDETR: their main.py's defaults are the base.
    base = {"detr": DETR_BASE, "conditional_detr": CONDITIONAL_DETR_BASE}.get(found.get("model"),
                                                                             {})
    if args is not None:  # what the keys cannot tell (heads vs points, DC5) is in the args
        given = vars(args) if hasattr(args, "__dict__") else dict(args)
        fields = {**base, **{k: v for k, v in given.items() if k in _ARGS_FIELDS}}
        fields["num_classes"], found_in, notes = found["num_classes"], "its saved args", []
    else:
        fields, found_in = {**base, **found}, "its keys"
    cfg = _config(fields, path, found_in)
    saved = {"epoch": epoch} if isinstance(epoch, int) else {}
    return ModelFile("official", path, cfg, state, _label_space(cfg.num_classes), found_in,
                     tuple(notes), args, saved)


def _huggingface(path: Path, hf_state: StateDict) -> ModelFile:
    state = hf_to_official(hf_state)
    config_json = (path if path.is_dir() else path.parent) / "config.json"
    if not config_json.is_file():
        fields, notes = variant_from_keys(state, path)
        cfg = _config(fields, path, "its keys")
        return ModelFile("hf", path, cfg, state, _label_space(cfg.num_classes), "its keys",
                         (*notes, "no config.json beside it"))
    try:
        hf = json.loads(config_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{os.fspath(config_json)} is not valid JSON: {err}") from err
    fields, labels = _fields_from_hf_config(hf, config_json)
    if "num_classes" not in fields:
        fields["num_classes"] = variant_from_keys(state, path)[0]["num_classes"]
    cfg = _config(fields, path, "config.json")
    meta = _label_space(cfg.num_classes)
    if labels and max(labels) < cfg.num_classes:  # id2label may skip COCO's unused ids
        meta["class_names"] = [labels.get(i, UNUSED) for i in range(cfg.num_classes)]
    return ModelFile("hf", path, cfg, state, meta, "config.json")


def _label_space(num_classes: int) -> dict:
    """91 classes are COCO's ids; any other head's labels are its row numbers."""
    if num_classes == COCO_NUM_CLASSES:
        ids, names = coco_label_space()
        return {"category_ids": ids, "class_names": names}
    return {"category_ids": list(range(num_classes)), "class_names": []}


def _config(fields: dict, path: Path, found_in: str) -> Config:
    try:
        return Config(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{os.fspath(path)}: the variant read from {found_in} is not one this "
                         f"library builds: {err}") from err


# Official main.py arguments that are our config fields under the same name.
_ARGS_FIELDS = ("backbone", "dilation", "num_feature_levels", "enc_layers", "dec_layers",
                "dim_feedforward", "hidden_dim", "dropout", "nheads", "num_queries",
                "dec_n_points", "enc_n_points", "aux_loss", "with_box_refine", "two_stage",
                "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef",
                "bbox_loss_coef", "giou_loss_coef", "focal_alpha", "lr", "lr_backbone",
                "lr_linear_proj_mult", "weight_decay", "batch_size", "epochs", "lr_drop",
                "clip_max_norm", "eos_coef")
# The fields that make facebookresearch/detr's model and recipe (get_config("detr")).
DETR_BASE = {k: v for k, v in get_config("detr").to_dict().items()
             if k in ("model", "no_object", "eos_coef", "position_offset", "num_feature_levels",
                      "num_queries", "dim_feedforward", "set_cost_class", "cls_loss_coef",
                      "lr", "lr_backbone", "epochs", "lr_drop")}
# ... and Atten4Vis/ConditionalDETR's (get_config("conditional_detr")).
CONDITIONAL_DETR_BASE = {k: v for k, v in get_config("conditional_detr").to_dict().items()
                         if k in ("model", "position_offset", "num_feature_levels",
                                  "num_queries", "dim_feedforward", "lr", "lr_backbone",
                                  "epochs", "lr_drop")}

# HuggingFace DeformableDetrConfig name -> our field.
_HF_FIELDS = {"d_model": "hidden_dim", "encoder_layers": "enc_layers",
              "decoder_layers": "dec_layers", "encoder_attention_heads": "nheads",
              "encoder_ffn_dim": "dim_feedforward", "dropout": "dropout",
              "num_feature_levels": "num_feature_levels", "encoder_n_points": "enc_n_points",
              "decoder_n_points": "dec_n_points", "with_box_refine": "with_box_refine",
              "two_stage": "two_stage", "dilation": "dilation", "backbone": "backbone",
              "auxiliary_loss": "aux_loss", "focal_alpha": "focal_alpha",
              "class_cost": "set_cost_class", "bbox_cost": "set_cost_bbox",
              "giou_cost": "set_cost_giou", "bbox_loss_coefficient": "bbox_loss_coef",
              "giou_loss_coefficient": "giou_loss_coef"}
# Pairs our model builds as one value (one width of heads and of FFN for both stacks).
_HF_SAME = (("encoder_attention_heads", "decoder_attention_heads"),
            ("encoder_ffn_dim", "decoder_ffn_dim"))


def _fields_from_hf_config(hf: dict, where: Path) -> tuple[dict, dict[int, str]]:
    """Our config fields and {label: class name} from a transformers config.json."""
    if hf.get("model_type") != "deformable_detr":
        raise ValueError(f"{os.fspath(where)} has model_type={hf.get('model_type')!r}; "
                         f"expected 'deformable_detr' (DeformableDetrForObjectDetection)")
    for a, b in _HF_SAME:
        if a in hf and b in hf and hf[a] != hf[b]:
            raise ValueError(f"{os.fspath(where)} has {a}={hf[a]} but {b}={hf[b]}; this "
                             f"library's model uses one value for both")
    fields = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items()
              if hf.get(theirs) is not None}
    # Two-stage keeps its top-k proposals as the decoder's queries.
    queries = hf.get("two_stage_num_proposals") if hf.get("two_stage") else hf.get("num_queries")
    if queries is not None:
        fields["num_queries"] = queries
    labels = {}
    id2label = hf.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        try:
            labels = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{os.fspath(where)}: id2label keys must be integers: {err}") from err
        if sorted(labels) == list(range(len(labels))):  # else the class head's rows tell
            fields["num_classes"] = len(labels)
    return fields, labels


# ------------------------------------------------------------------ the variant from keys

_LAYER = re.compile(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.")
_BLOCK = re.compile(r"^backbone\.0\.body\.layer(\d)\.(\d+)\.")
ASSUMED_HEADS = 8  # the keys hold M*L*K rows, not M: the official default


def variant_from_keys(state: Mapping[str, torch.Tensor], where) -> tuple[dict, list[str]]:
    """Config fields of a Deformable DETR state dict (official layout), read from the
    keys and shapes alone, and what had to be assumed: the number of heads M (the
    keys give M*L*K), C5 without dilation (DC5 has the same keys) and, for two-stage,
    300 proposals (no tensor's shape holds their number)."""
    if _DETR_KEY in state:
        return _detr_from_keys(state, where, DETR_BASE, no_object_rows=1)
    if _CONDITIONAL_DETR_KEY in state:
        return _detr_from_keys(state, where, CONDITIONAL_DETR_BASE, no_object_rows=0)
    for key in ("transformer.level_embed", "class_embed.0.weight", "backbone.0.body.conv1.weight"):
        if key not in state:
            raise ValueError(f"{os.fspath(where)} has no {key}: not a Deformable DETR state "
                             f"dict (its first keys: {list(state)[:5]})")
    n_levels, width = state["transformer.level_embed"].shape
    layers = _layer_indices(state)
    two_stage = "transformer.enc_output.weight" in state
    fields = {"num_feature_levels": n_levels, "hidden_dim": width,
              "enc_layers": len(layers["encoder"]), "dec_layers": len(layers["decoder"]),
              "num_classes": state["class_embed.0.weight"].shape[0],
              "with_box_refine": any(k.startswith("transformer.decoder.bbox_embed.")
                                     for k in state),
              "two_stage": two_stage, "nheads": ASSUMED_HEADS, **_backbone_from_keys(state, where)}
    notes = [f"nheads={ASSUMED_HEADS}", "dilation=False"]
    stack = "encoder" if layers["encoder"] else "decoder"
    fields["dim_feedforward"] = state[f"transformer.{stack}.layers.0.linear1.weight"].shape[0]
    for stack, attn, field in (("encoder", "self_attn", "enc_n_points"),
                               ("decoder", "cross_attn", "dec_n_points")):
        key = f"transformer.{stack}.layers.0.{attn}.attention_weights.weight"
        if key in state:  # (M*L*K, C)
            rows = state[key].shape[0]
            if rows % (ASSUMED_HEADS * n_levels):
                raise ValueError(f"{os.fspath(where)}: {key} has {rows} rows, not a multiple of "
                                 f"M*L = {ASSUMED_HEADS}*{n_levels}; pass a file with its config")
            fields[field] = rows // (ASSUMED_HEADS * n_levels)
    if two_stage:
        notes.append("300 two-stage proposals")
    else:
        fields["num_queries"] = state["query_embed.weight"].shape[0]
    return fields, notes


def _layer_indices(state) -> dict[str, set[int]]:
    """{"encoder": {0, 1, ...}, "decoder": {...}}: the layer numbers the keys hold."""
    layers = {"encoder": set(), "decoder": set()}
    for key in state:
        match = _LAYER.match(key)
        if match:
            layers[match[1]].add(int(match[2]))
    return layers


_DETR_KEY = "transformer.decoder.layers.0.multihead_attn.in_proj_weight"
_CONDITIONAL_DETR_KEY = "transformer.decoder.layers.0.ca_qpos_sine_proj.weight"


def _detr_from_keys(state, where, base, no_object_rows) -> tuple[dict, list[str]]:
    """facebookresearch/detr's layout (and Conditional DETR's, which adds query_scale and
    ref_point_head to the decoder): one class head of num_classes + no_object_rows rows
    (DETR's last is "no object"), (Q, C) queries, dense layers whose heads the keys do
    not tell."""
    for key in ("query_embed.weight", "class_embed.weight", "backbone.0.body.conv1.weight",
                "transformer.decoder.layers.0.linear1.weight"):
        if key not in state:
            raise ValueError(f"{os.fspath(where)} has no {key}: not a {base['model']} state "
                             f"dict in the official layout (its first keys: {list(state)[:5]})")
    layers = _layer_indices(state)
    queries, width = state["query_embed.weight"].shape
    fields = {**base, "hidden_dim": width, "num_queries": queries,
              "num_classes": state["class_embed.weight"].shape[0] - no_object_rows,
              "enc_layers": len(layers["encoder"]), "dec_layers": len(layers["decoder"]),
              "dim_feedforward": state["transformer.decoder.layers.0.linear1.weight"].shape[0],
              "nheads": ASSUMED_HEADS, **_backbone_from_keys(state, where)}
    return fields, [f"nheads={ASSUMED_HEADS}", "dilation=False"]


def _backbone_from_keys(state, where) -> dict:
    """backbone (the ResNet depth) and backbone_width from the block counts and conv1."""
    blocks = {}
    for key in state:
        match = _BLOCK.match(key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    counts = tuple(len(blocks.get(stage, ())) for stage in (1, 2, 3, 4))
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    for name, (block, layout) in RESNETS.items():
        if layout == counts and (block is not BasicBlock) == bottleneck:
            return {"backbone": name,
                    "backbone_width": state["backbone.0.body.conv1.weight"].shape[0]}
    raise ValueError(f"{os.fspath(where)}: its backbone has {counts} blocks per stage "
                     f"({'bottleneck' if bottleneck else 'basic'}); expected one of "
                     f"{sorted(RESNETS)}")


# ------------------------------------------------------------------------- using one

def _load(model: nn.Module, source: ModelFile, strict: bool):
    if source.kind == "ours" and strict:
        model.load_state_dict(source.state)
        return [], [], []
    if source.kind == "official":
        _check_dilation(model, source.args, strict)
    return _load_state(model, source.state, strict, fill_shared=source.kind == "hf",
                       note=source.describe())


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(path, device=None, **overrides):
    """A model from any checkpoint (see `read_model_file`), in eval mode, on `device`.

    Returns (model, cfg, postprocess, meta); meta holds category_ids, class_names
    and `detected`, the one line that says what the file is. `overrides` change config
    fields that do not alter the weights (e.g. op_backend); a file saved with
    op_backend="cuda" runs with "auto" on a device without CUDA.
    """
    source = read_model_file(path)
    device = _device(device)
    cfg = source.cfg.replace(pretrained_backbone=None, **overrides)
    if cfg.op_backend == "cuda" and device.type != "cuda" and "op_backend" not in overrides:
        cfg = cfg.replace(op_backend="auto")
    model, _, postprocess = build_model(cfg)
    _load(model, source, strict=True)
    model.to(device).eval()
    meta = {**source.meta, "kind": source.kind, "detected": source.describe()}
    return model, cfg, postprocess, meta


@dataclass(frozen=True)
class InitReport:
    """What `init_from` did with each of the model's tensors."""

    source: str
    loaded: list[str]
    reinitialised: list[str]   # class-head tensors of another number of classes
    skipped: list[str]         # other shape mismatches: kept their fresh init
    missing: list[str]         # in the model, not in the file: kept their fresh init
    unexpected: list[str]      # in the file, not in the model: ignored

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for what, keys in (("re-initialised", self.reinitialised), ("skipped", self.skipped),
                           ("kept the init of missing", self.missing),
                           ("ignored unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                parts.append(f"{what} {len(keys)}: {shown}")
        return f"init from {self.source}; " + "; ".join(parts)


def init_from(model: nn.Module, path) -> InitReport:
    """Start fine-tuning from any checkpoint: load every tensor whose name and shape fit,
    and keep the model's fresh initialisation for the class heads when the number of
    classes differs (two-stage's encoder head included: it is class_embed[-1]).
    A file that fits less than half of the model is refused: its architecture differs."""
    source = read_model_file(path)
    missing, unexpected, mismatched = _load(model, source, strict=False)
    expected = list(model.state_dict())
    bad = {k for k, *_ in mismatched}
    loaded = [k for k in expected if k not in bad and k not in missing]
    heads = [k for k in bad if CLASS_HEAD.match(k)]
    report = InitReport(source.describe(), loaded, sorted(heads),
                        sorted(bad - set(heads)), list(missing), list(unexpected))
    if len(loaded) < len(expected) / 2:
        raise ValueError(f"only {len(loaded)} of the model's {len(expected)} tensors fit "
                         f"{os.fspath(source.path)}: its architecture differs ({report})")
    return report


def export_model(checkpoint, path) -> Path:
    """Write any checkpoint as this package's weights-only file (atomically): model,
    config, meta (label space; what it was exported from), epoch/step and best AP;
    no optimizer, schedule or RNG state. `load_model` and `--checkpoint` read it."""
    source = read_model_file(checkpoint)
    model, _, _, _ = load_model(source, device="cpu")  # checks that the weights fit
    meta = dict(source.meta)
    if source.kind != "ours":
        meta["exported_from"] = source.describe()
    versions = {"ddetr_tutorial": __version__, "torch": str(torch.__version__)}
    slim = {"model": model.state_dict(), "config": source.cfg.to_dict(), "meta": meta,
            "epoch": 0, "step": 0, "step_in_epoch": 0, "best_ap": None, "versions": versions,
            **source.saved}
    return save_checkpoint(slim, path)
