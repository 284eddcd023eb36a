"""COCO-format detection dataset: any instances.json + image folder -> (image, target).

The annotation file is checked once, when the dataset is built, so a broken
file fails with a message naming the annotation and key instead of a
KeyError or a NaN loss hours later (DETR #459). Category ids map to
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
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

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
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {image_id} of {self.ann_file}: no file {path}")
        with Image.open(path) as image:
            # Palette images with transparency warn unless they go through RGBA.
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            image = image.convert("RGB")  # grayscale, RGBA, CMYK, ... -> RGB (alpha dropped)
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
    with open(ann_file) as f:
        data = json.load(f)
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
        for key in ("file_name", "height", "width"):
            if key not in image:
                raise ValueError(f"{where}: image {image['id']}: missing key '{key}'")
        if image["id"] in images:
            raise ValueError(f"{where}: image id {image['id']} appears twice")
        images[image["id"]] = image
    return images


def _check_categories(data: dict, where: str) -> dict:
    """-> {category id: name}."""
    if not isinstance(data.get("categories"), list):
        raise ValueError(f"{where}: missing or malformed key 'categories' (a list of {{id, name}})")
    categories = {}
    for position, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            raise ValueError(f"{where}: category entry {position} has no key 'id'")
        categories[category["id"]] = category.get("name", str(category["id"]))
    return categories


def _label_order(categories: dict, category_ids, where: str) -> list:
    """Contiguous labels: `category_ids` fixes the order; default sorted ids of the file."""
    if category_ids is None:
        return sorted(categories)
    category_ids = list(category_ids)
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
