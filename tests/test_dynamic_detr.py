"""Dynamic DETR: the dynamic encoder against a computation by hand in float64 (deformable
3x3 sampling over three neighbouring scales, SE scale weights, GroupNorm, dynamic ReLU),
dynamic ReLU itself, then the model's contracts (RoIs of the current boxes, boxes
detached between layers, gradients everywhere on a padded batch, it memorises two
images) and the config's rules."""

import pytest
import torch
import torch.nn.functional as F

from ddetr_tutorial.config import build_model, get_config
from ddetr_tutorial.dynamic_detr import (
    DynamicDETR,
    DynamicEncoderLayer,
    DyReLU,
    kernel_grid,
    masked_mean,
)
from ddetr_tutorial.losses import total_loss
from family_batch import assert_every_parameter_gets_a_gradient, padded_mixed_size_batch
from test_overfit import assert_memorises_two_images


def tiny(**overrides):
    return get_config("tiny_dynamic_detr", pretrained_backbone=None, **overrides)


def test_dyrelu_is_the_max_of_two_dynamic_lines():
    torch.manual_seed(0)
    act = DyReLU(8).double()
    x = torch.randn(2, 8, 3, 4).double()
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = True
    pooled = torch.stack([x[0].mean((1, 2)), x[1, :, :, :3].mean((1, 2))])  # valid pixels only
    theta = 2 * torch.sigmoid(act.fc2(F.relu(act.fc1(pooled)))) - 1  # (N, 4C)
    theta = theta.view(2, 8, 4)
    a1, a2 = 1 + theta[..., 0], theta[..., 1]
    b1, b2 = 0.5 * theta[..., 2], 0.5 * theta[..., 3]
    expected = torch.maximum(a1[..., None, None] * x + b1[..., None, None],
                             a2[..., None, None] * x + b2[..., None, None])
    torch.testing.assert_close(act(x, mask), expected)
    torch.nn.init.zeros_(act.fc2.weight)
    torch.nn.init.zeros_(act.fc2.bias)
    torch.testing.assert_close(act(x, mask), F.relu(x))  # hyper-function 0: a plain ReLU


def test_kernel_grid_is_the_3x3_taps():
    assert kernel_grid(9).tolist() == [[x, y] for y in (-1, 0, 1) for x in (-1, 0, 1)]
    with pytest.raises(ValueError, match="n_points=8: expected a square"):
        kernel_grid(8)


def _by_hand(layer, srcs, masks, lvl):
    """The encoder layer's output on level `lvl`, sample by sample with grid_sample."""
    M, K = layer.n_heads, layer.n_points
    src = srcs[lvl]
    N, C, H, W = src.shape
    D = C // M
    levels = [j for j in (lvl - 1, lvl, lvl + 1) if 0 <= j < len(srcs)]
    slots = [j - lvl + 1 for j in levels]
    pooled = torch.zeros(N, 3, C, dtype=src.dtype)
    for j, s in zip(levels, slots):
        pooled[:, s] = masked_mean(srcs[j], masks[j])
    se = layer.scale_attention
    scale = torch.sigmoid(se.fc2(F.relu(se.fc1(pooled.flatten(1)))))  # (N, 3)
    pred = layer.sampling_offsets(src)  # (N, 5MK, H, W)
    out = torch.zeros(N, C, H, W, dtype=src.dtype)
    grid = kernel_grid(K).double()
    for n in range(N):
        for y in range(H):
            for x in range(W):
                p = pred[n, :, y, x]
                offsets = p[:2 * M * K].view(M, K, 2)
                modulation = p[2 * M * K:].view(M, 3, K).sigmoid()
                acc = torch.zeros(C, dtype=src.dtype)
                for m in range(M):
                    for j, s in zip(levels, slots):
                        Hj, Wj = srcs[j].shape[-2:]
                        value = layer.value_proj(srcs[j][n].flatten(1).T)  # (HjWj, C)
                        value = value.masked_fill(masks[j][n].flatten()[:, None], 0)
                        v = value[:, m * D:(m + 1) * D].T.reshape(1, D, Hj, Wj)
                        for k in range(K):  # the tap, in level-lvl pixels, on level j
                            px = (x + 0.5 + grid[k, 0] + offsets[m, k, 0]) / W
                            py = (y + 0.5 + grid[k, 1] + offsets[m, k, 1]) / H
                            g = torch.stack([2 * px - 1, 2 * py - 1]).view(1, 1, 1, 2)
                            sample = F.grid_sample(v, g, align_corners=False)[0, :, 0, 0]
                            acc[m * D:(m + 1) * D] += scale[n, s] * modulation[m, s, k] * sample
                out[n, :, y, x] = layer.output_proj(acc)
    x = layer.norm(src + out)
    return layer.activation(x, masks[lvl])


