"""Data: the shapes generator, COCO parsing and its bad inputs, transforms, collate, pycocotools."""

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr_tutorial.data import (
    CocoDetection,
    build_dataset,
    collate_fn,
    make_shapes,
    make_transforms,
    scale_for,
)
from ddetr_tutorial.data import transforms as T

# ----------------------------------------------------------------------------- generator


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    summary = make_shapes(root, num_train=60, num_val=20, size=128, seed=0)
    return root, summary


def _load_json(root, split):
    with open(root / "annotations" / f"instances_{split}.json") as f:
        return json.load(f)


def _all_files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_make_shapes_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_shapes(tmp_path / name, num_train=8, num_val=3, seed=seed)
    a, b, c = (_all_files(tmp_path / name) for name in "abc")
    assert len(a) == 8 + 3 + 2 and a.keys() == b.keys() == c.keys()
    assert a == b  # byte-identical PNGs and JSON
    differing = [name for name in a if a[name] != c[name]]
    assert "annotations/instances_train.json" in differing
    assert sum(name.endswith(".png") for name in differing) >= 9


def test_make_shapes_counts_ids_and_boxes(shapes_dir):
    root, summary = shapes_dir
    assert summary["categories"] == ["circle", "square", "triangle", "cross"]
    for split, count in (("train", 60), ("val", 20)):
        data = _load_json(root, split)
        assert "info" in data and "licenses" in data  # pycocotools 2.0.9/2.0.10 need them
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
        assert [im["id"] for im in data["images"]] == list(range(count))
        anns = data["annotations"]
        assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))  # id 0 breaks COCOeval
        per_image = np.bincount([a["image_id"] for a in anns], minlength=count)
        assert per_image.min() >= 1 and per_image.max() <= 12
        for image in data["images"]:
            assert (image["height"], image["width"]) == (128, 128)
            with Image.open(root / split / image["file_name"]) as png:
                assert png.size == (128, 128) and png.mode == "RGB"
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["category_id"] in (1, 2, 3, 4) and a["iscrowd"] == 0
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
            assert a["area"] == w * h
        stats = summary[split]
        assert stats["images"] == count and stats["objects"] == len(anns)
        assert stats["small"] + stats["medium"] + stats["large"] == len(anns)
        assert sum(stats["per_class"].values()) == len(anns)
    # All of COCO's size buckets are populated, small ones a good share.
    train = summary["train"]
    assert train["small"] >= 0.2 * train["objects"]
    assert train["medium"] > 0 and train["large"] > 0
    assert all(n > 0 for n in train["per_class"].values())


def _foreground(pixels, outside):
    """Pixels that differ from the background, modelled as a plane per channel (+ light noise)."""
    h, w, _ = pixels.shape
    ys, xs = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xs.ravel(), ys.ravel()], axis=1)  # (h*w, 3)
    values = pixels.reshape(-1, 3).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design[outside.ravel()], values[outside.ravel()], rcond=None)
    residual = np.abs(values - design @ coef).sum(1).reshape(h, w)
    return residual > 36  # background + noise stays within 18, shapes are >= 72 away


def test_make_shapes_boxes_are_tight_to_the_drawn_pixels(tmp_path):
    # One object per image: it is the only thing that differs from the background.
    make_shapes(tmp_path, num_train=40, num_val=0, min_objects=1, max_objects=1, seed=5)
    data = _load_json(tmp_path, "train")
    checked = 0
    for a in data["annotations"]:
        pixels = np.asarray(Image.open(tmp_path / "train" / f"{a['image_id']:06d}.png"))
        x, y, w, h = a["bbox"]
        outside = np.ones(pixels.shape[:2], dtype=bool)
        outside[y:y + h, x:x + w] = False
        if outside.sum() < 300:
            continue  # a shape filling the image leaves too little background to model
        fg = _foreground(pixels, outside)
        assert not fg[outside].any(), f"image {a['image_id']}: shape pixels outside its box"
        box = fg[y:y + h, x:x + w]
        edges = (box[0].any(), box[-1].any(), box[:, 0].any(), box[:, -1].any())
        assert all(edges), f"image {a['image_id']}: box {a['bbox']} is loose (edges {edges})"
        checked += 1
    assert checked >= 25


