"""Training and evaluation: COCOeval oracle, optimizer groups, atomic checkpoints,
exact resume, two-process DDP and the CLI end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr_tutorial import checkpoints, cli, engine
from ddetr_tutorial.coco_eval import coco_eval
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.data import CocoDetection, make_shapes

# A small, quick configuration: tiny, 64-px images, dropout on so that the RNG
# of the model matters for the resume test.
SMALL = dict(image_size=64, batch_size=2, num_queries=20, num_select=20, dropout=0.1,
             op_backend="cpu")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, num_train=8, num_val=4, size=64, seed=3, max_objects=4)
    return root


def datasets(root, cfg):
    from ddetr_tutorial.config import build_transforms

    train = CocoDetection(root / "train", root / "annotations" / "instances_train.json",
                          build_transforms(cfg, "train"))
    val = CocoDetection(root / "val", root / "annotations" / "instances_val.json",
                        build_transforms(cfg, "val"), category_ids=train.category_ids)
    return train, val


def test_ground_truth_as_predictions_scores_ap_1(shapes):
    val = CocoDetection(shapes / "val", shapes / "annotations" / "instances_val.json")
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in val.coco.dataset["annotations"]]
    metrics, table = coco_eval(val.coco, results)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in table
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]) for r in results]
    assert coco_eval(val.coco, shifted)[0]["AP"] < 0.1  # boxes moved by their width


def test_no_predictions_score_zero(shapes):
    val = CocoDetection(shapes / "val", shapes / "annotations" / "instances_val.json")
    metrics, table = coco_eval(val.coco, [])
    assert all(v == 0.0 for v in metrics.values()) and "no detections" in table


def test_official_parameter_groups():
    cfg = get_config("tiny")
    model, _, _ = build_model(cfg)
    groups = engine.param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"default": cfg.lr, "backbone": cfg.lr_backbone,
                   "linear_proj": cfg.lr * cfg.lr_linear_proj_mult}
    assert all("backbone.0" in n for n in by_name["backbone"])
    slow = by_name["linear_proj"]
    assert slow and all("sampling_offsets" in n or "reference_points" in n for n in slow)
    assert not any("backbone.0" in n or "sampling_offsets" in n for n in by_name["default"])
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(v) for v in by_name.values()) == trainable


def test_non_finite_loss_raises_with_the_terms():
    cfg = get_config("tiny", **SMALL)
    model, _, _ = build_model(cfg)
    optimizer, _ = engine.build_optimizer(model, cfg)

    class NaNCriterion(torch.nn.Module):
        weight_dict = {"loss_ce": 1.0, "loss_bbox": 1.0}

        def forward(self, outputs, targets):
            return {"loss_ce": outputs["pred_logits"].sum() * float("nan"),
                    "loss_bbox": outputs["pred_boxes"].sum()}

    batch = (torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), [{}])
    with pytest.raises(FloatingPointError, match=r"the loss is nan; its terms: .*'loss_ce': nan"):
        engine.train_step(model, NaNCriterion(), batch, optimizer, torch.device("cpu"))


def test_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left


def test_checkpoint_rotation_keeps_last_and_best(tmp_path):
    manager = checkpoints.CheckpointManager(tmp_path, keep_last=2)
    for step, ap in [(1, 0.1), (2, 0.5), (3, 0.2), (4, 0.3)]:
        manager.save({"step": step}, step=step, ap=ap)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pth", "checkpoint_00000003.pth", "checkpoint_00000004.pth"]
    assert torch.load(tmp_path / "best.pth", weights_only=True)["step"] == 2


def test_missing_resume_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing.pth"):
        checkpoints.read_training_state(tmp_path / "nothing.pth")


def _fit(cfg, shapes, out, **kw):
    train, val = datasets(shapes, cfg)
    return engine.fit(cfg, train, val, out, epochs=3, seed=5, progress=False,
                      log=lambda *a: None, **kw)


def test_resume_is_exact(shapes, tmp_path):
    """k + m steps straight equal k steps, save, resume, m steps: bit for bit."""
    cfg = get_config("tiny", **SMALL)
    _fit(cfg, shapes, tmp_path / "straight", max_steps=6)
    _fit(cfg, shapes, tmp_path / "split", max_steps=3)  # stops mid-epoch 0 (4 steps/epoch)
    assert (tmp_path / "split" / "checkpoint_00000003.pth").exists()
    _fit(cfg, shapes, tmp_path / "split", max_steps=6,
         resume=tmp_path / "split" / "checkpoint_00000003.pth")
    straight = torch.load(tmp_path / "straight" / "checkpoint_00000006.pth", weights_only=True)
    resumed = torch.load(tmp_path / "split" / "checkpoint_00000006.pth", weights_only=True)
    assert straight["step"] == resumed["step"] == 6
    assert (straight["epoch"], straight["step_in_epoch"]) == (1, 2)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(),
                    resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert torch.equal(straight["rng"]["torch"], resumed["rng"]["torch"])


def test_two_process_ddp(shapes, tmp_path):
    """torchrun with two CPU processes (gloo): trains, evaluates, only rank 0 writes."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29617", "-m", "ddetr_tutorial", "train", "--config", "tiny",
               "--data", str(shapes), "--out", str(out), "--epochs", "1", "--quiet",
               "--set", *(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                          for k, v in SMALL.items())]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 2  # 8 images / (2 ranks x batch 2)
    assert "AP" in rows[0]
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "checkpoint_00000002.pth"]


