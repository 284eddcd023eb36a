"""Multi-scale deformable attention module (paper Sec. 4.1, Eq. 3).

Each query looks at only K points per head per level, around its reference
point: the offsets and the attention weights are linear functions of the
query, the sampled features come from the value projection of the
multi-scale feature maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import ms_deform_attn


class DeformableSampling(nn.Module):
    """The op call of `MSDeformAttn` as a parameter-free submodule.

    It adds no state_dict key; its forward hook sees what the attention sampled:
    args (value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,),
    sampling_locations (N, Lq, M, L, K, 2), attention_weights (N, Lq, M, L, K)),
    output (N, Lq, M*D). `ddetr_tutorial.recording` hooks it.
    """

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, backend: str = "auto"):
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, backend=backend)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official parameter names and init.

    d_model: C; n_levels: L; n_heads: M; n_points: K (per head per level).
    backend: passed to `ms_deform_attn` ('auto', 'pytorch', 'cpu', 'cuda').
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, backend: str = "auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model} "
                             f"and n_heads={n_heads}")
        self.d_model, self.n_levels = d_model, n_levels
        self.n_heads, self.n_points = n_heads, n_points
        self.backend = backend
        self.sample = DeformableSampling()  # no parameters: a hook point, no state_dict key
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialization.

        Offsets start as a fixed pattern: head m looks in direction 2*pi*m/M (scaled
        so the larger of |cos|, |sin| is 1), point k at radius k + 1 pixels, the
        same on every level. Attention starts uniform over the L*K points.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float32)  # (K,)
        grid = directions[:, None, None, :] * radii[None, None, :, None]  # (M, 1, K, 2)
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query, reference_points, input_flatten, spatial_shapes,
                level_start_index, padding_mask=None, query_level=None):
        """query: (N, Lq, C); reference_points: (N, Lq, L, 2) points (x, y) or
        (N, Lq, L, 4) boxes (cx, cy, w, h), normalized; input_flatten: (N, S, C);
        spatial_shapes: (L, 2); level_start_index: (L,); padding_mask: (N, S),
        True on padding. Returns (N, Lq, C). (`ddetr_tutorial.recording` records the
        sampling locations and attention weights through the `sample` submodule.)

        query_level: optional (Lq,) int64, the level each query lives on. Given, a
        query samples only its own level (softmax over its K points there): the
        "per-level" attention of the paper's Table 2 ablation, no cross-level exchange.
        """
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, K = self.n_heads, self.n_levels, self.n_points
        if reference_points.shape[:3] != (N, Lq, L) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must be (N, Lq, L, 2) or (N, Lq, L, 4) = "
                             f"({N}, {Lq}, {L}, 2|4), got {tuple(reference_points.shape)}")

        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)  # (N, S, M, D)

        offsets = self.sampling_offsets(query).view(N, Lq, M, L, K, 2)
        logits = self.attention_weights(query).view(N, Lq, M, L, K)
        if query_level is not None:
            own = self._own_level(query_level, Lq, L, query.device)  # (Lq, L)
            logits = logits.masked_fill(~own[None, :, None, :, None], float("-inf"))
        weights = F.softmax(logits.view(N, Lq, M, L * K), -1).view(N, Lq, M, L, K)

        locations = self.sampling_locations(reference_points, offsets, spatial_shapes)
        out = self.sample(value, spatial_shapes, level_start_index, locations, weights,
                          backend=self.backend)
        return self.output_proj(out)

    @staticmethod
    def _own_level(query_level, Lq, L, device):
        if not isinstance(query_level, torch.Tensor) or query_level.dtype != torch.long:
            raise TypeError(f"query_level must be an int64 tensor, got {query_level!r:.80}")
        if query_level.shape != (Lq,):
            raise ValueError(f"query_level must have shape (Lq,) = ({Lq},), "
                             f"got {tuple(query_level.shape)}")
        if Lq and (int(query_level.min()) < 0 or int(query_level.max()) >= L):
            raise ValueError(f"query_level values must be levels in [0, {L}), got "
                             f"[{int(query_level.min())}, {int(query_level.max())}]")
        return query_level.to(device)[:, None] == torch.arange(L, device=device)

    def sampling_locations(self, reference_points, offsets, spatial_shapes):
        """Reference points plus offsets -> (N, Lq, M, L, K, 2) normalized (x, y).

        Points: offsets are in pixels of each level, so divide by (W_l, H_l).
        Boxes: offsets are relative to the box, scaled by half its size / K.
        """
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets)  # (L, 2) rows (W, H)
            return (reference_points[:, :, None, :, None, :]
                    + offsets / normalizer[None, None, None, :, None, :])
        centers = reference_points[:, :, None, :, None, :2]
        sizes = reference_points[:, :, None, :, None, 2:]
        return centers + offsets / self.n_points * sizes * 0.5
