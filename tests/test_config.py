"""The config checks itself: types from the annotations, allowed values, rules between
fields; the CLI stops on a bad --set in one line, before any data is read."""

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from ddetr_tutorial import cli
from ddetr_tutorial.checkpoints import read_training_state
from ddetr_tutorial.config import CHOICES, PRESETS, RANGES, Config, get_config
from ddetr_tutorial.shipped import shipped_checkpoint

SHIPPED = shipped_checkpoint("tiny_shapes")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_a_dict(name):
    cfg = get_config(name)
    assert Config(**cfg.to_dict()) == cfg  # how checkpoints store and rebuild it


def test_the_shipped_checkpoint_config_still_loads():
    stored = read_training_state(SHIPPED)["config"]
    cfg = Config(**stored)
    # Fields added since it was saved take their defaults, which keep its model.
    assert {k: v for k, v in cfg.to_dict().items() if k in stored} == stored
    # The card's recipe: tiny_pretrained with a trained BatchNorm backbone at 128 px.
    assert cfg == get_config("tiny_pretrained", image_size=128, epochs=20, lr_drop=16,
                             backbone_norm="batch", train_backbone_stem=True,
                             lr_backbone=0.001)
    assert cfg == get_config("tiny_shapes")  # the preset that names it
    assert get_config("tiny_30min") == cfg.replace(epochs=8, lr_drop=6)


def test_every_checked_field_exists():
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(CHOICES) <= names and set(RANGES) <= names


