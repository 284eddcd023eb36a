"""ResNet backbone: official key layout, torchvision parameter counts, freezing,
strides and masks, pretrained loading, and the Joiner with position encodings."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddetr_tutorial.backbone import (
    Backbone,
    FrozenBatchNorm2d,
    Joiner,
    build_backbone,
    resize_mask,
    resnet,
)
from ddetr_tutorial.position_encoding import PositionEmbeddingSine
from official import official_keys


def official_backbone_shapes():
    """{key: shape} for the backbone.0.body.* lines of the official base model."""
    return {k: s for k, s in official_keys("base").items() if k.startswith("backbone.0.body.")}


def images_and_mask(N=2, H=97, W=130, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, H, W, generator=g), torch.zeros(N, H, W, dtype=torch.bool)


# ---------------------------------------------------------------- key layout

@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return Backbone("resnet50")


def test_resnet50_keys_and_shapes_equal_the_official_checkpoint(r50):
    expected = official_backbone_shapes()
    assert len(expected) == 265  # paper_data.md §2.1: 265 backbone keys
    ours = {"backbone.0." + k: tuple(v.shape) for k, v in r50.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert ours == expected
    assert not any("num_batches_tracked" in k or ".fc." in k for k in ours)


def test_synthetic_official_state_dict_loads_strictly(r50):
    g = torch.Generator().manual_seed(1)
    prefix = "backbone.0."
    synthetic = {k[len(prefix):]: torch.randn(shape, generator=g)
                 for k, shape in official_backbone_shapes().items()}
    r50.load_state_dict(synthetic, strict=True)
    for key, value in r50.state_dict().items():
        assert torch.equal(value, synthetic[key]), key


# ---------------------------------------------------------------- sizes

# torchvision's totals minus the ImageNet fc layer; checked by hand from the
# architecture (conv weights plus BN weight and bias): R18 11,689,512 - 513,000;
# R34 21,797,672 - 513,000; R50 25,557,032 - 2,049,000; R101 44,549,160 - 2,049,000.
TORCHVISION_WITHOUT_FC = {"resnet18": 11_176_512, "resnet34": 21_284_672,
                          "resnet50": 23_508_032, "resnet101": 42_500_160}


@pytest.mark.parametrize("name", sorted(TORCHVISION_WITHOUT_FC))
def test_parameter_counts_equal_torchvision_without_fc(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        body = resnet(name)
    # Frozen BN keeps weight/bias as buffers, so count what torchvision counts as
    # parameters: everything in the state dict except the running statistics.
    count = sum(v.numel() for k, v in body.state_dict().items() if "running_" not in k)
    assert count == TORCHVISION_WITHOUT_FC[name]
    conv_weights = sum(m.weight.numel() for m in body.modules() if isinstance(m, nn.Conv2d))
    assert sum(p.numel() for p in body.parameters()) == conv_weights


def test_frozen_stem_and_layer1_by_default(r50):
    for name, param in r50.named_parameters():
        trainable = name.startswith(("body.layer2", "body.layer3", "body.layer4"))
        assert param.requires_grad == trainable, name
    frozen = sum(p.numel() for p in r50.parameters() if not p.requires_grad)
    assert frozen == 222_400  # conv1 + layer1 of the official model (paper_data.md §1.2)


def test_train_backbone_false_freezes_everything():
    backbone = Backbone("resnet18", train_backbone=False)
    assert not any(p.requires_grad for p in backbone.parameters())


# ---------------------------------------------------------------- frozen BN

def test_frozen_batchnorm_equals_batchnorm_in_eval_mode():
    g = torch.Generator().manual_seed(2)
    bn = nn.BatchNorm2d(5, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(5, generator=g))
        bn.bias.copy_(torch.randn(5, generator=g))
        bn.running_mean.copy_(torch.randn(5, generator=g))
        bn.running_var.copy_(torch.rand(5, generator=g) + 0.1)
    bn.eval()
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # drops num_batches_tracked on the way
    x = torch.randn(3, 5, 4, 6, generator=g)
    torch.testing.assert_close(frozen(x), bn(x))
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    assert list(frozen.parameters()) == []


def test_no_num_batches_tracked_anywhere():
    with torch.device("meta"):
        for name in ("resnet18", "resnet50"):
            body = resnet(name, dilation=True)
            assert not any("num_batches_tracked" in k for k in body.state_dict())
            assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())


# ---------------------------------------------------------------- strides and masks

@pytest.mark.parametrize("return_interm_layers", [True, False])
def test_output_strides_and_shapes_for_an_odd_image(return_interm_layers):
    backbone = Backbone("resnet18", return_interm_layers=return_interm_layers)
    images, mask = images_and_mask(H=97, W=130)
    with torch.no_grad():
        features, masks = backbone(images, mask)
    strides = [8, 16, 32] if return_interm_layers else [32]
    channels = [128, 256, 512] if return_interm_layers else [512]
    assert backbone.strides == strides and backbone.num_channels == channels
    assert len(features) == len(masks) == len(strides)
    for f, m, s, c in zip(features, masks, strides, channels):
        # Every stride-2 layer maps n to ceil(n / 2), so a level is ceil(size / stride).
        assert f.shape == (2, c, math.ceil(97 / s), math.ceil(130 / s))
        assert m.shape == (2, *f.shape[-2:]) and m.dtype == torch.bool


def test_resnet50_channels(r50):
    assert r50.strides == [8, 16, 32] and r50.num_channels == [512, 1024, 2048]
    assert Backbone("resnet50", return_interm_layers=False).num_channels == [2048]


def three_by_three_convs(layer):
    """(stride, dilation) of the 3x3 convs of each block of a ResNet stage."""
    return [[(m.stride[0], m.dilation[0]) for m in block.modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)] for block in layer]


def test_dc5_trades_the_layer4_stride_for_dilation():
    with torch.device("meta"):  # structure only
        plain, dc5 = resnet("resnet50"), resnet("resnet50", dilation=True)
        r18_dc5 = resnet("resnet18", dilation=True)
    assert three_by_three_convs(plain.layer4) == [[(2, 1)], [(1, 1)], [(1, 1)]]
    # As torchvision: the first block keeps the old dilation, the later ones dilate by 2.
    assert three_by_three_convs(dc5.layer4) == [[(1, 1)], [(1, 2)], [(1, 2)]]
    assert dc5.layer4[0].downsample[0].stride == (1, 1)
    assert three_by_three_convs(r18_dc5.layer4) == [
        [(1, 1), (1, 1)], [(1, 2), (1, 2)]]
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in dc5.state_dict().items()}


@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("resnet50", 2048)])
def test_dc5_gives_c5_at_stride_16(name, channels):
    backbone = Backbone(name, dilation=True)
    assert backbone.strides == [8, 16, 16] and backbone.num_channels[-1] == channels
    images, mask = images_and_mask(N=1, H=50, W=75)
    with torch.no_grad():
        features, masks = backbone(images, mask)
    assert features[1].shape[-2:] == features[2].shape[-2:] == masks[2].shape[-2:] == (4, 5)
    assert features[2].shape[1] == channels


def randomize(module, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                    else torch.randn(t.shape, generator=g) * 0.3)
    return module


def bn(x, norm):
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                        training=False, eps=1e-5)


def test_bottleneck_strides_its_3x3_conv_v1_5():
    """Oracle: the ResNet v1.5 bottleneck written with functional ops."""
    block = randomize(resnet("resnet50").layer2[0])  # 256 -> 512 channels, stride 2
    x = torch.randn(1, 256, 9, 11)
    out = F.relu(bn(F.conv2d(x, block.conv1.weight), block.bn1))
    out = F.relu(bn(F.conv2d(out, block.conv2.weight, stride=2, padding=1), block.bn2))
    out = bn(F.conv2d(out, block.conv3.weight), block.bn3)
    shortcut = bn(F.conv2d(x, block.downsample[0].weight, stride=2), block.downsample[1])
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(out + shortcut))


def test_basic_block_matches_functional_oracle():
    block = randomize(resnet("resnet18").layer3[0])  # 128 -> 256 channels, stride 2
    x = torch.randn(1, 128, 9, 11)
    out = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1))
    out = bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
    shortcut = bn(F.conv2d(x, block.downsample[0].weight, stride=2), block.downsample[1])
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(out + shortcut))


def test_mask_of_a_padded_image_marks_the_padded_cells():
    """An image of 64 x 96 valid pixels in a 128 x 160 batch: at stride s exactly the
    cells from row 64/s and column 96/s on are padding."""
    backbone = Backbone("resnet18")
    images, mask = images_and_mask(N=2, H=128, W=160)
    mask[0, 64:, :] = True
    mask[0, :, 96:] = True
    images[0][mask[0].expand(3, -1, -1)] = 0.0
    with torch.no_grad():
        _, masks = backbone(images, mask)
    for m, s in zip(masks, backbone.strides):
        expected = torch.zeros(128 // s, 160 // s, dtype=torch.bool)
        expected[64 // s:, :] = True
        expected[:, 96 // s:] = True
        assert torch.equal(m[0], expected), s
        assert not m[1].any()


def test_mask_resize_is_nearest_neighbour_at_odd_sizes():
    """Cell (i, j) of an h x w map takes the pixel (floor(i*H/h), floor(j*W/w))."""
    H, W = 97, 130
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, H, W, generator=g) < 0.5
    for h, w in [(13, 17), (7, 9), (4, 5)]:
        rows = [math.floor(i * H / h) for i in range(h)]
        cols = [math.floor(j * W / w) for j in range(w)]
        expected = mask[:, rows][:, :, cols]
        assert torch.equal(resize_mask(mask, (h, w)), expected)


# ---------------------------------------------------------------- pretrained weights

def torchvision_format_state_dict(name, seed=4):
    """What torchvision's resnetXX().state_dict() holds: our keys plus
    num_batches_tracked per BN and the ImageNet classifier fc.*."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in resnet(name).state_dict().items()}
    for key in [k for k in state if k.endswith(".running_var")]:
        state[key] = state[key].abs() + 0.1
        state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    width = resnet(name).num_channels[-1]
    state["fc.weight"] = torch.randn(1000, width, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_pretrained_torchvision_file_loads(tmp_path):
    state = torchvision_format_state_dict("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    backbone = Backbone("resnet18", pretrained=path)
    loaded = backbone.body.state_dict()
    assert set(state) - set(loaded) == {"fc.weight", "fc.bias"} | {
        k for k in state if k.endswith("num_batches_tracked")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    # Loading does not undo the freezing.
    assert not backbone.body.conv1.weight.requires_grad
    assert backbone.body.layer2[0].conv1.weight.requires_grad


def test_pretrained_wrong_architecture_lists_the_keys(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_format_state_dict("resnet18"), path)
    with pytest.raises(ValueError, match=r"missing keys \[.*layer1\.0\.conv3\.weight") as err:
        Backbone("resnet50", pretrained=path)
    assert "unexpected keys" in str(err.value) and "shape mismatches" in str(err.value)
    assert "layer1.0.bn3" in str(err.value) and "layer1.0.conv1.weight: file" in str(err.value)


def test_pretrained_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Backbone("resnet18", pretrained=path)


# ---------------------------------------------------------------- joiner and errors

def test_joiner_returns_features_masks_and_positions():
    joiner = build_backbone(name="resnet18", hidden_dim=256)
    assert isinstance(joiner[0], Backbone) and isinstance(joiner[1], PositionEmbeddingSine)
    assert joiner.strides == [8, 16, 32] and joiner.num_channels == [128, 256, 512]
    assert all(k.startswith("0.body.") for k in joiner.state_dict())
    images, mask = images_and_mask(H=97, W=130)
    mask[1, 60:, :] = True
    with torch.no_grad():
        features, masks, positions = joiner(images, mask)
    assert len(features) == len(masks) == len(positions) == 3
    for f, m, p in zip(features, masks, positions):
        N, _, h, w = f.shape
        assert m.shape == (N, h, w) and p.shape == (N, 256, h, w) and p.dtype == f.dtype
        # Each level's encoding comes from that level's own mask.
        torch.testing.assert_close(p, joiner[1](m))


def test_joiner_casts_positions_to_the_feature_dtype():
    joiner = Joiner(Backbone("resnet18", return_interm_layers=False),
                    PositionEmbeddingSine(num_pos_feats=8)).double()
    images, mask = images_and_mask(N=1, H=40, W=40)
    with torch.no_grad():
        features, masks, positions = joiner(images.double(), mask)
    assert len(positions) == 1 and positions[0].dtype == torch.float64
    assert positions[0].shape == (1, 16, 2, 2)


def test_bad_input():
    backbone = Backbone("resnet18")
    images, mask = images_and_mask(N=2, H=32, W=32)
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'.*resnet18"):
        Backbone("resnet19")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(3, 32, 32\)"):
        backbone(images[0], mask)
    with pytest.raises(TypeError, match="bool.*float32"):
        backbone(images, mask.float())
    with pytest.raises(ValueError, match=r"\(2, 32, 32\).*\(2, 32, 31\)"):
        backbone(images, mask[..., :31])


def test_width_scales_channels_and_weights():
    """width=32 halves every channel count: a quarter of the conv weights."""
    full, narrow = resnet("resnet18"), resnet("resnet18", width=32)
    assert narrow.num_channels == [32, 64, 128, 256]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(narrow) * 4 == pytest.approx(count(full), rel=0.01)
    features = narrow(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [32, 64, 128, 256]
    with pytest.raises(ValueError, match="width must be an int >= 8, got 4"):
        resnet("resnet18", width=4)


def test_batch_norm_and_stem_options():
    backbone = Backbone("resnet18", norm="batch", train_stem=True)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.parameters())
    assert "body.bn1.num_batches_tracked" in backbone.state_dict()
    with pytest.raises(ValueError, match="norm must be 'frozen' or 'batch', got 'group'"):
        Backbone("resnet18", norm="group")
