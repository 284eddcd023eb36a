"""COCO-format detection dataset: any instances.json + image folder -> (image, target).

The annotation file is checked completely once, when the dataset is built,
and so is each image file's header (existence, format, size; pixels are not
decoded, so 10,000 images take about a second). A broken file fails with a
ValueError naming the file and the image or annotation id instead of a
KeyError or a NaN loss an epoch later (DETR #459). Category ids map to
contiguous labels explicitly: label = position in `category_ids`, and COCO's
ids have gaps (1..90 for 80 classes). Crowd regions (iscrowd=1) are left out
of the training targets, as in DETR; they stay in `.coco`, the pycocotools
ground truth that COCOeval reads, which ignores detections on them.

Images are read as stored, ignoring any EXIF rotation (COCO boxes refer to
the stored pixels, and so does DETR's loader).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from .image_files import check_header, read_rgb
from .transforms import Compose, Normalize, ToTensor

logger = logging.getLogger(__name__)


class CocoDetection(torch.utils.data.Dataset):
    """Detection dataset over a COCO instances file.

    `dataset[i]` -> (image, target) after `transforms` (default: ToTensor + Normalize):
      image     float32 (3, H, W), normalized
      target    labels int64 (n,), boxes float32 (n, 4) cxcywh normalized to (W, H),
                image_id int, orig_size int64 (h, w) of the file, size int64 (h, w) now.
    `category_ids[label]` is the COCO id of a label; `label_of[id]` the reverse.
    `load(i)` gives the untransformed PIL image and absolute xyxy boxes.
    """

    def __init__(self, image_dir, ann_file, transforms=None, category_ids=None):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = Compose([ToTensor(), Normalize()]) if transforms is None else transforms
        data = _read_json(self.ann_file)
        where = str(self.ann_file)
        images = _check_images(data, where)
        categories = _check_categories(data, where)
        self.category_ids = _label_order(categories, category_ids, where)  # label -> COCO id
        self.label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        self.class_names = [categories[cid] for cid in self.category_ids]
        _check_annotations(data.setdefault("annotations", []), images, self.label_of, where)
        self.coco = _build_coco(data)
        self.ids = sorted(self.coco.imgs)  # index -> image id
        _check_image_files(self.image_dir, [images[i] for i in self.ids], where)
        self._targets = {}  # image id -> (boxes_xyxy (n, 4) float32, labels (n,) int64)
        self.num_crowd, self.dropped_ann_ids = 0, []
        for image_id in self.ids:
            self._targets[image_id] = self._index_image(image_id)
        self._log_summary()

    @property
    def num_classes(self) -> int:
        """K: number of contiguous labels (the model's sigmoid outputs)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image, target = self.load(index)
        return self.transforms(image, target)

    def load(self, index: int):
        """(PIL RGB image, target with absolute xyxy `boxes`) before any transform."""
        image_id = self.ids[index]
        image = self._load_image(image_id)
        boxes_xyxy, labels = self._targets[image_id]
        size = torch.tensor([image.height, image.width], dtype=torch.int64)
        # Copies: transforms must never reach the cached arrays.
        target = {"boxes": torch.from_numpy(boxes_xyxy.copy()),
                  "labels": torch.from_numpy(labels.copy()),
                  "image_id": image_id, "orig_size": size, "size": size.clone()}
        return image, target

    def __repr__(self):
        return (f"CocoDetection({len(self)} images, {self.num_classes} classes, "
                f"images in {self.image_dir}, annotations in {self.ann_file})")

    def _index_image(self, image_id: int):
        """Training boxes of one image: crowd left out, clamped to the image, empty ones dropped."""
        info = self.coco.imgs[image_id]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann["iscrowd"]:
                self.num_crowd += 1
                continue
            x, y, w, h = ann["bbox"]
            x0, x1 = min(max(x, 0), info["width"]), min(max(x + w, 0), info["width"])
            y0, y1 = min(max(y, 0), info["height"]), min(max(y + h, 0), info["height"])
            if x1 <= x0 or y1 <= y0:  # zero area, or wholly outside the image
                self.dropped_ann_ids.append(ann["id"])
                continue
            boxes.append((x0, y0, x1, y1))
            labels.append(self.label_of[ann["category_id"]])
        return (np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64))

    def _log_summary(self) -> None:
        num_boxes = sum(len(labels) for _, labels in self._targets.values())
        message = (f"{self.ann_file.name}: {len(self)} images, {num_boxes} training boxes, "
                   f"{self.num_crowd} crowd annotations left out of the targets "
                   f"(kept for evaluation), "
                   f"{len(self.dropped_ann_ids)} zero-area boxes dropped "
                   f"after clamping to the image")
        if self.dropped_ann_ids:
            logger.warning(message + f" (annotation ids {self.dropped_ann_ids[:10]}"
                           + (" ...)" if len(self.dropped_ann_ids) > 10 else ")"))
        else:
            logger.info(message)

    def _load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = os.path.abspath(self.image_dir / info["file_name"])
        if not os.path.isfile(path):  # checked at build; deleted since?
            raise FileNotFoundError(f"image {image_id} of {self.ann_file}: no file {path}")
        image = read_rgb(path, f"image {image_id} of {self.ann_file}")
        if (image.width, image.height) != (info["width"], info["height"]):
            raise ValueError(f"{path} is {image.width}x{image.height} (w x h) but {self.ann_file} "
                             f"says {info['width']}x{info['height']} for image {image_id}")
        return image


