"""2-D sine position encoding of a feature map (DETR Sec. 3.2, Deformable DETR Sec. 4.1).

Attention is blind to where a token sits, so every pixel of every feature map
gets a fixed code of its (y, x) position. Each axis is encoded as in the
original Transformer, PE(p, 2i) = sin(p / T^(2i/F)), PE(p, 2i+1) = cos(p / T^(2i/F)),
with F features per axis and temperature T, and the two codes are concatenated,
y first. Positions are counted over the valid (unpadded) pixels only and
normalized to (0, 2*pi), so an image has the same code whatever it is padded to.

The learned per-level embedding that tells the levels apart
(`transformer.level_embed`, e_l in the paper) lives in the transformer.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """The official Deformable DETR sine encoding; no parameters.

    num_pos_feats: F, features per axis (C = 2F in total, F even).
    temperature: T, sets the longest wavelength.
    normalize: map the pixel-center positions to (0, scale) per image;
    scale: 2*pi by default. offset: subtracted from the 1-based positions before
    normalizing: 0.5 (pixel centres) in Deformable DETR, 0 in DETR.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 normalize: bool = True, scale: float = 2 * math.pi, offset: float = 0.5):
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be a positive even number (sin and cos "
                             f"come in pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (N, H, W) bool, True on padding. Returns (N, 2F, H, W) float32:
        channels [0, F) encode y, [F, 2F) encode x, sin and cos interleaved.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True on padding), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.dim() != 3:
            raise ValueError(f"mask must be (N, H, W), got shape {tuple(mask.shape)}")
        y_embed, x_embed = self._positions(mask)  # (N, H, W) each
        return torch.cat([self._encode(y_embed), self._encode(x_embed)], dim=1)

    def _positions(self, mask: torch.Tensor):
        """Row and column of each pixel counted over valid pixels, from 1; (N, H, W)."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # Deformable DETR subtracts 0.5 (pixel centers) where DETR does not; each
            # keeps its own, so checkpoints see the codes they were trained with. The
            # last row / column holds the valid height / width; eps avoids 0/0 on padding.
            eps = 1e-6
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        return y_embed, x_embed

    def _encode(self, position: torch.Tensor) -> torch.Tensor:
        """position: (N, H, W) -> (N, F, H, W), [sin(p/w_0), cos(p/w_0), sin(p/w_1), ...]."""
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=position.device)
        # Channels 2i and 2i+1 share one wavelength T^(2i/F).
        wavelengths = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor")
                                           / self.num_pos_feats)  # (F,)
        angles = position[..., None] / wavelengths  # (N, H, W, F)
        codes = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1)
        return codes.flatten(3).permute(0, 3, 1, 2)  # (N, F, H, W)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}")


def build_position_encoding(*, hidden_dim: int = 256, temperature: float = 10000.0,
                            offset: float = 0.5) -> PositionEmbeddingSine:
    """The encoding for a model of width C = hidden_dim: F = C / 2 features per axis."""
    if hidden_dim <= 0 or hidden_dim % 4 != 0:
        raise ValueError(f"hidden_dim must be a positive multiple of 4 (two axes of sin/cos "
                         f"pairs), got {hidden_dim}")
    return PositionEmbeddingSine(hidden_dim // 2, temperature=temperature, normalize=True,
                                 offset=offset)
