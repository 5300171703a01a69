"""Qwen-Image VAE adapter (diffusers ``AutoencoderKLQwenImage``).

The Qwen-Image VAE is a copy of the Wan2.1 VAE under other class names: the same causal-cache decoder, 16 latent
channels, 8x spatial and 4x temporal compression, but its up-blocks take no ``first_chunk`` argument. Its pipelines
(text-to-image, edit, image-to-image, inpaint) decode one latent frame; the natural reference is another image, the
edit source or the input of an image-to-image step. ``AutoencoderKLQwenImage21`` is a different decoder (residual
up-blocks, 2D convolutions that take no cache, 64 latent channels) and is not driven by this adapter.

Stage layout (base_dim 96): as Wan2.1, 384 / 192 / 192 channels at H/8, H/4, H/2 on one H/16 token grid.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from refdecoder.backbones.wan.family import WanFamilyAdapter

__all__ = ["QwenImageAdapter"]


class QwenImageAdapter(WanFamilyAdapter):
    """Adapter for diffusers ``AutoencoderKLQwenImage``."""

    vae_class = "AutoencoderKLQwenImage"
    passes_first_chunk = False

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A reduced-width Qwen-Image VAE (base_dim 8, z_dim 4): milliseconds per decode on CPU."""
        from diffusers import AutoencoderKLQwenImage

        return cls._tiny(AutoencoderKLQwenImage, overrides, base_dim=8, z_dim=4)
