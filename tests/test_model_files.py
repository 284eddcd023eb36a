"""Any checkpoint wherever one is accepted: ours, an official `.pth`, HuggingFace weights.

No weights can be downloaded here, so the official and HuggingFace files are
synthetic: random tensors with the official key lists (tests/reference), saved
the way each project saves them (the official main.py: {'model', 'args', 'epoch'};
transformers' save_pretrained: a folder with config.json and model.safetensors).
Each CLI command then runs on them end to end.
"""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from ddetr_tutorial import cli
from ddetr_tutorial.config import Config, build_model, build_transforms, get_config
from ddetr_tutorial.data import make_shapes
from ddetr_tutorial.data.coco_categories import COCO_CATEGORIES
from ddetr_tutorial.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ddetr_tutorial.model_files import (
    init_from,
    load_model,
    read_model_file,
    variant_from_keys,
)
from ddetr_tutorial.shipped import shipped_checkpoint
from ddetr_tutorial.weights import load_official_checkpoint, official_to_hf
from official import PRESET_KEYS, deduplicated, official_keys, synthetic_official

PERSON = 1  # COCO's id (and the official class-head row) of "person"


def official_args(**changes) -> argparse.Namespace:
    """The official main.py's argparse defaults that name the variant."""
    fields = dict(backbone="resnet50", dilation=False, position_embedding="sine",
                  num_feature_levels=4, enc_layers=6, dec_layers=6, dim_feedforward=1024,
                  hidden_dim=256, dropout=0.1, nheads=8, num_queries=300, dec_n_points=4,
                  enc_n_points=4, with_box_refine=False, two_stage=False, masks=False,
                  aux_loss=True, lr=2e-4, lr_backbone=2e-5, dataset_file="coco", epochs=50)
    fields.update(changes)
    return argparse.Namespace(**fields)


def on_meta(name):
    """A state dict of one official variant with no storage: enough to read its variant."""
    return {k: torch.empty(s, device="meta") for k, s in official_keys(name).items()}


