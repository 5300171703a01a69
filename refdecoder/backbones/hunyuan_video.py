"""HunyuanVideo (v1) VAE adapter (diffusers ``AutoencoderKLHunyuanVideo``).

The decoder is causal in time (convolutions pad on the left by replicating frame 0; the up-samplers keep frame 0 one
frame) but it normalises with GroupNorm over all frames of a pass and its mid-block attention spans every earlier
frame, and diffusers' modules take no cache. So a split into consecutive windows cannot equal ``vae.decode``, and
this adapter does not stream (``exact_streaming = False``): a decode is one window, decoded in the backbone's own
layout. That layout is diffusers' frame-wise decode (``use_framewise_decoding``, on by default): above
``tile_sample_min_num_frames // 4`` latent frames (4 with the defaults), ``vae.decode`` decodes overlapping groups of
``tile_latent_min + 1`` latent frames every ``tile_sample_stride_num_frames // 4`` latent frames, drops the first
pixel frame of every group after the first and cross-fades neighbouring groups over
``tile_sample_min_num_frames - tile_sample_stride_num_frames`` pixel frames. :meth:`decode_window` does exactly that,
calling the stage hooks once per group (so the reference attention of a group spans its frames, and memory is one
group's activations plus the output video). With ``use_framewise_decoding`` off it decodes the whole sequence in one
pass, as ``vae.decode`` then does. diffusers' own spatial tiling (``vae.enable_tiling()``) is not reproduced: a decode
that it would tile is refused in one line (use RefDecoder's tiled decode instead).

Stage layout (block_out_channels 128, 256, 512, 512; 8x spatial, 4x temporal; 16 latent channels): hook points before
the three up-sampling ``decoder.up_blocks[0..2]`` with 512 / 512 / 512 channels at H/8, H/4, H/2; blocks 1 and 2
double the frame count (frame 0 stays one frame). Default token patches (1,2,2), (1,4,4), (1,8,8) put every stage on
one H/16 grid (2x2 latent positions). ``up_blocks[3]`` does not up-sample and is not a stage.
diffusers leaves the output unclamped (``output_clamp = False``); latents are normalised with
``config.scaling_factor`` (the pipelines decode ``z / scaling_factor``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refdecoder.backbones._diffusers import class_reason
from refdecoder.backbones.base import Fit, StageSpec
from refdecoder.backbones.diffusers_video import (
    DiffusersVideoAdapter,
    each_frame_alone,
    halving_stages,
    refuse_vae_tiling,
)
from refdecoder.frames import CAUSAL_1_PLUS_4K, FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

__all__ = ["HunyuanVideoAdapter"]


class HunyuanVideoAdapter(DiffusersVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLHunyuanVideo``: one window per decode, in diffusers' frame-wise groups."""

    frame_rule: FrameRule = CAUSAL_1_PLUS_4K
    causal_first_frame = True
    exact_streaming = False  # GroupNorm over each pass's frames: the base plan_windows decodes one window

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(lambda: class_reason(vae, "AutoencoderKLHunyuanVideo"), lambda: _time_reason(vae))

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow HunyuanVideo VAE (widths 8..32, one res-block per level, 8x / 4x, 4 latent channels)."""
        from diffusers import AutoencoderKLHunyuanVideo

        kwargs: dict[str, Any] = dict(
            latent_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4
        )
        kwargs.update(overrides)
        return AutoencoderKLHunyuanVideo(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return int(self.vae.config.spatial_compression_ratio)

    def stages(self) -> list[StageSpec]:
        points = []
        for i, block in enumerate(self.vae.decoder.up_blocks):
            if block.upsamplers is None or block.upsamplers[0].upsample_factor[1] == 1:
                break  # the up-sampling blocks come first; the rest keep the resolution
            points.append((i, block.resnets[0].conv1.conv.in_channels, int(block.upsamplers[0].upsample_factor[0])))
        return halving_stages(points, self.spatial_factor, grid=2 * self.spatial_factor)  # 2x2 latent positions

    # --- decoding -------------------------------------------------------------------------------------------
    def decode_window(self, x: torch.Tensor, state: None, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        """The whole latent ``x`` (``B, C, t, h, w`` after ``post_quant_conv``) as ``vae.decode`` lays it out."""
        vae = self.vae
        refuse_vae_tiling(vae, x, self.spatial_factor, "hunyuan-video")
        ratio = vae.temporal_compression_ratio
        group = vae.tile_sample_min_num_frames // ratio  # latent frames past the first in a frame-wise group
        if not (vae.use_framewise_decoding and x.shape[2] > group):
            return self._decoder_pass(x, hooks, ctx)
        # AutoencoderKLHunyuanVideo._temporal_tiled_decode, with the stage hooks inside every group's pass.
        stride = vae.tile_sample_stride_num_frames
        blend = vae.tile_sample_min_num_frames - stride
        groups = []
        for start in range(0, x.shape[2], stride // ratio):
            decoded = self._decoder_pass(x[:, :, start : start + group + 1], hooks, ctx)
            groups.append(decoded[:, :, 1:] if start > 0 else decoded)
        kept = [groups[0][:, :, : stride + 1]]
        for i in range(1, len(groups)):
            kept.append(vae.blend_t(groups[i - 1], groups[i], blend)[:, :, :stride])
        return torch.cat(kept, dim=2)[:, :, : self.frame_rule.pixel_frames(x.shape[2])]

    def decoder_input(self, latents: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
        # post_quant_conv is a 1x1x1 conv, so applying it once equals diffusers applying it per frame-wise group.
        return self.vae.post_quant_conv(latents)

    def _decoder_pass(self, x: torch.Tensor, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        decoder, stages = self.vae.decoder, len(self.stages())
        # HunyuanVideoDecoder3D.forward, with the stage hooks before the up-sampling blocks.
        h, reference = decoder.mid_block(decoder.conv_in(x)), None  # reference: its features entering stage i
        for i, block in enumerate(decoder.up_blocks):
            if i < stages:
                h, reference = self.conditioned_stage(i, h, reference, hooks, ctx)
            h = block(h)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        # One frame through the block is the image path: causal replicate padding sees only itself, the up-sampler
        # keeps frame 0 one frame, and GroupNorm over one frame is the image's. Reference frames go into the batch.
        return each_frame_alone(self.vae.decoder.up_blocks[index], reference)


def _time_reason(vae: nn.Module) -> str | None:
    """None when the decoder up-samples time 4x (the frame rule 1 + 4k), else why not."""
    time = vae.config.temporal_compression_ratio
    return None if time == 4 else f"temporal_compression_ratio={time} (hunyuan-video needs 4)"
