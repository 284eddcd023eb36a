"""Bad input to ms_deform_attn gets a ValueError/TypeError that names the numbers."""

import gc
import re

import pytest
import torch

from ddetr_tutorial.ops import check_inputs, functions, level_tensors, ms_deform_attn
from msda_inputs import SHAPES, make_inputs


def inputs(**kw):
    return make_inputs(SHAPES["four_levels"], N=2, Lq=5, M=2, D=4, K=3, **kw)


def expect(error, pattern, args, backend="pytorch"):
    with pytest.raises(error, match=pattern):
        ms_deform_attn(*args, backend=backend)


def test_token_count_vs_spatial_shapes():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, re.escape("value has 336 tokens but spatial_shapes sum to 340 "
                                 "(levels (16, 16), (8, 8), (4, 4), (2, 2))"),
           (value[:, :336], ss, starts, loc, attn))


def test_level_start_index_mismatch():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, re.escape("level_start_index is [0, 256, 320, 330] but spatial_shapes "
                                 "(16, 16), (8, 8), (4, 4), (2, 2) start their levels at "
                                 "[0, 256, 320, 336]"),
           (value, ss, torch.tensor([0, 256, 320, 330]), loc, attn))
    expect(ValueError, re.escape("level_start_index must have shape (4,) for L=4 levels, got (3,)"),
           (value, ss, starts[:3], loc, attn))


def test_level_count_mismatch():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, "sampling_locations has L=3 levels but spatial_shapes has 4 rows",
           (value, ss, starts, loc[:, :, :, :3], attn[:, :, :, :3]))


def test_head_count_mismatch():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, "value has M=2 heads but sampling_locations has M=1",
           (value, ss, starts, loc[:, :, :1], attn[:, :, :1]))


def test_batch_mismatch():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, "value has batch N=2 but sampling_locations has N=1",
           (value, ss, starts, loc[:1], attn[:1]))


def test_point_count_mismatch():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, re.escape("attention_weights has shape (2, 5, 2, 4, 2) but "
                                 "sampling_locations (2, 5, 2, 4, 3, 2) needs (2, 5, 2, 4, 3)"),
           (value, ss, starts, loc, attn[..., :2]))


def test_wrong_ranks():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, re.escape("value must be (N, S, M, D), got shape (2, 340, 8)"),
           (value.flatten(2), ss, starts, loc, attn))
    expect(ValueError, re.escape("sampling_locations must be (N, Lq, M, L, K, 2), got shape "
                                 "(2, 5, 2, 4, 3, 1)"),
           (value, ss, starts, loc[..., :1], attn))
    expect(ValueError, re.escape("spatial_shapes must be (L, 2) rows (H, W), got shape (8,)"),
           (value, ss.flatten(), starts, loc, attn))


def test_zero_size_level():
    value, ss, starts, loc, attn = inputs()
    ss = torch.tensor([[16, 16], [8, 8], [4, 4], [0, 2]])
    expect(ValueError, re.escape("level 3 has size (0, 2); every level needs H, W >= 1"),
           (value[:, :336], ss, starts, loc, attn))


def test_zero_heads_or_points():
    value, ss, starts, loc, attn = inputs()
    expect(ValueError, "K must be at least 1, got 0", (value, ss, starts, loc[..., :0, :],
                                                     attn[..., :0]))


def test_index_dtype():
    value, ss, starts, loc, attn = inputs()
    expect(TypeError, "spatial_shapes must be int64 or int32, got torch.float32",
           (value, ss.float(), starts, loc, attn))
    expect(TypeError, "level_start_index must be int64 or int32, got torch.int16",
           (value, ss, starts.short(), loc, attn))


def test_value_dtype():
    value, ss, starts, loc, attn = inputs()
    expect(TypeError, "value must be float16, bfloat16, float32 or float64, got torch.int64",
           (value.long(), ss, starts, loc, attn))


def test_mixed_float_dtypes():
    value, ss, starts, loc, attn = inputs(dtype=torch.float32)
    expect(TypeError, "sampling_locations is torch.float64 but value is torch.float32; "
                      "expected torch.float32", (value, ss, starts, loc.double(), attn))
    expect(TypeError, "attention_weights is torch.float16 but value is torch.float32",
           (value, ss, starts, loc, attn.half()))