def test_cli_train_evaluate_predict(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in SMALL.items()]
    assert cli.main(["train", "--config", "tiny", "--data", str(shapes), "--out", str(out),
                     "--epochs", "1", "--quiet", "--set", *overrides]) == 0
    checkpoint = checkpoints.latest_checkpoint(out)
    assert checkpoint is not None and (out / "curves.png").exists()
    card = (out / "model_card.md").read_text()
    assert "python -m ddetr_tutorial train --config tiny" in card and "Average Precision" in card
    assert cli.main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(shapes),
                     "--out", str(tmp_path / "metrics.json"), "--quiet"]) == 0
    assert "Average Precision" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "metrics.json").read_text())) >= {"AP", "AP50", "APs"}
    assert cli.main(["predict", "--checkpoint", str(checkpoint), str(shapes / "val"),
                     "--out", str(tmp_path / "pred"), "--threshold", "0.0"]) == 0
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {f.name for f in (shapes / "val").iterdir()}
    assert all(p["category_id"] in (1, 2, 3, 4) and len(p["bbox"]) == 4 for p in predictions)
    assert len(list((tmp_path / "pred").glob("*_detections.png"))) == 4
    assert (tmp_path / "pred" / "detections.png").exists()
    # export keeps the weights only: smaller, and evaluates to the same numbers
    slim = tmp_path / "slim.pth"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(slim)]) == 0
    assert slim.stat().st_size < 0.5 * checkpoint.stat().st_size
    assert "optimizer" not in torch.load(slim, weights_only=True)
    assert cli.main(["evaluate", "--checkpoint", str(slim), "--data", str(shapes),
                     "--out", str(tmp_path / "metrics_slim.json"), "--quiet"]) == 0
    assert (json.loads((tmp_path / "metrics_slim.json").read_text())
            == json.loads((tmp_path / "metrics.json").read_text()))


def test_evaluating_any_split_uses_the_deterministic_transforms(shapes):
    # `evaluate --split train` once got the training transforms: flipped images scored
    # against unflipped ground truth, about half the true AP.
    import argparse

    cfg = get_config("tiny", **SMALL)
    args = argparse.Namespace(data=str(shapes))
    evaluated = cli._datasets(args, cfg, splits=("train",), augment=())["train"]
    augmented = cli._datasets(args, cfg, splits=("train",))["train"]
    from ddetr_tutorial.config import build_transforms

    plain = CocoDetection(shapes / "train", shapes / "annotations" / "instances_train.json",
                          build_transforms(cfg, "val"))
    torch.manual_seed(0)
    differs = False
    for index in range(len(plain)):
        image, target = evaluated[index]
        expected, expected_target = plain[index]
        assert torch.equal(image, expected) and torch.equal(target["boxes"],
                                                            expected_target["boxes"])
        for _ in range(4):  # the training transforms flip half the time
            differs |= not torch.equal(augmented[index][1]["boxes"], expected_target["boxes"])
    assert differs


def test_cli_help_documents_every_command(capsys):
    for command in ("make-data", "train", "evaluate", "predict", "export", "build-ops"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_resume_needs_existing_file(shapes, tmp_path):
    cfg = get_config("tiny", **SMALL)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        _fit(cfg, shapes, tmp_path / "x", resume=tmp_path / "missing.pth")
    assert Path(tmp_path / "x").exists()


def test_warm_up_is_linear_then_follows_the_step_schedule():
    cfg = get_config("tiny", lr=1e-3, lr_backbone=1e-4, lr_drop=2, warmup_steps=5)
    model = build_model(cfg)[0]
    optimizer, scheduler = engine.build_optimizer(model, cfg)
    bases = [g["lr"] for g in optimizer.param_groups]
    seen, step = [], 0
    for _ in range(3):  # epochs of 3 steps: the warm-up crosses an epoch end
        for _ in range(3):
            engine.warm_up(optimizer, scheduler, step, cfg.warmup_steps)
            seen.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            step += 1
        scheduler.step()
    for step, lrs in enumerate(seen):
        decay = 0.1 ** ((step // 3) // 2)
        factor = min(1.0, (step + 1) / 5)
        torch.testing.assert_close(lrs, [b * decay * factor for b in bases])
    assert seen[4] == bases and seen[6] == [b * 0.1 for b in bases]


def test_plot_log_draws_ap_only_where_evaluated(tmp_path, recwarn):
    # eval_every=2: epoch 1 has no AP. The AP curve must skip it, without an
    # empty-legend warning or a None point.
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [{"epoch": 1, "train_loss": 3.0},
            {"epoch": 2, "train_loss": 2.0, "AP": 0.1, "AP50": 0.2, "APs": 0.05}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    original = plt.Axes.plot
    def spy(ax, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(args[0])))
        return original(ax, *args, **kwargs)
    plt.Axes.plot = spy
    try:
        engine.plot_log(log, tmp_path / "curves.png")
    finally:
        plt.Axes.plot = original
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    assert ("loss", [1, 2]) in drawn and ("AP", [2]) in drawn
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]


def test_budget_stops_at_an_epoch_boundary_and_resume_takes_the_run_folder(shapes, tmp_path,
                                                                          capsys):
    out = tmp_path / "budgeted"
    overrides = [f"{k}={v}" for k, v in SMALL.items()]
    common = ["train", "--config", "tiny", "--data", str(shapes), "--out", str(out),
              "--epochs", "3", "--quiet"]
    # 0.001 min: the first epoch always starts; the second would end past the budget
    assert cli.main([*common, "--budget-min", "0.001", "--set", *overrides]) == 0
    assert f"continue with --resume {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert cli.main([*common, "--resume", str(out), "--set", *overrides]) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "The whole run: 3 epochs" in (out / "model_card.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli.main([*common, "--resume", str(tmp_path / "empty")])
    assert "is a folder with no checkpoint_*.pth" in capsys.readouterr().err
