"""Stable Video Diffusion VAE adapter (diffusers ``AutoencoderKLTemporalDecoder``).

The encoder is an image encoder (one latent per frame, no temporal compression); the decoder is an image decoder
whose res-blocks mix frames (``SpatioTemporalResBlock``: a temporal convolution blended in by a learned factor) and
whose output goes through a temporal convolution (``time_conv_out``, kernel 3 over time). diffusers decodes a batch
of frames ``(B*F), C, h, w`` as videos of ``num_frames`` frames, and ``StableVideoDiffusionPipeline.decode_latents``
calls it on ``decode_chunk_size`` frames at a time, each chunk on its own. So the output depends on the chunks, and
this adapter decodes in the same chunks (``exact_streaming = False``): ``plan_windows`` cuts the latent into
independent windows of ``window`` frames, the ``window`` of ``model.decode`` plays ``decode_chunk_size``, and
:meth:`plain_decode` is ``vae.decode`` on the same chunks, as the pipeline calls it.

RefDecoder takes ``B, C, F, h, w`` latents (frames on their own axis); the adapter folds frames into the batch for
the diffusers modules and hands the stage hooks ``B, C_i, F, h_i, w_i``. Stage layout (block_out_channels 128, 256,
512, 512; 8x spatial; 4 latent channels): hook points before the three up-sampling ``decoder.up_blocks[0..2]``
with 512 / 512 / 512 channels at H/8, H/4, H/2, patches (1,2,2), (1,4,4), (1,8,8) on one H/16 grid. The reference
passes each block as a one-frame video (its temporal convolutions then see that frame alone: the image path).
diffusers leaves the output unclamped; latents are normalised with ``config.scaling_factor``.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones._diffusers import class_reason
from refdecoder.backbones.base import Fit, StageSpec
from refdecoder.backbones.diffusers_video import DiffusersVideoAdapter, halving_stages
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks
from refdecoder.hooks import plan_windows as split_windows

__all__ = ["StableVideoDiffusionAdapter"]


class StableVideoDiffusionAdapter(DiffusersVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLTemporalDecoder``: independent chunks, as the pipeline decodes."""

    frame_rule: FrameRule = FrameRule(first=1, step=1)  # one latent frame per pixel frame
    causal_first_frame = False
    exact_streaming = False  # the output depends on the chunks (temporal convolutions inside each)
    default_window = 14  # decode_latents' default decode_chunk_size

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(lambda: class_reason(vae, "AutoencoderKLTemporalDecoder"), lambda: _stage_reason(vae))

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow SVD VAE (width 32, the decoder's GroupNorm needs multiples of 32; 8x; 4 latent channels)."""
        from diffusers import AutoencoderKLTemporalDecoder

        width = 32
        kwargs: dict[str, Any] = dict(
            block_out_channels=(width,) * 4, layers_per_block=1, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
        )  # fmt: skip
        kwargs.update(overrides)
        return AutoencoderKLTemporalDecoder(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return 2 ** sum(block.upsamplers is not None for block in self.vae.decoder.up_blocks)

    def stages(self) -> list[StageSpec]:
        points = [
            (i, block.resnets[0].spatial_res_block.conv1.in_channels, 1)
            for i, block in enumerate(self.vae.decoder.up_blocks)
            if block.upsamplers is not None
        ]
        return halving_stages(points, self.spatial_factor, grid=2 * self.spatial_factor)

    def plan_windows(self, num_latent_frames: int, window: int) -> list[tuple[int, int]]:
        """Independent chunks of ``window`` frames (``decode_chunk_size``); :meth:`plain_decode` uses the same."""
        return split_windows(num_latent_frames, window)

    # --- encode / decode ------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``B, 3, T, H, W`` -> ``B, C, T, H/8, W/8``: each frame encoded as an image (posterior mode)."""
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        latents = self.vae.encode(frames).latent_dist.mode()
        return rearrange(latents, "(b t) c h w -> b c t h w", b=video.shape[0])

    def decode_window(self, x: torch.Tensor, state: None, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        """One chunk ``B, C, t, h, w`` as ``vae.decode(z, num_frames=t)`` decodes its ``(B*t), C, h, w`` fold."""
        batch, frames = x.shape[0], x.shape[2]
        decoder = self.vae.decoder
        indicator = x.new_zeros(batch, frames)  # image_only_indicator: 0 = a video frame, as vae.decode passes it
        h = decoder.mid_block(
            decoder.conv_in(rearrange(x, "b c t h w -> (b t) c h w")), image_only_indicator=indicator
        )
        h = h.to(next(decoder.up_blocks.parameters()).dtype)  # TemporalDecoder.forward's cast to the up-blocks' dtype
        stages, reference = len(self.stages()), None  # reference: its features entering stage i
        for i, block in enumerate(decoder.up_blocks):
            if i < stages:  # the hooks see frames on their own axis
                video = rearrange(h, "(b t) c h w -> b c t h w", b=batch)
                video, reference = self.conditioned_stage(i, video, reference, hooks, ctx)
                h = rearrange(video, "b c t h w -> (b t) c h w")
            h = block(h, image_only_indicator=indicator)
        h = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))
        return decoder.time_conv_out(rearrange(h, "(b t) c h w -> b c t h w", b=batch))

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        # Each reference frame is a one-frame video: the temporal convolutions see it alone.
        frames = rearrange(reference, "b c r h w -> (b r) c h w")
        out = self.vae.decoder.up_blocks[index](frames, image_only_indicator=frames.new_zeros(frames.shape[0], 1))
        return rearrange(out, "(b r) c h w -> b c r h w", b=reference.shape[0])

    def check_upscale(self, factor: int) -> None:
        """The upscale head replaces an RGB ``conv_out``; here ``time_conv_out`` follows it and needs 3 channels."""
        if factor > 1:
            from refdecoder.errors import ConfigError

            raise ConfigError(
                f"upscale.factor={factor}: the stable-video-diffusion decoder runs a temporal convolution over the 3 "
                "RGB channels after conv_out (time_conv_out), which an upscale head's 3*s**2 channels cannot feed; "
                "use factor 1"
            )

    def plain_decode(self, latents: torch.Tensor, window: int | None = None, **inputs: Any) -> torch.Tensor:
        """``vae.decode`` on chunks of ``window`` frames (default :attr:`default_window`), as ``decode_latents`` calls
        it with ``decode_chunk_size``; ``B, C, F, h, w`` -> ``B, 3, F, H, W``, unclamped."""
        window = self.default_window if window is None else window
        chunks = []
        for start, stop in self.plan_windows(latents.shape[2], window):
            folded = rearrange(latents[:, :, start:stop], "b c t h w -> (b t) c h w")
            out = self.vae.decode(folded, num_frames=stop - start).sample
            chunks.append(rearrange(out, "(b t) c h w -> b c t h w", b=latents.shape[0]))
        return torch.cat(chunks, dim=2)


def _stage_reason(vae: nn.Module) -> str | None:
    """None when the decoder has an up-sampling block to hook before, else why not."""
    if any(block.upsamplers is not None for block in vae.decoder.up_blocks):
        return None
    levels = len(vae.config.block_out_channels)
    return f"block_out_channels has {levels} level(s): the decoder never up-samples, so it has no stage to condition"
