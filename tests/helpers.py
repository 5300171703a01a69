"""Small builders shared by the core tests."""

from __future__ import annotations

from pathlib import Path

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


def save_random_model(root: Path) -> dict[str, Path]:
    """A tiny Wan VAE saved as a diffusers folder ``root/vae`` and random RefDecoder weights for it in
    ``root/weights`` (what ``--vae`` / ``--weights`` take)."""
    import refdecoder

    vae = tiny_wan()
    vae.save_pretrained(root / "vae")
    model = refdecoder.wrap(vae, "tiny")
    for part in (model.tokenizer, model.transformer, model.projectors):
        randomize_(part, scale=0.1)
    model.save_pretrained(root / "weights")
    model.unwrap()
    return {"vae": root / "vae", "weights": root / "weights"}
