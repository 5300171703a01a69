"""A learnable locality prior: an additive attention bias per head by the spatial offset from query to key.

The bias of a key depends on the head, on whether the key lies in a reference or a video frame, and on its offset
``(dy, dx)`` in token rows and columns from the query (time plays no part: RoPE carries it). Offsets beyond
``extent`` share the value at the edge of the table, so the same table serves a neighbourhood of radius
``extent`` and global attention, where it acts as a distance bias. It starts as ``-slope * sqrt(dy^2 + dx^2)``:
attention begins concentrated on the query's own position in every frame and can learn to spread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from refdecoder.errors import ConfigError

if TYPE_CHECKING:
    from refdecoder.blocks.attention_scope import AttentionScope

__all__ = ["LocalityBias"]


class LocalityBias(nn.Module):
    """Per-head relative-position bias over a ``(2*extent+1)^2`` window, one table for reference keys, one for video.

    Args:
        num_heads: attention heads.
        extent: largest offset with its own entry (a local scope's radius; for global attention, the reach of the
            prior).
        slope: initial bias per token of Euclidean distance (0 = no prior at init).

    Parameter ``table``: ``num_heads, 2, 2*extent+1, 2*extent+1`` float32, ``[head, kind, dy + extent, dx + extent]``
    with kind 0 = a key in a reference frame, 1 = in a video frame.
    """

    def __init__(self, num_heads: int, extent: int, slope: float = 3.0) -> None:
        super().__init__()
        if num_heads < 1 or extent < 0 or slope < 0:
            raise ConfigError(
                f"locality bias needs num_heads >= 1, extent >= 0 and slope >= 0, got {num_heads}, {extent}, {slope}"
            )
        self.num_heads, self.extent = num_heads, extent
        steps = torch.arange(-extent, extent + 1, dtype=torch.float32)
        distance = (steps[:, None] ** 2 + steps[None, :] ** 2).sqrt()
        self.table = nn.Parameter((-slope * distance).expand(num_heads, 2, -1, -1).clone())

    def slots(self, kind: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Bias of keys given by ``kind``, ``dy``, ``dx`` (same shape ``S...``) -> ``num_heads, S...``."""
        e = self.extent
        return self.table[:, kind, dy.clamp(-e, e) + e, dx.clamp(-e, e) + e]

    def per_frame(self, scope: AttentionScope) -> torch.Tensor:
        """``num_heads, T``: the bias of the key at the query's own position in each frame (radius-0 scopes)."""
        t = scope.grid[0]
        kind = (torch.arange(t, device=self.table.device) >= scope.num_reference).long()
        zero = torch.zeros_like(kind)
        return self.slots(kind, zero, zero)

    def dense(self, scope: AttentionScope, rows: slice | None = None) -> torch.Tensor:
        """``num_heads, N_q, N``: the bias between the queries ``rows`` (default all) and every key of the grid."""
        t, h, w = scope.grid
        index = torch.arange(t * h * w, device=self.table.device)
        queries = index[rows] if rows is not None else index
        kind = (index // (h * w) >= scope.num_reference).long()
        dy = (index % (h * w) // w)[None, :] - (queries % (h * w) // w)[:, None]
        dx = (index % w)[None, :] - (queries % w)[:, None]
        return self.slots(kind.expand_as(dy), dy, dx)

    def score_mod(self, scope: AttentionScope):
        """The bias as a ``flex_attention`` score modification for ``scope``'s grid."""
        _, h, w = scope.grid
        # Without gradients the table is captured as a constant (compiled CPU flex_attention cannot capture a
        # tensor that requires grad; CUDA can).
        table = self.table if torch.is_grad_enabled() else self.table.detach()
        p, e = h * w, self.extent

        def add_bias(score, batch, head, q_idx, kv_idx):
            kind = (kv_idx // p >= scope.num_reference).long()
            dy = ((kv_idx % p) // w - (q_idx % p) // w).clamp(-e, e) + e
            dx = (kv_idx % w - q_idx % w).clamp(-e, e) + e
            return score + table[head, kind, dy, dx].to(score.dtype)

        return add_bias

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, extent={self.extent}"
