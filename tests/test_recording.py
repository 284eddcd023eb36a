"""The sampling recorder: what it names and keeps, and that it leaves the model as it was."""

import pytest
import torch

from ddetr_tutorial.attention import MSDeformAttn
from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.recording import record_sampling


def tiny(**overrides):
    torch.manual_seed(0)
    model = build_model(get_config("tiny", op_backend="pytorch", **overrides))[0]
    return model.eval()


def inputs(N=1, size=64):
    return torch.randn(N, 3, size, size), torch.zeros(N, size, size, dtype=torch.bool)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_layers_are_named_by_module_path():
    model = tiny()
    with torch.no_grad(), record_sampling(model) as record:
        out = model(*inputs())
    assert [layer.name for layer in record.layers] == [
        "transformer.encoder.layers.0.self_attn", "transformer.encoder.layers.1.self_attn",
        "transformer.decoder.layers.0.cross_attn", "transformer.decoder.layers.1.cross_attn"]
    assert record.encoder == record.layers[:2] and record.decoder == record.layers[2:]
    assert record.spatial_shapes.tolist() == [[8, 8], [4, 4], [2, 2], [1, 1]]
    assert record.level_start_index.tolist() == [0, 64, 80, 84]
    assert torch.equal(record.valid_ratios, torch.ones(1, 4, 2))
    assert len(record.boxes) == len(record.logits) == 2  # aux_outputs, then the final layer
    assert record.boxes[-1] is not out["pred_boxes"]  # detached copies by default
    torch.testing.assert_close(record.boxes[-1], out["pred_boxes"])
    assert not record.layers[0].sampling_locations.requires_grad


def test_no_hooks_are_left_behind_and_nothing_is_recorded_outside():
    model = tiny()
    before = hook_count(model)
    with torch.no_grad():
        with record_sampling(model) as record:
            assert hook_count(model) > before
            model(*inputs())
        assert hook_count(model) == before
        kept = list(record.layers)
        model(*inputs())  # after the with: the record does not change
    assert record.layers == kept and len(kept) == 4
    # an exception inside the with removes the hooks too
    with pytest.raises(RuntimeError, match="boom"), record_sampling(model):
        raise RuntimeError("boom")
    assert hook_count(model) == before


def test_several_models_and_forwards():
    plain, refine = tiny(two_stage=False, with_box_refine=False), tiny(two_stage=False)
    images, mask = inputs()
    with torch.no_grad(), record_sampling(plain) as a, record_sampling(refine) as b:
        plain(images, mask)
        refine(images, mask)
        refine(*inputs(N=2))  # a new forward starts the record afresh
    assert len(a.layers) == len(b.layers) == 4
    assert a.decoder[1].reference_points.shape[-1] == 2  # points without refinement
    assert b.decoder[1].reference_points.shape[-1] == 4  # refined boxes after layer 0
    assert b.layers[0].sampling_locations.shape[0] == 2  # the last forward's batch


def test_a_bare_attention_and_keeping_the_graph():
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2, backend="pytorch")
    query = torch.randn(1, 3, 16, requires_grad=True)
    shapes, starts = torch.tensor([[2, 2]]), torch.tensor([0])
    with record_sampling(attn, detach=False) as record:
        attn(query, torch.rand(1, 3, 1, 2), torch.randn(1, 4, 16), shapes, starts)
    (layer,) = record.layers
    assert layer.name == "" and layer.part == "other" and record.boxes == []
    layer.attention_weights.sum().backward()  # the graph back to the query is kept
    assert query.grad is not None


def test_a_model_without_deformable_attention_is_refused():
    with pytest.raises(ValueError, match="DETR has no MSDeformAttn module: dense attention"):
        with record_sampling(tiny(model="detr", two_stage=False, with_box_refine=False)):
            pass
