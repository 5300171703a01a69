"""Wan2.1 VAE adapter (diffusers ``AutoencoderKLWan`` with ``is_residual=False`` and no patchify).

Stage layout (base_dim 96): hook points before ``decoder.up_blocks[0..2]`` with 384 / 192 / 192 channels at H/8,
H/4, H/2; blocks 0 and 1 double the frame count. Default token patches (1,2,2), (1,4,4), (1,8,8) put every stage on
the same H/16 token grid (the paper's layout).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from refdecoder.backbones.wan.family import WanFamilyAdapter

__all__ = ["WanAdapter"]


class WanAdapter(WanFamilyAdapter):
    """Adapter for diffusers ``AutoencoderKLWan`` with the Wan2.1 layout."""

    vae_class = "AutoencoderKLWan"
    expected_config = {"is_residual": False, "patch_size": None}

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A reduced-width Wan2.1-architecture VAE (base_dim 8, z_dim 4): milliseconds per decode on CPU."""
        from diffusers import AutoencoderKLWan

        return cls._tiny(AutoencoderKLWan, overrides, base_dim=8, z_dim=4)
