"""What the HunyuanVideo 1.5, LTX-Video and CogVideoX adapters share: diffusers ``AutoencoderKL*`` conventions.

Their VAEs name the latent width ``config.latent_channels``, encode to a ``DiagonalGaussianDistribution`` whose mode
is the latent (the base adapter's default encode), keep the decoder under ``decoder`` (plus an optional
``post_quant_conv``), leave their decoded output unclamped, and their pipelines scale latents by
``config.scaling_factor``. Stages are up-sampling blocks whose spatial scale halves from block to block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones.base import BackboneAdapter, StageSpec
from refdecoder.errors import BackboneError

__all__ = ["DiffusersVideoAdapter", "halving_stages", "each_frame_alone", "refuse_vae_tiling"]


class DiffusersVideoAdapter(BackboneAdapter):
    """Base of the adapters for diffusers video VAEs that are not Wan-family (no per-conv cache list)."""

    output_clamp = False  # their vae.decode returns the decoder's output as it is

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw -> pipeline latents: ``z * scaling_factor`` (the pipelines decode ``z / scaling_factor``)."""
        return latents * self.vae.config.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor

    def decoder_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for prefix in ("post_quant_conv", "decoder"):
            module = getattr(self.vae, prefix, None)
            for name, param in module.named_parameters() if module is not None else ():
                yield f"{prefix}.{name}", param


def refuse_vae_tiling(vae: nn.Module, x: torch.Tensor, factor: int, backbone: str) -> None:
    """Raise :class:`BackboneError` when the VAE's own spatial tiling (``tile_sample_min_height/width`` pixels)
    would tile the ``..., h, w`` latent ``x``, which the ``backbone`` adapter does not reproduce."""
    tiles = (vae.tile_sample_min_height // factor, vae.tile_sample_min_width // factor)
    if vae.use_tiling and (x.shape[-2] > tiles[0] or x.shape[-1] > tiles[1]):
        raise BackboneError(
            f"the VAE's own spatial tiling is on (vae.enable_tiling()) and would tile this {x.shape[-2]}x"
            f"{x.shape[-1]} latent, which the {backbone} adapter does not reproduce: call vae.disable_tiling() "
            "(RefDecoder's own tiles: iter_decode(..., tiles=plan_tiles(...)) or --tile)"
        )


def halving_stages(points: Iterable[tuple[int, int, int]], scale: int, grid: int) -> list[StageSpec]:
    """``StageSpec`` s for up-sampling blocks ``(index, channels, time_factor)`` in call order.

    The first sits at ``scale`` (pixels per feature position) and each following one at half the previous;
    token patches put every stage on one grid of ``grid`` pixels per token.
    """
    specs = []
    for index, channels, time_factor in points:
        patch = grid // scale
        specs.append(StageSpec(f"stage{index}", channels, scale, (1, patch, patch), time_factor))
        scale //= 2
    return specs


def each_frame_alone(block: nn.Module, reference: torch.Tensor) -> torch.Tensor:
    """``B, C, R, h, w`` reference features through a causal 3D ``block``, each of the R frames as a one-frame video.

    Frames are folded into the batch so they never mix in time; for a causal decoder block one frame is the image
    path (replicate padding sees only that frame, up-samplers keep frame 0 one frame). Returns ``B, C', R, h', w'``.
    """
    out = block(rearrange(reference, "b c r h w -> (b r) c 1 h w"))
    return rearrange(out, "(b r) c 1 h w -> b c r h w", b=reference.shape[0])
