"""benchmarks/race_views.py: the views and DETR's logit terms of trained race runs,
written from a tiny race, read back, and refused for an unfinished run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import detr_family  # noqa: E402
import race_views  # noqa: E402
from ddetr_tutorial import family_views  # noqa: E402
from ddetr_tutorial.data import make_shapes  # noqa: E402


@pytest.fixture(scope="module")
def tiny_race(tmp_path_factory):
    root = tmp_path_factory.mktemp("race")
    data = root / "shapes"
    make_shapes(data, num_train=16, num_val=5, size=64, seed=3, max_objects=4)
    common = ["--data", str(data), "--seeds", "0", "--image-size", "64", "--threads", "1",
              "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results")]
    assert detr_family.main(["run", *common, "--only", "detr", "--epochs", "2"]) == 0
    assert detr_family.main(["run", *common, "--only", "sparse_rcnn", "--epochs", "2",
                             "--epochs-now", "1"]) == 0            # left unfinished
    return root, data


def test_views_and_terms_of_a_trained_run(tiny_race, monkeypatch):
    root, data = tiny_race
    monkeypatch.setattr(race_views, "VIEW_MEMBERS", {"detr": "DETR"})
    views, terms = root / "views", root / "terms.json"
    assert race_views.main(["--data", str(data), "--runs-dir", str(root / "runs"), "--epochs",
                            "2", "--term-seeds", "0", "--views-dir", str(views),
                            "--terms-out", str(terms)]) == 0
    (view,) = family_views.load_views(views / "detr.json")
    annotations = json.loads((data / "annotations" / "instances_val.json").read_text())
    counts = [sum(a["image_id"] == im["id"] for a in annotations["annotations"])
              for im in annotations["images"]]
    assert view["image_index"] == counts.index(max(counts))        # the busiest image
    assert (view["name"], view["run"], view["data_seed"]) == ("DETR", "detr_2ep_s0", 3)
    assert view["kind"] == "attention" and view["queries"].shape == (3,)
    sums = view["attention"].sum((-1, -2))
    assert sums.sub(1).abs().max() < 1e-5                          # weights over the map
    saved = json.loads(terms.read_text())
    layers = saved["seeds"]["0"]["layers"]
    assert saved["data_seed"] == 3 and saved["seeds"]["0"]["images"] == 5
    assert list(layers) == ["1", "2"]                              # tiny DETR: 2 decoder layers
    for row in layers.values():
        spreads = {n: row[n]["key_std"] for n in family_views.LogitTerms._fields}
        assert all(s >= 0 for s in spreads.values())
        content = spreads["content_content"] + spreads["spatial_content"]
        assert row["content_share"] == pytest.approx(content / sum(spreads.values()))
    # layer 1's queries carry no image (c_q is the same for every image), yet its
    # content-spatial term reads the keys, which differ: the spread is not zero
    assert layers["1"]["content_spatial"]["key_std"] > 0


def test_unfinished_runs_and_foreign_data_are_refused(tiny_race, tmp_path):
    root, data = tiny_race
    with pytest.raises(SystemExit, match="unfinished run"):
        race_views.trained(root / "runs", "sparse_rcnn", 2, 0)
    with pytest.raises(SystemExit, match="has no checkpoint"):
        race_views.trained(root / "runs", "anchor_detr", 2, 0)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(
        json.dumps({"info": {"description": "my own data"}, "images": []}))
    with pytest.raises(SystemExit, match="no 'seed N'"):
        race_views.data_seed(tmp_path)
