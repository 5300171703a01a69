"""The transformer shared by every decoder stage: pre-norm self-attention + feed-forward blocks with 3-D RoPE.

Layout follows the Wan DiT block without timestep modulation or cross-attention (the official RefDecoder
transformer), so official weights map one to one: LayerNorm without affine -> self-attention with q/k RMS norm
over the full width -> residual; LayerNorm -> GELU(tanh) FFN -> residual.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from refdecoder.blocks.attention import attention, local_attention_mask, per_position_attention
from refdecoder.blocks.norms import FP32LayerNorm, RMSNorm
from refdecoder.blocks.rope import RotaryEmbedding3D, apply_rope
from refdecoder.errors import ConfigError, InputError

__all__ = ["SelfAttention", "FeedForward", "TransformerBlock", "SharedTransformer"]

Rope = tuple[torch.Tensor, torch.Tensor]
# Which keys a query sees: None = all; an int T = only its own grid position in each of T frames; a bool N x N mask.
Scope = torch.Tensor | int | None


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMS norm (over all heads together) and RoPE.

    Args:
        dim: token width (``num_heads * head_dim``).
        num_heads: heads; head ``h`` takes channels ``[h*head_dim, (h+1)*head_dim)``.
        eps: RMS-norm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rope: Rope, scope: Scope = None) -> torch.Tensor:
        """``B, N, dim`` tokens, ``(cos, sin)`` tables ``N, head_dim`` and the attention scope -> ``B, N, dim``."""
        # The norms act on the full width before the heads are split (as the official checkpoints expect).
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(x)))
        v = self._heads(self.to_v(x))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(scope, int):
            out = per_position_attention(q, k, v, scope)
        else:
            out = attention(q, k, v, scope)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class FeedForward(nn.Module):
    """``Linear(dim, ffn_dim) -> GELU(tanh) -> Linear(ffn_dim, dim)`` on ``..., dim`` tokens."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``; norms are float32 LayerNorms, no affine.

    Args:
        dim: token width.
        num_heads: attention heads (``dim`` must be divisible by it).
        ffn_dim: hidden width of the feed-forward layers.
        eps: epsilon of the LayerNorms and the q/k RMS norms.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x: torch.Tensor, rope: Rope, scope: Scope = None) -> torch.Tensor:
        """``B, N, dim`` tokens, ``(cos, sin)`` tables ``N, head_dim`` and the attention scope -> ``B, N, dim``."""
        x = x + self.attn(self.norm1(x), rope, scope)
        return x + self.ffn(self.norm2(x))


class SharedTransformer(nn.Module):
    """A stack of :class:`TransformerBlock` that every decoder stage calls with its own token grid.

    Args:
        dim: token width (``num_heads * head_dim``).
        depth: number of blocks.
        num_heads: attention heads.
        ffn_dim: feed-forward width; default ``4 * dim``.
        rope_theta: RoPE base.
        eps: norm epsilon.
        attention_radius: None = global attention over every token of a stage; r >= 0 = each token sees only the
            tokens within r rows and columns of it, in every frame (see
            :func:`~refdecoder.blocks.attention.local_attention_mask`). A locality prior that makes the reference
            token at the same position easy to find. Radius 0 runs as per-position attention over the frames
            (cheaper than global); a larger radius costs an ``N x N`` bool mask per stage grid.

    The same instance serves all stages (shared weights) and keeps no per-stage state; the stage-specific parts
    (patch embedding, output projection) live in each stage's :class:`~refdecoder.blocks.StageProjector`. Set
    ``gradient_checkpointing = True`` to recompute each block in the backward pass while training.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        ffn_dim: int | None = None,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
        attention_radius: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"transformer width {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, ffn_dim if ffn_dim is not None else 4 * dim, eps) for _ in range(depth)
        )
        self.rope = RotaryEmbedding3D(dim // num_heads, rope_theta)
        if attention_radius is not None and attention_radius < 0:
            raise ConfigError(f"attention_radius must be None (global) or >= 0, got {attention_radius}")
        self.attention_radius = attention_radius
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
        self.gradient_checkpointing = False

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.dim // self.num_heads

    def forward(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int, int],
        time_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run all blocks over one token sequence.

        Args:
            tokens: ``B, N, dim`` with ``N = T*H*W`` ordered (t, h, w), w fastest.
            grid: ``(T, H, W)`` token grid.
            time_positions: ``(T,)`` integer RoPE time index per grid frame; default ``arange(T)``.

        Returns:
            ``B, N, dim``.
        """
        t, h, w = grid
        if tokens.ndim != 3 or tokens.shape[1] != t * h * w or tokens.shape[2] != self.dim:
            raise InputError(
                f"tokens must be B, T*H*W={t * h * w}, {self.dim} for grid {tuple(grid)}, "
                f"got shape {tuple(tokens.shape)}"
            )
        rope = self.rope(grid, time_positions, device=tokens.device)
        scope = self._scope(grid, tokens.device)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                tokens = checkpoint(block, tokens, rope, scope, use_reentrant=False)
            else:
                tokens = block(tokens, rope, scope)
        return tokens

    def _scope(self, grid: tuple[int, int, int], device: torch.device) -> Scope:
        """None (global), the frame count (radius 0), or the local mask for ``grid`` (the last one is reused)."""
        if self.attention_radius is None:
            return None
        if self.attention_radius == 0:
            return int(grid[0])
        key = (tuple(int(v) for v in grid), device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, local_attention_mask(key[0], self.attention_radius, device))
        return self._mask_cache[1]

    def extra_repr(self) -> str:
        scope = "global" if self.attention_radius is None else f"radius {self.attention_radius}"
        return f"dim={self.dim}, heads={self.num_heads}, head_dim={self.head_dim}, attention={scope}"
