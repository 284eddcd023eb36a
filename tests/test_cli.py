"""The command line is a thin layer: it starts without importing torch, and the work
it does (here: finding the images to predict on) lives in the library."""

import subprocess
import sys

import pytest
from PIL import Image

from ddetr_tutorial.predict import image_files


def test_the_cli_imports_without_torch():
    code = ("import sys, ddetr_tutorial.cli\n"
            "heavy = [m for m in ('torch', 'matplotlib', 'pycocotools') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_image_files_takes_files_as_given_and_folders_sorted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "notes.txt"):
        (folder / name).write_bytes(b"")
    single = tmp_path / "single.webp"
    Image.new("RGB", (4, 4)).save(single)
    assert image_files([single, folder]) == [single, folder / "a.JPG", folder / "b.png"]
    with pytest.raises(FileNotFoundError, match="no such image or folder: .*missing.png"):
        image_files([tmp_path / "missing.png"])
