"""Feature Pyramid Network (Lin et al. 2017): C2-C5 -> P2-P5, the pyramid Sparse R-CNN
pools its boxes from.

Each level: a 1x1 lateral conv of C_l, plus the coarser level's sum upsampled x2
(nearest), then a 3x3 output conv; every P_l has the same width. As detectron2's FPN
(the one Sparse R-CNN builds on): convs with bias, no norm, weights
`kaiming_uniform_(a=1)` and bias 0. Its P6 (a max-pool of P5) is not built: Sparse
R-CNN's boxes are pooled from P2-P5 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """in_channels: the widths of C2..C5 (finest first); out_channels: P's width.

    forward(features) takes the maps finest first and returns P_l in the same order;
    `strides` are passed through for the pooler.
    """

    def __init__(self, in_channels: list[int], out_channels: int, strides: list[int]):
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels has {len(in_channels)} levels but strides "
                             f"{len(strides)}: expected one stride per level")
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                    for _ in in_channels)
        self.strides, self.out_channels = list(strides), out_channels
        for conv in [*self.lateral, *self.output]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.lateral):
            raise ValueError(f"FPN built for {len(self.lateral)} levels, got {len(features)} maps")
        out, top = [], None
        for lvl in reversed(range(len(features))):  # coarsest first: the top-down path
            lateral = self.lateral[lvl](features[lvl])
            if top is not None:  # sizes may be odd (ceil strides): upsample to this level's
                lateral = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            top = lateral
            out.append(self.output[lvl](lateral))
        return out[::-1]
