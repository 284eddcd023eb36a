"""benchmarks/detr_family.py: the claims' verdicts computed from synthetic runs as by
hand, the attention-memory curves, and a resumable race run end to end on a tiny set."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import detr_family  # noqa: E402
from ddetr_tutorial.data import make_shapes  # noqa: E402


def record(model, seed, aps, planned=None):
    planned = planned or len(aps)
    curve = [{"epoch": e + 1, "machine": "test", "train_seconds": 30.0, "AP": ap, "APs": ap / 2}
             for e, ap in enumerate(aps)]
    return {"model": model, "seed": seed, "epochs_planned": planned, "epochs_done": len(aps),
            "status": "complete" if len(aps) >= planned else "partial", "curve": curve}


def claims_of(records, convergence_records=(), memory=None):
    report = detr_family.build_report(records, list(convergence_records), memory=memory)
    return report, {c["claim"].split(":")[0].split(" ")[0]: c for c in report["claims"]}


def test_verdicts_against_the_seed_spread():
    base = "deformable_detr_two_stage"
    records = [record(base, 0, [0.1, 0.30]), record(base, 1, [0.1, 0.32]),  # spread 0.02
               record("dn_deformable_detr", 0, [0.2, 0.36]),               # +0.05: holds
               record("dn_deformable_detr", 1, [0.2, 0.38]),
               record("h_deformable_detr", 0, [0.2, 0.32]),                # +0.01: inside
               record("h_deformable_detr", 1, [0.2, 0.31]),
               record("efficient_detr", 0, [0.2, 0.30]),                   # -0.01: matches
               record("efficient_detr", 1, [0.2, 0.30])]
    _, claims = claims_of(records)
    assert claims["DN-DETR"]["verdict"] == "holds"
    assert claims["DN-DETR"]["detail"]["diff"] == pytest.approx(0.06)
    assert claims["DN-DETR"]["detail"]["noise"] == pytest.approx(0.02)
    assert claims["H-DETR"]["verdict"] == "inconclusive"
    assert claims["Efficient"]["verdict"] == "holds"
    worse = [r for r in records if r["model"] != "efficient_detr"] + [
        record("efficient_detr", 0, [0.2, 0.2]), record("efficient_detr", 1, [0.2, 0.21])]
    assert claims_of(worse)[1]["Efficient"]["verdict"] == "does not hold"
    # members with no complete runs are pending, never judged
    assert claims["Dynamic"]["verdict"] == "inconclusive" and "pending" in claims["Dynamic"]["ours"]


def test_convergence_factor_per_seed_against_detr_long_schedule():
    detr = [record("detr", s, [0.01 * e for e in range(1, 61)]) for s in (0, 1)]  # final 0.60
    # seed 0 reaches 0.60 at epoch 6 (10x), seed 1 at epoch 12 (5x): straddles 6.7
    cond = [record("conditional_detr", 0, [0.1 * e for e in range(1, 13)]),
            record("conditional_detr", 1, [0.05 * e for e in range(1, 13)])]
    sparse = [record("sparse_rcnn", s, [0.2 * e for e in range(1, 13)]) for s in (0, 1)]
    report, claims = claims_of(cond + sparse, detr)
    c = claims["Conditional"]
    assert c["detail"]["reach_epochs"] == [6, 12] and c["detail"]["factors"] == [10.0, 5.0]
    assert c["verdict"] == "inconclusive"
    assert claims["Sparse"]["verdict"] == "holds"  # epoch 3: 20x >= 3x
    assert report["long_schedules"]["detr"]["epochs"] == 60
    slow = [record("conditional_detr", s, [0.01] * 12) for s in (0, 1)]
    assert claims_of(slow, detr)[1]["Conditional"]["verdict"] == "does not hold"


def test_memory_claim_and_schema(tmp_path):
    out = tmp_path / "memory.json"
    assert detr_family.main(["memory", "--sides", "8", "32", "--repeats", "1",
                             "--budget-gib", "0.0001", "--out", str(out)]) == 0
    memory = json.loads(out.read_text())
    enc = memory["curves"]["encoder"]
    assert set(enc) == {"dense", "dense_fused", "conditional", "rcda", "deformable"}
    assert all(r["peak_mib"] is not None for r in enc["dense_fused"])  # never skipped
    assert enc["dense"][1]["peak_mib"] is None and "budget" in enc["dense"][1]["skipped"]
    assert all(r["peak_mib"] is not None and r["peak_mib"] >= 0 for r in enc["rcda"])
    assert memory["curves"]["decoder"]["dense"][0]["queries"] == 30
    claim = detr_family.memory_claim(memory)
    assert claim["verdict"] == "inconclusive"  # dense never ran at 32 x 32
    by_hand = {"curves": {"encoder": {
        "dense": [{"side": 32, "peak_mib": 40.0}, {"side": 64, "peak_mib": 600.0}],
        "rcda": [{"side": 32, "peak_mib": 5.0}, {"side": 64, "peak_mib": 20.0}]}}}
    claim = detr_family.memory_claim(by_hand)
    assert claim["verdict"] == "holds" and claim["side"] == 64 and "30.0x" in claim["ours"]
    by_hand["curves"]["encoder"]["dense_fused"] = [{"side": 32, "peak_mib": 4.0},
                                                   {"side": 64, "peak_mib": 30.0}]
    claim = detr_family.memory_claim(by_hand, against="dense_fused")   # RCDA above at 32
    assert claim["verdict"] == "does not hold" and "fused dense (SDPA) 30.0 MiB" in claim["ours"]
    del by_hand["curves"]["encoder"]["dense_fused"]
    assert detr_family.memory_claim(by_hand, against="dense_fused")["verdict"] == "inconclusive"


def test_race_is_resumable_skips_committed_runs_and_reports(tmp_path):
    data = tmp_path / "shapes"
    make_shapes(data, num_train=16, num_val=2, size=64, seed=0, max_objects=3)
    results = tmp_path / "results"
    common = ["--data", str(data), "--only", "anchor_detr", "--seeds", "0", "--epochs", "2",
              "--image-size", "64", "--threads", "1", "--runs-dir", str(tmp_path / "runs"),
              "--results-dir", str(results)]
    assert detr_family.main(["run", *common, "--epochs-now", "1"]) == 0
    path = results / "anchor_detr_2ep_s0.json"
    first = json.loads(path.read_text())
    assert first["status"] == "partial (1/2 epochs)"
    assert first["config"]["model"] == "anchor_detr" and first["config"]["num_queries"] == 10
    assert first["config"]["pretrained_backbone"] == "shapes_resnet18_w32"
    assert detr_family.main(["run", *common]) == 0
    done = json.loads(path.read_text())
    assert done["status"] == "complete" and done["curve"][0] == first["curve"][0]
    # a fresh checkout: the checkpoints are gone, the committed JSON says complete
    shutil.rmtree(tmp_path / "runs")
    assert detr_family.main(["run", *common]) == 0
    assert json.loads(path.read_text()) == done and not (tmp_path / "runs").exists()
    (results / "cost_cpu.json").write_text(json.dumps({"members": {"anchor_detr": {
        "params": 10, "step_ms": 2.0, "infer_ms": 1.0}}}))
    out = tmp_path / "detr_family.json"
    assert detr_family.main(["report", "--results-dir", str(results), "--convergence-dir",
                             str(tmp_path / "none"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert set(run) >= {"model", "seed", "epochs", "AP", "APs", "minutes", "params", "step_ms",
                        "infer_ms", "machine"}
    assert run["epochs"] == [1, 2] and run["params"] == 10 and 0 <= run["AP"][-1] <= 1
    assert {c["verdict"] for c in report["claims"]} <= {"holds", "does not hold",
                                                        "inconclusive"}
    assert out.with_suffix(".png").stat().st_size > 0


def test_every_member_has_a_name_and_unknown_members_are_refused():
    assert set(detr_family.NAMES) == set(detr_family.MEMBERS)
    with pytest.raises(ValueError, match="unknown member 'yolo'"):
        detr_family.member_config("yolo", 12, 128, 4)
    cfg = detr_family.member_config("detr_dc5", 12, 128, 4)
    assert (cfg.epochs, cfg.lr_drop, cfg.image_size) == (12, 10, 128)
    assert cfg.dilation and cfg.no_object and cfg.num_queries == 30


def test_committed_report_is_what_the_committed_runs_give():
    # every number of benchmarks/results/detr_family.json traces to a committed file: the
    # report rebuilt from the per-run, cost, memory and convergence files equals it
    results = detr_family.RESULTS
    committed = json.loads((results / "detr_family.json").read_text())
    race = results / "detr_family"
    records = [json.loads(p.read_text()) for p in sorted(race.glob("*_s[0-9]*.json"))]
    rebuilt = detr_family.build_report(
        records, detr_family.convergence.load_runs(results / "convergence"),
        detr_family.read_json(race / "cost_cpu.json"),
        detr_family.read_json(race / "memory_cpu.json"))
    rebuilt = json.loads(json.dumps(rebuilt))       # as written: tuples become lists
    for key in ("runs", "claims", "long_schedules", "exceptions", "names"):
        assert rebuilt[key] == committed[key], key
    members = {r["model"] for r in committed["runs"] if r["status"] == "complete"}
    assert members == set(detr_family.MEMBERS)     # done: every member, two seeds or more
    for m in members:
        assert len({r["seed"] for r in committed["runs"] if r["model"] == m}) >= 2, m
    assert all(c["verdict"] in {"holds", "does not hold", "inconclusive"}
               and not c["ours"].startswith("pending") for c in committed["claims"])


def readme_table(readme: str, header: str) -> list[list[str]]:
    lines = readme.splitlines()
    start = lines.index(header) + 2                 # past the header and its |---| row
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_readme_family_tables_are_the_committed_report():
    # the README's race tables are read off benchmarks/results/detr_family.json, not typed in
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    report = json.loads((detr_family.RESULTS / "detr_family.json").read_text())
    claims = readme_table(readme, "| claim | paper | ours | verdict |")
    assert [row[-1] for row in claims] == [c["verdict"] for c in report["claims"]]
    rows = readme_table(readme, "| member | AP (seeds 0, 1) | APs | training minutes | parameters"
                                " | training step | inference |")
    assert [row[0] for row in rows] == list(report["names"].values())
    for row, model in zip(rows, report["names"]):
        runs = sorted((r for r in report["runs"] if r["model"] == model), key=lambda r: r["seed"])
        ap = [100 * r["AP"][-1] for r in runs]
        aps = sum(100 * r["APs"][-1] for r in runs) / len(runs)
        assert row[1] == f"{sum(ap) / len(ap):.1f} ({', '.join(f'{a:.1f}' for a in ap)})", model
        assert row[2] == f"{aps:.1f}", model
        assert row[3] == ", ".join(f"{r['minutes'][-1]:.1f}" for r in runs), model
        for cell, key in zip(row[4:], ("params_ratio", "step_ratio", "infer_ratio")):
            assert cell.endswith(f"{runs[0][key]:.2f}x"), (model, key, cell)
