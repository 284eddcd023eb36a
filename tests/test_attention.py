"""The MSDeformAttn module: official initialization, reference points, padding."""

import math

import pytest
import torch

from ddetr_tutorial.attention import MSDeformAttn
from ddetr_tutorial.recording import record_sampling
from msda_inputs import COMPILED, device_of, level_start_index

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]
S = sum(h * w for h, w in SHAPES)

# Head m looks along angle 2*pi*m/8, scaled so max(|x|, |y|) = 1.
DIRECTIONS_8 = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]


def make_module(**kw):
    torch.manual_seed(0)
    return MSDeformAttn(d_model=32, n_levels=4, n_heads=8, n_points=3, **kw).double()


def sampled(attn, *args, **kwargs):
    """attn's output, and the sampling locations and attention weights it recorded."""
    with record_sampling(attn) as record:
        out = attn(*args, **kwargs)
    (layer,) = record.layers
    return out, layer.sampling_locations, layer.attention_weights


def make_inputs(N=2, Lq=7, C=32, points=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(N, Lq, C, generator=g, dtype=torch.float64)
    feats = torch.randn(N, S, C, generator=g, dtype=torch.float64)
    ref = torch.rand(N, Lq, 4, points, generator=g, dtype=torch.float64)
    if points == 4:
        ref[..., 2:] = 0.1 + 0.3 * ref[..., 2:]
    return query, ref, feats, torch.tensor(SHAPES), level_start_index(SHAPES)


def test_initial_values():
    attn = make_module()
    expected = torch.tensor(DIRECTIONS_8, dtype=torch.float64)[:, None, None, :] \
        * torch.arange(1, 4, dtype=torch.float64)[None, None, :, None]  # (M, 1, K, 2)
    expected = expected.expand(8, 4, 3, 2).reshape(-1)
    # The official init computes in float32, hence atol 1e-5 after .double().
    torch.testing.assert_close(attn.sampling_offsets.bias, expected, rtol=0, atol=1e-5)
    for tensor in (attn.sampling_offsets.weight, attn.attention_weights.weight,
                   attn.attention_weights.bias, attn.value_proj.bias, attn.output_proj.bias):
        assert torch.count_nonzero(tensor) == 0
    bound = math.sqrt(6 / (32 + 32))  # xavier_uniform for a 32 x 32 projection
    for proj in (attn.value_proj, attn.output_proj):
        assert proj.weight.abs().max() <= bound
        assert proj.weight.std() > bound / 3  # really initialised, not zero


def test_initial_sampling_pattern():
    """At init each point k of head m sits k + 1 pixels from the reference, in
    head m's direction, with uniform attention over the L*K points."""
    attn = make_module()
    query, ref, feats, shapes, starts = make_inputs()
    _, loc, weights = sampled(attn, query, ref, feats, shapes, starts)
    assert loc.shape == (2, 7, 8, 4, 3, 2) and weights.shape == (2, 7, 8, 4, 3)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 12))
    for lvl, (h, w) in enumerate(SHAPES):
        pixels = (loc[:, :, :, lvl] - ref[:, :, None, lvl, None, :]) \
            * torch.tensor([w, h], dtype=torch.float64)
        for m, (dx, dy) in enumerate(DIRECTIONS_8):
            for k in range(3):
                want = torch.tensor([dx, dy], dtype=torch.float64) * (k + 1)
                torch.testing.assert_close(pixels[:, :, m, k], want.expand(2, 7, 2),
                                           rtol=0, atol=1e-5)


def test_box_reference_points():
    """4-d references: offsets are scaled by half the box size over K."""
    attn = make_module()
    query, ref, feats, shapes, starts = make_inputs(points=4)
    _, loc, _ = sampled(attn, query, ref, feats, shapes, starts)
    offsets = attn.sampling_offsets(query).view(2, 7, 8, 4, 3, 2)
    want = ref[:, :, None, :, None, :2] + offsets / 3 * ref[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(loc, want)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, got "
                                         "d_model=30 and n_heads=8"):
        MSDeformAttn(d_model=30, n_heads=8)


