"""The checkpoints shipped inside the package, by name.

`tiny_shapes.pth` (12.6 MiB, model card `tiny_shapes.md` beside it) is the `tiny`
config trained on the synthetic shapes set. The files travel as package data, so
a name works after `pip install .` from any folder, wherever a checkpoint path is
accepted: `load_model("tiny_shapes")`, `--checkpoint tiny_shapes`.

`shapes_resnet18_w32.pth` (card `.md` and full record `.json` beside it) is a
quarter-width ResNet-18 pretrained on synthetic classification
(`pretraining.py`), in torchvision's key layout; its name works wherever a
pretrained backbone file is accepted (`pretrained_backbone="shapes_resnet18_w32"`).
"""

from __future__ import annotations

import os
from pathlib import Path

FOLDER = Path(__file__).resolve().parent

# name -> file inside this package
SHIPPED = {
    "tiny_shapes": FOLDER / "tiny_shapes.pth",
}
# name -> torchvision-format ResNet weights inside this package (backbone pretraining)
SHIPPED_BACKBONES = {
    "shapes_resnet18_w32": FOLDER / "shapes_resnet18_w32.pth",
}


def shipped_checkpoint(name: str) -> Path:
    """The file of a shipped checkpoint, by name (never a local file)."""
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a shipped checkpoint; shipped: {_names()}")
    path = SHIPPED[name]
    if not path.is_file():  # an install that dropped the package data
        raise FileNotFoundError(f"the shipped checkpoint {name!r} is missing from the package: "
                                f"expected {path} (reinstall ddetr-tutorial)")
    return path


def model_card(name: str) -> Path:
    """The model card (Markdown) of a shipped checkpoint: how it was made, its AP."""
    return shipped_checkpoint(name).with_suffix(".md")


def resolve_checkpoint(name_or_path) -> Path:
    """A checkpoint file from a shipped name (`"tiny_shapes"`) or a path.

    An existing file (or folder: HuggingFace weights) wins over a name, so a local
    file is never shadowed; a name resolves to its file inside the package. Anything
    else is a ValueError that names the value, the shipped names and that nothing
    exists there.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint is a file path or a shipped name ({_names()}), "
                        f"got {type(name_or_path).__name__} {name_or_path!r}")
    path = Path(name_or_path)
    if path.is_file() or path.is_dir():
        return path
    if isinstance(name_or_path, str) and name_or_path in SHIPPED:
        return shipped_checkpoint(name_or_path)
    raise ValueError(f"no checkpoint {os.fspath(name_or_path)!r}: nothing exists at "
                     f"{path.resolve()} and it is not a shipped name ({_names()})")


def resolve_backbone_weights(name_or_path) -> Path:
    """Pretrained backbone weights from a shipped name (`"shapes_resnet18_w32"`) or a path.

    An existing file wins over a name; a shipped name resolves to its file inside the
    package (FileNotFoundError if the install dropped it); anything else stays a path.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"pretrained backbone weights are a file path or a shipped name "
                        f"({_names(SHIPPED_BACKBONES)}), got {type(name_or_path).__name__} "
                        f"{name_or_path!r}")
    path = Path(name_or_path)
    if path.is_file() or not (isinstance(name_or_path, str) and name_or_path in SHIPPED_BACKBONES):
        return path
    shipped = SHIPPED_BACKBONES[name_or_path]
    if not shipped.is_file():
        raise FileNotFoundError(f"the shipped backbone {name_or_path!r} is missing from the "
                                f"package: expected {shipped} (reinstall ddetr-tutorial)")
    return shipped


def _names(table=SHIPPED) -> str:
    return ", ".join(repr(n) for n in table)
