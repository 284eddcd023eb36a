"""Row-column decoupled attention (RCDA; Anchor DETR, Wang et al. AAAI 2022, Sec. 3.3).

Dense attention gives each of Lq queries a weight for every one of the H x W
keys. RCDA factorises that map: the keys are averaged over H into one key per
column x (the "row" keys, W of them) and over W into one key per row y (the
"column" keys, H of them); each query has a row query and a column query and
takes two softmaxes, a_row over the W columns and a_col over the H rows; the
value at (y, x) is weighted by a_col[y] * a_row[x]:

    out_q = sum_y sum_x a_col[q, y] a_row[q, x] v[y, x].

The attention weights cost O(N M Lq (H + W)) memory instead of O(N M Lq H W);
the sum is taken one axis at a time, the shorter first (an intermediate of
N M Lq min(H, W) D). Names follow megvii-research/AnchorDETR (`in_proj_weight`
of 5C rows: q_row, q_col, k_row, k_col, v; `out_proj`), so its checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def decoupled_weights(q_row: Tensor, q_col: Tensor, k_row: Tensor, k_col: Tensor,
                      padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RCDA's two softmaxes, per head: a_row (N, M, Lq, W) over the columns and a_col
    (N, M, Lq, H) over the rows (shapes and padding as `decoupled_attention`)."""
    scale = q_row.shape[-1] ** -0.5
    logits_row = (q_row * scale) @ k_row.transpose(-1, -2)  # (N, M, Lq, W)
    logits_col = (q_col * scale) @ k_col.transpose(-1, -2)  # (N, M, Lq, H)
    if padding_mask is not None:
        logits_row = logits_row.masked_fill(padding_mask[:, None, None, 0, :], float("-inf"))
        logits_col = logits_col.masked_fill(padding_mask[:, None, None, :, 0], float("-inf"))
    return logits_row.softmax(-1), logits_col.softmax(-1)


def decoupled_attention(q_row: Tensor, q_col: Tensor, k_row: Tensor, k_col: Tensor,
                        value: Tensor, padding_mask: Tensor | None = None,
                        dropout: float = 0.0, training: bool = False) -> Tensor:
    """The attention of RCDA, after the projections, per head.

    q_row, q_col: (N, M, Lq, D); k_row: (N, M, W, D) one key per column; k_col:
    (N, M, H, D) one key per row; value: (N, M, H, W, D); padding_mask: (N, H, W)
    True on padding (padding is at the bottom and the right, so its first row
    marks the padded columns and its first column the padded rows). -> (N, M, Lq, D).
    """
    a_row, a_col = decoupled_weights(q_row, q_col, k_row, k_col, padding_mask)
    a_row, a_col = F.dropout(a_row, dropout, training), F.dropout(a_col, dropout, training)
    N, M, H, W, D = value.shape
    if H < W:  # sum over x first: (N, M, Lq, W) @ (N, M, W, H*D) -> (N, M, Lq, H, D)
        partial = (a_row @ value.transpose(2, 3).reshape(N, M, W, H * D)).unflatten(-1, (H, D))
        return (a_col.unsqueeze(-2) @ partial).squeeze(-2)
    partial = (a_col @ value.reshape(N, M, H, W * D)).unflatten(-1, (W, D))  # (N, M, Lq, W, D)
    return (a_row.unsqueeze(-2) @ partial).squeeze(-2)


class RowColumnAttention(nn.Module):
    """Multi-head RCDA (the official `MultiheadRCDA`), batch first.

    forward(query_row, query_col, key_row, key_col, value, padding_mask):
    query_row, query_col (N, Lq, C); key_row, key_col, value (N, H, W, C);
    padding_mask (N, H, W) True on padding, or None. -> (N, Lq, C).
    The row keys are projected then averaged over H, the column keys over W.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(5 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        # As nn.MultiheadAttention (and the official code): Xavier over the stacked matrix.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        """(N, ..., C) -> (N, M, ..., D)."""
        return x.unflatten(-1, (self.n_heads, -1)).movedim(-2, 1)

    def project(self, query_row: Tensor, query_col: Tensor, key_row: Tensor, key_col: Tensor,
                value: Tensor) -> tuple[Tensor, ...]:
        """The five projections, per head: q_row, q_col (N, M, Lq, D); k_row (N, M, W, D),
        one key per column; k_col (N, M, H, D), one per row; v (N, M, H, W, D)."""
        w, b = self.in_proj_weight.chunk(5), self.in_proj_bias.chunk(5)
        return (self._heads(F.linear(query_row, w[0], b[0])),
                self._heads(F.linear(query_col, w[1], b[1])),
                self._heads(F.linear(key_row, w[2], b[2]).mean(1)),
                self._heads(F.linear(key_col, w[3], b[3]).mean(2)),
                self._heads(F.linear(value, w[4], b[4])))

    def forward(self, query_row: Tensor, query_col: Tensor, key_row: Tensor, key_col: Tensor,
                value: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        q_row, q_col, k_row, k_col, v = self.project(query_row, query_col, key_row, key_col,
                                                     value)
        out = decoupled_attention(q_row, q_col, k_row, k_col, v, padding_mask,
                                  self.dropout, self.training)
        return self.out_proj(out.movedim(1, -2).flatten(-2))
