"""`pip install .` gives a working library from any folder: the wheel holds every
module, the kernel sources and the shipped model, and an installed copy, imported
where the repository is not on the path, loads "tiny_shapes" by name and detects
with it, as the checkout does. Offline: no build isolation, no index."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from ddetr_tutorial.box_ops import box_iou
from ddetr_tutorial.data import make_shapes
from ddetr_tutorial.notebook import load_shipped_model
from ddetr_tutorial.shipped import SHIPPED, SHIPPED_BACKBONES, model_card, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddetr_tutorial"
# what the build reads besides the package itself
BUILD_INPUTS = ["pyproject.toml", "README.md"]


def _run(command, **kw):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of the sources (so the build writes
    nothing into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(PACKAGE, src / PACKAGE.name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    for name in BUILD_INPUTS:
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--quiet", "--wheel-dir", str(tmp / "dist"), str(src)])
    (found,) = (tmp / "dist").glob("ddetr_tutorial-*.whl")
    return found


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a fresh folder of its own."""
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
          "--target", str(target), str(wheel)])
    return target


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _package_files(pattern: str) -> list[Path]:
    return sorted(p for p in PACKAGE.rglob(pattern) if "__pycache__" not in p.parts)


def test_wheel_holds_every_module_the_kernel_sources_and_the_shipped_model(wheel):
    # Listed from the source tree: a new header or module is covered without editing this.
    csrc = sorted(p for p in (PACKAGE / "ops" / "csrc").iterdir()
                  if p.is_file() and not p.name.startswith("."))
    assert {p.suffix for p in csrc} >= {".cpp", ".cu", ".cuh", ".h"}
    shipped = [p for path in SHIPPED.values() for p in (path, path.with_suffix(".md"))]
    shipped += [p for path in SHIPPED_BACKBONES.values()  # weights, card, record
                for p in (path, path.with_suffix(".md"), path.with_suffix(".json"))]
    wanted = _package_files("*.py") + csrc + shipped
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [str(p.relative_to(ROOT)) for p in wanted
                   if p.relative_to(ROOT).as_posix() not in names]
        assert not missing, f"not in {wheel.name}: {missing}"
        for p in csrc + shipped:  # the same bytes, not an empty or stale file
            assert _sha(zf.read(p.relative_to(ROOT).as_posix())) == _sha(p.read_bytes()), p


def test_resolve_checkpoint_names_and_paths(tmp_path, monkeypatch):
    assert resolve_checkpoint("tiny_shapes") == SHIPPED["tiny_shapes"]
    assert SHIPPED["tiny_shapes"].is_relative_to(PACKAGE)
    assert model_card("tiny_shapes").read_text().startswith("# Model card")
    local = tmp_path / "tiny_shapes"  # an existing file is never shadowed by a name
    local.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("tiny_shapes") == Path("tiny_shapes")
    assert resolve_checkpoint(local) == local
    with pytest.raises(ValueError, match=r"'tiny_shape'.*nothing exists at .*tiny_shape\b"
                       r".*shipped name \('tiny_shapes'\)"):
        resolve_checkpoint("tiny_shape")
    with pytest.raises(TypeError, match="got int 3"):
        resolve_checkpoint(3)
    with pytest.raises(ValueError, match="'nope' is not a shipped checkpoint"):
        model_card("nope")


def test_cli_rejects_an_unknown_checkpoint_before_any_work(capsys):
    from ddetr_tutorial import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["predict", "--checkpoint", "tiny_shape", "x.png", "--out", "nowhere"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "'tiny_shape'" in err and "'tiny_shapes'" in err


# Runs in the installed copy, from a folder where the repository is not importable.
CHECK = textwrap.dedent("""
    import json, sys
    import torch
    import ddetr_tutorial
    from ddetr_tutorial.model_files import load_model
    from ddetr_tutorial.notebook import SHIPPED_MODEL, load_shipped_model
    from ddetr_tutorial.ops import loader

    model, cfg, _, meta = load_model("tiny_shapes", device="cpu", op_backend="pytorch")
    inputs = torch.load("inputs.pt")
    with torch.no_grad():
        outputs = model(inputs["images"], inputs["mask"])
    torch.save({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, "outputs.pt")
    same = load_shipped_model()[0].state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    json.dump({"package": ddetr_tutorial.__file__, "shipped": str(SHIPPED_MODEL),
               "csrc": str(loader.CSRC), "build": str(loader.build_directory("cpu")),
               "backend": cfg.op_backend, "path": sys.path}, open("where.json", "w"))
""")


def test_installed_copy_runs_the_shipped_model_from_any_folder(site, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "check.py").write_text(CHECK)
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 80)
    mask = torch.zeros(1, 64, 80, dtype=torch.bool)
    mask[:, :, 72:] = True
    torch.save({"images": images, "mask": mask}, elsewhere / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": str(site), "DDETR_BACKEND": "pytorch",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    _run([sys.executable, "check.py"], cwd=elsewhere, env=env)

    where = json.loads((elsewhere / "where.json").read_text())
    for key in ("package", "shipped", "csrc"):  # everything comes from the installed copy
        assert Path(where[key]).is_relative_to(site), (key, where[key])
    assert str(ROOT) not in where["path"]
    # JIT builds go to the extension cache, never into the (possibly read-only) package
    assert Path(where["build"]).is_relative_to(tmp_path / "extensions"), where["build"]

    # oracle: the checkout's copy of the shipped model on the same input
    model = load_shipped_model(op_backend="pytorch")[0]
    with torch.no_grad():
        expected = model(images, mask)
    got = torch.load(elsewhere / "outputs.pt")
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])


def test_installed_cli_predicts_with_the_shipped_name(site, tmp_path):
    shapes = tmp_path / "shapes"
    make_shapes(shapes, num_train=0, num_val=2, size=96, seed=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DDETR_BACKEND": "pytorch"}
    _run([sys.executable, "-m", "ddetr_tutorial", "predict", "--checkpoint", "tiny_shapes",
          str(shapes / "val"), "--out", "detections"], cwd=elsewhere, env=env)

    predictions = json.loads((elsewhere / "detections" / "predictions.json").read_text())
    truth = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    files = {im["id"]: im["file_name"] for im in truth["images"]}
    for name in files.values():
        assert (elsewhere / "detections" / name.replace(".png", "_detections.png")).is_file()
        found = [p for p in predictions if p["file_name"] == name]
        assert found, f"no detection in {name}"
        # the top detection of each image is one of its objects (the model has AP50 0.9)
        top = max(found, key=lambda p: p["score"])
        objects = [a for a in truth["annotations"] if files[a["image_id"]] == name
                   and a["category_id"] == top["category_id"]]
        assert objects, (name, top)
        iou, _ = box_iou(_xyxy([top["bbox"]]), _xyxy([a["bbox"] for a in objects]))
        assert iou.max() > 0.5, (name, top, objects)


def _xyxy(boxes_xywh) -> torch.Tensor:
    x, y, w, h = torch.tensor(boxes_xywh, dtype=torch.float64).unbind(-1)
    return torch.stack([x, y, x + w, y + h], -1)
