"""COCO evaluation: detections as COCO results, scored by pycocotools' COCOeval.

The numbers are the standard 12 of the COCO detection benchmark (paper Table 1
reports AP, AP50, AP75, APs, APm, APl), computed by the reference implementation
rather than re-derived, so they compare with published results.
"""

from __future__ import annotations

import contextlib
import io

from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
           "ARl")


def coco_results(detections, image_ids, category_ids) -> list[dict]:
    """Post-processed detections -> COCO result dicts (bbox as xywh pixels).

    detections: one dict per image with `boxes` (n, 4) xyxy pixels, `scores` (n,)
    and `labels` (n,) contiguous; category_ids[label] is the COCO category id.
    """
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].tolist()
        for (x0, y0, x1, y1), score, label in zip(boxes, det["scores"].tolist(),
                                                   det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return results


def coco_eval(coco_gt, results: list[dict], image_ids=None) -> tuple[dict, str]:
    """pycocotools COCOeval (bbox) of `results` against `coco_gt`.

    Returns the 12 standard numbers by name (AP, AP50, AP75, APs, APm, APl,
    AR1, AR10, AR100, ARs, ARm, ARl; -1 where a size has no objects) and the
    printed table. No detections at all scores 0 everywhere.
    """
    if not results:
        return {k: 0.0 for k in METRICS}, "no detections: every metric is 0\n"
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(METRICS, (float(x) for x in evaluator.stats))), table.getvalue()