@pytest.mark.parametrize("kwargs,match", [
    ({"size": 16}, "size"),
    ({"num_train": -1}, "num_train"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects"),
])
def test_make_shapes_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- dataset


def test_dataset_on_shapes_matches_the_json(shapes_dir):
    root, _ = shapes_dir
    args = scale_for(128)
    dataset = build_dataset(root, "val", make_transforms("val", **args))
    data = _load_json(root, "val")
    assert len(dataset) == 20 and dataset.category_ids == [1, 2, 3, 4] and dataset.num_classes == 4
    assert dataset.label_of == {1: 0, 2: 1, 3: 2, 4: 3}
    assert dataset.class_names == ["circle", "square", "triangle", "cross"]
    image, target = dataset[3]
    assert image.dtype == torch.float32 and image.shape == (3, 160, 160)
    assert target["image_id"] == 3
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    assert target["orig_size"].tolist() == [128, 128] and target["size"].tolist() == [160, 160]
    anns = [a for a in data["annotations"] if a["image_id"] == 3]
    expected = torch.tensor([[x + w / 2, y + h / 2, w, h]
                             for x, y, w, h in (a["bbox"] for a in anns)]) / 128
    torch.testing.assert_close(target["boxes"], expected)  # resize keeps normalized boxes
    assert target["labels"].tolist() == [a["category_id"] - 1 for a in anns]


def test_pycocotools_round_trip_gives_perfect_ap(shapes_dir):
    # Oracle (reliability H9): the dataset's targets turned back into detections score AP 1.
    root, _ = shapes_dir
    dataset = build_dataset(root, "val")
    assert isinstance(dataset.coco, COCO)
    assert len(dataset.coco.getAnnIds()) == len(_load_json(root, "val")["annotations"])
    detections = []
    for i in range(len(dataset)):
        _, target = dataset.load(i)
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            detections.append({"image_id": target["image_id"], "score": 1.0,
                               "category_id": dataset.category_ids[label],
                               "bbox": [x0, y0, x1 - x0, y1 - y0]})
    evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def _write_coco(tmp_path, annotations, images=None, categories=None, modes=None):
    """A tiny COCO dataset: 64x48 RGB images (or other PIL modes) and an instances file."""
    images = images if images is not None else [
        {"id": i, "file_name": f"{i}.png", "height": 48, "width": 64} for i in (1, 2)]
    categories = categories if categories is not None else [
        {"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 90, "name": "c"}]
    (tmp_path / "images").mkdir(exist_ok=True)
    for image in images:
        mode = (modes or {}).get(image["id"], "RGB")
        colour = {"RGB": (10, 200, 30), "L": 100, "RGBA": (10, 200, 30, 128), "P": 5,
                  "LA": (100, 50)}[mode]
        Image.new(mode, (image["width"], image["height"]), colour).save(
            tmp_path / "images" / image["file_name"])
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": categories}))
    return tmp_path / "images", ann_file


def _ann(ann_id, image_id=1, category_id=3, bbox=(4, 6, 20, 10), **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            **extra}


def test_category_mapping_is_explicit(tmp_path):
    anns = [_ann(1, category_id=3), _ann(2, category_id=90), _ann(3, category_id=7)]
    image_dir, ann_file = _write_coco(tmp_path, anns)
    default = CocoDetection(image_dir, ann_file)
    assert default.category_ids == [3, 7, 90] and default.label_of == {3: 0, 7: 1, 90: 2}
    assert default.load(0)[1]["labels"].tolist() == [0, 2, 1]
    fixed = CocoDetection(image_dir, ann_file, category_ids=[90, 7, 3])
    assert fixed.label_of == {90: 0, 7: 1, 3: 2} and fixed.class_names == ["c", "b", "a"]
    assert fixed.load(0)[1]["labels"].tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"category_ids \[5\] are not among"):
        CocoDetection(image_dir, ann_file, category_ids=[3, 5])


def test_unknown_category_id_names_the_annotation(tmp_path):
    image_dir, ann_file = _write_coco(tmp_path, [_ann(1), _ann(5, category_id=42)])
    with pytest.raises(ValueError, match=r"annotation 5: key 'category_id' is 42, an unknown"):
        CocoDetection(image_dir, ann_file)
    # A category missing from an explicit mapping is unknown too.
    image_dir, ann_file = _write_coco(tmp_path, [_ann(1), _ann(6, category_id=7)])
    with pytest.raises(ValueError, match=r"annotation 6: key 'category_id' is 7"):
        CocoDetection(image_dir, ann_file, category_ids=[3])


@pytest.mark.parametrize("ann,match", [
    ({"id": 7, "image_id": 1, "category_id": 3}, r"annotation 7: missing key 'bbox'"),
    ({"id": 7, "image_id": 1, "bbox": [1, 2, 3, 4]}, r"annotation 7: missing key 'category_id'"),
    ({"id": 7, "category_id": 3, "bbox": [1, 2, 3, 4]}, r"annotation 7: missing key 'image_id'"),
    (_ann(7, bbox=(1, 2, 3)), r"annotation 7: key 'bbox' must be 4 numbers"),
    (_ann(7, bbox=("1", 2, 3, 4)), r"annotation 7: key 'bbox' must be 4 numbers"),
    (_ann(7, bbox=(1, 2, -3, 4)), r"annotation 7: key 'bbox' has a negative width"),
    (_ann(7, bbox=(1, 2, 3, float("nan"))), r"annotation 7: key 'bbox' contains NaN"),
    (_ann(7, image_id=99), r"annotation 7: key 'image_id' is 99"),
    ({"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]},
     r"annotation entry 1 has no key 'id'"),
])
def test_malformed_annotation_names_id_and_key(tmp_path, ann, match):
    image_dir, ann_file = _write_coco(tmp_path, [_ann(1), ann])
    with pytest.raises(ValueError, match=match):
        CocoDetection(image_dir, ann_file)


def test_malformed_file_level_entries(tmp_path):
    image_dir, ann_file = _write_coco(tmp_path, [_ann(1), _ann(1)])
    with pytest.raises(ValueError, match=r"annotation 1: id appears twice"):
        CocoDetection(image_dir, ann_file)
    ann_file.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(ValueError, match=r"key 'images'"):
        CocoDetection(image_dir, ann_file)
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png"}], "categories": []}))
    with pytest.raises(ValueError, match=r"image 1: missing key 'height'"):
        CocoDetection(image_dir, ann_file)
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        CocoDetection(image_dir, tmp_path / "nope.json")


def test_crowd_left_out_of_targets_but_kept_for_evaluation(tmp_path):
    anns = [_ann(1), _ann(2, bbox=(30, 20, 10, 10), iscrowd=1), _ann(3, category_id=7)]
    dataset = CocoDetection(*_write_coco(tmp_path, anns))
    _, target = dataset.load(0)
    assert target["labels"].tolist() == [0, 1] and dataset.num_crowd == 1
    assert sorted(dataset.coco.getAnnIds(imgIds=[1])) == [1, 2, 3]
    assert dataset.coco.anns[2]["iscrowd"] == 1 and dataset.coco.anns[1]["iscrowd"] == 0
    assert dataset.coco.anns[1]["area"] == 200  # filled in (w*h) where missing, for COCOeval


def test_image_without_objects_is_kept(tmp_path):
    dataset = CocoDetection(*_write_coco(tmp_path, [_ann(1)]))
    assert len(dataset) == 2
    image, target = dataset[1]
    assert target["image_id"] == 2 and image.shape == (3, 48, 64)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    train = make_transforms("train", **scale_for(64))
    for seed in range(5):
        torch.manual_seed(seed)
        _, target = train(*dataset.load(1))
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_grayscale_rgba_palette_images_become_rgb(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 64} for i in range(1, 6)]
    modes = {1: "L", 2: "RGBA", 3: "P", 4: "LA", 5: "RGB"}
    dataset = CocoDetection(*_write_coco(tmp_path, [], images=images, modes=modes))
    for i in range(5):
        pil, _ = dataset.load(i)
        assert pil.mode == "RGB" and pil.size == (64, 48)
        image, _ = dataset[i]
        assert image.shape == (3, 48, 64)
    gray = np.asarray(dataset.load(0)[0])
    assert (gray == 100).all()  # L -> all three channels equal the gray value


def test_boxes_clamped_and_empty_ones_dropped_once_logged(tmp_path, caplog):
    anns = [_ann(1, bbox=(-5, 40, 20, 20)),    # sticks out left and bottom -> clamped
            _ann(2, bbox=(70, 10, 5, 5)),      # wholly right of the 64 px image -> dropped
            _ann(3, bbox=(10, 10, 0, 8)),      # zero width -> dropped
            _ann(4, image_id=2, bbox=(60, 44, 10, 10))]
    with caplog.at_level(logging.INFO, logger="ddetr_tutorial.data.coco"):
        dataset = CocoDetection(*_write_coco(tmp_path, anns))
    assert dataset.dropped_ann_ids == [2, 3]
    records = [r for r in caplog.records if r.name == "ddetr_tutorial.data.coco"]
    assert len(records) == 1 and "2 zero-area boxes dropped" in records[0].getMessage()
    assert dataset.load(0)[1]["boxes"].tolist() == [[0, 40, 15, 48]]
    assert dataset.load(1)[1]["boxes"].tolist() == [[60, 44, 64, 48]]
    assert len(dataset.coco.getAnnIds()) == 4  # the evaluation ground truth is untouched


def test_missing_or_mismatched_image_file(tmp_path):
    image_dir, ann_file = _write_coco(tmp_path, [_ann(1)])
    os.remove(image_dir / "2.png")
    with pytest.raises(FileNotFoundError) as info:  # at build, not at the first read
        CocoDetection(image_dir, ann_file)
    assert str((image_dir / "2.png").resolve()) in str(info.value)
    assert "image 2" in str(info.value) and str(ann_file) in str(info.value)
    Image.new("RGB", (30, 20)).save(image_dir / "2.png")
    with pytest.raises(ValueError, match=r"is 30x20 .* image 2 of .* says 64x48"):
        CocoDetection(image_dir, ann_file)
    Image.new("RGB", (64, 48)).save(image_dir / "2.png")
    dataset = CocoDetection(image_dir, ann_file)
    os.remove(image_dir / "2.png")  # deleted after the build: the read still names it
    with pytest.raises(FileNotFoundError, match=r"image 2 of .*: no file"):
        dataset[1]


def test_transforms_never_change_the_cached_targets(shapes_dir):
    root, _ = shapes_dir
    dataset = build_dataset(root, "train", make_transforms("train", **scale_for(128)))
    before = dataset.load(0)[1]["boxes"].clone()
    for seed in range(10):
        torch.manual_seed(seed)
        dataset[0]
    torch.testing.assert_close(dataset.load(0)[1]["boxes"], before)


# ----------------------------------------------------------------------------- transforms


def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.arange(len(boxes)) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "labels": labels}


def test_flip_known_example():
    image = Image.new("RGB", (100, 50))
    image.putpixel((10, 5), (255, 255, 255))
    flipped, target = T.RandomHorizontalFlip(p=1.0)(image, _target([[10, 5, 30, 25]]))
    assert target["boxes"].tolist() == [[70, 5, 90, 25]]  # x0' = W - x1, x1' = W - x0
    assert flipped.getpixel((89, 5)) == (255, 255, 255)
    same, target = T.RandomHorizontalFlip(p=0.0)(image, _target([[10, 5, 30, 25]]))
    assert target["boxes"].tolist() == [[10, 5, 30, 25]] and same is image


def test_resize_known_example_and_max_size():
    image = Image.new("RGB", (200, 100))
    resized, target = T.RandomResize([50])(image, _target([[20, 10, 60, 50]]))
    assert resized.size == (100, 50) and target["size"].tolist() == [50, 100]
    assert target["boxes"].tolist() == [[10, 5, 30, 25]]
    resized, target = T.RandomResize([100], max_size=150)(image, _target([[20, 10, 60, 50]]))
    assert resized.size == (150, 75)  # short side 100 would make the long side 200 > 150
    torch.testing.assert_close(target["boxes"], torch.tensor([[15.0, 7.5, 45.0, 37.5]]))
    # Rounding makes the two axes' ratios differ: 101 x 50 -> 50 x 25; boxes follow each axis.
    resized, target = T.RandomResize([25])(Image.new("RGB", (101, 50)), _target([[0, 0, 100, 50]]))
    assert resized.size == (50, 25)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 100 * 50 / 101, 25.0]]))


