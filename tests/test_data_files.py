"""Issue 14 items 4 and 10: 16-bit images, and every malformed input failing when the dataset is
built, with a ValueError naming the file and the image or annotation id."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ddetr_tutorial.data import CocoDetection
from ddetr_tutorial.data.image_files import is_sixteen_bit


def _write_set(tmp_path, images=None, annotations=None, categories=None):
    """Two 64x48 RGB PNGs, one box each, categories 3 and 7 -> (image_dir, ann_file, data)."""
    images = images if images is not None else [
        {"id": i, "file_name": f"{i}.png", "height": 48, "width": 64} for i in (1, 2)]
    annotations = annotations if annotations is not None else [
        {"id": 10 + i, "image_id": i, "category_id": 3, "bbox": [4, 6, 20, 10]} for i in (1, 2)]
    categories = categories if categories is not None else [{"id": 3, "name": "a"},
                                                            {"id": 7, "name": "b"}]
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    for i in range(1, 3):
        Image.new("RGB", (64, 48), (10, 200, 30)).save(image_dir / f"{i}.png")
    data = {"images": images, "annotations": annotations, "categories": categories}
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


def _png16(path, pixels, color_type):
    """Write a 16-bit PNG by hand (PIL cannot write 16-bit RGB): pixels uint16 (H, W, channels)."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- 16-bit images


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    values = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    Image.fromarray(values).save(image_dir / "1.png")
    assert Image.open(image_dir / "1.png").mode == "I;16"  # what PIL gives for this file
    pil, _ = CocoDetection(image_dir, ann_file).load(0)
    rgb = np.asarray(pil)
    assert pil.mode == "RGB" and rgb.shape == (48, 64, 3)
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert (rgb == expected[..., None]).all()  # convert("RGB") alone gives 255 almost everywhere
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) == 256