def build_dataset(root, split: str, transforms=None, category_ids=None) -> CocoDetection:
    """The shapes layout: root/{split}/*.png and root/annotations/instances_{split}.json."""
    root = Path(root)
    return CocoDetection(root / split, root / "annotations" / f"instances_{split}.json",
                         transforms=transforms, category_ids=category_ids)


# ----------------------------------------------------------------------------- checks


def _read_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise FileNotFoundError(f"no annotation file {os.path.abspath(ann_file)}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{ann_file} is not valid JSON: {error.msg} at line {error.lineno} "
                         f"column {error.colno}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{ann_file} is not a UTF-8 JSON text file ({error.reason} at byte "
                         f"{error.start})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: a COCO file is a JSON object, got {type(data).__name__}")
    return data


def _check_images(data: dict, where: str) -> dict:
    """-> {image id: image entry}; each needs id, file_name, height, width."""
    if not isinstance(data.get("images"), list):
        raise ValueError(f"{where}: missing or malformed key 'images' (a list of image entries)")
    images = {}
    for position, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise ValueError(f"{where}: image entry {position} has no key 'id'")
        if not _is_int(image["id"]):
            raise ValueError(f"{where}: image entry {position}: key 'id' is {image['id']!r}, "
                             "expected an integer (COCOeval and the batches use integer ids)")
        for key in ("file_name", "height", "width"):
            if key not in image:
                raise ValueError(f"{where}: image {image['id']}: missing key '{key}'")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ValueError(f"{where}: image {image['id']}: key 'file_name' is "
                             f"{image['file_name']!r}, expected a non-empty path string")
        for key in ("height", "width"):
            if not _is_int(image[key]) or image[key] <= 0:
                raise ValueError(f"{where}: image {image['id']}: key '{key}' is {image[key]!r}, "
                                 "expected a positive integer (pixels)")
        if image["id"] in images:
            raise ValueError(f"{where}: image id {image['id']} appears twice")
        images[image["id"]] = image
    return images


def _check_categories(data: dict, where: str) -> dict:
    """-> {category id: name}."""
    if not isinstance(data.get("categories"), list):
        raise ValueError(f"{where}: missing or malformed key 'categories' (a list of {{id, name}})")
    if not data["categories"]:
        raise ValueError(f"{where}: key 'categories' is empty; a detector needs at least one "
                         "category {id, name}")
    categories = {}
    for position, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            raise ValueError(f"{where}: category entry {position} has no key 'id'")
        cid = category["id"]
        if not _is_int(cid):
            raise ValueError(f"{where}: category entry {position}: key 'id' is {cid!r}, "
                             "expected an integer")
        if cid in categories:
            raise ValueError(f"{where}: category id {cid} appears twice")
        name = category.get("name", str(cid))
        if not isinstance(name, str):
            raise ValueError(f"{where}: category {cid}: key 'name' is {name!r}, expected a string")
        categories[cid] = name
    return categories


