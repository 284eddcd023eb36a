"""benchmarks/paper_claims.py: a resumable run end to end on a tiny set, and the
verdict logic of the report on synthetic results."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paper_claims  # noqa: E402
from ddetr_tutorial.data import make_shapes  # noqa: E402


def record(variant, seed, aps, epochs=None, aps_small=None):
    """A run's JSON as `run` writes it: one AP (x1, not x100) per epoch."""
    epochs = epochs or len(aps)
    curve = [{"epoch": e + 1, "machine": "test", "AP": ap,
              "APs": (aps_small or aps)[e]} for e, ap in enumerate(aps)]
    return {"variant": variant, "seed": seed, "epochs": epochs, "epochs_done": len(aps),
            "status": "complete" if len(aps) >= epochs else "partial", "curve": curve}


def test_report_verdicts():
    runs = {
        "deformable": [record("deformable", 0, [0.1, 0.2, 0.30, 0.40]),
                       record("deformable", 1, [0.1, 0.2, 0.31, 0.42])],
        # DETR-DC5 reaches Deformable's final 41 AP at its epoch 10: 2.5x
        "detr_dc5": [record("detr_dc5", s, [0.02 * e + 0.22 for e in range(1, 13)])
                     for s in (0, 1)],
        "single_scale_k1": [record("single_scale_k1", 0, [0.1, 0.3])],
        "ms_inputs_k1": [record("ms_inputs_k1", 0, [0.1, 0.35])],    # +5: holds
        "ms_inputs_k4": [record("ms_inputs_k4", 0, [0.1, 0.36])],    # +1: within spread 2
        "box_refine": [record("box_refine", 0, [0.1, 0.30])],        # -11: does not hold
        "two_stage": [record("two_stage", 0, [0.1, 0.2], epochs=4)],  # partial: pending
    }
    report = paper_claims.build_report(runs)
    assert report["noise"] == pytest.approx(2.0)
    claims = {c["claim"]: c for c in report["claims"]}
    convergence = claims["convergence: epochs DETR-DC5 needs for Deformable DETR's AP"]
    assert convergence["ours"].startswith("2.5x (10 vs 4 epochs)")
    assert convergence["status"] == "holds"
    assert claims["multi-scale inputs: AP"]["ours"] == pytest.approx(5.0)
    assert claims["multi-scale inputs: AP"]["status"] == "holds"
    assert claims["K=4 instead of K=1: AP"]["status"].startswith("inconclusive")
    assert claims["multi-scale attention: AP"]["ours"] == pytest.approx(41.0 - 36.0)
    assert claims["+ box refinement: AP"]["status"] == "does not hold"
    assert claims["++ two-stage: AP"]["status"] == "pending (waiting for two_stage)"
    assert "| multi-scale inputs: AP | +1.7 | +5.0 | holds |" in paper_claims.markdown(report)


def test_no_seed_spread_means_no_verdict():
    runs = {"single_scale_k1": [record("single_scale_k1", 0, [0.3])],
            "ms_inputs_k1": [record("ms_inputs_k1", 0, [0.35])]}
    claims = {c["claim"]: c for c in paper_claims.build_report(runs)["claims"]}
    assert claims["multi-scale inputs: AP"]["status"] == "pending (no seed spread yet)"
    assert (claims["convergence and small objects vs DETR-DC5"]["status"]
            == "pending (waiting for deformable, detr_dc5)")


def test_run_is_resumable_and_reported(tmp_path):
    data = tmp_path / "shapes"
    # 16 images: one step per epoch at the tiny preset's batch of 16
    make_shapes(data, num_train=16, num_val=2, size=64, seed=0, max_objects=3)
    common = ["--data", str(data), "--only", "ms_inputs_k1", "--seeds", "0", "--epochs", "2",
              "--image-size", "64", "--runs-dir", str(tmp_path / "runs"),
              "--results-dir", str(tmp_path / "results")]
    result = tmp_path / "results" / "ms_inputs_k1_s0.json"
    # no time left: nothing trains, the run is recorded as not started
    assert paper_claims.main(["run", *common, "--budget-min", "0"]) == 0
    assert json.loads(result.read_text())["status"] == "partial (0/2 epochs)"
    # one epoch now, then stop
    assert paper_claims.main(["run", *common, "--epochs-now", "1"]) == 0
    first = json.loads(result.read_text())
    assert first["status"] == "partial (1/2 epochs)" and len(first["curve"]) == 1
    assert first["config"]["cross_level_attention"] is False
    assert first["config"]["enc_n_points"] == 1 and first["curve"][0]["machine"]
    # run again: it continues from the checkpoint to the end
    assert paper_claims.main(["run", *common]) == 0
    done = json.loads(result.read_text())
    assert done["status"] == "complete" and [r["epoch"] for r in done["curve"]] == [1, 2]
    assert done["curve"][0] == first["curve"][0]
    # other options would silently change the schedule of the saved run: refused
    with pytest.raises(SystemExit, match="another configuration"):
        paper_claims.main(["run", *[c if c != "2" else "3" for c in common]])
    out = tmp_path / "report" / "paper_claims.json"
    assert paper_claims.main(["report", "--results-dir", str(tmp_path / "results"),
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["variants"]["ms_inputs_k1"]["seeds"] == [0]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| ms_inputs_k1 | 0 |" in out.with_suffix(".md").read_text()