def test_sixteen_bit_color_pngs_keep_their_high_byte(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    generator = np.random.default_rng(0)
    rgb16 = generator.integers(0, 65536, (48, 64, 3)).astype(np.uint16)
    _png16(image_dir / "1.png", rgb16, color_type=2)
    gray_alpha16 = generator.integers(0, 65536, (48, 64, 2)).astype(np.uint16)
    _png16(image_dir / "2.png", gray_alpha16, color_type=4)
    dataset = CocoDetection(image_dir, ann_file)
    assert (np.asarray(dataset.load(0)[0]) == rgb16 >> 8).all()
    gray = np.asarray(dataset.load(1)[0])
    assert (gray == (gray_alpha16[..., :1] >> 8)).all()  # alpha dropped, gray in every channel


def test_mode_i_from_a_png_counts_as_sixteen_bit():
    assert is_sixteen_bit("I;16B", "TIFF") and is_sixteen_bit("I", "PNG")
    assert not is_sixteen_bit("I", "TIFF") and not is_sixteen_bit("L", "PNG")


@pytest.mark.parametrize("mode,dtype", [("F", np.float32), ("I", np.int32)])
def test_float_and_32_bit_images_are_refused_at_build(tmp_path, mode, dtype):
    image_dir, ann_file = _write_set(tmp_path)
    images = json.loads(ann_file.read_text())
    images["images"][1]["file_name"] = "2.tif"
    ann_file.write_text(json.dumps(images))
    Image.fromarray(np.full((48, 64), 3, dtype=dtype)).save(image_dir / "2.tif")
    with pytest.raises(ValueError, match=rf"2\.tif \(image 2 of .*instances\.json\) has pixel "
                                         rf"mode '{mode}'"):
        CocoDetection(image_dir, ann_file)


# ----------------------------------------------------------------------------- image files


def test_corrupt_image_file_fails_at_build_naming_file_and_id(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    (image_dir / "2.png").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"2\.png \(image 2 of .*instances\.json\) is not a "
                                         r"readable image"):
        CocoDetection(image_dir, ann_file)
    (image_dir / "2.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2\.png \(image 2 of .*\) is not a readable image"):
        CocoDetection(image_dir, ann_file)


def test_truncated_pixels_fail_at_read_naming_file_and_id(tmp_path):
    # The header is intact, so the build passes (headers only); the read names the file.
    image_dir, ann_file = _write_set(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3)).astype(np.uint8)
    Image.fromarray(noise).save(image_dir / "2.png")
    data = (image_dir / "2.png").read_bytes()
    (image_dir / "2.png").write_bytes(data[: len(data) // 2])
    dataset = CocoDetection(image_dir, ann_file)
    with pytest.raises(ValueError, match=r"2\.png \(image 2 of .*\) cannot be decoded"):
        dataset[1]


def test_missing_image_folder_and_many_missing_files(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no image folder .*nope \(the images of "):
        CocoDetection(tmp_path / "nope", ann_file)
    for i in (1, 2):
        (image_dir / f"{i}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 2 images of .*instances\.json have no "
                                                r"file: image 1 \(.*1\.png\), image 2"):
        CocoDetection(image_dir, ann_file)


# ----------------------------------------------------------------------------- annotations


def _image(i=1, **changes):
    return {"id": i, "file_name": f"{i}.png", "height": 48, "width": 64, **changes}


def _ann(ann_id=11, **changes):
    return {"id": ann_id, "image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 10], **changes}


@pytest.mark.parametrize("images,annotations,categories,match", [
    ([_image(id="1")], [], None, r"image entry 0: key 'id' is '1', expected an integer"),
    ([_image(id=True)], [], None, r"image entry 0: key 'id' is True"),
    ([_image(), _image(2, id="b")], [], None, r"image entry 1: key 'id' is 'b'"),
    ([_image(height="48")], [], None, r"image 1: key 'height' is '48', expected a positive"),
    ([_image(width=0)], [], None, r"image 1: key 'width' is 0, expected a positive"),
    ([_image(file_name=None)], [], None, r"image 1: key 'file_name' is None"),
    (None, None, [], r"key 'categories' is empty"),
    (None, None, [{"id": "3", "name": "a"}, {"id": 7}],
     r"category entry 0: key 'id' is '3', expected an integer"),
    (None, None, [{"id": 3}, {"id": 3}], r"category id 3 appears twice"),
    (None, None, [{"id": 3, "name": 5}], r"category 3: key 'name' is 5"),
    (None, [_ann(ann_id="x")], None, r"annotation entry 0: key 'id' is 'x', expected an int"),
    (None, [_ann(category_id="3")], None, r"annotation 11: key 'category_id' is '3', an unknown"),
    (None, [_ann(image_id="1")], None, r"annotation 11: key 'image_id' is '1', not an image"),
    (None, [_ann(iscrowd=2)], None, r"annotation 11: key 'iscrowd' is 2, expected 0 or 1"),
    (None, [_ann(area=-1)], None, r"annotation 11: key 'area' is -1, expected a finite"),
    (None, [_ann(area="big")], None, r"annotation 11: key 'area' is 'big'"),
])
def test_malformed_entries_fail_at_build_naming_file_and_id(tmp_path, images, annotations,
                                                            categories, match):
    image_dir, ann_file = _write_set(tmp_path, images, annotations, categories)
    with pytest.raises(ValueError, match=match) as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value)


def test_string_category_ids_mixed_with_ints_name_the_entry(tmp_path):
    # Before: sorted() of mixed ids raised "'<' not supported between 'str' and 'int'".
    image_dir, ann_file = _write_set(tmp_path, categories=[{"id": 3}, {"id": "7"}])
    with pytest.raises(ValueError, match=r"instances\.json: category entry 1: key 'id' is '7'"):
        CocoDetection(image_dir, ann_file)
    image_dir, ann_file = _write_set(tmp_path)
    with pytest.raises(ValueError, match=r"category_ids must be a non-empty list of integer"):
        CocoDetection(image_dir, ann_file, category_ids=[3, "7"])
    assert CocoDetection(image_dir, ann_file, category_ids=np.array([7, 3])).category_ids == [7, 3]


@pytest.mark.parametrize("text,match", [
    ('{"images": [', r"instances\.json is not valid JSON: Expecting .* at line 1 column 13"),
    ('{"images": []}\n}', r"instances\.json is not valid JSON: Extra data at line 2 column 1"),
    ("", r"instances\.json is not valid JSON: Expecting value at line 1 column 1"),
])
def test_broken_json_names_the_file_and_position(tmp_path, text, match):
    image_dir, ann_file = _write_set(tmp_path)
    ann_file.write_text(text)
    with pytest.raises(ValueError, match=match):
        CocoDetection(image_dir, ann_file)


def test_non_utf8_annotation_file_names_the_file(tmp_path):
    image_dir, ann_file = _write_set(tmp_path)
    ann_file.write_bytes(b'{"images": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"instances\.json is not a UTF-8 JSON text file"):
        CocoDetection(image_dir, ann_file)
