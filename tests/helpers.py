"""Small builders shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn

from refdecoder.backbones.wan import WanAdapter
from refdecoder.testing import randomize_  # noqa: F401  (re-exported for the tests)


def tiny_wan(seed: int = 0, **overrides) -> nn.Module:
    """Reduced-width Wan2.1-architecture VAE in eval mode (base_dim 8, z_dim 4)."""
    torch.manual_seed(seed)
    return WanAdapter.build_tiny(**overrides).eval()


def latents_for(vae: nn.Module, frames: int, h: int = 4, w: int = 6, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vae.config.z_dim, frames, h, w, generator=g)


def reference_for(latents: torch.Tensor, frames: int = 1, seed: int = 1, spatial: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, _, _, h, w = latents.shape
    return torch.rand(b, 3, frames, h * spatial, w * spatial, generator=g) * 2 - 1
