"""benchmarks/failure_census.py: each object's outcome and the false positives,
against a census worked out by hand."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import failure_census  # noqa: E402


def obj(image, cat, x, y, w, h):
    return {"image_id": image, "category_id": cat, "bbox": [x, y, w, h], "area": w * h}


def det(image, cat, x, y, w, h, score):
    return {**obj(image, cat, x, y, w, h), "score": score}


def test_census_sorts_every_object_as_by_hand():
    objects = [obj(1, 1, 0, 0, 10, 10),     # small, found
               obj(1, 2, 50, 50, 40, 40),   # medium, a box of class 3 on it: wrong class
               obj(1, 1, 0, 60, 20, 20),    # small, only a quarter-overlapping box: rough
               obj(2, 4, 0, 0, 100, 100),   # large, only a low-score detection: missed
               obj(2, 1, 150, 150, 8, 8)]   # small, nothing near: missed
    detections = [det(1, 1, 1, 0, 10, 10, 0.9),     # IoU 9/11 with object 0
                  det(1, 3, 50, 50, 40, 36, 0.8),   # IoU 0.9 with object 1, other class
                  det(1, 1, 10, 70, 20, 20, 0.7),   # IoU 100/700 = 0.14 with object 2
                  det(2, 4, 0, 0, 100, 100, 0.2),   # under the threshold: not counted
                  det(2, 2, 300, 300, 10, 10, 0.6)]  # overlaps nothing: a false positive
    got = failure_census.census(objects, detections, threshold=0.3)
    assert got["objects"] == {"small": 3, "medium": 1, "large": 1}
    assert got["by_size"]["small"] == {"found": 1, "wrong class": 0, "rough": 1, "missed": 1}
    assert got["by_size"]["medium"] == {"found": 0, "wrong class": 1, "rough": 0, "missed": 0}
    assert got["by_size"]["large"] == {"found": 0, "wrong class": 0, "rough": 0, "missed": 1}
    assert got["all"] == {"found": 1, "wrong class": 1, "rough": 1, "missed": 2}
    # the rough box overlaps its object with IoU < 0.5, so it is a false positive too
    assert got["false_positives"] == 2
    # with the threshold lowered the large object is found
    lowered = failure_census.census(objects, detections, threshold=0.1)
    assert lowered["by_size"]["large"]["found"] == 1
