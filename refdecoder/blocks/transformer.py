"""The transformer shared by every decoder stage: pre-norm self-attention + feed-forward blocks with 3-D RoPE.

Layout follows the Wan DiT block without timestep modulation or cross-attention (the official RefDecoder
transformer), so official weights map one to one: LayerNorm without affine -> self-attention with q/k RMS norm
over the full width -> residual; LayerNorm -> GELU(tanh) FFN -> residual.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from refdecoder.blocks.attention import attention
from refdecoder.blocks.attention_scope import AttentionScope, scoped_attention
from refdecoder.blocks.guided_attention import ReferenceGuide, guided_neighbourhood_attention
from refdecoder.blocks.locality_bias import LocalityBias
from refdecoder.blocks.norms import FP32LayerNorm, RMSNorm
from refdecoder.blocks.rope import RotaryEmbedding3D, apply_rope
from refdecoder.errors import ConfigError, InputError

__all__ = ["SelfAttention", "FeedForward", "TransformerBlock", "SharedTransformer"]

Rope = tuple[torch.Tensor, torch.Tensor]


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMS norm (over all heads together), RoPE and an optional locality bias.

    Args:
        dim: token width (``num_heads * head_dim``).
        num_heads: heads; head ``h`` takes channels ``[h*head_dim, (h+1)*head_dim)``.
        eps: RMS-norm epsilon.
        locality_bias: optional :class:`~refdecoder.blocks.LocalityBias` added to this layer's logits (its own
            table; the prior is learned per layer).
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, locality_bias: LocalityBias | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.locality_bias = locality_bias

    def forward(
        self, x: torch.Tensor, rope: Rope, scope: AttentionScope | None = None, guide: ReferenceGuide | None = None
    ) -> torch.Tensor:
        """``B, N, dim`` tokens, ``(cos, sin)`` tables ``N, head_dim`` and the attention scope -> ``B, N, dim``.

        ``scope=None`` attends over all tokens (a layer with a locality bias needs the scope of its grid). With a
        ``guide``, the video queries' reference neighbourhoods are centred on its displacements
        (:func:`~refdecoder.blocks.guided_attention.guided_neighbourhood_attention`).
        """
        if scope is None and self.locality_bias is not None:
            raise InputError("this attention layer has a locality bias: pass the AttentionScope of the token grid")
        # The norms act on the full width before the heads are split (as the official checkpoints expect).
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(x)))
        v = self._heads(self.to_v(x))
        q, k_rotated = apply_rope(q, *rope), apply_rope(k, *rope)
        if guide is not None:
            out = guided_neighbourhood_attention(
                q, k_rotated, k, v, scope, guide.displacement, guide.reference_times, guide.rope_theta,
                self.locality_bias, integral=guide.integral,
            )  # fmt: skip
        elif scope is None:
            out = attention(q, k_rotated, v)
        else:
            out = scoped_attention(q, k_rotated, v, scope, self.locality_bias)
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
        locality_bias: optional locality prior of the attention.
    """

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, eps: float = 1e-6, locality_bias: LocalityBias | None = None
    ) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, eps, locality_bias)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(
        self, x: torch.Tensor, rope: Rope, scope: AttentionScope | None = None, guide: ReferenceGuide | None = None
    ) -> torch.Tensor:
        """``B, N, dim`` tokens, ``(cos, sin)`` tables ``N, head_dim``, the attention scope and an optional
        reference guide -> ``B, N, dim``."""
        x = x + self.attn(self.norm1(x), rope, scope, guide)
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
        attention_radius: None = global attention over every token of a stage (the paper); r >= 0 = each token
            sees only the tokens within r rows and columns of it, in every frame (see
            :class:`~refdecoder.blocks.AttentionScope`). Radius 0 runs as per-position attention over the frames;
            r >= 1 as neighbourhood attention, with memory linear in the tokens, never ``N x N``.
        video_attention_radius: with a local ``attention_radius``, the radius in the video frames (None: the same;
            0: a query sees its own position in the video frames and a neighbourhood in the reference).
        locality_bias: add a learnable per-head, per-layer bias by spatial offset
            (:class:`~refdecoder.blocks.LocalityBias`), starting concentrated on the query's own position.
        locality_bias_slope: its initial slope per token of distance.
        locality_bias_extent: its reach with global attention (offsets beyond share the edge value); a local scope
            uses its largest radius.

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
        video_attention_radius: int | None = None,
        locality_bias: bool = False,
        locality_bias_slope: float = 3.0,
        locality_bias_extent: int = 4,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"transformer width {dim} must be divisible by num_heads {num_heads}")
        try:  # the scope checks the radii once here, not at the first decode
            AttentionScope((1, 1, 1), 0, attention_radius, video_attention_radius)
        except ValueError as err:
            raise ConfigError(f"invalid attention scope: {err}") from err
        self.dim, self.num_heads = dim, num_heads
        self.attention_radius, self.video_attention_radius = attention_radius, video_attention_radius
        if attention_radius is not None:
            locality_bias_extent = max(attention_radius, video_attention_radius or 0)

        def bias() -> LocalityBias | None:
            return LocalityBias(num_heads, locality_bias_extent, locality_bias_slope) if locality_bias else None

        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, ffn_dim if ffn_dim is not None else 4 * dim, eps, bias())
            for _ in range(depth)
        )
        self.rope = RotaryEmbedding3D(dim // num_heads, rope_theta)
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
        num_reference: int = 0,
        displacement: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run all blocks over one token sequence.

        Args:
            tokens: ``B, N, dim`` with ``N = T*H*W`` ordered (t, h, w), w fastest.
            grid: ``(T, H, W)`` token grid.
            time_positions: ``(T,)`` integer RoPE time index per grid frame; default ``arange(T)``.
            num_reference: leading grid frames that are reference frames (they may have their own attention
                radius and locality-bias table).
            displacement: optional ``B, R, 2, T - R, H, W`` ``(dy, dx)`` in tokens: where each video token's content
                lies in each reference frame; the reference neighbourhoods are centred there (needs a local radius).

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
        scope = AttentionScope(
            tuple(int(v) for v in grid), num_reference, self.attention_radius, self.video_attention_radius
        )
        guide = None
        if displacement is not None:
            if scope.is_global:
                raise InputError("displacements need a local attention_radius (global attention has no neighbourhood)")
            times = torch.arange(t) if time_positions is None else time_positions.reshape(-1)
            guide = ReferenceGuide.for_stage(displacement, times[:num_reference], self.rope.theta)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                tokens = checkpoint(block, tokens, rope, scope, guide, use_reentrant=False)
            else:
                tokens = block(tokens, rope, scope, guide)
        return tokens

    def extra_repr(self) -> str:
        if self.attention_radius is None:
            scope = "global"
        else:
            scope = f"radius {self.attention_radius}"
            if self.video_attention_radius is not None:
                scope += f" (video {self.video_attention_radius})"
        bias = self.blocks[0].attn.locality_bias if len(self.blocks) else None
        prior = f", locality_bias=extent {bias.extent}" if bias is not None else ""
        return f"dim={self.dim}, heads={self.num_heads}, head_dim={self.head_dim}, attention={scope}{prior}"
