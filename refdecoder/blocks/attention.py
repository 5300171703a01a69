"""Full (non-causal) multi-head attention with one dispatch point.

xformers' memory-efficient attention is used when xformers is installed and the tensors are on CUDA; otherwise
PyTorch's ``scaled_dot_product_attention`` (which picks flash / memory-efficient / math kernels itself). Global
attention builds no mask, so memory stays linear in the token count on the fused kernels. A local attention scope
of radius 0 (each token sees its own (row, column) position in every frame) runs as one short attention per
position, without a mask; a larger radius passes a dense boolean ``N x N`` mask (:func:`local_attention_mask`) to
SDPA, ``N^2`` bytes.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = ["attention", "attention_backend", "local_attention_mask", "per_position_attention"]

logger = logging.getLogger("refdecoder")


@functools.cache
def _xformers_ops() -> ModuleType | None:
    """``xformers.ops`` or None; imported once, because a failed import is slow to repeat on every call."""
    try:
        return importlib.import_module("xformers.ops")
    except ImportError:
        return None
    except Exception as err:  # a broken xformers build raises anything at import; fall back, but say why once
        logger.warning("xformers is installed but failed to import (%s); using PyTorch SDPA", err)
        return None


def attention_backend(device: torch.device | str) -> str:
    """``"xformers"`` when xformers is importable and ``device`` is CUDA, else ``"sdpa"``."""
    if torch.device(device).type == "cuda" and _xformers_ops() is not None:
        return "xformers"
    return "sdpa"


def local_attention_mask(
    grid: tuple[int, int, int], radius: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Which keys each query may see when attention is restricted to a spatial neighbourhood.

    Args:
        grid: ``(T, H, W)`` token grid, tokens ordered (t, h, w) with w fastest.
        radius: r; a query at row/column ``(h, w)`` sees every key with ``|dh| <= r`` and ``|dw| <= r`` in every
            frame (time is never restricted, so a video token always sees the reference token at its position).

    Returns:
        ``T*H*W, T*H*W`` bool, True = attend.
    """
    if radius < 0:
        raise ValueError(f"attention radius must be >= 0, got {radius}")
    t, h, w = grid
    rows = torch.arange(h, device=device).repeat_interleave(w).repeat(t)
    cols = torch.arange(w, device=device).repeat(t * h)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    return near_rows & ((cols[:, None] - cols[None, :]).abs() <= radius)


def per_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int) -> torch.Tensor:
    """Attention where each token sees only the tokens at its own grid position, in every frame (radius 0).

    Equal to :func:`attention` with ``local_attention_mask(grid, 0)``, but computed as ``H*W`` attentions over
    ``frames`` tokens each, so neither time nor memory grows with the square of the token count.

    Args:
        q, k, v: ``B, heads, N, head_dim`` with ``N = frames * H * W`` ordered (t, h, w).
        frames: T, the grid's frame count.

    Returns:
        ``B, heads, N, head_dim``.
    """
    b, heads, n, d = q.shape
    if n % frames:
        raise ValueError(f"token count {n} is not a multiple of the frame count {frames}")

    def by_position(x: torch.Tensor) -> torch.Tensor:  # B, heads, T*P, D -> B*P, heads, T, D
        return x.reshape(b, heads, frames, n // frames, d).permute(0, 3, 1, 2, 4).reshape(-1, heads, frames, d)

    out = attention(by_position(q), by_position(k), by_position(v))
    return out.reshape(b, n // frames, heads, frames, d).permute(0, 2, 3, 1, 4).reshape(b, heads, n, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` over all tokens, or over those ``mask`` allows (non-causal).

    Args:
        q, k, v: ``B, heads, N, head_dim`` (same dtype and device; k and v may have another N than q).
        mask: optional ``N_q, N_k`` bool, True = attend (every query must allow at least one key).

    Returns:
        ``B, heads, N_q, head_dim`` in q's dtype.
    """
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if attention_backend(q.device) == "xformers":
        # xformers wants B, N, heads, D.
        out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
