"""Checkpoints: official files load strictly, the HuggingFace rename is exact, loading is safe.

No weights can be downloaded here, so the checkpoints are synthetic: random
tensors with the keys and shapes of the official models (tests/reference),
shared heads sharing values as in a real file.
"""

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from ddetr_tutorial import weights
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.weights import (
    hf_to_official,
    load_hf_checkpoint,
    load_official_checkpoint,
    official_to_hf,
)
from official import (
    PRESET_KEYS,
    deduplicated,
    official_keys,
    synthetic_official,
    transformers_layout,
)

KEY_FILES = PRESET_KEYS
CLEAN = ([], [], [])  # LoadResult of a strict load: nothing missing, unexpected or mis-shaped


def scramble(model):
    """Overwrite every weight, so that a load that copies nothing cannot pass."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(0.5)


def predict(model, preset):
    # Two-stage picks its 300 queries among the encoder's tokens: 128x128 gives 340.
    size = 128 if preset == "two_stage" else 64
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(images, torch.zeros(1, size, size, dtype=torch.bool))


@pytest.fixture(scope="module")
def detector():
    """Full R50 models and synthetic official state dicts, built once per variant."""
    cache = {}

    def get(preset):
        if preset not in cache:
            torch.manual_seed(0)
            model, _, _ = build_model(get_config(preset, op_backend="pytorch"))
            cache[preset] = model, synthetic_official(official_keys(KEY_FILES[preset]))
        return cache[preset]

    yield get
    cache.clear()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model, _, _ = build_model(get_config("tiny", with_box_refine=False, two_stage=False,
                                         op_backend="pytorch"))
    return model


def copy_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ official checkpoints

@pytest.mark.parametrize("preset", list(KEY_FILES))
def test_official_checkpoint_file_loads_and_runs(preset, detector, tmp_path):
    model, state = detector(preset)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4), "epoch": 3}, path)
    scramble(model)
    assert load_official_checkpoint(model, path) == CLEAN
    ours = model.state_dict()
    for key in ("transformer.level_embed", "backbone.0.body.layer3.5.bn2.running_var",
                "transformer.decoder.layers.5.self_attn.in_proj_weight",
                "transformer.encoder.layers.2.self_attn.sampling_offsets.bias",
                "input_proj.0.0.weight", "class_embed.5.bias", "bbox_embed.5.layers.2.weight"):
        assert torch.equal(ours[key], state[key]), key
    assert all(torch.equal(ours[k], v) for k, v in state.items())
    outputs = predict(model, preset)
    assert outputs["pred_logits"].shape == (1, 300, 91)
    assert torch.isfinite(outputs["pred_logits"]).all()
    boxes = outputs["pred_boxes"]
    assert boxes.shape == (1, 300, 4) and ((boxes >= 0) & (boxes <= 1)).all()


def test_profiler_extras_and_ddp_prefix_are_tolerated(tiny):
    state = copy_state(tiny)
    state["total_ops"] = torch.zeros(1, dtype=torch.float64)
    state["total_params"] = torch.zeros(1, dtype=torch.float64)
    state["backbone.0.body.conv1.total_params"] = torch.zeros(1, dtype=torch.float64)
    state["transformer.encoder.layers.0.linear1.total_ops"] = torch.zeros(1, dtype=torch.float64)
    scramble(tiny)
    assert load_official_checkpoint(tiny, {"model": state, "epoch": 1}) == CLEAN
    assert torch.equal(tiny.transformer.level_embed, state["transformer.level_embed"])
    scramble(tiny)
    ddp = {"module." + k: v for k, v in state.items()}
    assert load_official_checkpoint(tiny, ddp) == CLEAN
    assert torch.equal(tiny.query_embed.weight, state["query_embed.weight"])


def test_missing_key_is_named(tiny):
    state = copy_state(tiny)
    del state["transformer.level_embed"]
    with pytest.raises(ValueError, match=r"1 missing key: transformer\.level_embed"):
        load_official_checkpoint(tiny, state)


def test_unexpected_key_is_named(tiny):
    state = copy_state(tiny)
    state["transformer.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 unexpected key: transformer\.extra_head\.weight"):
        load_official_checkpoint(tiny, state)


def test_shape_mismatch_names_both_shapes(tiny):
    state = copy_state(tiny)
    model_shape = list(state["input_proj.0.0.weight"].shape)
    state["input_proj.0.0.weight"] = torch.zeros(64, 100, 1, 1)
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(tiny, state)
    assert (f"input_proj.0.0.weight checkpoint [64, 100, 1, 1] vs model {model_shape}"
            in str(err.value))


def test_not_strict_loads_what_fits_and_reports_the_rest(tiny):
    # The fine-tuning case: a checkpoint trained on 7 classes, a model for 4.
    state = copy_state(tiny)
    head = {"weight": torch.randn(7, 64), "bias": torch.randn(7)}  # shared by both layers
    for key in state:
        if key.startswith("class_embed."):
            state[key] = head[key.rsplit(".", 1)[1]]
    with pytest.raises(ValueError, match=r"num_classes differs: checkpoint 7, model 4"):
        load_official_checkpoint(tiny, state)
    del state["transformer.level_embed"]
    scramble(tiny)
    kept = tiny.class_embed[0].weight.detach().clone()
    result = load_official_checkpoint(tiny, state, strict=False)
    assert result.missing == ["transformer.level_embed"] and result.unexpected == []
    assert ("class_embed.1.weight", (7, 64), (4, 64)) in result.mismatched
    assert len(result.mismatched) == 4  # weight and bias of the one head, under 2 names each
    assert torch.equal(tiny.class_embed[0].weight, kept)
    assert torch.equal(tiny.query_embed.weight, state["query_embed.weight"])


def test_wrong_variant_says_which_flag(tmp_path):
    torch.manual_seed(0)
    refine, _, _ = build_model(get_config("tiny", with_box_refine=True, two_stage=False,
                                          op_backend="pytorch"))
    plain, _, _ = build_model(get_config("tiny", with_box_refine=False, two_stage=False,
                                         op_backend="pytorch"))
    path = tmp_path / "refine.pth"
    args = argparse.Namespace(with_box_refine=True, two_stage=False, num_feature_levels=4)
    torch.save({"model": refine.state_dict(), "args": args}, path)
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(plain, path)
    message = str(err.value)
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" in message
    assert "build the model with with_box_refine=True" in message
    assert "its saved args say num_feature_levels=4, with_box_refine=True" in message
    # The other way round.
    with pytest.raises(ValueError, match="build the model with with_box_refine=False"):
        load_official_checkpoint(refine, plain.state_dict())


def test_dc5_checkpoint_into_a_plain_model_is_caught(tiny):
    # Same keys and shapes; only the saved args know the backbone was dilated.
    checkpoint = {"model": copy_state(tiny), "args": argparse.Namespace(dilation=True)}
    with pytest.raises(ValueError, match=r"saved args say dilation=True .* build the model "
                                         r"with dilation=True"):
        load_official_checkpoint(tiny, checkpoint)
    with pytest.warns(UserWarning, match="dilation=True"):
        assert load_official_checkpoint(tiny, checkpoint, strict=False) == CLEAN
    checkpoint["args"].dilation = False
    assert load_official_checkpoint(tiny, checkpoint) == CLEAN


def test_shared_heads_must_agree(tiny):
    state = copy_state(tiny)
    state["class_embed.1.weight"] = state["class_embed.1.weight"] + 1
    with pytest.raises(ValueError, match=r"different values for class_embed\.0\.weight and "
                                         r"class_embed\.1\.weight"):
        load_official_checkpoint(tiny, state)


# ------------------------------------------------------------------- HuggingFace names

# Official -> transformers names, as transformers' convert_deformable_detr_to_pytorch.py
# (rename_key, read_in_q_k_v, the "model." prefix) and modeling_deformable_detr.py
# (DeformableDetrEncoderLayer / DecoderLayer / Model / ForObjectDetection) spell them.
KNOWN_HF_NAMES = {
    "backbone.0.body.conv1.weight": "model.backbone.conv_encoder.model.conv1.weight",
    "backbone.0.body.layer2.0.downsample.1.running_var":
        "model.backbone.conv_encoder.model.layer2.0.downsample.1.running_var",
    "transformer.level_embed": "model.level_embed",
    "input_proj.3.0.weight": "model.input_proj.3.0.weight",
    "transformer.encoder.layers.0.self_attn.sampling_offsets.weight":
        "model.encoder.layers.0.self_attn.sampling_offsets.weight",
    "transformer.encoder.layers.0.norm1.weight":
        "model.encoder.layers.0.self_attn_layer_norm.weight",
    "transformer.encoder.layers.0.linear1.weight": "model.encoder.layers.0.fc1.weight",
    "transformer.encoder.layers.0.norm2.bias": "model.encoder.layers.0.final_layer_norm.bias",
    "transformer.decoder.layers.1.cross_attn.value_proj.weight":
        "model.decoder.layers.1.encoder_attn.value_proj.weight",
    "transformer.decoder.layers.1.norm1.weight":
        "model.decoder.layers.1.encoder_attn_layer_norm.weight",
    "transformer.decoder.layers.1.norm2.weight":
        "model.decoder.layers.1.self_attn_layer_norm.weight",
    "transformer.decoder.layers.1.norm3.weight": "model.decoder.layers.1.final_layer_norm.weight",
    "transformer.decoder.layers.1.linear2.bias": "model.decoder.layers.1.fc2.bias",
    "transformer.decoder.layers.1.self_attn.out_proj.weight":
        "model.decoder.layers.1.self_attn.out_proj.weight",
    "class_embed.0.weight": "class_embed.0.weight",
    "bbox_embed.2.layers.1.bias": "bbox_embed.2.layers.1.bias",
    # two-stage
    "transformer.enc_output.weight": "model.enc_output.weight",
    "transformer.enc_output_norm.bias": "model.enc_output_norm.bias",
    "transformer.pos_trans.weight": "model.pos_trans.weight",
    "transformer.pos_trans_norm.weight": "model.pos_trans_norm.weight",
    "transformer.decoder.bbox_embed.6.layers.2.bias": "model.decoder.bbox_embed.6.layers.2.bias",
    "transformer.decoder.class_embed.6.bias": "model.decoder.class_embed.6.bias",
}


def test_known_hf_names():
    official = {k: torch.randn(2) for k in KNOWN_HF_NAMES}
    official["query_embed.weight"] = torch.randn(300, 512)
    official["transformer.reference_points.weight"] = torch.randn(2, 256)
    official["transformer.decoder.layers.0.self_attn.in_proj_weight"] = torch.randn(768, 256)
    official["transformer.decoder.layers.0.self_attn.in_proj_bias"] = torch.randn(768)
    hf = official_to_hf(official)
    for ours, theirs in KNOWN_HF_NAMES.items():
        assert torch.equal(hf[theirs], official[ours]), (ours, theirs)
    assert torch.equal(hf["model.query_position_embeddings.weight"], official["query_embed.weight"])
    assert torch.equal(hf["model.reference_points.weight"],
                       official["transformer.reference_points.weight"])
    # nn.MultiheadAttention packs rows as [q; k; v]; transformers splits them in that order.
    packed_w = official["transformer.decoder.layers.0.self_attn.in_proj_weight"]
    packed_b = official["transformer.decoder.layers.0.self_attn.in_proj_bias"]
    for i, name in enumerate("qkv"):
        rows = slice(256 * i, 256 * (i + 1))
        prefix = f"model.decoder.layers.0.self_attn.{name}_proj"
        assert torch.equal(hf[f"{prefix}.weight"], packed_w[rows])
        assert torch.equal(hf[f"{prefix}.bias"], packed_b[rows])
    assert not any("in_proj" in k for k in hf)


@pytest.mark.parametrize("preset", list(KEY_FILES))
def test_hf_rename_matches_transformers_and_round_trips(preset, detector):
    _, state = detector(preset)
    hf = official_to_hf(state)
    reference = transformers_layout(state)
    assert sorted(hf) == sorted(reference)
    assert all(torch.equal(hf[k], v) for k, v in reference.items())
    back = hf_to_official(hf)
    assert list(back) == list(state)  # same keys, same order
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_transformers_5_in_memory_names_are_read():
    # transformers 5 renames these in memory (its conversion_mapping.py, "deformable_detr").
    hf = {"model.backbone.model.layer1.0.conv1.weight": torch.randn(2),
          "model.encoder.layers.0.mlp.fc1.weight": torch.randn(2),
          "model.decoder.layers.3.mlp.fc2.bias": torch.randn(2),
          "model.decoder.layers.3.self_attn.o_proj.weight": torch.randn(2),
          "model.backbone.conv_encoder.model.bn1.num_batches_tracked": torch.tensor(5)}
    assert list(hf_to_official(hf)) == ["backbone.0.body.layer1.0.conv1.weight",
                                        "transformer.encoder.layers.0.linear1.weight",
                                        "transformer.decoder.layers.3.linear2.bias",
                                        "transformer.decoder.layers.3.self_attn.out_proj.weight"]


@pytest.mark.parametrize("preset", list(KEY_FILES))
def test_hf_checkpoint_gives_the_official_outputs(preset, detector, tmp_path):
    model, state = detector(preset)
    scramble(model)
    load_official_checkpoint(model, state)
    expected = predict(model, preset)
    path = tmp_path / "pytorch_model.bin"
    torch.save(transformers_layout(state), path)  # an HF .bin is a bare state dict
    scramble(model)
    assert load_hf_checkpoint(model, path) == CLEAN
    got = predict(model, preset)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)


@pytest.mark.parametrize("keep", [min, max], ids=["first-name", "last-name"])
@pytest.mark.parametrize("preset", ["paper", "two_stage"])
def test_hf_tied_heads_saved_once_still_load(preset, keep, detector):
    model, state = detector(preset)
    hf = deduplicated(transformers_layout(state), keep)
    assert len(hf) < len(state)  # some shared names really were dropped
    scramble(model)
    assert load_hf_checkpoint(model, hf) == CLEAN
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items())


def test_hf_safetensors_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model, _, _ = build_model(get_config("tiny", with_box_refine=True, two_stage=True,
                                         op_backend="pytorch"))
    state = copy_state(model)
    hf = deduplicated(transformers_layout(model.state_dict()), min)
    safetensors_torch.save_file(hf, str(tmp_path / "model.safetensors"))
    scramble(model)
    assert load_hf_checkpoint(model, tmp_path) == CLEAN  # a save_pretrained folder
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_safetensors_without_the_package_says_so(tiny, tmp_path, monkeypatch):
    # What `weights` holds when its import of safetensors failed.
    monkeypatch.setattr(weights, "_load_safetensors", None)
    with pytest.raises(ImportError, match=r"needs the `safetensors` package"):
        load_hf_checkpoint(tiny, tmp_path / "model.safetensors")


# ------------------------------------------------------------------- weights_only safety

def _leave_mark(path):
    """What an unsafe loader would run while unpickling `Payload`."""
    Path(path).write_text("unpickling ran code")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _leave_mark, (self.marker,)


class TrainingNotes:
    """An ordinary custom object someone saved next to the weights."""

    def __init__(self):
        self.text = "best epoch so far"


def test_pickled_code_is_refused_not_run(tiny, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "untrusted.pth"
    torch.save({"model": tiny.state_dict(), "args": argparse.Namespace(lr=2e-4),
                "extra": Payload(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"`\S*_leave_mark`.*safe_globals"):
        load_official_checkpoint(tiny, path)
    with pytest.raises(pickle.UnpicklingError, match=r"_leave_mark"):
        load_hf_checkpoint(tiny, path)
    assert not marker.exists()


def test_custom_objects_load_only_when_the_caller_allows_them(tiny, tmp_path):
    state = copy_state(tiny)
    path = tmp_path / "with_notes.pth"
    torch.save({"model": state, "notes": TrainingNotes(), "args": argparse.Namespace()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"TrainingNotes"):
        load_official_checkpoint(tiny, path)
    with torch.serialization.safe_globals([TrainingNotes]):
        assert load_official_checkpoint(tiny, path) == CLEAN
    # A caller's own allow-list stays as it was after our call.
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace, TrainingNotes])
    try:
        load_official_checkpoint(tiny, path)
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    assert set(torch.serialization.get_safe_globals()) == set(before)


def test_legacy_file_format_loads(tiny, tmp_path):
    # Files saved by torch < 1.6 (as the official ones may be) are not zip archives.
    state = copy_state(tiny)
    path = tmp_path / "legacy.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4), "epoch": 49}, path,
               _use_new_zipfile_serialization=False)
    scramble(tiny)
    assert load_official_checkpoint(tiny, path) == CLEAN
    assert torch.equal(tiny.transformer.level_embed, state["transformer.level_embed"])
