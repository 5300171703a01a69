"""Qwen-Image 2.1 VAE adapter (diffusers ``AutoencoderKLQwenImage21``).

Not the Qwen-Image (Wan2.1-copy) decoder: residual up-blocks whose shortcut duplicates channels into space
(``QwenImage21ResidualUpBlock``, ``is_residual=True`` in the release; the plain ``QwenImage21UpBlock`` otherwise), 2D
convolutions wrapped as "causal 3D" ones that squeeze a single frame and refuse a cache, 64 latent channels, 16x
spatial compression, and 4-channel **RGBA** pixels in and out (``in_channels = out_channels = 4``).

It is an image VAE: ``vae.decode`` decodes exactly one latent frame (with two, its 2D convolutions get a 5D tensor
they cannot squeeze and raise; past that, the cache it would hand them is refused too), and its pipelines
(``QwenImage21Pipeline``, the modular ``QwenImage21`` blocks) decode ``B, C, 1, h, w``. So this adapter decodes a
latent video as a sequence of images: frame rule ``1 + 1k``, every latent frame is one pixel frame decoded on its
own (frames folded into the batch, the way ``vae.decode`` decodes a batch of images), and :meth:`plain_decode` is
one ``vae.decode`` call on that fold, so at one latent frame it *is* ``vae.decode``. Windows only group frames that
never interact, so streaming is exact (``exact_streaming``). The upsample3d time convolutions are never used by
``vae.decode`` (frame 0 takes the ``"Rep"`` path), nor here.

Stage layout (release: ``decoder_base_dim`` 144, ``dim_mult`` 1, 2, 4, 8, 8; four up-sampling blocks): hook points
before the last three, ``decoder.up_blocks[1..3]``, with 1152 / 1152 / 576 channels at H/8, H/4, H/2, as the
presets' three stages expect; ``up_blocks[0]`` (H/16 -> H/8) runs unconditioned. Token patches (1,2,2), (1,4,4),
(1,8,8) put every stage on one H/16 grid (one latent position per token).

Pixel channels: :attr:`pixel_channels` is ``config.out_channels`` (4: RGBA). Videos, references (the pipelines'
conditioning images are converted to RGBA too) and the reference tokenizer carry all 4 channels; alpha is never
dropped. LPIPS refuses non-RGB frames in one line, so RGBA training uses pixel losses (docs/backbones.md).
Output is clamped to [-1, 1] as ``vae.decode`` does; latents are normalised with ``latents_mean`` / ``latents_std``.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones._diffusers import MeanStdLatents, class_reason
from refdecoder.backbones.base import Fit, StageSpec
from refdecoder.backbones.diffusers_video import DiffusersVideoAdapter, halving_stages, refuse_vae_tiling
from refdecoder.errors import ConfigError
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

__all__ = ["QwenImage21Adapter"]


def _images(x: torch.Tensor) -> torch.Tensor:
    """``B, C, T, H, W`` -> ``(B*T), C, 1, H, W``: every frame an image of its own (the modules take one frame)."""
    return rearrange(x, "b c t h w -> (b t) c 1 h w")


def _video(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of :func:`_images`."""
    return rearrange(x, "(b t) c 1 h w -> b c t h w", b=batch)


