"""The transformer's pieces against hand computations: valid ratios, encoder reference
points, two-stage proposals, the refinement step; its level checks; and the tiny
detector under torch.compile(fullgraph=True)."""

import math

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._pytree import tree_leaves

from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.transformer import (
    DeformableDecoder,
    DeformableEncoder,
    DeformableTransformer,
    inverse_sigmoid,
    valid_ratios,
)


def padding_mask(N, H, W, valid):
    """(N, H, W) True on padding; image n holds the top-left valid[n] = (h, w) pixels."""
    mask = torch.ones(N, H, W, dtype=torch.bool)
    for n, (h, w) in enumerate(valid):
        mask[n, :h, :w] = False
    return mask


def test_valid_ratios_are_the_unpadded_fraction_as_w_h():
    mask = padding_mask(3, 4, 8, [(4, 8), (3, 6), (1, 1)])
    want = torch.tensor([[1.0, 1.0], [6 / 8, 3 / 4], [1 / 8, 1 / 4]])
    assert torch.equal(valid_ratios(mask), want)


def test_encoder_reference_points_are_pixel_centres_of_the_valid_image():
    shapes = [(2, 4), (1, 2)]
    ratios = torch.tensor([[[0.75, 0.5], [1.0, 1.0]]])  # (N=1, L=2, 2) as (w, h)
    points = DeformableEncoder.reference_points(shapes, ratios, "cpu")
    assert points.shape == (1, 2 * 4 + 1 * 2, 2, 2)
    token = 0
    for lvl, (H, W) in enumerate(shapes):
        rw, rh = ratios[0, lvl].tolist()
        for row in range(H):
            for col in range(W):
                # centre of the pixel, as a fraction of the valid part of its own level
                x, y = (col + 0.5) / (rw * W), (row + 0.5) / (rh * H)
                for seen in range(2):  # ... then on every level's padded map
                    sw, sh = ratios[0, seen].tolist()
                    assert points[0, token, seen].tolist() == pytest.approx([x * sw, y * sh])
                token += 1
    # A tensor of shapes (read back once) gives the same points.
    assert torch.equal(DeformableEncoder.reference_points(torch.tensor(shapes), ratios, "cpu"),
                       points)


def small_two_stage():
    torch.manual_seed(0)
    return DeformableTransformer(d_model=32, n_heads=4, num_encoder_layers=1,
                                 num_decoder_layers=1, d_ffn=32, n_levels=2, dec_n_points=2,
                                 enc_n_points=2, two_stage=True, two_stage_num_proposals=3,
                                 backend="pytorch")


def test_two_stage_proposals_by_hand():
    transformer = small_two_stage()
    shapes = [(4, 4), (2, 2)]
    valid = [[(4, 4), (2, 2)], [(3, 2), (2, 1)]]  # per image, per level: valid (h, w)
    masks = [padding_mask(2, H, W, [v[lvl] for v in valid]) for lvl, (H, W) in enumerate(shapes)]
    mask = torch.cat([m.flatten(1) for m in masks], 1)  # (N, S)
    memory = torch.randn(2, 20, 32)
    output, proposals = transformer.encoder_proposals(memory, mask, shapes)
    assert proposals.shape == (2, 20, 4)
    for n in range(2):
        token = 0
        for lvl, (H, W) in enumerate(shapes):
            vh, vw = valid[n][lvl]
            for row in range(H):
                for col in range(W):
                    box = [(col + 0.5) / vw, (row + 0.5) / vh, 0.05 * 2 ** lvl, 0.05 * 2 ** lvl]
                    inside = all(0.01 < v < 0.99 for v in box)
                    if mask[n, token] or not inside:  # padding, or too close to the border
                        assert torch.all(proposals[n, token] == math.inf), (n, token)
                    else:  # in logit space
                        want = [math.log(v / (1 - v)) for v in box]
                        assert proposals[n, token].tolist() == pytest.approx(want, rel=1e-5)
                    token += 1
    # The projected memory is zero before the projection wherever the proposal is invalid.
    invalid = torch.isinf(proposals).any(-1)
    blank = transformer.enc_output_norm(transformer.enc_output(torch.zeros(32)))
    torch.testing.assert_close(output[invalid], blank.expand(int(invalid.sum()), 32))
    assert invalid.any() and not invalid.all()


