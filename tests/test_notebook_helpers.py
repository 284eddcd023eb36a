"""The helpers the notebooks import from `ddetr_tutorial.notebook`."""

import numpy as np
import torch
from PIL import Image

from ddetr_tutorial.data.transforms import Normalize, ToTensor
from ddetr_tutorial.notebook import bilinear, to_rgb
from ddetr_tutorial.ops.reference import bilinear_sample


def test_bilinear_equals_the_reference_point_sampler_inside_and_outside_the_map():
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)  # (H, W, D)
    loc = torch.rand(300, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3  # some points outside
    expected = torch.stack([bilinear_sample(feature, x, y) for x, y in loc.tolist()])
    torch.testing.assert_close(bilinear(feature, loc), expected)


def test_bilinear_returns_the_pixel_at_its_centre_and_zero_far_outside():
    feature = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # (H=2, W=3, D=4)
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) / 3, (rows.flatten() + 0.5) / 2], -1)
    torch.testing.assert_close(bilinear(feature, centres), feature.view(6, 4))
    far = torch.tensor([[-0.5, 0.5], [1.5, 0.5], [0.5, 2.0]])
    assert bilinear(feature, far).abs().max() == 0
    # halfway between two horizontal neighbours: their mean
    between = torch.tensor([[1 / 3, 0.25]])
    torch.testing.assert_close(bilinear(feature, between)[0], (feature[0, 0] + feature[0, 1]) / 2)


def test_to_rgb_undoes_the_normalization_of_the_transforms():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    tensor, _ = Normalize()(*ToTensor()(Image.fromarray(pixels), None))
    rgb = to_rgb(tensor)
    assert rgb.shape == (6, 9, 3)
    np.testing.assert_allclose(rgb, pixels / 255.0, atol=1e-6)
