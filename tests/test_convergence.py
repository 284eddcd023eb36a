"""benchmarks/convergence.py: the factor computed from synthetic runs as by hand, the
schema of convergence.json, and a resumable run end to end on a tiny set."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import convergence  # noqa: E402
from ddetr_tutorial.data import make_shapes  # noqa: E402


def record(model, seed, aps, planned=None, seconds=60.0):
    """A run's JSON as `run` writes it: one AP (a fraction) per epoch."""
    planned = planned or len(aps)
    curve = [{"epoch": e + 1, "machine": "test", "train_seconds": seconds, "AP": ap,
              "APs": ap / 2} for e, ap in enumerate(aps)]
    return {"model": model, "seed": seed, "epochs_planned": planned, "epochs_done": len(aps),
            "status": "complete" if len(aps) >= planned else "partial", "curve": curve}


def test_factor_is_detr_epochs_over_the_epoch_deformable_reaches_detr_final_ap():
    records = [
        record("deformable", 0, [0.10, 0.20, 0.30, 0.40]),
        record("deformable", 1, [0.10, 0.22, 0.32, 0.44]),   # mean: .10 .21 .31 .42
        # DETR-DC5 ends at mean 0.30 after 20 epochs: Deformable's mean first reaches
        # it at epoch 3 (0.31), so 20 / 3
        record("detr_dc5", 0, [0.01 * e for e in range(1, 21)][:19] + [0.29]),
        record("detr_dc5", 1, [0.01 * e for e in range(1, 21)][:19] + [0.31]),
        # DETR ends above every Deformable epoch: not reached
        record("detr", 0, [0.5] * 20),
        record("detr", 1, [0.3] * 5, planned=20),  # partial: not counted
    ]
    report = convergence.build_report(records)
    assert report["factor"] == pytest.approx(round(20 / 3, 2))
    dc5 = report["factors"]["detr_dc5"]
    assert dc5["deformable_epoch"] == 3 and dc5["target_AP"] == pytest.approx(0.30)
    detr = report["factors"]["detr"]
    assert detr["factor"] is None and detr["detr_seeds"] == [0]
    assert "not reached" in detr["note"]
    run = report["runs"][0]
    assert set(run) >= {"model", "seed", "epochs", "AP", "APs", "minutes", "machine"}
    assert run["epochs"] == [1, 2, 3, 4] and run["minutes"] == [1.0, 2.0, 3.0, 4.0]
    assert all(0 <= ap <= 1 for r in report["runs"] for ap in r["AP"])


def test_no_factor_before_the_runs_are_complete():
    records = [record("deformable", 0, [0.1, 0.2], planned=4), record("detr_dc5", 0, [0.1])]
    report = convergence.build_report(records)
    assert report["factor"] is None and "pending" in report["note"]


def test_variants_share_the_recipe_and_differ_in_the_detector():
    class Args:
        epochs, detr_factor, image_size = 12, 5, 128

    deform = convergence.variant_config("deformable", Args, 4)
    dc5 = convergence.variant_config("detr_dc5", Args, 4)
    assert (deform.epochs, deform.lr_drop) == (12, 10) and (dc5.epochs, dc5.lr_drop) == (60, 50)
    assert deform.pretrained_backbone == dc5.pretrained_backbone == "shapes_resnet18_w32"
    assert dc5.model == "detr" and dc5.no_object and dc5.dilation
    assert dc5.num_feature_levels == 1 and deform.num_feature_levels == 4
    same = ("lr", "lr_backbone", "batch_size", "num_queries", "hidden_dim", "clip_max_norm",
            "backbone_norm", "train_backbone_stem", "image_size", "aux_loss")
    assert {k: getattr(deform, k) for k in same} == {k: getattr(dc5, k) for k in same}


def test_run_is_resumable_and_reported(tmp_path):
    data = tmp_path / "shapes"
    make_shapes(data, num_train=16, num_val=2, size=64, seed=0, max_objects=3)
    common = ["--data", str(data), "--only", "detr", "--seeds", "0", "--epochs", "2",
              "--detr-factor", "1", "--image-size", "64", "--threads", "1",
              "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    result = tmp_path / "results" / "detr_2ep_s0.json"
    assert convergence.main(["run", *common, "--epochs-now", "1"]) == 0
    first = json.loads(result.read_text())
    assert first["status"] == "partial (1/2 epochs)"
    assert first["curve"][0]["machine"].endswith("1 threads")
    assert first["config"]["no_object"] is True
    assert convergence.main(["run", *common]) == 0
    done = json.loads(result.read_text())
    assert done["status"] == "complete" and done["curve"][0] == first["curve"][0]
    out = tmp_path / "convergence.json"
    assert convergence.main(["report", "--results-dir", str(tmp_path / "results"),
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["epochs"] for r in report["runs"]] == [[1, 2]]
    assert report["factor"] is None and out.with_suffix(".png").stat().st_size > 0
