"""Wan2.2 VAE adapter (diffusers ``AutoencoderKLWan`` with ``is_residual=True``: the TI2V-5B layout).

The decoder's up-blocks are residual (``WanResidualUpBlock``): besides the res-blocks and the up-sampler, a
parameter-free ``avg_shortcut`` (channel repeat + depth-to-space) is added, and on the first chunk it drops its
extra leading frame, which is why these blocks must see diffusers' ``first_chunk`` flag. The decoder writes a
patchified output (``patch_size`` 2: 12 channels at H/2) that is unpatchified to 3 channels at H, for 16x spatial
compression with 48 latent channels.

Stage layout (decoder_base_dim 256): hook points before ``decoder.up_blocks[0..2]`` with 1024 / 1024 / 1024 channels
at H/16, H/8, H/4; blocks 0 and 1 double the frame count; block 3 refines at H/2 without up-sampling. Default token
patches (1,2,2), (1,4,4), (1,8,8) put every stage on one H/32 grid (2x2 latent positions, as for Wan2.1).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from refdecoder.backbones.wan.family import WanFamilyAdapter

__all__ = ["Wan22Adapter"]


class Wan22Adapter(WanFamilyAdapter):
    """Adapter for diffusers ``AutoencoderKLWan`` with the Wan2.2 residual layout (any ``patch_size``)."""

    vae_class = "AutoencoderKLWan"
    expected_config = {"is_residual": True}

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A reduced-width Wan2.2-architecture VAE (base_dim 8, decoder 16, z_dim 8, patch 2, 16x): CPU-fast."""
        from diffusers import AutoencoderKLWan

        defaults = dict(base_dim=8, decoder_base_dim=16, z_dim=8, is_residual=True, patch_size=2)
        defaults.update(in_channels=12, out_channels=12, scale_factor_spatial=16)
        return cls._tiny(AutoencoderKLWan, overrides, **defaults)