def test_crop_clips_boxes_and_drops_vanished_ones_with_labels():
    image = Image.new("RGB", (100, 100))
    target = _target([[10, 10, 20, 20], [40, 40, 80, 80], [60, 0, 90, 30], [50, 10, 70, 20]],
                     labels=[5, 6, 7, 8])
    cropped, out = T.crop(image, target, top=0, left=0, height=50, width=50)
    assert cropped.size == (50, 50) and out["size"].tolist() == [50, 50]
    # Box 3 is outside; box 4 only touches the edge x=50, so it has zero width.
    assert out["boxes"].tolist() == [[10, 10, 20, 20], [40, 40, 50, 50]]
    assert out["labels"].tolist() == [5, 6]
    cropped, out = T.crop(image, target, top=30, left=35, height=40, width=60)
    assert out["boxes"].tolist() == [[5, 10, 45, 40]] and out["labels"].tolist() == [6]


def test_normalize_known_example():
    image = torch.ones(3, 50, 100) * torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    out, target = T.Normalize()(image, _target([[10, 5, 30, 25]]))
    torch.testing.assert_close(out, torch.zeros(3, 50, 100))
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
    with pytest.raises(TypeError, match="ToTensor first"):
        T.Normalize()(Image.new("RGB", (4, 4)), None)


