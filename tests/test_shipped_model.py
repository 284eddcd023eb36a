"""The shipped model still detects: tiny_shapes on a regenerated shapes-val
(the split does not depend on --train) against the project's target and its model card."""

import pytest
import torch

from ddetr_tutorial.config import build_transforms
from ddetr_tutorial.data import CocoDetection, collate_fn, make_shapes
from ddetr_tutorial.engine import evaluate
from ddetr_tutorial.notebook import load_shipped_model
from ddetr_tutorial.reproducibility import make_loader

# ddetr_tutorial/shipped/tiny_shapes.md, shapes-val at 96 px
CARD = {"AP": 0.681, "AP50": 0.903, "AP75": 0.789, "APs": 0.583, "APm": 0.747, "APl": 0.845}


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_val")
    make_shapes(root, num_train=0, num_val=200, size=128, seed=0)
    model, cfg, postprocess, meta = load_shipped_model(device="cpu")
    val = CocoDetection(root / "val", root / "annotations" / "instances_val.json",
                        build_transforms(cfg, "val"), category_ids=meta["category_ids"])
    loader = make_loader(val, cfg.batch_size, False, collate_fn)
    return evaluate(model, postprocess, loader, val.coco, val.category_ids,
                    torch.device("cpu"))[0]


def test_shipped_model_meets_the_target(metrics):
    assert metrics["AP"] >= 0.6, metrics
    assert metrics["AP50"] >= 0.9, metrics


@pytest.mark.parametrize("name", sorted(CARD))
def test_shipped_model_matches_its_card(metrics, name):
    # The card rounds to 3 digits; a looser band would let a silent change in the
    # model code (which the checkpoint would still load into) go unnoticed.
    assert metrics[name] == pytest.approx(CARD[name], abs=0.002), (name, metrics[name])