def _label_order(categories: dict, category_ids, where: str) -> list:
    """Contiguous labels: `category_ids` fixes the order; default sorted ids of the file."""
    if category_ids is None:
        return sorted(categories)
    category_ids = list(category_ids)
    if not category_ids or not all(_is_int(cid) for cid in category_ids):
        raise ValueError(f"category_ids must be a non-empty list of integer category ids, "
                         f"got {category_ids!r}")
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"category_ids has duplicates: {category_ids}")
    unknown = [cid for cid in category_ids if cid not in categories]
    if unknown:
        raise ValueError(f"category_ids {unknown} are not among the categories of {where} "
                         f"(ids {sorted(categories)})")
    return category_ids


def _check_annotations(annotations, images: dict, label_of: dict, where: str) -> None:
    """Raise ValueError naming the annotation id and key for the first malformed annotation.

    Fills the optional keys the way COCOeval needs them: iscrowd=0, area=w*h.
    """
    if not isinstance(annotations, list):
        raise ValueError(f"{where}: 'annotations' must be a list, got {type(annotations).__name__}")
    seen = set()
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "id" not in ann:
            raise ValueError(f"{where}: annotation entry {position} has no key 'id'")
        if not _is_int(ann["id"]):
            raise ValueError(f"{where}: annotation entry {position}: key 'id' is {ann['id']!r}, "
                             "expected an integer (COCOeval matches annotations by id)")
        name = f"{where}: annotation {ann['id']}"
        if ann["id"] in seen:
            raise ValueError(f"{name}: id appears twice")
        seen.add(ann["id"])
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise ValueError(f"{name}: missing key '{key}'")
        if ann["image_id"] not in images:
            raise ValueError(f"{name}: key 'image_id' is {ann['image_id']!r}, "
                             "not an image of the file")
        if ann["category_id"] not in label_of:
            raise ValueError(f"{name}: key 'category_id' is {ann['category_id']!r}, an unknown "
                             f"category id (known ids: {sorted(label_of)})")
        _check_bbox(ann["bbox"], name)
        _check_optional(ann, name)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    if 0 in seen:
        # COCOeval stores the matched ground-truth id and reads 0 as "unmatched".
        logger.warning(f"{where}: annotation id 0 exists; pycocotools' COCOeval counts a detection "
                       "matched to it as a false positive. Number annotations from 1.")


def _check_bbox(bbox, name: str) -> None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise ValueError(f"{name}: key 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
    if not all(math.isfinite(v) for v in bbox):
        kind = "NaN" if any(math.isnan(v) for v in bbox) else "inf"
        raise ValueError(f"{name}: key 'bbox' contains {kind}: {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"{name}: key 'bbox' has a negative width or height: {bbox!r} "
                         "(COCO boxes are [x, y, w, h], not corners)")


def _check_optional(ann: dict, name: str) -> None:
    """iscrowd, if given, is 0/1; area, if given, a finite number >= 0 (COCOeval reads both)."""
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        raise ValueError(f"{name}: key 'iscrowd' is {ann['iscrowd']!r}, expected 0 or 1")
    if "area" in ann:
        area = ann["area"]
        if (not isinstance(area, (int, float)) or isinstance(area, bool)
                or not math.isfinite(area) or area < 0):
            raise ValueError(f"{name}: key 'area' is {area!r}, expected a finite number >= 0")


def _check_image_files(image_dir: Path, images: list, where: str) -> None:
    """Each image entry's file exists and its header is a readable image of the stated size."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"no image folder {os.path.abspath(image_dir)} "
                                f"(the images of {where})")
    missing = []
    for image in images:
        path = os.path.abspath(image_dir / image["file_name"])
        if not os.path.isfile(path):
            missing.append(f"image {image['id']} ({path})")
            continue
        check_header(path, f"image {image['id']} of {where}", image["width"], image["height"])
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} images of {where} have no "
                                f"file: " + ", ".join(missing[:5])
                                + (", ..." if len(missing) > 5 else ""))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _build_coco(data: dict) -> COCO:
    """A pycocotools COCO index over already-checked data (COCOeval needs `info` in some
    versions)."""
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco
