"""Defects of issue 14 in training and the CLI: best.pth across --resume, datasets too
small to give a step, stale temporary checkpoint files, files that are not
checkpoints, --set changes --resume cannot honour, and one-line CLI errors."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from ddetr_tutorial import checkpoints, cli, engine
from ddetr_tutorial.config import build_transforms, get_config
from ddetr_tutorial.data import CocoDetection, make_shapes

SMALL = dict(image_size=64, batch_size=2, num_queries=10, num_select=10, op_backend="pytorch",
             enc_layers=1, dec_layers=1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes4")
    make_shapes(root, num_train=4, num_val=2, size=64, seed=1, max_objects=2)
    return root


def datasets(root, cfg, train_split="train"):
    train = CocoDetection(root / train_split, root / "annotations" /
                          f"instances_{train_split}.json", build_transforms(cfg, "train"))
    val = CocoDetection(root / "val", root / "annotations" / "instances_val.json",
                        build_transforms(cfg, "val"), category_ids=train.category_ids)
    return train, val


def scripted_evaluation(monkeypatch, aps):
    """engine.evaluate returns the next AP of `aps` (the weights' true AP is not what
    is tested: which file keeps which weights is)."""
    queue = list(aps)

    def fake(*args, **kwargs):
        return {"AP": queue.pop(0)}, "scripted table\n"

    monkeypatch.setattr(engine, "evaluate", fake)


def _fit(cfg, root, out, epochs, **kw):
    train, val = datasets(root, cfg)
    return engine.fit(cfg, train, val, out, epochs=epochs, seed=2, progress=False,
                      log=lambda *a: None, **kw)


def test_best_survives_resume_and_agrees_with_its_weights(shapes, tmp_path, monkeypatch):
    cfg = get_config("tiny", **SMALL)
    out = tmp_path / "run"
    scripted_evaluation(monkeypatch, [0.3, 0.6])
    _fit(cfg, shapes, out, epochs=2)  # 2 steps per epoch: checkpoints at steps 2 and 4
    best_before = torch.load(out / "best.pth", weights_only=True)
    assert best_before["best_ap"] == 0.6 and best_before["step"] == 4

    scripted_evaluation(monkeypatch, [0.1])  # the resumed epoch is worse
    with pytest.warns(engine.ResumeWarning, match=r"lr=0\.5 ignored on resume"):
        _fit(cfg.replace(lr=0.5), shapes, out, epochs=3,
             resume=out / "checkpoint_00000004.pth")
    best = torch.load(out / "best.pth", weights_only=True)
    epoch2 = torch.load(out / "checkpoint_00000004.pth", weights_only=True)
    assert best["best_ap"] == 0.6 and best["step"] == 4 and best["epoch"] == 2
    for key, value in epoch2["model"].items():
        assert torch.equal(best["model"][key], value), key
    last = torch.load(out / "checkpoint_00000006.pth", weights_only=True)
    assert last["best_ap"] == 0.6  # the run's best, carried on
    assert last["config"]["lr"] == cfg.lr  # the saved optimizer's lr is what trained
    logged = {r["epoch"]: r["AP"] for r in map(json.loads, (out / "log.jsonl").open())}
    assert logged == {1: 0.3, 2: 0.6, 3: 0.1}

    # A better epoch after the resume does replace it.
    scripted_evaluation(monkeypatch, [0.9])
    _fit(cfg, shapes, out, epochs=4, resume=out / "checkpoint_00000006.pth")
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["best_ap"] == 0.9 and best["step"] == 8


def test_resume_into_a_new_folder_writes_a_best_that_describes_itself(shapes, tmp_path,
                                                                      monkeypatch):
    cfg = get_config("tiny", **SMALL)
    scripted_evaluation(monkeypatch, [0.6])
    _fit(cfg, shapes, tmp_path / "a", epochs=1)
    scripted_evaluation(monkeypatch, [0.2])
    _fit(cfg, shapes, tmp_path / "b", epochs=2, resume=tmp_path / "a" / "checkpoint_00000002.pth")
    best = torch.load(tmp_path / "b" / "best.pth", weights_only=True)
    assert best["best_ap"] == 0.2 and best["step"] == 4  # its own AP, not the old run's 0.6


@pytest.mark.parametrize("images, batch, world, ok", [
    (16, 8, 2, True), (16, 16, 2, False), (15, 8, 2, True), (3, 4, 1, False), (0, 1, 1, False),
    (4, 4, 1, True)])
def test_dataset_size_checks_per_rank(images, batch, world, ok):
    if ok:
        engine.check_dataset_sizes(range(images), range(1), batch, world)
        return
    with pytest.raises(ValueError, match=rf"training set has {images} images: .* for {world} "
                                         rf"process\(es\), fewer than batch_size={batch}"):
        engine.check_dataset_sizes(range(images), range(1), batch, world)


def test_empty_validation_set_is_refused():
    with pytest.raises(ValueError, match="validation set has 0 images"):
        engine.check_dataset_sizes(range(4), range(0), 2, 1)


def test_too_small_a_dataset_fails_before_any_work(tmp_path, monkeypatch, capsys):
    make_shapes(tmp_path / "one", num_train=1, num_val=1, size=64, seed=0, max_objects=1)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(engine, "build_model", no_model)
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "one"), "--out", str(out), "--epochs", "1",
            "--quiet", "--set", *(f"{k}={v}" for k, v in SMALL.items())]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training set has 1 images" in err[0]
    assert "batch_size=2" in err[0] and "1 process(es)" in err[0]
    assert not out.exists()  # no best.pth, no model card, not even the folder


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    live_pid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".checkpoint_00000004.pth.{dead_pid}.tmp",
                 tmp_path / f".best.pth.{dead_pid}.tmp"]
        kept = [tmp_path / f".checkpoint_00000006.pth.{live_pid.pid}.tmp",  # still writing
                tmp_path / ".notes.123.tmp", tmp_path / "checkpoint_00000002.pth",
                tmp_path / ".checkpoint_x.pth.abc.tmp"]
        for path in stale + kept:
            path.write_bytes(b"partial")
        checkpoints.CheckpointManager(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    finally:
        live_pid.kill()
        live_pid.wait()


def _not_checkpoints(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.ones(64)}, "step": 1}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:300])
    text = tmp_path / "notes.pth"
    text.write_text("hello world, not a checkpoint")
    return [(empty, 0), (cut, 300), (text, text.stat().st_size)]


def test_a_file_that_is_not_a_checkpoint_says_so_with_its_size(tmp_path):
    for path, size in _not_checkpoints(tmp_path):
        with pytest.raises(checkpoints.NotACheckpointError) as info:
            checkpoints.read_training_state(path)
        message = str(info.value)
        assert message.startswith(f"{path} is not a checkpoint (truncated? {size} bytes")
        assert "weights_only=False" not in message
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.ones(2), tensor)
    with pytest.raises(checkpoints.NotACheckpointError, match="holds a Tensor, not a dict"):
        checkpoints.read_training_state(tensor)


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    (cut, size), = [c for c in _not_checkpoints(tmp_path) if c[0].name == "cut.pth"]
    command = ["evaluate", "--checkpoint", str(cut), "--data", str(tmp_path)]
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"evaluate: {cut} is not a checkpoint (truncated? {size} bytes")
    with pytest.raises(checkpoints.NotACheckpointError):
        cli.main([*command, "--debug"])


def test_resume_config_warns_only_for_changes_it_cannot_honour():
    saved = get_config("tiny", **SMALL).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = engine.resume_config(get_config("tiny", **dict(SMALL, op_backend="cpu"), epochs=9),
                                   saved)
    assert cfg.epochs == 9 and cfg.op_backend == "cpu"
    with pytest.warns(engine.ResumeWarning) as caught:
        cfg = engine.resume_config(get_config("tiny", **SMALL, lr_drop=3, dropout=0.3), saved)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("lr_drop=3 ignored on resume") for m in messages), messages
    changed = f"dropout ({saved['dropout']!r} -> 0.3)"
    assert any(changed in m and "no longer an exact continuation" in m
               for m in messages), messages
    assert cfg.lr_drop == saved["lr_drop"] and cfg.dropout == 0.3


def test_model_card_after_resume_shows_the_config_that_trained(shapes, tmp_path):
    # `--set lr=0.5` on --resume is ignored (the saved optimizer's lr trains); the card
    # once listed it anyway, contradicting the checkpoint beside it.
    out = tmp_path / "run"
    base = ["train", "--config", "tiny", "--data", str(shapes), "--out", str(out), "--quiet",
            "--set", *(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                       for k, v in SMALL.items())]
    assert cli.main([*base, "--epochs", "1"]) == 0
    with pytest.warns(engine.ResumeWarning, match=r"lr=0\.5 ignored on resume"):
        assert cli.main([*base, "lr=0.5", "--epochs", "2", "--resume",
                         str(checkpoints.latest_checkpoint(out))]) == 0
    card = (out / "model_card.md").read_text()
    assert "lr=0.5" in card  # the command, as typed
    changed = json.loads(card.split("differing from the paper's: `")[1].split("`")[0])
    assert changed["lr"] == get_config("tiny").lr == 1e-3
