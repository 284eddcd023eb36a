"""Detection on image files: COCO-format predictions and drawn detections.

What `python -m ddetr_tutorial predict` runs; the model comes from
`model_files.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from PIL import Image

from .config import build_transforms
from .data import collate_fn, read_rgb
from .visualize import draw_detections

SHEET_SIZE = 12
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_files(paths) -> list[Path]:
    """The image files among `paths`: files as given, folders as their images, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    return files


@torch.no_grad()
def detect(model, postprocess, transform, image: Image.Image) -> dict[str, torch.Tensor]:
    """One PIL image -> its detections on the CPU: `boxes` (n, 4) xyxy in the image's
    pixels, `scores` (n,), `labels` (n,) contiguous."""
    device = next(model.parameters()).device
    tensor, _ = transform(image, None)
    images, mask, _ = collate_fn([(tensor, {})])  # (1, 3, H, W), (1, H, W)
    outputs = model(images.to(device), mask.to(device))
    size = torch.tensor([[image.height, image.width]], device=device)
    return {k: v.cpu() for k, v in postprocess(outputs, size)[0].items()}


def predict_images(model, cfg, postprocess, paths, out_dir, threshold=0.5, class_names=None,
                   category_ids=None) -> Path:
    """Detect objects in image files: writes predictions.json (COCO result format plus
    file_name and, with class_names, category_name), <name>_detections.png per image
    and, for several images, detections.png with the first 12 side by side. Returns
    the JSON path.
    Detections scoring below `threshold` are neither written nor drawn."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = build_transforms(cfg, "val")
    model.eval()
    results, sheet = [], []
    for path in image_files(paths):
        image = read_rgb(path, "input image")  # 16-bit PNGs scaled, not clipped
        det = detect(model, postprocess, transform, image)
        keep = det["scores"] >= threshold
        for box, score, label in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(),
                                     det["labels"][keep].tolist()):
            x0, y0, x1, y1 = box
            category = category_ids[label] if category_ids else label
            results.append({"file_name": path.name, "category_id": int(category),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score,
                            **({"category_name": class_names[label]} if class_names else {})})
        drawn = (image, det["boxes"][keep], det["labels"][keep], det["scores"][keep])
        fig = draw_detections(*drawn, class_names, title=path.name)
        fig.savefig(out_dir / f"{path.stem}_detections.png", dpi=120)
        plt.close(fig)
        if len(sheet) < SHEET_SIZE:
            sheet.append((path.name, drawn))
    if len(sheet) > 1:
        _contact_sheet(sheet, class_names, out_dir / "detections.png")
    out = out_dir / "predictions.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    return out


def _contact_sheet(sheet, class_names, path: Path) -> None:
    """Several images' detections on one page, three to a row."""
    columns = min(3, len(sheet))
    rows = -(-len(sheet) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, drawn) in zip(axes.flat, sheet):
        draw_detections(*drawn, class_names, ax=ax, title=name)
    for ax in axes.flat[len(sheet):]:
        ax.set_axis_off()
    fig.savefig(path, dpi=120)
    plt.close(fig)
