"""RoIAlign (Mask R-CNN, He et al. 2017), the box pooling of Sparse R-CNN and Dynamic DETR.

Same numbers as torchvision's `roi_align`, without torchvision. Shapes:
features (N, C, H, W); boxes either a list of N tensors (K_i, 4) of (x1, y1, x2, y2)
in input pixels, or one (K, 5) tensor (batch index, x1, y1, x2, y2); the output is
(K, C, ph, pw), rows in the order of the boxes (the list concatenated).

Each output bin averages sampling_ratio x sampling_ratio bilinear samples (adaptive
ceil(roi / pooled) per box when sampling_ratio <= 0). A sample with y < -1 or y > H
(x likewise) is 0; otherwise y is clamped into [0, H - 1] before interpolating.

  roi_align_reference  the specification: loops over bins and samples, float64-friendly
  roi_align            the fast route: backend "grid_sample" (border padding + a mask)
                       or "ms_deform_attn" (our op, points clamped to pixel centres);
                       "auto" takes the op when its compiled kernel builds (on a 2-core
                       CPU, forward+backward 2-5x faster: benchmarks/bench_roi_align.py),
                       else grid_sample
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import ms_deform_attn, resolve_backend

BACKENDS = ("grid_sample", "ms_deform_attn")
BACKEND_CHOICES = ("auto", *BACKENDS)


# --------------------------------------------------------------------------- input checks

def _check_features(features) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError("features must be a torch.Tensor (N, C, H, W), "
                        f"got {type(features).__name__}")
    if features.dim() != 4:
        raise ValueError(f"features must be (N, C, H, W), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating tensor, got {features.dtype}")


def rois_from_boxes(boxes, N: int) -> torch.Tensor:
    """boxes: list of N tensors (K_i, 4), or one (K, 5) -> (K, 5) (batch index, x1, y1, x2, y2)."""
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != N:
            raise ValueError(f"boxes is a list of {len(boxes)} tensors but features hold "
                             f"{N} images")
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}] must be a (K_i, 4) tensor (x1, y1, x2, y2), "
                                 f"got {shape}")
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1)
                          for i, b in enumerate(boxes)]) if boxes else torch.zeros(0, 5)
    elif isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError("boxes as one tensor must be (K, 5) (batch index, x1, y1, x2, y2), "
                             f"got shape {tuple(boxes.shape)}")
        rois = boxes
    else:
        raise TypeError(f"boxes must be a list of (K_i, 4) tensors or a (K, 5) tensor, "
                        f"got {type(boxes).__name__}")
    if not rois.is_floating_point():
        raise TypeError(f"boxes must be floating tensors, got {rois.dtype}")
    idx = rois[:, 0]
    bad = (idx != idx.round()) | (idx < 0) | (idx >= N)
    if bad.any():
        raise ValueError(f"box batch index {idx[bad][0].item()} is not an image index in "
                         f"[0, {N}) (features hold {N} images)")
    return rois


def _pair(output_size) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    ints = isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) for s in size)
    if not ints:
        raise TypeError("output_size must be an int or a pair of ints (ph, pw), "
                        f"got {output_size!r}")
    if min(size) <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return size


def _check_args(features, boxes, output_size, spatial_scale, sampling_ratio):
    _check_features(features)
    rois = rois_from_boxes(boxes, features.shape[0])
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int (<= 0 = adaptive), got {sampling_ratio!r}")
    if not (isinstance(spatial_scale, (int, float)) and math.isfinite(spatial_scale)
            and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    if rois.device != features.device:
        raise ValueError(f"boxes are on {rois.device} but features on {features.device}")
    return rois.to(features.dtype), _pair(output_size)


# --------------------------------------------------------------------------- the specification

def _bilinear_reference(fmap, y: float, x: float):
    """One sample of fmap (C, H, W) at pixel (y, x), torchvision's edge rule. Returns (C,)."""
    H, W = fmap.shape[1:]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return fmap.new_zeros(fmap.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fmap[:, y0, x0] + hy * lx * fmap[:, y0, x1]
            + ly * hx * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def roi_align_reference(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=2,
                        aligned=True):
    """RoIAlign by loops over boxes, bins and samples: the oracle (slow).

    features (N, C, H, W), boxes (list of (K_i, 4) or (K, 5)) -> (K, C, ph, pw).
    """
    rois, (ph, pw) = _check_args(features, boxes, output_size, spatial_scale, sampling_ratio)
    out = features.new_zeros(rois.shape[0], features.shape[1], ph, pw)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1 = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        w, h = x2 * spatial_scale - offset - x1, y2 * spatial_scale - offset - y1
        if not aligned:  # the original RoIAlign forced malformed boxes to 1x1
            w, h = max(w, 1.0), max(h, 1.0)
        bin_h, bin_w = h / ph, w / pw
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / pw)
        count = max(gh * gw, 1)
        for i in range(ph):
            for j in range(pw):
                acc = features.new_zeros(features.shape[1])
                for iy in range(gh):
                    y = y1 + i * bin_h + (iy + 0.5) * bin_h / gh
                    for ix in range(gw):
                        x = x1 + j * bin_w + (ix + 0.5) * bin_w / gw
                        acc = acc + _bilinear_reference(features[int(b)], y, x)
                out[k, :, i, j] = acc / count
    return out


