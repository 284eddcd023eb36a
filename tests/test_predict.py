"""predict_images reads its files like the datasets do: a 16-bit grayscale PNG is scaled
to 8 bits (not clipped to white), so it gives the detections of its 8-bit twin."""

import json

import numpy as np
from PIL import Image

from ddetr_tutorial.data.shapes import render_image
from ddetr_tutorial.notebook import load_shipped_model
from ddetr_tutorial.predict import predict_images


def test_a_sixteen_bit_png_is_detected_like_its_eight_bit_twin(tmp_path):
    pixels, _ = render_image(np.random.default_rng(3), 96)
    gray = np.asarray(Image.fromarray(pixels).convert("L"))  # (H, W) uint8
    Image.fromarray(gray).save(tmp_path / "eight.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # I;16
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"

    model, cfg, postprocess, _ = load_shipped_model(op_backend="pytorch")
    found = {}
    for name in ("eight", "sixteen"):
        out = predict_images(model, cfg, postprocess, [tmp_path / f"{name}.png"],
                             tmp_path / name, threshold=0.3)
        found[name] = [(d["category_id"], np.round(d["bbox"], 3).tolist(), round(d["score"], 5))
                       for d in json.loads(out.read_text())]
    assert found["eight"], "the 8-bit image should have detections to compare"
    assert found["sixteen"] == found["eight"]
