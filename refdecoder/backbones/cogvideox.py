"""CogVideoX VAE adapter (diffusers ``AutoencoderKLCogVideoX``).

diffusers decodes CogVideoX in frame batches of ``vae.num_latent_frames_batch_size`` (2) latent frames, the first
batch taking one more when the count is odd, and threads ``conv_cache`` dicts from batch to batch. Its GroupNorms
normalise over all frames of a batch, so the output depends on the batching: this adapter decodes in exactly those
batches, whatever window is asked (``exact_streaming = False``; the caches carry, so it equals ``vae.decode`` and
memory depends on the batch, not on the length), and stage attention spans one batch (3 or 2 latent frames).

Frames: odd latent counts only. A batch of ``t`` latent frames decodes to ``4t - 3`` frames when ``t`` is odd and
``4t`` when even, so only odd counts give the ``1 + 4k`` videos the encoder makes of ``1 + 8k`` frames (the
pipelines' 49 frames are 13 latents); even counts raise :class:`~refdecoder.errors.InputError`. The frame rule is
``1 + 8k`` pixel frames to ``1 + 2k`` latent frames (:class:`OddLatentRule`).

Stage inputs beyond the hidden state: every res-block's SpatialNorm is conditioned on the latent ``zq`` of the
batch. The reference has no latent, so the adapter encodes the reference frame with the frozen encoder (posterior
mode, no gradients, once per decode) and uses that as its ``zq``: a lone reference frame then passes each block
exactly as a one-frame video with that image as its latent would.

Stage layout (block_out_channels 128, 256, 256, 512; 8x spatial, 4x temporal; 16 latent channels): hook points
before ``decoder.up_blocks[0..2]`` with 512 / 512 / 256 channels at H/8, H/4, H/2; blocks 0 and 1 double the frame
count. Default token patches (1,2,2), (1,4,4), (1,8,8) (one H/16 grid, as for Wan2.1). Latents are normalised with
``config.scaling_factor`` (the pipelines decode ``z / scaling_factor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from refdecoder.backbones._diffusers import class_reason, config_reasons
from refdecoder.backbones.base import Fit, StageSpec
from refdecoder.backbones.diffusers_video import DiffusersVideoAdapter, halving_stages
from refdecoder.errors import BackboneError, InputError
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

__all__ = ["CogVideoXAdapter", "OddLatentRule"]


@dataclass(frozen=True)
class OddLatentRule(FrameRule):
    """``1 + 8k`` pixel frames <-> ``1 + 2k`` latent frames (``first=1, step=8``): CogVideoX's round trip."""

    def latent_frames(self, pixel_frames: int) -> int:
        self.check(pixel_frames)
        return 1 + 2 * (pixel_frames - self.first) // self.step

    def pixel_frames(self, latent_frames: int) -> int:
        if latent_frames < 1 or latent_frames % 2 == 0:
            raise InputError(
                f"got {latent_frames} latent frames, but CogVideoX decodes an odd count (1, 3, 5, ..., 13 for 49 "
                "frames): an even count decodes to 4t frames, which no 1 + 4k video encodes to"
            )
        return 1 + self.step * (latent_frames - 1) // 2


