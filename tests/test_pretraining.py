"""Backbone pretraining in miniature: the classification generator (deterministic,
balanced, disjoint by seed from the detection set), the torchvision-layout weights
it trains and their loading (file, shipped name, `tiny_pretrained`), the card, and
the budget."""

import json

import numpy as np
import pytest
import torch

from ddetr_tutorial.backbone import Backbone, load_resnet_weights, resnet
from ddetr_tutorial.cli import main
from ddetr_tutorial.config import get_config
from ddetr_tutorial.data import shapes
from ddetr_tutorial.data.classification import (
    CLASS_NAMES,
    PRETRAIN_SALT,
    classification_image,
    classification_key,
    make_classification,
)
from ddetr_tutorial.pretraining import ResNetClassifier, cosine_lr, pretrain, torchvision_state_dict
from ddetr_tutorial.shipped import SHIPPED_BACKBONES, resolve_backbone_weights

STATE = np.random.SeedSequence  # what np.random.default_rng(key) seeds from


def _state(key) -> tuple:
    return tuple(STATE(key).generate_state(4))


# ---------------------------------------------------------------- the generator

def test_images_are_deterministic_per_seed_split_and_index():
    a, label = classification_image(3, "train", 41, size=32)
    b, _ = classification_image(3, "train", 41, size=32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and label == 41 % 20
    assert np.array_equal(a, b)
    for other in (classification_image(4, "train", 41, 32), classification_image(3, "val", 41, 32),
                  classification_image(3, "train", 61, 32)):  # same class, other image
        assert not np.array_equal(a, other[0])
    # an image does not depend on how many are made
    pixels, labels = make_classification(45, size=32, seed=3)
    assert np.array_equal(pixels[41], a) and labels[41] == label


def test_classes_are_new_to_the_detector_balanced_and_all_drawn():
    assert len(CLASS_NAMES) == 20 == len(set(CLASS_NAMES))
    assert not set(CLASS_NAMES) & set(shapes.SHAPE_NAMES)
    pixels, labels = make_classification(60, size=32, seed=0, split="val")
    assert np.array_equal(np.bincount(labels, minlength=20), np.full(20, 3))
    # every class draws something: far more than the clutter's few colours
    assert all(len(np.unique(img.reshape(-1, 3), axis=0)) > 2 for img in pixels)
    # a subset of classes takes its images from the full set, in index order
    sub, sub_labels = make_classification(4, size=32, seed=0, split="val", labels=[2, 19])
    assert sub_labels.tolist() == [2, 19, 2, 19]
    assert np.array_equal(sub[3], make_classification(40, 32, 0, "val")[0][39])
    with pytest.raises(ValueError, match="labels must be class indices"):
        make_classification(4, labels=[20])
    with pytest.raises(ValueError, match="split must be one of"):
        classification_key(0, "test", 0)


def test_rng_keys_are_disjoint_from_every_detection_key():
    """numpy pads a 3-word key with 0 (so [s, split, i] == [s, split, i, 0]) and splits a
    seed >= 2**32 into two words; the key layout avoids both, so no classification
    image shares a random stream with a detection image."""
    assert _state([5, 1, 7]) == _state([5, 1, 7, 0])  # the padding the layout must avoid
    assert PRETRAIN_SALT > 1 and all(classification_key(0, s, 0)[3] != 0 for s in ("train", "val"))
    seeds, indices = (0, 1, 2, 7, PRETRAIN_SALT), range(30)
    detection = {_state([seed, split, i]) for seed in seeds + (2 ** 32 + 1,) for split in (0, 1)
                 for i in indices}
    ours = {_state(classification_key(seed, split, i)) for seed in seeds
            for split in ("train", "val") for i in indices}
    assert len(ours) == len(seeds) * 2 * len(indices) and not ours & detection
    # and the pictures differ too: same (seed, split, index), same size
    rng = np.random.default_rng([0, 0, 3])
    assert not np.array_equal(shapes.render_image(rng, 64)[0],
                              classification_image(0, "train", 3, 64)[0])


# ---------------------------------------------------------------- training and weights

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few-second run through the command line: star vs stripes, 32-px images."""
    out = tmp_path_factory.mktemp("pretrain") / "tiny.pth"
    torch.manual_seed(0)
    code = main(["pretrain-backbone", "--out", str(out), "--width", "8", "--size", "32",
                 "--train", "192", "--val", "64", "--epochs", "4", "--batch-size", "32",
                 "--budget-min", "5", "--threads", "1"])
    assert code == 0
    return out


def test_run_writes_torchvision_weights_that_load(run):
    state = torch.load(run, weights_only=True)
    assert state["conv1.weight"].dtype == torch.float16  # stored in half, loaded as float32
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.weight",
            "fc.weight", "fc.bias"} <= set(state)
    assert state["fc.weight"].shape == (20, 64)
    body = resnet("resnet18", width=8)
    load_resnet_weights(body, run)  # drops fc.* and num_batches_tracked, strict otherwise
    for key, value in body.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key
    backbone = Backbone("resnet18", pretrained=str(run), width=8)  # frozen BN, the paper's
    assert torch.equal(backbone.body.layer2[0].bn1.running_var,
                       state["layer2.0.bn1.running_var"].float())


def test_run_writes_a_card_and_learns(run):
    record = json.loads(run.with_suffix(".json").read_text())
    card = run.with_suffix(".md").read_text()
    assert record["command"].startswith("python -m ddetr_tutorial pretrain-backbone --out")
    assert record["data"]["num_train"] == 192 and len(record["data"]["classes"]) == 20
    assert record["machine"]["cores"] >= 1 and record["machine"]["torch"] == torch.__version__
    assert record["epochs_done"] == 4 and record["stopped_by"] == "epochs"
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2, 3, 4]
    assert f"Held-out top-1: {record['top1']:.3f}" in card and record["machine"]["cpu"] in card
    # the top-1 is re-measured with the stored float16 weights, and barely moves
    assert record["storage"] == "float16" and abs(record["top1"] - record["top1_float32"]) < 0.05
    # 24 steps on 20 classes: the training loss falls (the held-out test is the pair's below)
    losses = [h["train_loss"] for h in record["history"][1:]]
    assert losses[-1] < losses[0] - 0.15, losses


def test_easy_pair_is_learned_above_chance(tmp_path):
    # filled vs outlined heart: held-out top-1 far above 1/2 (3 sd of 128 coin flips) in seconds
    record = pretrain(tmp_path / "pair.pth", width=8, image_size=32, num_train=1024, num_val=128,
                      classes=[5, 15], epochs=3, batch_size=32, lr=5e-3, budget_min=None,
                      threads=1, log=lambda *a: None)
    assert record["data"]["classes"] == ["heart", "heart_outline"]
    assert record["chance_top1"] == 0.5 and record["history"][0]["top1"] <= 0.55
    assert record["top1"] >= 0.65, record["history"]


def test_budget_stops_training(tmp_path):
    record = pretrain(tmp_path / "b.pth", width=8, image_size=32, num_train=64, num_val=32,
                      epochs=10_000, batch_size=16, budget_min=0.03, threads=1,
                      log=lambda *a: None)
    assert record["stopped_by"] == "budget" and record["epochs_done"] < 10_000
    assert record["minutes"] < 0.25 and (tmp_path / "b.pth").is_file()
    with pytest.raises(ValueError, match="budget_min must be > 0"):
        pretrain(tmp_path / "c.pth", budget_min=0)


def test_schedule_warms_up_then_anneals_to_zero():
    assert cosine_lr(0.1, 0.0, 0.05) < 0.01 and cosine_lr(0.1, 0.05, 0.05) == pytest.approx(0.1)
    assert cosine_lr(0.1, 1.0, 0.05) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.1, 2.0, 0.05) == pytest.approx(0.0, abs=1e-12)  # past the budget


def test_state_dict_layout_matches_the_detector_backbone():
    model = ResNetClassifier("resnet18", width=8, num_classes=5)
    state = torchvision_state_dict(model)
    body_keys = set(resnet("resnet18", width=8).state_dict())
    assert set(state) - body_keys == {"fc.weight", "fc.bias"} | {
        k for k in state if k.endswith("num_batches_tracked")}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ---------------------------------------------------------------- shipped name and preset

def test_a_path_stays_a_path_and_a_local_file_wins(tmp_path, monkeypatch):
    assert resolve_backbone_weights(tmp_path / "x.pth") == tmp_path / "x.pth"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes_resnet18_w32").write_bytes(b"")
    assert resolve_backbone_weights("shapes_resnet18_w32").resolve() == (
        tmp_path / "shapes_resnet18_w32")
    with pytest.raises(TypeError, match="shipped name"):
        resolve_backbone_weights(3)


def test_tiny_pretrained_is_tiny_with_the_papers_fine_tuning():
    tiny, pre = get_config("tiny"), get_config("tiny_pretrained")
    assert (tiny.pretrained_backbone, tiny.backbone_norm, tiny.lr_backbone) == (None, "batch", 1e-3)
    assert pre.pretrained_backbone == "shapes_resnet18_w32" and pre.backbone_norm == "frozen"
    assert not pre.train_backbone_stem and pre.lr_backbone == pytest.approx(0.1 * pre.lr)
    changed = {k for k, v in pre.to_dict().items() if tiny.to_dict()[k] != v}
    assert changed == {"pretrained_backbone", "backbone_norm", "train_backbone_stem",
                       "lr_backbone"}


@pytest.mark.skipif(not SHIPPED_BACKBONES["shapes_resnet18_w32"].is_file(),
                    reason="the shipped backbone is not in this checkout")
def test_shipped_backbone_loads_by_name_and_through_the_preset():
    from ddetr_tutorial.config import build_model

    path = SHIPPED_BACKBONES["shapes_resnet18_w32"]
    assert path.stat().st_size < 6_000_000 and path.with_suffix(".md").is_file()
    state = torch.load(path, weights_only=True)
    body = resnet("resnet18", width=32)
    load_resnet_weights(body, "shapes_resnet18_w32")
    assert torch.equal(body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"].float())
    model, _, _ = build_model(get_config("tiny_pretrained"))
    resnet_body = model.backbone[0].body
    assert torch.equal(resnet_body.conv1.weight, state["conv1.weight"].float())
    assert torch.equal(resnet_body.layer4[0].bn1.running_mean,
                       state["layer4.0.bn1.running_mean"].float())
    assert not resnet_body.layer1[0].conv1.weight.requires_grad  # conv1/layer1 frozen
    assert resnet_body.layer2[0].conv1.weight.requires_grad
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["top1"] > 3 * record["chance_top1"]