def test_half_value_with_float32_locations_is_accepted():
    value, ss, starts, loc, attn = inputs(dtype=torch.float32)
    out = ms_deform_attn(value.bfloat16(), ss, starts, loc, attn, backend="pytorch")
    assert out.dtype == torch.bfloat16


def test_not_a_tensor():
    value, ss, starts, loc, attn = inputs()
    expect(TypeError, "spatial_shapes must be a torch.Tensor, got list",
           (value, ss.tolist(), starts, loc, attn))


def test_unknown_backend():
    expect(ValueError, re.escape("backend must be one of ('auto', 'pytorch', 'cpu', 'cuda'), "
                                 "got 'gpu'"), inputs(), backend="gpu")


def test_cuda_backend_with_cpu_tensors():
    expect(ValueError, "backend='cuda' needs CUDA tensors, but value is on cpu", inputs(),
           backend="cuda")


def test_cpu_backend_rejects_half():
    value, ss, starts, loc, attn = inputs(dtype=torch.float32)
    expect(TypeError, "backend='cpu' supports torch.float32, torch.float64, got torch.bfloat16",
           (value.bfloat16(), ss, starts, loc, attn), backend="cpu")


def test_devices_must_agree():
    value, ss, starts, loc, attn = inputs()
    meta = loc.to("meta")
    expect(ValueError, "sampling_locations is on meta but value is on cpu",
           (value, ss, starts, meta, attn))


# ------------------------------------------------------------------ level_tensors: no device read

@pytest.fixture
def count_tolist(monkeypatch):
    """Counts Tensor.tolist calls (the device read of the index checks)."""
    calls = []
    original = torch.Tensor.tolist

    def counted(self):
        calls.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    return calls


def test_level_tensors_match_hand_built_ones():
    ss, starts = level_tensors(SHAPES["four_levels"])
    value, hand_ss, hand_starts, loc, attn = inputs()
    assert torch.equal(ss, hand_ss) and torch.equal(starts, hand_starts)
    assert ss.dtype == starts.dtype == torch.int64
    with pytest.raises(ValueError, match=re.escape("level 1 has size (0, 3)")):
        level_tensors([(2, 2), (0, 3)])


def test_level_tensors_are_validated_without_reading_them(monkeypatch):
    def no_reads(self):
        raise AssertionError("tolist called on a level_tensors pair")

    ss, starts = level_tensors(SHAPES["four_levels"])
    value, _, _, loc, attn = inputs()
    monkeypatch.setattr(torch.Tensor, "tolist", no_reads)
    for _ in range(3):  # one forward's layers share the pair
        check_inputs(value, ss, starts, loc, attn)
        ms_deform_attn(value, ss, starts, loc, attn, backend="cpu")
    # The host copy still catches a token count that does not match.
    expect(ValueError, "value has 336 tokens but spatial_shapes sum to 340",
           (value[:, :336], ss, starts, loc, attn), backend="cpu")


def test_foreign_index_tensors_are_read(count_tolist):
    value, ss, starts, loc, attn = inputs()
    check_inputs(value, ss, starts, loc, attn)
    assert len(count_tolist) == 2  # spatial_shapes and level_start_index
    host_ss, host_starts = level_tensors(SHAPES["four_levels"])
    count_tolist.clear()
    check_inputs(value, host_ss, starts, loc, attn)  # a pair made apart is not trusted
    check_inputs(value, ss, host_starts, loc, attn)
    assert len(count_tolist) == 4


def test_level_tensors_changed_in_place_are_read_again(count_tolist):
    value, _, _, loc, attn = inputs()
    ss, starts = level_tensors(SHAPES["four_levels"])
    ss[3] = torch.tensor([1, 2])  # in place: the host copy no longer holds
    expect(ValueError, re.escape("value has 340 tokens but spatial_shapes sum to 338 "
                                 "(levels (16, 16), (8, 8), (4, 4), (1, 2))"),
           (value, ss, starts, loc, attn))
    assert count_tolist
    ss, starts = level_tensors(SHAPES["four_levels"])
    starts.add_(1)
    expect(ValueError, re.escape("level_start_index is [1, 257, 321, 337]"),
           (value, ss, starts, loc, attn))


def test_level_tensors_are_forgotten_when_freed():
    ss, starts = level_tensors(SHAPES["four_levels"])
    key = id(ss)
    assert functions._known_levels(ss, starts) == tuple(SHAPES["four_levels"])
    del ss, starts
    gc.collect()
    assert key not in functions._host_levels
