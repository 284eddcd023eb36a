"""Multi-scale deformable attention in plain PyTorch: the specification.

Paper, Eq. 3: for query q with reference point p_q,

    MSDeformAttn(z_q, p_q, {x_l}) =
        sum_m W_m [ sum_l sum_k A_mlqk * W'_m x_l(phi_l(p_q) + dp_mlqk) ]

This file computes the bracket for every head m, given the sampling locations
phi_l(p_q) + dp_mlqk (normalized to [0, 1]) and the attention weights A_mlqk.
The projections W_m, W'_m live in `ddetr_tutorial.attention.MSDeformAttn`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index,
                           sampling_locations, attention_weights):
    """Reference implementation with `F.grid_sample` (align_corners=False, zero padding).

    value: (N, S, M, D); spatial_shapes: (L, 2) rows (H_l, W_l);
    sampling_locations: (N, Lq, M, L, K, 2) normalized (x, y);
    attention_weights: (N, Lq, M, L, K). Returns (N, Lq, M * D).
    Half-precision values are computed in float32 and cast back.
    """
    out_dtype = value.dtype
    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    sampling_locations = sampling_locations.to(value.dtype)
    attention_weights = attention_weights.to(value.dtype)
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (H, W) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, K, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Lq, K)
    sampled = torch.stack(sampled, dim=-2).flatten(-2)  # (N*M, D, Lq, L*K)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * K)
    out = (sampled * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(out_dtype)


def bilinear_sample(feature, x, y):
    """Sample `feature` (H, W, D) at one normalized point (x, y) in [0, 1].

    Pixel centres sit at (i + 0.5) / W: the grid_sample convention with
    align_corners=False. Corners outside the map count as zeros.
    """
    H, W, D = feature.shape
    w_im, h_im = x * W - 0.5, y * H - 0.5
    h0, w0 = math.floor(h_im), math.floor(w_im)
    lh, lw = h_im - h0, w_im - w0
    out = feature.new_zeros(D)
    for h, w, weight in ((h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
                         (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)):
        if 0 <= h < H and 0 <= w < W:
            out += weight * feature[h, w]
    return out


def ms_deform_attn_loops(value, spatial_shapes, level_start_index,
                         sampling_locations, attention_weights):
    """The same operation written as plain loops, one sampling point at a time.

    Slow (Python loops over N, Lq, M, L, K): meant for reading and for small
    checks. Same arguments and result as `ms_deform_attn_pytorch`.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    out = value.new_zeros(N, Lq, M, D)
    for n in range(N):
        for lvl in range(L):
            H, W = (int(s) for s in spatial_shapes[lvl])
            start = int(level_start_index[lvl])
            feature = value[n, start:start + H * W].view(H, W, M, D)
            for q in range(Lq):
                for m in range(M):
                    for k in range(K):
                        x, y = sampling_locations[n, q, m, lvl, k].tolist()
                        a = attention_weights[n, q, m, lvl, k]
                        out[n, q, m] += a * bilinear_sample(feature[:, :, m], x, y)
    return out.view(N, Lq, M * D)