@pytest.mark.parametrize("lvl", [0, 1, 2])
def test_encoder_layer_by_hand(lvl):
    torch.manual_seed(0)
    layer = DynamicEncoderLayer(d_model=32, n_heads=2, n_points=9, dropout=0.0,
                                backend="pytorch").double().eval()
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.05)  # off the plain grid
    torch.nn.init.normal_(layer.sampling_offsets.bias, std=0.5)
    sizes = [(6, 5), (3, 3), (2, 2)]
    srcs = [torch.randn(2, 32, h, w).double() for h, w in sizes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in sizes]
    masks[0][1, :, 4:] = True
    masks[1][1, :, 2:] = True
    masks[2][1, :, 1:] = True
    got = layer(srcs, masks)[lvl]
    torch.testing.assert_close(got, _by_hand(layer, srcs, masks, lvl))


def test_zero_offsets_sample_the_plain_grid_on_every_scale():
    layer = DynamicEncoderLayer(d_model=32, n_heads=2, n_points=9)
    src = torch.randn(1, 32, 4, 6)
    locations, modulation = layer.sampling(src, 1, [0, 1, 2])
    # pixel (y=2, x=3), tap k=0 (dx=-1, dy=-1): the same normalized point on all three maps
    torch.testing.assert_close(locations[0, 2 * 6 + 3, 0, :, 0],
                               torch.tensor([[2.5 / 6, 1.5 / 4]] * 3))
    assert torch.equal(modulation, torch.full_like(modulation, 0.5))


def test_padded_mixed_size_batch_trains_every_parameter():
    torch.manual_seed(0)
    model, criterion, post = build_model(tiny())
    assert isinstance(model, DynamicDETR)
    images, mask, targets = padded_mixed_size_batch()
    outputs = model(images, mask)
    assert len(outputs.aux_outputs) == 1  # tiny: 2 decoder layers
    loss = total_loss(criterion(outputs, targets), criterion.weight_dict)
    assert_every_parameter_gets_a_gradient(model, loss)
    assert post(outputs, torch.tensor([[96, 64], [64, 96]]))[0]["boxes"].shape == (100, 4)


def test_first_rois_are_the_learned_boxes_and_boxes_detach(monkeypatch):
    import ddetr_tutorial.dynamic_detr as dd

    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny())
    seen = []
    real = dd.pyramid_roi_align

    def spy(features, boxes, *args, **kwargs):
        seen.append([b.clone() for b in boxes])
        return real(features, boxes, *args, **kwargs)

    monkeypatch.setattr(dd, "pyramid_roi_align", spy)
    images, mask, targets = padded_mixed_size_batch()
    outputs = model(images, mask)
    learned = model.query_boxes.weight.sigmoid().detach()  # cxcywh of each image
    x0, y0 = learned[:, 0] - learned[:, 2] / 2, learned[:, 1] - learned[:, 3] / 2
    torch.testing.assert_close(seen[0][0][:, :2], torch.stack([x0 * 64, y0 * 96], 1))
    torch.testing.assert_close(seen[0][1][:, :2], torch.stack([x0 * 96, y0 * 64], 1))
    # the second layer pools the first layer's boxes
    first = outputs.aux_outputs[0].pred_boxes[1].detach()
    torch.testing.assert_close(seen[1][1][:, 0], (first[:, 0] - first[:, 2] / 2) * 96)
    losses = criterion(outputs, targets)
    losses["loss_bbox"].backward()  # the last layer only: no path back through layer 1's box
    assert model.bbox_embed[0].layers[-1].weight.grad is None or \
        not model.bbox_embed[0].layers[-1].weight.grad.any()


def test_tiny_dynamic_detr_memorises_two_images():
    # as Sparse R-CNN's, its focal term falls first: at a tenth a box can still be at
    # IoU 0.62, so it trains on for at least 300 steps
    assert_memorises_two_images(get_config("tiny_dynamic_detr", num_classes=3), steps=500,
                                min_steps=300, lr=1e-3)


@pytest.mark.parametrize("change, message", [
    (dict(enc_n_points=5), "enc_n_points=5: expected a square"),
    (dict(with_box_refine=False), "model='dynamic_detr' expects True and False"),
])
def test_bad_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        tiny(**change)


def test_paper_preset():
    cfg = get_config("dynamic_detr")
    assert (cfg.num_feature_levels, cfg.enc_layers, cfg.dec_layers, cfg.num_queries,
            cfg.enc_n_points, cfg.epochs) == (4, 6, 6, 300, 9, 12)
    model = build_model(cfg.replace(num_classes=80, pretrained_backbone=None))[0]
    assert model.strides == [8, 16, 32, 64]