BAD = [
    # (overrides on top of tiny, error type, the field named in the message)
    (dict(two_stage="yes"), TypeError, "two_stage='yes'"),
    (dict(lr="abc"), TypeError, "lr='abc'"),
    (dict(num_queries=0), ValueError, "num_queries=0"),
    (dict(nheads=3), ValueError, "nheads=3"),  # tiny has hidden_dim=64
    (dict(aux_loss=1), TypeError, "aux_loss=1"),
    (dict(lr=True), TypeError, "lr=True"),  # bool is not a number here
    (dict(num_queries=True), TypeError, "num_queries=True"),
    (dict(num_queries=30.0), TypeError, "num_queries=30.0"),
    (dict(backbone=18), TypeError, "backbone=18"),
    (dict(pretrained_backbone=3), TypeError, "pretrained_backbone=3"),
    (dict(image_size=96.5), TypeError, "image_size=96.5"),
    (dict(image_size=4), ValueError, "image_size=4"),
    (dict(model="dert"), ValueError, "model='dert'"),
    (dict(backbone="resnet152"), ValueError, "backbone='resnet152'"),
    (dict(backbone_norm="group"), ValueError, "backbone_norm='group'"),
    (dict(augment="crop"), ValueError, "augment='crop'"),
    (dict(op_backend="gpu"), ValueError, "op_backend='gpu'"),
    (dict(backbone_width=4), ValueError, "backbone_width=4"),
    (dict(hidden_dim=0), ValueError, "hidden_dim=0"),
    (dict(hidden_dim=48, nheads=4), ValueError, "hidden_dim=48"),  # GroupNorm(32)
    (dict(nheads=0), ValueError, "nheads=0"),
    (dict(enc_layers=-1), ValueError, "enc_layers=-1"),
    (dict(dec_layers=0), ValueError, "dec_layers=0"),
    (dict(num_feature_levels=0), ValueError, "num_feature_levels=0"),
    (dict(enc_n_points=0), ValueError, "enc_n_points=0"),
    (dict(dec_n_points=0), ValueError, "dec_n_points=0"),
    (dict(dim_feedforward=0), ValueError, "dim_feedforward=0"),
    (dict(num_classes=0), ValueError, "num_classes=0"),
    (dict(num_select=0), ValueError, "num_select=0"),
    (dict(dropout=1.0), ValueError, "dropout=1.0"),
    (dict(dropout=-0.1), ValueError, "dropout=-0.1"),
    (dict(focal_alpha=1.5), ValueError, "focal_alpha=1.5"),
    (dict(set_cost_bbox=-1), ValueError, "set_cost_bbox=-1"),
    (dict(cls_loss_coef=-2.0), ValueError, "cls_loss_coef=-2.0"),
    (dict(lr=0), ValueError, "lr=0"),
    (dict(lr=-1e-4), ValueError, "lr=-0.0001"),
    (dict(lr=math.nan), ValueError, "lr=nan"),
    (dict(lr=math.inf), ValueError, "lr=inf"),
    (dict(lr_backbone=-1e-5), ValueError, "lr_backbone=-1e-05"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay=-1.0"),
    (dict(batch_size=0), ValueError, "batch_size=0"),
    (dict(epochs=0), ValueError, "epochs=0"),
    (dict(lr_drop=0), ValueError, "lr_drop=0"),
    (dict(clip_max_norm=-0.1), ValueError, "clip_max_norm=-0.1"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps=-1"),
    (dict(with_box_refine=False), ValueError, "two_stage=True needs with_box_refine=True"),
    (dict(model="detr"), ValueError, "model='detr'"),  # with tiny's refinement and two-stage
    (dict(set_cost_class=0, set_cost_bbox=0, set_cost_giou=0), ValueError, "set_cost_class"),
]


@pytest.mark.parametrize("overrides, error, named", BAD, ids=[str(b[0]) for b in BAD])
def test_a_bad_field_names_itself_the_value_and_what_is_expected(overrides, error, named):
    with pytest.raises(error) as info:
        get_config("tiny", **overrides)
    message = str(info.value)
    assert named in message and "\n" not in message, message
    assert "expected" in message or "needs" in message, message
    with pytest.raises(error):  # the constructor itself checks, not only get_config
        Config(**{**get_config("tiny").to_dict(), **overrides})


def test_messages_say_what_is_expected():
    with pytest.raises(TypeError, match=r"two_stage='yes' \(str\): expected true or false"):
        get_config("tiny", two_stage="yes")
    with pytest.raises(TypeError, match=r"lr='abc' \(str\): expected a number"):
        get_config("tiny", lr="abc")
    with pytest.raises(ValueError, match=r"num_queries=0: expected an integer >= 1"):
        get_config("tiny", num_queries=0)
    with pytest.raises(ValueError, match=r"nheads=3: expected a divisor of hidden_dim=64"):
        get_config("tiny", nheads=3)
    with pytest.raises(ValueError, match=r"model='dert': expected one of 'deformable', 'detr'"):
        get_config("tiny", model="dert")


def test_accepted_values_are_normalised():
    cfg = get_config("tiny", lr=1, num_queries=np.int64(20), dropout=np.float32(0.5))
    assert cfg.lr == 1.0 and type(cfg.lr) is float  # an int is a fine float
    assert cfg.num_queries == 20 and type(cfg.num_queries) is int
    assert type(cfg.dropout) is float
    assert get_config("tiny", image_size=None).image_size is None
    assert get_config("tiny", enc_layers=0).enc_layers == 0  # an encoder-free ablation
    assert get_config("tiny", lr_drop=100).lr_drop == 100  # past `epochs`: no drop


def test_replace_checks_and_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("tiny").replace(heads=4)
    with pytest.raises(ValueError, match="num_queries=-1"):
        get_config("tiny").replace(num_queries=-1)


# ----------------------------------------------------------------------------- the CLI

CLI_CASES = [("two_stage=yes", "two_stage='yes'"), ("lr=abc", "lr='abc'"),
             ("num_queries=0", "num_queries=0"), ("nheads=3", "nheads=3")]


@pytest.mark.parametrize("setting, named", CLI_CASES)
def test_cli_stops_on_a_bad_setting_before_reading_data(setting, named, tmp_path):
    # --data names a folder that does not exist: reading it would fail differently.
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", "tiny", "--data", str(tmp_path / "none"),
                  "--out", str(tmp_path / "run"), "--set", setting])
    message = str(info.value.code)
    assert message.startswith("train: config field ") and named in message, message
    assert "expected" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_cli_bad_setting_is_one_line_on_stderr_and_a_failure_exit(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddetr_tutorial", "train", "--config", "tiny", "--data",
         str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--set", "nheads=3"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "train: config field nheads=3: expected a divisor of hidden_dim=64 (each of the M "
        "heads gets D = C / M channels)"], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