class CogVideoXAdapter(DiffusersVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLCogVideoX``: its own frame batches, caches carried; ``zq`` for the
    reference from the frozen encoder."""

    frame_rule: FrameRule = OddLatentRule(first=1, step=8)
    causal_first_frame = True
    exact_streaming = False

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(
            lambda: class_reason(vae, "AutoencoderKLCogVideoX"),
            lambda: config_reasons(vae, {"temporal_compression_ratio": 4}, cls.name),
        )

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow CogVideoX VAE (widths 8..32, GroupNorm of 4 groups, one res-block per level, 4 latents)."""
        from diffusers import AutoencoderKLCogVideoX

        kwargs: dict[str, Any] = dict(
            block_out_channels=(8, 16, 16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=4
        )
        kwargs.update(overrides)
        return AutoencoderKLCogVideoX(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    def stages(self) -> list[StageSpec]:
        # The last block refines at the output resolution; the others up-sample (blocks 0 and 1 in time too).
        blocks = [(i, b) for i, b in enumerate(self.vae.decoder.up_blocks) if b.upsamplers is not None]
        points = [
            (i, b.resnets[0].conv1.conv.in_channels, 2 if b.upsamplers[0].compress_time else 1) for i, b in blocks
        ]
        return halving_stages(points, self.spatial_factor, grid=2 * self.spatial_factor)

    def plan_windows(self, num_latent_frames: int, window: int) -> list[tuple[int, int]]:
        """diffusers' frame batches (``AutoencoderKLCogVideoX._decode``), whatever ``window`` is asked."""
        size = self.vae.num_latent_frames_batch_size
        extra = num_latent_frames % size
        # diffusers slices past the end for a one-frame latent; the stop is clipped here so the window is exact.
        return [
            (size * i + (0 if i == 0 else extra), min(size * (i + 1) + extra, num_latent_frames))
            for i in range(max(num_latent_frames // size, 1))
        ]

    # --- decoding -------------------------------------------------------------------------------------------
    def decoder_input(self, latents: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
        # A 1x1x1 conv when present (use_post_quant_conv), so applying it once equals diffusers' per batch.
        conv = self.vae.post_quant_conv
        return latents if conv is None else conv(latents)

    def begin_decode(self, x: torch.Tensor) -> dict[str, Any]:
        return {"cache": {}}  # CogVideoXDecoder3D's conv_cache, carried from batch to batch

    def decode_window(
        self, zq: torch.Tensor, state: dict[str, Any], hooks: DecodeHooks, ctx: DecodeContext
    ) -> torch.Tensor:
        decoder, cache, new = self.vae.decoder, state["cache"], {}
        # CogVideoXDecoder3D.forward, with the stage hooks before the up-sampling blocks; the batch's latent is
        # every SpatialNorm's zq.
        h, new["conv_in"] = decoder.conv_in(zq, conv_cache=cache.get("conv_in"))
        h, new["mid_block"] = decoder.mid_block(h, None, zq, conv_cache=cache.get("mid_block"))
        reference = None  # the reference's features entering stage i (the hook starts them at stage 0)
        for i, block in enumerate(decoder.up_blocks):
            if block.upsamplers is not None:
                h, reference = self.conditioned_stage(i, h, reference, hooks, ctx)
            h, new[f"up_block_{i}"] = block(h, None, zq, conv_cache=cache.get(f"up_block_{i}"))
        h, new["norm_out"] = decoder.norm_out(h, zq, conv_cache=cache.get("norm_out"))
        h, new["conv_out"] = decoder.conv_out(decoder.conv_act(h), conv_cache=cache.get("conv_out"))
        state["cache"] = new
        return h

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        """Stage ``index``'s block on ``B, C_i, R, h_i, w_i`` reference features, each frame alone, no cache.

        The block's SpatialNorms need the reference's own latent ``zq`` (``B, C, R, h, w``, see
        :meth:`reference_latent`): encoded from ``ctx.reference_pixels`` once per decode and kept in
        ``ctx.reference_branch_inputs`` (this adapter's type for it: that latent).
        """
        if ctx is None or ctx.reference_pixels is None:
            raise BackboneError(
                "the cogvideox up-blocks need the reference's latent: pass the decode's ctx, with "
                "ctx.reference_pixels set"
            )
        if ctx.reference_branch_inputs is None:  # once per decode, shared by every window and stage
            scale = self.stages()[index].scale
            size = (reference.shape[-2] * scale, reference.shape[-1] * scale)
            ctx.reference_branch_inputs = self.reference_latent(ctx.reference_pixels, size)
        zq = ctx.reference_branch_inputs.to(reference.dtype)
        b = reference.shape[0]
        frames = rearrange(reference, "b c r h w -> (b r) c 1 h w")
        out, _ = self.vae.decoder.up_blocks[index](frames, None, rearrange(zq, "b c r h w -> (b r) c 1 h w"))
        return rearrange(out, "(b r) c 1 h w -> b c r h w", b=b)

    @torch.no_grad()
    def reference_latent(self, reference: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``B, 3, R, H, W`` pixel reference -> its frozen-encoder latent ``B, C, R, h, w``, each frame alone.

        ``size``: the decode's pixel (H, W); a reference of another size (an upscale head's target) is first
        area-resized to it, so the latent has the decode's own grid.
        """
        b = reference.shape[0]
        frames = rearrange(reference, "b c r h w -> (b r) c h w")
        if tuple(frames.shape[-2:]) != tuple(size):
            frames = F.interpolate(frames, size=size, mode="area")
        weight = next(self.vae.encoder.parameters())
        latent = self.encode(frames[:, :, None].to(weight.dtype))
        return rearrange(latent, "(b r) c 1 h w -> b c r h w", b=b)