def _random_scene(generator):
    """A black image of random size with white rectangles at random boxes (some touching edges)."""
    width, height = (int(v) for v in torch.randint(40, 200, (2,), generator=generator))
    n = int(torch.randint(0, 6, (), generator=generator))
    corners = torch.rand(n, 2, 2, generator=generator) * torch.tensor([width, height])
    boxes = torch.cat([corners.min(1).values, corners.max(1).values + 2], 1).floor()
    boxes = torch.minimum(boxes, torch.tensor([width, height, width, height], dtype=torch.float32))
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes.int().tolist():
        pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels), _target(boxes.tolist(), labels=list(range(10, 10 + n)))


def test_train_augmentation_keeps_boxes_valid_and_on_their_pixels():
    args = scale_for(128)
    resize = T.RandomResize(args["scales"], max_size=args["max_size"])
    geometric = T.Compose([T.RandomHorizontalFlip(), T.RandomSelect(resize, T.Compose([
        T.RandomResize(args["crop_scales"]), T.RandomSizeCrop(*args["crop"]), resize]))])
    generator = torch.Generator().manual_seed(0)
    for seed in range(150):
        image, target = _random_scene(generator)
        torch.manual_seed(seed)
        out, t = geometric(image, target)
        width, height = out.size
        boxes = t["boxes"]
        assert t["size"].tolist() == [height, width]
        assert len(boxes) == len(t["labels"])
        assert set(t["labels"].tolist()) <= set(target["labels"].tolist())
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
        # The boxes still frame white pixels: the middle of each box is bright.
        pixels = np.asarray(out.convert("L"))
        for x0, y0, x1, y1 in boxes.tolist():
            if x1 - x0 >= 3 and y1 - y0 >= 3:
                assert pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)] > 128, f"seed {seed}"
        # And no bright region is left without a box (bilinear edges aside).
        covered = np.zeros_like(pixels, dtype=bool)
        for x0, y0, x1, y1 in boxes.tolist():
            top, left = max(0, math.floor(y0) - 1), max(0, math.floor(x0) - 1)
            covered[top:math.ceil(y1) + 1, left:math.ceil(x1) + 1] = True
        assert not (pixels[~covered] > 200).any(), f"seed {seed}: bright pixels outside every box"