def test_bad_reference_points():
    attn = make_module()
    query, ref, feats, shapes, starts = make_inputs()
    with pytest.raises(ValueError, match=r"reference_points must be \(N, Lq, L, 2\) or "
                                         r"\(N, Lq, L, 4\) = \(2, 7, 4, 2\|4\), "
                                         r"got \(2, 7, 4, 3\)"):
        attn(query, torch.cat([ref, ref[..., :1]], -1), feats, shapes, starts)


@pytest.mark.parametrize("backend", ["pytorch"] + COMPILED)
def test_padding_values_do_not_matter(backend):
    """Junk in padded positions must not change the output."""
    device = device_of(backend) if backend != "pytorch" else "cpu"
    attn = make_module(backend=backend).to(device)
    with torch.no_grad():  # a trained-looking module, not the symmetric init
        attn.sampling_offsets.weight.normal_(0, 0.1)
        attn.attention_weights.weight.normal_(0, 0.1)
    query, ref, feats, shapes, starts = (t.to(device) for t in make_inputs())
    mask = torch.zeros(2, S, dtype=torch.bool, device=device)
    mask[1, 30:48] = True  # the right half of image 1 on level 0, say
    mask[1, 50:56] = True
    out = attn(query, ref, feats, shapes, starts, padding_mask=mask)
    junk = feats.clone()
    junk[mask] = 1e6 * torch.randn_like(junk[mask])
    out_junk = attn(query, ref, junk, shapes, starts, padding_mask=mask)
    torch.testing.assert_close(out_junk, out, rtol=0, atol=0)
    unmasked = attn(query, ref, junk, shapes, starts)
    assert not torch.allclose(unmasked[1], out[1])  # the mask is what protects it


@pytest.mark.parametrize("backend", COMPILED)
def test_module_backends_agree(backend):
    device = device_of(backend)
    reference = make_module(backend="pytorch").to(device)
    compiled = make_module(backend=backend).to(device)
    inputs = [t.to(device) for t in make_inputs()]
    out_ref = reference(*inputs)
    out = compiled(*inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    out_ref.sum().backward()
    for (name, p), p_ref in zip(compiled.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_per_level_attention_reads_only_the_queries_own_level():
    # Table 2's ablation without "MS attention": a query on level l samples level l only.
    attn = make_module(backend="pytorch")
    with torch.no_grad():  # non-uniform attention, so a leak across levels would show
        torch.nn.init.normal_(attn.attention_weights.weight, std=0.5)
    query, ref, feats, shapes, starts = make_inputs(Lq=8)
    query_level = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out, _, weights = sampled(attn, query, ref, feats, shapes, starts, query_level=query_level)
    own = torch.nn.functional.one_hot(query_level, 4).bool()[None, :, None, :, None]
    assert torch.all(weights.masked_select(~own.expand_as(weights)) == 0)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 8, 8, dtype=torch.float64))
    # changing every other level's features leaves a level-0 query's output unchanged
    changed = feats.clone()
    changed[:, SHAPES[0][0] * SHAPES[0][1]:] += 10.0
    again = attn(query, ref, changed, shapes, starts, query_level=query_level)
    torch.testing.assert_close(again[:, [0, 4]], out[:, [0, 4]])
    assert not torch.allclose(again[:, [1, 5]], out[:, [1, 5]])
    # and without query_level the same module mixes the levels
    mixed = attn(query, ref, changed, shapes, starts)
    assert not torch.allclose(mixed[:, [0, 4]], attn(query, ref, feats, shapes, starts)[:, [0, 4]])


@pytest.mark.parametrize("query_level, error, match", [
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(Lq,\) = \(7,\)"),
    (torch.tensor([0, 1, 2, 3, 4, 0, 1]), ValueError, r"levels in \[0, 4\)"),
    (torch.zeros(7), TypeError, "int64"),
])
def test_bad_query_level(query_level, error, match):
    attn = make_module(backend="pytorch")
    query, ref, feats, shapes, starts = make_inputs()
    with pytest.raises(error, match=match):
        attn(query, ref, feats, shapes, starts, query_level=query_level)
