"""The official model's state-dict layout, for the tests.

tests/reference/official_keys_{base,single_scale,box_refine,two_stage}.txt list
every key and shape of the four official variants, made by instantiating the
official code (fundamentalvision/Deformable-DETR @ 11169a6).
"""

import ast
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference"
# config preset -> key-list name
PRESET_KEYS = {"paper": "base", "single_scale": "single_scale", "box_refine": "box_refine",
               "two_stage": "two_stage"}


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of one official variant, in file order."""
    keys = {}
    for line in (REFERENCE / f"official_keys_{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        keys[key] = tuple(ast.literal_eval(shape))
    return keys