def relabel(root, ids, names, extra=()):
    """Give a shapes dataset other category ids (and names); `extra` adds unused ones."""
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        new = dict(zip(sorted(c["id"] for c in data["categories"]), ids))
        data["categories"] = ([{"id": new[c["id"]], "name": names[i], "supercategory": "x"}
                               for i, c in enumerate(sorted(data["categories"],
                                                            key=lambda c: c["id"]))]
                              + [{"id": i, "name": n, "supercategory": "x"} for i, n in extra])
        for ann in data["annotations"]:
            ann["category_id"] = new[ann["category_id"]]
        path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def coco_shapes(tmp_path_factory):
    """One small dataset labelled with COCO ids (person, dog, car, cat), one val image."""
    root = tmp_path_factory.mktemp("coco_shapes")
    make_shapes(root, num_train=8, num_val=1, size=64, seed=5, max_objects=3)
    relabel(root, [1, 18, 3, 17], ["person", "dog", "car", "cat"])
    return root


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A two-stage official checkpoint whose class head favours "person"."""
    state = synthetic_official(official_keys("two_stage"))
    for key in [k for k in state if k.startswith("class_embed.") and k.endswith(".bias")]:
        state[key][PERSON] += 20.0  # shared heads: the decoder's names see it too
    path = tmp_path_factory.mktemp("official") / "r50_deformable_detr_plus_plus-checkpoint.pth"
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 49,
                "args": official_args(with_box_refine=True, two_stage=True)}, path)
    return path, state


@pytest.fixture(scope="module")
def hf_folder(official_file, tmp_path_factory):
    """The same weights as transformers saves them: safetensors, tied heads once."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    _, state = official_file
    folder = tmp_path_factory.mktemp("hf") / "deformable-detr-refined-two-stage"
    folder.mkdir()
    hf = deduplicated(official_to_hf(state), min)
    safetensors_torch.save_file(hf, str(folder / "model.safetensors"))
    id2label = {str(i): COCO_CATEGORIES.get(i, "N/A") for i in range(91)}
    (folder / "config.json").write_text(json.dumps({
        "model_type": "deformable_detr", "architectures": ["DeformableDetrForObjectDetection"],
        "d_model": 256, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
        "decoder_attention_heads": 8, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024,
        "num_feature_levels": 4, "encoder_n_points": 4, "decoder_n_points": 4,
        "two_stage": True, "with_box_refine": True, "two_stage_num_proposals": 300,
        "num_queries": 300, "backbone": "resnet50", "dilation": False, "use_timm_backbone": True,
        "id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}))
    return folder


# ------------------------------------------------------------------ detecting the variant

@pytest.mark.parametrize("preset", sorted(PRESET_KEYS))
def test_the_variant_read_from_keys_builds_the_official_layout(preset):
    fields, notes = variant_from_keys(on_meta(PRESET_KEYS[preset]), "file.pth")
    cfg = Config(**fields, op_backend="pytorch")
    expected = get_config(preset)
    for name in ("num_feature_levels", "with_box_refine", "two_stage", "num_queries",
                 "hidden_dim", "enc_layers", "dec_layers", "dim_feedforward", "num_classes",
                 "enc_n_points", "dec_n_points", "nheads", "backbone"):
        assert getattr(cfg, name) == getattr(expected, name), name
    model, _, _ = build_model(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        official_keys(PRESET_KEYS[preset])
    assert "dilation=False" in notes and "nheads=8" in notes


def test_saved_args_decide_what_keys_cannot_tell(tmp_path):
    path = tmp_path / "r50_deformable_detr_dc5.pth"
    torch.save({"model": on_meta("base"), "args": official_args(dilation=True)}, path)
    found = read_model_file(path)
    assert (found.kind, found.found_in, found.cfg.dilation) == ("official", "its saved args", True)
    assert "resnet50-DC5" in found.describe() and "91 classes (COCO)" in found.describe()
    assert found.meta["class_names"][PERSON] == "person" and found.meta["category_ids"][18] == 18

    torch.save(on_meta("base"), path)  # a bare state dict: the keys, and what was assumed
    found = read_model_file(path)
    assert (found.kind, found.found_in, found.cfg.dilation) == ("official", "its keys", False)
    assert "assumed nheads=8, dilation=False" in found.describe()


def test_hf_weights_without_config_json_are_read_from_their_keys(tmp_path):
    torch.save(official_to_hf(on_meta("box_refine")), tmp_path / "pytorch_model.bin")
    for path in (tmp_path, tmp_path / "pytorch_model.bin"):
        found = read_model_file(path)
        assert (found.kind, found.found_in) == ("hf", "its keys")
        assert found.cfg.with_box_refine and not found.cfg.two_stage
        assert "no config.json beside it" in found.describe()


def test_official_evaluation_transforms_for_official_weights(official_file):
    cfg = read_model_file(official_file[0]).cfg
    transform = build_transforms(cfg, "val")
    from PIL import Image

    image, _ = transform(Image.new("RGB", (300, 100)), {"boxes": torch.zeros(0, 4),
                                                         "labels": torch.zeros(0).long()})
    # short side 800 would make the long one 2400 > 1333: the short side becomes
    # round(1333 * 100 / 300) = 444 and the long int(444 * 300 / 100), the official rule
    assert tuple(image.shape[1:]) == (444, 1332)
    image, _ = transform(Image.new("RGB", (640, 480)), None)
    assert tuple(image.shape[1:]) == (800, 1066)
    text = repr(transform)
    assert str(IMAGENET_MEAN) in text and str(IMAGENET_STD) in text


def test_bad_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder without model.safetensors"):
        read_model_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "detr"}))
    torch.save(official_to_hf(on_meta("base")), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model_type='detr'.*expected 'deformable_detr'"):
        read_model_file(tmp_path)
    torch.save({"model": {"conv.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth has no transformer\.level_embed"):
        read_model_file(tmp_path / "other.pth")


# ------------------------------------------------------------------- every command, end to end

def run_cli(capsys, *argv):
    assert cli.main(list(map(str, argv))) == 0
    return capsys.readouterr().out


def test_official_checkpoint_through_every_command(official_file, coco_shapes, tmp_path, capsys):
    path, state = official_file
    out = run_cli(capsys, "evaluate", "--checkpoint", path, "--data", coco_shapes, "--quiet",
                  "--device", "cpu", "--out", tmp_path / "official.json")
    assert out.splitlines()[0] == (
        f"checkpoint {path}: official Deformable DETR checkpoint, resnet50, 4 levels, box "
        f"refinement, two-stage, 300 queries, 91 classes (COCO) (variant from its saved args)")
    assert "Average Precision" in out

    out = run_cli(capsys, "predict", "--checkpoint", path, coco_shapes / "val", "--out",
                  tmp_path / "pred", "--threshold", "0", "--device", "cpu")
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    top = max(predictions, key=lambda p: p["score"])
    assert (top["category_id"], top["category_name"]) == (PERSON, "person")
    assert all(p["category_name"] == COCO_CATEGORIES.get(p["category_id"], "N/A")
               for p in predictions)

    image = next((coco_shapes / "val").iterdir())
    out = run_cli(capsys, "visualize", "--checkpoint", path, "--image", image, "--out",
                  tmp_path / "fig6.png", "--device", "cpu")
    assert "official Deformable DETR" in out and (tmp_path / "fig6.png").stat().st_size > 0

    slim = tmp_path / "exported.pth"
    run_cli(capsys, "export", "--checkpoint", path, "--out", slim)
    # The same weights, config and label space: every command gives the same results.
    model, cfg, _, meta = load_model(slim, device="cpu")
    assert meta["kind"] == "ours" and meta["class_names"][PERSON] == "person"
    assert cfg == read_model_file(path).cfg and cfg.two_stage and cfg.with_box_refine
    assert meta["category_ids"] == list(range(91))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_hf_folder_predicts_what_the_official_file_does(official_file, hf_folder, coco_shapes,
                                                        tmp_path, capsys):
    runs = {}
    for name, checkpoint in (("official", official_file[0]), ("hf", hf_folder)):
        out = run_cli(capsys, "predict", "--checkpoint", checkpoint, coco_shapes / "val",
                      "--out", tmp_path / name, "--threshold", "0.05", "--device", "cpu")
        runs[name] = (out, json.loads((tmp_path / name / "predictions.json").read_text()))
    assert "HuggingFace Deformable DETR weights" in runs["hf"][0]
    assert "(variant from config.json)" in runs["hf"][0]
    assert runs["hf"][1] == runs["official"][1] and runs["hf"][1]

    out = run_cli(capsys, "evaluate", "--checkpoint", hf_folder, "--data", coco_shapes,
                  "--quiet", "--device", "cpu")
    assert out.startswith(f"checkpoint {hf_folder}: HuggingFace") and "Average Precision" in out
    run_cli(capsys, "export", "--checkpoint", hf_folder, "--out", tmp_path / "from_hf.pth")
    exported = torch.load(tmp_path / "from_hf.pth", weights_only=True)
    state = official_file[1]  # the tied heads HF saved once are whole again
    assert sorted(exported["model"]) == sorted(state)
    assert all(torch.equal(exported["model"][k], v) for k, v in state.items())


def test_bare_official_state_dict_loads_as_the_official_model(tmp_path):
    state = synthetic_official(official_keys("single_scale"))
    torch.save(state, tmp_path / "single_scale.pth")
    model, cfg, _, meta = load_model(tmp_path / "single_scale.pth", device="cpu",
                                     op_backend="pytorch")
    assert cfg.num_feature_levels == 1 and meta["kind"] == "official"
    reference, _, _ = build_model(get_config("single_scale", op_backend="pytorch"))
    load_official_checkpoint(reference, state)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        got, expected = model(images, mask), reference.eval()(images, mask)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)


def test_a_cuda_checkpoint_evaluates_on_cpu(tmp_path, capsys):
    # The shipped model saved as if trained with op_backend="cuda".
    saved = torch.load(shipped_checkpoint("tiny_shapes"), weights_only=True)
    saved["config"]["op_backend"] = "cuda"
    torch.save(saved, tmp_path / "cuda.pth")
    model, cfg, _, _ = load_model(tmp_path / "cuda.pth", device="cpu")
    assert cfg.op_backend == "auto"
    make_shapes(tmp_path / "data", num_train=1, num_val=1, size=64, seed=5)
    out = run_cli(capsys, "evaluate", "--checkpoint", tmp_path / "cuda.pth", "--data",
                  tmp_path / "data", "--quiet", "--device", "cpu")
    assert '"AP": ' in out


# ------------------------------------------------------------------------------ fine-tuning

@pytest.fixture(scope="module")
def small_official_file(tmp_path_factory):
    """An official-format checkpoint of a small variant (the official main.py takes any
    torchvision ResNet and any widths): {'model', 'args'} as it saves them."""
    args = official_args(backbone="resnet18", hidden_dim=64, enc_layers=1, dec_layers=2,
                         dim_feedforward=128, num_queries=50, with_box_refine=True,
                         two_stage=True)
    fields = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
    torch.manual_seed(0)
    model, _, _ = build_model(Config(**fields, num_classes=91, op_backend="pytorch"))
    path = tmp_path_factory.mktemp("small_official") / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 11}, path)
    return path, model.state_dict()


def test_fine_tune_official_weights_on_non_contiguous_ids(small_official_file, tmp_path,
                                                          capsys):
    path, state = small_official_file
    root = tmp_path / "data"
    make_shapes(root, num_train=8, num_val=2, size=64, seed=6, max_objects=3)
    relabel(root, [3, 7, 11, 20], ["a", "b", "c", "d"])
    out = run_cli(capsys, "train", "--init-from", path, "--data", root, "--out",
                  tmp_path / "run", "--epochs", "5", "--quiet", "--device", "cpu", "--set",
                  "image_size=96", "augment='flip'", "batch_size=2", "lr=1e-3",
                  "op_backend='pytorch'", "dropout=0.0")
    assert f"init-from {path}: official Deformable DETR checkpoint, resnet18" in out
    # two-stage: all 3 class heads (the decoder's 2 and the encoder's proposal head),
    # under their own names and the decoder's
    assert "re-initialised 12: class_embed.0.bias" in out
    assert f"loaded {len(state) - 12} tensors" in out
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train_loss"] for line in log]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], losses
    model, cfg, _, meta = load_model(tmp_path / "run" / "best.pth", device="cpu")
    assert cfg.num_classes == 4 and meta["category_ids"] == [3, 7, 11, 20]
    assert model.class_embed[0].weight.shape == (4, 64)


def test_init_from_refuses_another_architecture():
    model, _, _ = build_model(get_config("tiny", op_backend="pytorch", hidden_dim=128,
                                         backbone="resnet50"))
    with pytest.raises(ValueError, match=r"only \d+ of the model's \d+ tensors fit"):
        init_from(model, "tiny_shapes")


def test_init_from_and_config_exclude_each_other(coco_shapes, tmp_path):
    with pytest.raises(SystemExit, match="--config and --init-from exclude each other"):
        cli.main(["train", "--init-from", "tiny_shapes", "--config", "tiny", "--data",
                  str(coco_shapes), "--out", str(tmp_path)])


def test_init_from_under_torchrun(tmp_path):
    root = tmp_path / "data"
    make_shapes(root, num_train=8, num_val=3, size=64, seed=7, max_objects=3)
    relabel(root, [3, 7, 11, 20], ["a", "b", "c", "d"], extra=[(33, "unused")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29631", "-m", "ddetr_tutorial", "train", "--init-from",
               "tiny_shapes", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs",
               "1", "--quiet", "--set", "image_size=64", "batch_size=2", "op_backend='cpu'"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("re-initialised 12: class_embed.0.bias") == 1  # rank 0 only
    model, cfg, _, meta = load_model(tmp_path / "run" / "best.pth", device="cpu")
    assert cfg.num_classes == 5 and meta["category_ids"] == [3, 7, 11, 20, 33]
    # One epoch of training moved the loaded backbone a little: it is still far closer
    # to the shipped weights than to a fresh initialisation.
    shipped, _, _, _ = load_model("tiny_shapes", device="cpu")
    fresh, _, _ = build_model(cfg)
    key = "backbone.0.body.conv1.weight"
    ours = model.state_dict()[key]
    assert (ours - shipped.state_dict()[key]).norm() < (ours - fresh.state_dict()[key]).norm()


def test_the_notebook_explorer_opens_any_checkpoint(small_official_file, coco_shapes):
    pytest.importorskip("ipywidgets")
    from ddetr_tutorial.visualize import SamplingExplorer

    image = next((coco_shapes / "val").iterdir())
    explorer = SamplingExplorer.from_checkpoint(small_official_file[0], image)
    assert "official Deformable DETR checkpoint, resnet18" in explorer.detected
    assert explorer.data["image_size"] == (800, 800)  # the official evaluation size
    assert explorer.class_names[PERSON] == "person"
    explorer.update(kind="encoder", pixel=(400.0, 400.0))
    assert explorer.png()[:4] == b"\x89PNG"


def test_notebook_09_opens_your_checkpoint_and_photos_from_the_environment(
        small_official_file, coco_shapes, tmp_path, monkeypatch):
    pytest.importorskip("ipywidgets")
    from ddetr_tutorial.notebook import MAX_PHOTOS, your_explorer

    monkeypatch.delenv("DDETR_CHECKPOINT", raising=False)
    monkeypatch.delenv("DDETR_IMAGES", raising=False)
    assert your_explorer() is None  # no weights: the notebook falls back to the shipped model

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.txt").write_text("not an image")
    monkeypatch.setenv("DDETR_CHECKPOINT", str(small_official_file[0]))
    with pytest.raises(ValueError, match="no images: set DDETR_IMAGES"):
        your_explorer()
    monkeypatch.setenv("DDETR_IMAGES", str(photos))
    with pytest.raises(ValueError, match=r"no image files .* in .*photos"):
        your_explorer()
    monkeypatch.setenv("DDETR_IMAGES", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        your_explorer()

    shots = sorted((coco_shapes / "val").iterdir())
    for i in range(MAX_PHOTOS + 1):  # one more than the explorer takes
        shot = shots[i % len(shots)]
        (photos / f"photo_{i}{shot.suffix}").write_bytes(shot.read_bytes())
    monkeypatch.setenv("DDETR_IMAGES", str(photos))
    explorer = your_explorer()
    assert "official Deformable DETR checkpoint" in explorer.detected
    assert len(explorer.images) == MAX_PHOTOS
    assert explorer.class_names[PERSON] == "person"  # COCO's names for the 91-row head
    assert explorer.data["image_size"][0] == 800  # the official evaluation transform
    assert explorer.png()[:4] == b"\x89PNG"


def test_hf_id2label_without_the_unused_ids_still_names_the_coco_rows(tmp_path):
    torch.save(official_to_hf(on_meta("base")), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "deformable_detr", "id2label": {str(i): n for i, n in
                                                      COCO_CATEGORIES.items()}}))
    found = read_model_file(tmp_path)
    assert found.cfg.num_classes == 91  # from the class head: the 80 ids are not contiguous
    assert found.meta["class_names"][18] == "dog" and found.meta["class_names"][12] == "N/A"


@pytest.mark.parametrize("preset, says", [
    ("tiny_anchor_detr", "model=anchor_detr (focal), resnet18, single-scale, "
                         "10 anchors x 3 patterns"),
    ("tiny_efficient_detr", "model=efficient_detr (focal), resnet18, 4 levels, box refinement, "
                            "two-stage, 30 queries"),
    ("tiny_conditional_detr", "model=conditional_detr (focal), resnet18, single-scale, "
                              "30 queries"),
])
def test_family_members_saved_files_say_what_they_are(preset, says, tmp_path):
    cfg = get_config(preset, pretrained_backbone=None)
    model = build_model(cfg)[0]
    path = tmp_path / f"{preset}.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0, "step": 0},
               path)
    found = read_model_file(path)
    assert found.cfg == cfg
    assert says in found.describe(), found.describe()