class QwenImage21Adapter(MeanStdLatents, DiffusersVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLQwenImage21``: each latent frame decoded as one (RGBA) image."""

    frame_rule: FrameRule = FrameRule(first=1, step=1)
    causal_first_frame = False  # no temporal up-sampling at all: every latent frame makes one pixel frame
    default_window = 4
    output_clamp = True  # vae.decode clamps to [-1, 1]

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(lambda: class_reason(vae, "AutoencoderKLQwenImage21"), lambda: _config_reasons(vae))

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow Qwen-Image 2.1 VAE (width 8, 8x, 4 latent channels, RGBA in and out, residual up-blocks)."""
        from diffusers import AutoencoderKLQwenImage21

        kwargs: dict[str, Any] = dict(
            base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True], scale_factor_spatial=8,
        )  # fmt: skip
        kwargs.update(overrides)
        MeanStdLatents.tiny_statistics(kwargs, kwargs["z_dim"])
        return AutoencoderKLQwenImage21(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def pixel_channels(self) -> int:
        return int(self.vae.config.out_channels)

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self._up_blocks())

    def stages(self) -> list[StageSpec]:
        """Before the last three up-sampling blocks (all of them when fewer): the presets' three stages."""
        blocks, hooked = self.vae.decoder.up_blocks, self._hooked_blocks()
        points = [(k, blocks[i].resnets[0].in_dim, 1) for k, i in enumerate(hooked)]
        scale = 2 ** len(hooked)  # the blocks before the first hooked one have already up-sampled
        return halving_stages(points, scale, grid=2 * scale)

    def _hooked_blocks(self) -> list[int]:
        """Indices of the up-blocks that stages 0, 1, 2 sit before."""
        return self._up_blocks()[-3:]

    def _up_blocks(self) -> list[int]:
        """Indices of the up-blocks that double H and W (residual blocks: ``upsampler``; plain: ``upsamplers``)."""
        blocks = self.vae.decoder.up_blocks
        return [
            i for i, b in enumerate(blocks)
            if getattr(b, "upsampler", None) is not None or getattr(b, "upsamplers", None) is not None
        ]  # fmt: skip

    def check_upscale(self, factor: int) -> None:
        if factor > 1:
            raise ConfigError(
                f"upscale.factor={factor}: the qwen-image-2.1 decoder's conv_out is a 2D conv wrapped as a causal "
                f"3D one writing {self.pixel_channels} channels, which the upscale head (an RGB output conv) does "
                "not replace; use factor 1"
            )

    # --- encode / decode ------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``B, C_px, T, H, W`` in [-1, 1] -> ``B, z, T, H/16, W/16``: each frame encoded as an image (posterior
        mode), as ``vae.encode`` encodes one frame."""
        return _video(self.vae.encode(_images(video)).latent_dist.mode(), video.shape[0])

    def decoder_input(self, latents: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
        return _video(self.vae.post_quant_conv(_images(latents)), latents.shape[0])

    def decode_window(self, x: torch.Tensor, state: None, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        """``B, z, t, h, w`` (after ``post_quant_conv``) -> unclamped ``B, C_px, t, H, W``, frame by frame."""
        refuse_vae_tiling(self.vae, x, self.spatial_factor, "qwen-image-2.1")
        batch, decoder = x.shape[0], self.vae.decoder
        stages = {block: k for k, block in enumerate(self._hooked_blocks())}
        # QwenImage21Decoder3d.forward on single frames, as vae.decode runs it for frame 0 (first_chunk=True, no
        # cache: the image path), with the stage hooks before the up-sampling blocks.
        h, reference = decoder.mid_block(decoder.conv_in(_images(x))), None  # reference: entering stage i
        for i, block in enumerate(decoder.up_blocks):
            if i in stages:
                video, reference = self.conditioned_stage(stages[i], _video(h, batch), reference, hooks, ctx)
                h = _images(video)
            h = block(h, first_chunk=True)
        h = decoder.conv_out(decoder.nonlinearity(decoder.norm_out(h)))
        return _video(h, batch)

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        # Each reference frame is an image, as every decoded frame is.
        block = self.vae.decoder.up_blocks[self._hooked_blocks()[index]]
        return _video(block(_images(reference), first_chunk=True), reference.shape[0])

    def plain_decode(self, latents: torch.Tensor, window: int | None = None, **inputs: Any) -> torch.Tensor:
        """One ``vae.decode`` of the latent frames folded into the batch (clamped, as it clamps)."""
        return _video(self.vae.decode(_images(latents)).sample, latents.shape[0])


def _config_reasons(vae: nn.Module) -> list[str]:
    """Config fields this adapter does not drive: a patchified output, or pixels in and out of different widths."""
    reasons = []
    if vae.config.patch_size not in (None, 1):
        reasons.append(f"patch_size={vae.config.patch_size} (qwen-image-2.1 needs None: unpatchified output)")
    if vae.config.in_channels != vae.config.out_channels:
        reasons.append(
            f"in_channels={vae.config.in_channels} != out_channels={vae.config.out_channels} (qwen-image-2.1 needs "
            "the same pixel channels in and out: the reference is encoded like the video)"
        )
    return reasons