def test_full_train_and_val_recipes_give_normalized_cxcywh():
    generator = torch.Generator().manual_seed(1)
    train, val = (make_transforms("train", **scale_for(128)),
                  make_transforms("val", **scale_for(128)))
    for seed in range(40):
        image, target = _random_scene(generator)
        torch.manual_seed(seed)
        for transform in (train, val):
            out, t = transform(image, {**target, "size": torch.tensor([image.height, image.width])})
            assert out.dtype == torch.float32 and out.shape[0] == 3
            assert t["size"].tolist() == list(out.shape[1:])
            cx, cy, w, h = t["boxes"].unbind(-1)
            assert (w > 0).all() and (h > 0).all()
            assert ((cx - w / 2) >= -1e-6).all() and ((cx + w / 2) <= 1 + 1e-6).all()
            assert ((cy - h / 2) >= -1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all()
    out, _ = val(Image.new("RGB", (200, 128)), None)  # inference: no target
    assert out.shape == (3, 160, 250)
    # Long side capped at max_size by the official rule: short = round(267 * 128 / 256)
    # = 134 (half to even), long = int(134 * 256 / 128) = 268, a pixel over, as there.
    out, _ = val(Image.new("RGB", (256, 128)), None)
    assert out.shape == (3, 134, 268)


def test_random_size_crop_on_an_image_smaller_than_min_size():
    torch.manual_seed(0)
    out, t = T.RandomSizeCrop(384, 600)(Image.new("RGB", (50, 30)), _target([[0, 0, 10, 10]]))
    assert out.size == (50, 30) and t["size"].tolist() == [30, 50]


def test_recipes_and_scale_for():
    assert scale_for(640) == {"scales": T.PAPER_SCALES, "max_size": 1333, "crop": (384, 600),
                              "crop_scales": (400, 500, 600)}
    small = scale_for(128)
    assert small["scales"][0] == 96 and small["scales"][-1] == 160 and small["max_size"] == 267
    train = make_transforms("train", crop=None)
    assert not any(isinstance(t, T.RandomSelect) for t in train.transforms)
    with pytest.raises(ValueError, match="'valid'"):
        make_transforms("valid")
    with pytest.raises(ValueError, match="scales"):
        make_transforms("train", scales=[])
    with pytest.raises(ValueError, match="min_size"):
        T.RandomSizeCrop(10, 5)


# ----------------------------------------------------------------------------- collate


def test_collate_pads_with_a_mask_and_keeps_targets():
    a, b = torch.rand(3, 4, 5) + 1, torch.rand(3, 6, 3) + 1  # + 1: no pixel equals the zero padding
    targets = [_target([[0.5, 0.5, 0.2, 0.2]]), _target([])]
    images, mask, out = collate_fn([(a, targets[0]), (b, targets[1])])
    assert images.shape == (2, 3, 6, 5) and mask.shape == (2, 6, 5) and mask.dtype == torch.bool
    torch.testing.assert_close(images[0, :, :4, :5], a)
    torch.testing.assert_close(images[1, :, :6, :3], b)
    expected_mask = torch.ones(2, 6, 5, dtype=torch.bool)
    expected_mask[0, :4, :5] = False
    expected_mask[1, :6, :3] = False
    assert torch.equal(mask, expected_mask)
    assert torch.equal(mask, images.eq(0).all(1))  # padding is exactly where the zeros are
    assert out[0] is targets[0] and out[1]["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="empty"):
        collate_fn([])
    with pytest.raises(TypeError, match="ToTensor"):
        collate_fn([(Image.new("RGB", (4, 4)), {})])


def test_collate_with_a_dataloader(shapes_dir):
    root, _ = shapes_dir
    dataset = build_dataset(root, "val", make_transforms("train", **scale_for(128)))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
    images, mask, targets = next(iter(loader))
    assert images.shape[0] == 4 and len(targets) == 4
    for i, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert not mask[i, :h, :w].any() and mask[i].sum() == mask.shape[1] * mask.shape[2] - h * w


def test_flip_only_augmentation_trains_at_the_evaluation_size():
    from ddetr_tutorial.config import build_transforms, get_config

    cfg = get_config("tiny", image_size=48)
    image = Image.new("RGB", (64, 40))
    boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0]])
    sizes, flipped = set(), set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, target = build_transforms(cfg, "train")(image, {"boxes": boxes.clone(),
                                                              "labels": torch.tensor([1])})
        sizes.add(tuple(out.shape[1:]))
        flipped.add(round(float(target["boxes"][0, 0]), 4))  # cx, normalized
    val, _ = build_transforms(cfg, "val")(image, None)
    # short side 48, the long one int(48 * 64 / 40) = 76; no crops, no scales
    assert sizes == {(48, 76)} == {tuple(val.shape[1:])}
    assert flipped == {round(12 / 64, 4), round(1 - 12 / 64, 4)}  # flips only
    with pytest.raises(ValueError, match="augment='none': expected one of 'paper', 'flip'"):
        get_config("tiny", augment="none")  # the config refuses it before any transform
