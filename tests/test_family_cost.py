"""benchmarks/family_cost.py: every member builds at its tiny size and trains a step;
the JSON holds ratios to Deformable DETR and the machine."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import family_cost  # noqa: E402


def test_every_member_builds_at_its_tiny_size():
    for name in family_cost.MEMBERS:
        model, criterion, _ = family_cost.build(name)
        assert sum(p.numel() for p in model.parameters()) > 0, name


def test_one_small_run_writes_ratios(tmp_path):
    out = tmp_path / "cost.json"
    family_cost.main(["--only", "sparse_rcnn", "--batch", "2", "--size", "64", "--rounds", "1",
                      "--repeats", "1", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["members"]
    assert set(rows) == {"deformable_detr", "sparse_rcnn"}
    assert rows["deformable_detr"]["step_ratio"] == 1.0
    assert rows["sparse_rcnn"]["params_ratio"] == round(
        rows["sparse_rcnn"]["params"] / rows["deformable_detr"]["params"], 3)
    assert result["machine"]["cpu_count"] and result["batch"] == 2
