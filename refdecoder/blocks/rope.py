"""3-D rotary position embedding (Wan-style) over a (time, row, column) token grid.

Each head vector is split into a time, a row and a column part (``rope_axis_dims``); adjacent channel pairs
``(x[2j], x[2j+1])`` of a part are rotated by an angle proportional to the token's position on that axis, so the
attention logit between two tokens depends on their position difference only.

Precision, whatever the activations' dtype: angles are computed in float64, because their absolute error grows with
the position (at position 100 a bf16 angle can be a quarter radian off, a float32 one 4e-6); the tables are kept in
float32 (they are neither parameters nor buffers, so ``model.to(torch.bfloat16)`` leaves them); the rotation runs
in float32 and rounds once, to the input's dtype, at the end.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["rope_axis_dims", "rope_tables", "rope_at", "apply_rope", "RotaryEmbedding3D"]

Grid = tuple[int, int, int]


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the ``(t, h, w)`` axes: ``h = w = 2 * (head_dim // 6)``, ``t`` the rest.

    128 -> (44, 42, 42). Raises ValueError for an odd or non-positive ``head_dim`` (channels rotate in pairs).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs an even, positive head_dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """``len(positions), dim`` float64 angles, each pair's angle repeated for both pair members."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return torch.outer(positions.to(torch.float64), inv_freq).repeat_interleave(2, dim=1)


def rope_tables(
    grid: Grid,
    head_dim: int,
    theta: float = 10000.0,
    time_positions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for every token of a ``T x H x W`` grid.

    Args:
        grid: ``(T, H, W)`` token grid.
        head_dim: channels per attention head (even).
        theta: RoPE base; pair ``j`` of an axis with ``d`` channels turns by ``p / theta**(2j/d)`` at position p.
        time_positions: ``(T,)`` integer time index of each grid frame; default ``arange(T)``. Row and column
            positions are always the token's row and column index.
        device: where to build the tables (default: ``time_positions``' device, else CPU).

    Returns:
        ``(cos, sin)``, each float32 ``T*H*W, head_dim``: tokens ordered (t, h, w) with w fastest, channels laid out
        ``[t dims | h dims | w dims]``, each value repeated for the two members of its rotation pair.
    """
    t, h, w = (int(v) for v in grid)
    if time_positions is None:
        time_positions = torch.arange(t, device=device)
    elif time_positions.numel() != t:
        raise ValueError(f"time_positions must hold one index per grid frame ({t}), got {time_positions.numel()}")
    device = device if device is not None else time_positions.device
    dt, dh, dw = rope_axis_dims(head_dim)
    parts = (
        _axis_angles(time_positions.to(device).reshape(t), dt, theta)[:, None, None].expand(t, h, w, dt),
        _axis_angles(torch.arange(h, device=device), dh, theta)[None, :, None].expand(t, h, w, dh),
        _axis_angles(torch.arange(w, device=device), dw, theta)[None, None, :].expand(t, h, w, dw),
    )
    angles = torch.cat(parts, dim=-1).reshape(t * h * w, head_dim)
    return angles.cos().float(), angles.sin().float()


def rope_at(
    t: torch.Tensor, y: torch.Tensor, x: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin rows for arbitrary integer positions (also outside any grid), equal to :func:`rope_tables`' rows.

    Args:
        t, y, x: integer time, row and column positions, broadcastable to one shape ``S...``.
        head_dim: channels per attention head (even).
        theta: RoPE base.

    Returns:
        ``(cos, sin)``, each float32 ``S..., head_dim``, channels laid out as in :func:`rope_tables`.
    """
    t, y, x = torch.broadcast_tensors(t, y, x)
    dims = rope_axis_dims(head_dim)
    angles = torch.cat([_axis_angles(p.reshape(-1), dim, theta) for p, dim in zip((t, y, x), dims)], dim=-1).reshape(
        *t.shape, head_dim
    )
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x``: ``(x0 cos - x1 sin, x0 sin + x1 cos)``, in float32.

    Args:
        x: ``B, heads, N, head_dim``.
        cos, sin: ``N, head_dim`` tables from :func:`rope_tables`.

    Returns:
        Same shape and dtype as ``x``.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


class RotaryEmbedding3D(nn.Module):
    """Builds (and caches) the RoPE tables for a token grid; no parameters, no state_dict entries.

    Args:
        head_dim: channels per attention head (even).
        theta: RoPE base.

    ``forward(grid, time_positions=None, device=None)`` returns the ``(cos, sin)`` of :func:`rope_tables`. The last
    result is kept and reused while the grid, the time positions and the device stay the same (every stage of a
    window usually shares one grid).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        rope_axis_dims(head_dim)
        self.head_dim, self.theta = head_dim, theta
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(
        self,
        grid: Grid,
        time_positions: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # A compiled graph computes its own tables: reading the cache would guard the graph on the grid of
            # the previous call, and each window would trace again.
            return rope_tables(grid, self.head_dim, self.theta, time_positions, device)
        positions = None if time_positions is None else tuple(int(p) for p in time_positions.reshape(-1).tolist())
        key = (tuple(int(v) for v in grid), positions, torch.device(device) if device is not None else None)
        if self._cache is None or self._cache[0] != key:
            times = None if positions is None else torch.tensor(positions)
            self._cache = (key, rope_tables(key[0], self.head_dim, self.theta, times, device))
        return self._cache[1]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
