"""Latent token dropout: zero random latent positions during training so the decoder must use the reference.

Each sample draws its own drop probability ``p ~ U(0, p_max)``, then drops every latent position with probability
p. Dropped values become 0 with no rescaling (the decoder should learn to fill them in, not to expect a scaled
input). ``"spatial"`` (the official behaviour) makes one decision per spatial position shared by all channels and
frames; ``"spatiotemporal"`` (the paper's text) decides per frame too.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from refdecoder.errors import ConfigError, InputError

__all__ = ["latent_token_dropout", "LatentTokenDropout"]

Mode = Literal["spatial", "spatiotemporal"]


def latent_token_dropout(
    x: torch.Tensor,
    p_max: float,
    mode: Mode = "spatial",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero random latent positions of ``x`` (always applied; see :class:`LatentTokenDropout` for train-only).

    Args:
        x: ``B, C, T, H, W`` latents.
        p_max: upper bound of the per-sample drop probability, in [0, 1].
        mode: ``"spatial"`` (mask ``B, 1, 1, H, W``: shared by channels and frames) or ``"spatiotemporal"``
            (mask ``B, 1, T, H, W``: shared by channels).
        generator: RNG for the draws (on any device; the mask is moved to ``x``'s device).

    Returns:
        ``x`` with dropped positions set to 0, same shape and dtype.
    """
    if x.ndim != 5:
        raise InputError(f"latent token dropout expects latents B, C, T, H, W, got shape {tuple(x.shape)}")
    if not 0.0 <= p_max <= 1.0:
        raise ConfigError(f"p_max must be in [0, 1], got {p_max}")
    b, _, t, h, w = x.shape
    mask_shape = {"spatial": (b, 1, 1, h, w), "spatiotemporal": (b, 1, t, h, w)}.get(mode)
    if mask_shape is None:
        raise ConfigError(f"token dropout mode must be 'spatial' or 'spatiotemporal', got {mode!r}")
    device = generator.device if generator is not None else x.device
    p = torch.rand(b, 1, 1, 1, 1, generator=generator, device=device) * p_max
    drop = torch.rand(mask_shape, generator=generator, device=device) < p
    return x.masked_fill(drop.to(x.device), 0.0)


class LatentTokenDropout(nn.Module):
    """Training-only :func:`latent_token_dropout`; identity in eval mode or with ``p_max == 0``.

    Args:
        p_max: upper bound of the per-sample drop probability (0.7 in the official Wan training).
        mode: ``"spatial"`` or ``"spatiotemporal"``.

    ``forward(x, ctx=None)`` takes ``B, C, T, H, W`` latents; when ``ctx`` (the per-decode context) has a non-None
    ``generator`` attribute, the draws use it.
    """

    def __init__(self, p_max: float = 0.7, mode: Mode = "spatial") -> None:
        super().__init__()
        if not 0.0 <= p_max <= 1.0:
            raise ConfigError(f"p_max must be in [0, 1], got {p_max}")
        if mode not in ("spatial", "spatiotemporal"):
            raise ConfigError(f"token dropout mode must be 'spatial' or 'spatiotemporal', got {mode!r}")
        self.p_max, self.mode = p_max, mode

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self.training or self.p_max == 0:
            return x
        return latent_token_dropout(x, self.p_max, self.mode, getattr(ctx, "generator", None))

    def extra_repr(self) -> str:
        return f"p_max={self.p_max}, mode={self.mode!r}"
