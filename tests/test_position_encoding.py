"""The 2-D sine position encoding against a loop oracle, and its properties."""

import math

import pytest
import torch

from ddetr_tutorial.position_encoding import PositionEmbeddingSine, build_position_encoding


def oracle(mask, num_pos_feats, temperature=10000.0, normalize=True, scale=2 * math.pi):
    """Straight from the definition, one pixel and one channel at a time, in float64:
    y = number of valid pixels at or above (r, c) in column c, x likewise in row r;
    with normalize, (y - 0.5) / (valid pixels in the column) * scale."""
    N, H, W = mask.shape
    F = num_pos_feats
    out = torch.zeros(N, 2 * F, H, W, dtype=torch.float64)
    valid = (~mask).tolist()
    for n in range(N):
        for r in range(H):
            for c in range(W):
                y = sum(valid[n][i][c] for i in range(r + 1))
                x = sum(valid[n][r][j] for j in range(c + 1))
                if normalize:
                    y = (y - 0.5) / (sum(valid[n][i][c] for i in range(H)) + 1e-6) * scale
                    x = (x - 0.5) / (sum(valid[n][r][j] for j in range(W)) + 1e-6) * scale
                for k in range(F):
                    wavelength = temperature ** (2 * (k // 2) / F)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[n, k, r, c] = trig(y / wavelength)
                    out[n, F + k, r, c] = trig(x / wavelength)
    return out


def random_mask(N, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, H, W, generator=g) < 0.4
    # Keep one valid pixel per row and column: a fully padded row divides 0 by eps,
    # angles of ~1e6 radians that float32 cannot match a float64 oracle on.
    mask[:, 0, :] = False
    mask[:, :, 0] = False
    return mask


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_loop_oracle_on_irregular_mask(normalize):
    mask = random_mask(2, 5, 7)
    pos = PositionEmbeddingSine(num_pos_feats=6, temperature=20.0, normalize=normalize)(mask)
    expected = oracle(mask, 6, temperature=20.0, normalize=normalize)
    torch.testing.assert_close(pos.double(), expected, rtol=0, atol=2e-5)


def test_default_matches_closed_form_with_the_half_pixel_offset():
    """Unpadded (H, W): channel 2i of the y half is sin(2*pi*(r + 0.5)/H / 10000^(2i/128))."""
    H, W = 6, 9
    pos = PositionEmbeddingSine()(torch.zeros(1, H, W, dtype=torch.bool))[0]  # (256, H, W)
    assert pos.shape == (256, H, W)
    r = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W)
    c = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)
    y = (r + 0.5) / H * 2 * math.pi
    x = (c + 0.5) / W * 2 * math.pi
    pos = pos.double()
    for i in (0, 1, 10, 63):
        wavelength = 10000 ** (2 * i / 128)
        expected = {2 * i: torch.sin(y / wavelength), 2 * i + 1: torch.cos(y / wavelength),
                    128 + 2 * i: torch.sin(x / wavelength), 129 + 2 * i: torch.cos(x / wavelength)}
        for channel, values in expected.items():
            torch.testing.assert_close(pos[channel], values, rtol=0, atol=1e-5)
    # Without the -0.5 (DETR's variant) the first y channel would differ by a half-pixel phase.
    assert not torch.allclose(pos[0].double(), torch.sin((r + 1) / H * 2 * math.pi), atol=1e-3)


def test_y_half_varies_only_down_rows_and_x_half_only_across_columns():
    pos = PositionEmbeddingSine(num_pos_feats=16)(torch.zeros(2, 5, 8, dtype=torch.bool))
    y_half, x_half = pos[:, :16], pos[:, 16:]
    torch.testing.assert_close(y_half, y_half[..., :1].expand_as(y_half))
    torch.testing.assert_close(x_half, x_half[:, :, :1].expand_as(x_half))
    assert y_half[:, 0].diff(dim=1).abs().min() > 0  # rows really differ
    assert x_half[:, 0].diff(dim=2).abs().min() > 0


def test_padding_leaves_the_valid_region_unchanged():
    """An h x w image padded bottom-right into H x W gets the codes of an unpadded h x w image."""
    h, w, H, W = 5, 7, 9, 12
    module = PositionEmbeddingSine()
    alone = module(torch.zeros(1, h, w, dtype=torch.bool))
    mask = torch.ones(2, H, W, dtype=torch.bool)
    mask[0, :h, :w] = False
    mask[1] = False  # a full-size neighbour in the same batch
    padded = module(mask)
    torch.testing.assert_close(padded[:1, :, :h, :w], alone, rtol=0, atol=0)
    torch.testing.assert_close(padded[1:], module(torch.zeros(1, H, W, dtype=torch.bool)))


def test_shape_range_dtype_and_no_parameters():
    module = PositionEmbeddingSine(num_pos_feats=64)
    pos = module(random_mask(3, 4, 6))
    assert pos.shape == (3, 128, 4, 6) and pos.dtype == torch.float32
    assert pos.abs().max() <= 1.0
    assert list(module.parameters()) == [] and list(module.state_dict()) == []
    # Channels 0 and 1 are sin and cos of the normalized row itself (wavelength 1):
    # atan2 recovers it, inside (0, 2*pi) and increasing down the rows.
    unpadded = module(torch.zeros(1, 4, 6, dtype=torch.bool))[0]
    rows = torch.atan2(unpadded[0], unpadded[1]).remainder(2 * math.pi)[:, 0]  # (H,)
    assert (rows > 0).all() and (rows < 2 * math.pi).all() and (rows.diff() > 0).all()


def test_build_position_encoding_uses_half_the_width_per_axis():
    module = build_position_encoding(hidden_dim=64)
    assert module.num_pos_feats == 32 and module.normalize
    assert module(torch.zeros(1, 2, 3, dtype=torch.bool)).shape == (1, 64, 2, 3)


def test_bad_input():
    module = PositionEmbeddingSine()
    with pytest.raises(TypeError, match="bool"):
        module(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, H, W\).*\(4, 4\)"):
        module(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="even.*127"):
        PositionEmbeddingSine(num_pos_feats=127)
    with pytest.raises(ValueError, match="multiple of 4.*30"):
        build_position_encoding(hidden_dim=30)