# --------------------------------------------------------------------------- the fast route

def _sample_points(rois, ph, pw, spatial_scale, sampling_ratio, aligned):
    """Pixel coordinates of every sample, which of them a box uses, and its sample count.

    rois (K, 5) -> y (K, ph, G_h), x (K, pw, G_w), y_used, x_used (same shapes, bool),
    count (K, 1, 1, 1, 1), (G_h, G_w). Adaptive grids differ per box: every box gets the
    largest, and the samples beyond its own grid are marked unused.
    """
    offset = 0.5 if aligned else 0.0
    start = rois[:, 1:3] * spatial_scale - offset                   # (K, 2) (x1, y1)
    size = rois[:, 3:5] * spatial_scale - offset - start            # (K, 2) (w, h)
    if not aligned:
        size = size.clamp(min=1.0)
    bins = size / size.new_tensor([pw, ph])                         # (K, 2)
    if sampling_ratio > 0:
        grid = torch.full_like(size, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(bins).long()                              # ceil(roi / pooled)
    G_w, G_h = (max(int(g), 1) for g in grid.max(0).values)  # rois is never empty here

    def axis(d, P, G):  # (K, P, G) positions along one axis and their validity
        g = grid[:, d].to(size.dtype)[:, None, None]
        steps = torch.arange(P, dtype=size.dtype, device=size.device)[None, :, None]
        sub = torch.arange(G, dtype=size.dtype, device=size.device)[None, None, :]
        pos = start[:, d, None, None] + steps * bins[:, d, None, None] \
            + (sub + 0.5) * bins[:, d, None, None] / g.clamp(min=1)
        return pos, sub < g

    x, x_used = axis(0, pw, G_w)
    y, y_used = axis(1, ph, G_h)
    count = (grid[:, 0] * grid[:, 1]).clamp(min=1).to(size.dtype)[:, None, None, None, None]
    return y, x, y_used, x_used, count, (G_h, G_w)


def _weights(y, x, y_used, x_used, count, H, W):
    """(K, ph, G_h, pw, G_w): 1/count for a sample that counts, 0 for one outside or padding."""
    y_in = y_used & (y >= -1.0) & (y <= H)
    x_in = x_used & (x >= -1.0) & (x <= W)
    return (y_in[:, :, :, None, None] & x_in[:, None, None, :, :]).to(y.dtype) / count


def _by_grid_sample(features, rois, pts, ph, pw):
    y, x, y_used, x_used, count, (G_h, G_w) = pts
    N, C, H, W = features.shape
    K, P = rois.shape[0], G_h * G_w
    w = _weights(y, x, y_used, x_used, count, H, W).permute(0, 1, 3, 2, 4)  # (K, ph, pw, G_h, G_w)
    # align_corners=False unnormalises g to ((g + 1) W - 1) / 2, so g = (2x + 1) / W - 1;
    # border padding then clamps x into [0, W - 1], which is torchvision's edge rule.
    gx = ((2 * x + 1) / W - 1)[:, None, :, None, :].expand(K, ph, pw, G_h, G_w)
    gy = ((2 * y + 1) / H - 1)[:, :, None, :, None].expand(K, ph, pw, G_h, G_w)
    grid = torch.stack([gx, gy], -1).reshape(K, ph * pw, P, 2)  # samples of a bin side by side
    w = w.reshape(K, ph * pw, P)
    batch = rois[:, 0].long()
    parts, rows = [], []
    for n in batch.unique().tolist():  # one grid_sample per image over all its boxes
        sel = (batch == n).nonzero().squeeze(1)
        s = F.grid_sample(features[n:n + 1], grid[sel].reshape(1, -1, P, 2), mode="bilinear",
                          padding_mode="border", align_corners=False)  # (1, C, k ph pw, P)
        pooled = (s[0] * w[sel].reshape(-1, P)).sum(-1)        # (C, k ph pw): the bin means
        parts.append(pooled.reshape(C, -1, ph, pw).transpose(0, 1))
        rows.append(sel)
    return torch.cat(parts)[torch.argsort(torch.cat(rows))]   # back to the boxes' order


def _by_ms_deform_attn(features, rois, pts, ph, pw):
    y, x, y_used, x_used, count, (G_h, G_w) = pts
    N, C, H, W = features.shape
    K = rois.shape[0]
    weight = _weights(y, x, y_used, x_used, count, H, W)        # (K, ph, G_h, pw, G_w)
    # The op reads a location u at pixel u W - 0.5: clamping to a pixel centre first
    # gives the clamp of torchvision's rule; the weight 0 removes the outside samples.
    lx = ((x.clamp(0, W - 1) + 0.5) / W)[:, None, None, :, :].expand(K, ph, G_h, pw, G_w)
    ly = ((y.clamp(0, H - 1) + 0.5) / H)[:, :, :, None, None].expand(K, ph, G_h, pw, G_w)
    loc = torch.stack([lx, ly], -1).permute(0, 1, 3, 2, 4, 5)  # (K, ph, pw, G_h, G_w, 2)
    w = weight.permute(0, 1, 3, 2, 4)                           # (K, ph, pw, G_h, G_w)
    batch = rois[:, 0].long()
    per_image = torch.bincount(batch, minlength=N)
    Kmax = int(per_image.max())
    order = torch.argsort(batch, stable=True)                   # boxes grouped by image
    first = torch.cumsum(per_image, 0) - per_image              # (N,) first row of each image
    rank = torch.arange(K, device=batch.device) - first[batch[order]]
    slot = torch.empty_like(batch).index_put_((order,), rank)  # (K,) row within its image
    # Each image's boxes become its queries, padded to Kmax with weight-0 queries.
    P = G_h * G_w
    locs = loc.new_full((N, Kmax, ph * pw, P, 2), 0.5).index_put(
        (batch, slot), loc.reshape(K, ph * pw, P, 2))
    wts = w.new_zeros(N, Kmax, ph * pw, P).index_put((batch, slot), w.reshape(K, ph * pw, P))
    value = features.flatten(2).transpose(1, 2).unsqueeze(2)    # (N, S, M=1, C)
    shapes = torch.tensor([[H, W]], dtype=torch.long, device=features.device)
    start = torch.zeros(1, dtype=torch.long, device=features.device)
    out = ms_deform_attn(value, shapes, start, locs.reshape(N, Kmax * ph * pw, 1, 1, P, 2),
                         wts.reshape(N, Kmax * ph * pw, 1, 1, P))  # (N, Kmax ph pw, C)
    out = out.reshape(N, Kmax, ph, pw, C)[batch, slot]          # (K, ph, pw, C)
    return out.permute(0, 3, 1, 2)


def roi_align(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=2, aligned=True,
              backend="auto"):
    """RoIAlign, torchvision's `roi_align` numbers; features (N, C, H, W) -> (K, C, ph, pw).

    boxes: list of N tensors (K_i, 4), or (K, 5) with the batch index first. backend
    "grid_sample", "ms_deform_attn" (our op, its `auto` kernel choice) or "auto": the
    op when its compiled kernel is there for these features, else grid_sample.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    rois, (ph, pw) = _check_args(features, boxes, output_size, spatial_scale, sampling_ratio)
    if rois.shape[0] == 0:
        return features.new_zeros(0, features.shape[1], ph, pw)
    if backend == "auto":  # the op's own reference would be slower than grid_sample
        compiled = resolve_backend("auto", features) != "pytorch"
        backend = "ms_deform_attn" if compiled else "grid_sample"
    pts = _sample_points(rois, ph, pw, spatial_scale, sampling_ratio, aligned)
    run = _by_grid_sample if backend == "grid_sample" else _by_ms_deform_attn
    return run(features, rois, pts, ph, pw)


# --------------------------------------------------------------------- from a pyramid

def pyramid_levels(boxes: torch.Tensor, num_levels: int, min_level: int = 2,
                   canonical_size: float = 224.0, canonical_level: int = 4) -> torch.Tensor:
    """The FPN paper's Eq. 1, as detectron2's pooler: the box of side sqrt(wh) goes to
    level floor(k0 + log2(sqrt(wh) / 224)), k0 = 4, clamped to the pyramid.
    boxes (K, 4) xyxy in pixels -> (K,) indices into the levels (0 = P_min_level)."""
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-8))
    return (level.clamp(min_level, min_level + num_levels - 1) - min_level).long()


def pyramid_roi_align(features, boxes, strides, output_size=7, sampling_ratio=2,
                      min_level=2, canonical_size=224.0, backend="auto"):
    """Multi-level RoIAlign (aligned=True): each box pooled from its `pyramid_levels`
    level at 1 / stride. features: L maps (N, C, H_l, W_l) finest first (P2..P5);
    boxes: list of N (K_i, 4) xyxy in pixels -> (sum K_i, C, ph, pw), boxes in order."""
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature maps but {len(strides)} strides")
    rois = rois_from_boxes(boxes, features[0].shape[0]).to(features[0].dtype)
    ph, pw = _pair(output_size)
    out = features[0].new_zeros(rois.shape[0], features[0].shape[1], ph, pw)
    level = pyramid_levels(rois[:, 1:], len(features), min_level, canonical_size)
    for lvl, (fmap, stride) in enumerate(zip(features, strides)):
        index = (level == lvl).nonzero().flatten()
        if index.numel():
            out[index] = roi_align(fmap, rois[index], (ph, pw), 1.0 / stride, sampling_ratio,
                                   aligned=True, backend=backend)
    return out