def test_refinement_step_is_sigmoid_of_delta_plus_logit_and_detached():
    reference = torch.tensor([[[0.2, 0.5, 0.3, 0.9]]], requires_grad=True)  # (N, Q, 4)
    delta = torch.tensor([[[0.3, -1.0, 0.0, 2.0]]], requires_grad=True)
    new = DeformableDecoder.refine(delta, reference)
    want = [1 / (1 + math.exp(-(d + math.log(r / (1 - r)))))
            for d, r in zip(delta[0, 0].tolist(), reference[0, 0].tolist())]
    assert new[0, 0].tolist() == pytest.approx(want, rel=1e-6)
    assert not new.requires_grad  # each layer learns its own correction
    # Point references: the centre is refined, the size comes from the delta alone.
    point = reference[..., :2]
    new = DeformableDecoder.refine(delta, point)
    assert new[0, 0, :2].tolist() == pytest.approx(want[:2], rel=1e-6)
    assert new[0, 0, 2:].tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2.0))], rel=1e-6)
    # 0 and 1 stay finite through the clamped logit.
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()


def test_decoder_references_follow_the_refinement_step():
    torch.manual_seed(0)
    model, _, _ = build_model(get_config("tiny", op_backend="pytorch", two_stage=False))
    decoder = model.transformer.decoder
    captured = {}
    decoder.register_forward_hook(lambda mod, args, out: captured.update(args=args, out=out))
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        model(images, mask)
    hs, references = captured["out"]
    first = captured["args"][1]  # (N, Q, 2): the learned reference points
    previous = first
    for lid in range(decoder.num_layers):
        step = DeformableDecoder.refine(decoder.bbox_embed[lid](hs[lid]), previous)
        torch.testing.assert_close(references[lid], step)
        previous = references[lid]


def test_host_shapes_need_no_device_read(monkeypatch):
    """Given host (H, W) rows, reference points and proposals never call .tolist()."""
    transformer = small_two_stage()
    shapes = [(4, 4), (2, 2)]
    mask = torch.zeros(1, 20, dtype=torch.bool)

    def no_tolist(self):
        raise AssertionError("tolist() called: a device sync per call on CUDA")

    monkeypatch.setattr(torch.Tensor, "tolist", no_tolist)
    DeformableEncoder.reference_points(shapes, torch.ones(1, 2, 2), "cpu")
    transformer.encoder_proposals(torch.randn(1, 20, 32), mask, shapes)


def test_levels_are_checked_once_with_the_numbers():
    transformer = small_two_stage()
    srcs = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)]
    masks = [torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)]
    with pytest.raises(ValueError, match="built for 2 levels but got 1 maps, 1 masks and 1"):
        transformer(srcs[:1], masks[:1], srcs[:1])
    with pytest.raises(ValueError, match=r"level 1: .* got src \(1, 32, 2, 2\), mask \(1, 3, 3\)"):
        transformer(srcs, [masks[0], torch.zeros(1, 3, 3, dtype=torch.bool)], srcs)
    assert transformer.check_levels(srcs, masks, srcs) == [(4, 4), (2, 2)]


def test_tiny_detector_compiles_fullgraph_and_matches_eager():
    """The whole tiny detector (two-stage + refinement) traces as one graph, forward and
    backward, with the registered C++ op inside both graphs, and computes what eager does."""
    torch.manual_seed(0)
    model, _, _ = build_model(get_config("tiny", op_backend="cpu"))
    images = torch.randn(2, 3, 64, 64)
    mask = padding_mask(2, 64, 64, [(64, 64), (48, 40)])

    def run(forward):
        model.zero_grad(set_to_none=True)
        out = forward(images, mask)
        sum(t.float().square().mean() for t in tree_leaves(out)).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = run(model)
    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    compiled, compiled_grads = run(torch.compile(model, fullgraph=True, backend=backend))
    for kind, op in (("forward", "ms_deform_attn"), ("backward", "ms_deform_attn_backward")):
        targets = [str(n.target) for n in graphs[kind].graph.nodes if n.op == "call_function"]
        assert targets.count(f"ddetr_tutorial.{op}.default") == 4  # 2 encoder + 2 decoder layers
    assert type(compiled) is type(eager) and list(compiled) == list(eager)
    torch.testing.assert_close(tree_leaves(compiled), tree_leaves(eager))
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    torch.testing.assert_close(compiled_grads, eager_grads)
