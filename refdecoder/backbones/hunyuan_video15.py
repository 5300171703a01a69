"""HunyuanVideo 1.5 VAE adapter (diffusers ``AutoencoderKLHunyuanVideo15``).

The decoder is causal (time padded on the left by replicating frame 0, RMS norms per position, a causally masked
mid-block attention) but diffusers' modules take no cache: ``vae.decode`` runs the whole latent sequence at once,
and the mid-block attention of frame ``t`` spans every earlier frame. Window-by-window decoding would need a KV
cache over all past frames and a conv cache that these modules do not offer, so this adapter does not stream
(``exact_streaming = False``): a decode is one window over all latent frames, exactly the backbone's own layout, and
equals ``vae.decode``. Memory grows linearly with the length (the mid-block attention quadratically in
``t * h * w`` at the latent resolution, with a dense ``(t h w)^2`` mask built by diffusers).

Stage layout (block_out_channels 128, 256, 512, 1024, 1024; 16x spatial, 4x temporal; 32 latent channels): hook
points before the first three up-sampling ``decoder.up_blocks[0..2]`` with 1024 / 1024 / 512 channels at H/16, H/8,
H/4; blocks 0 and 1 double the frame count (frame 0 stays one frame, diffusers' DC-AE first-frame rule). Default
token patches (1,2,2), (1,4,4), (1,8,8) put every stage on one H/32 grid (2x2 latent positions). The fourth
up-sampler (``up_blocks[3]``, 256 channels at H/2) is not a stage: the paper conditions three stages, the presets'
per-stage settings are written for three, and on the H/32 grid it would need a (1,16,16) patch of 65,536 inputs
per token.
diffusers leaves the output unclamped, and so do ``plain_decode`` and ``RefDecoder.decode`` (``output_clamp``). Latents
are normalised with ``config.scaling_factor`` (the pipeline decodes ``z / scaling_factor``).

Batches: diffusers' mid-block attention (``HunyuanVideo15AttnBlock``, diffusers 0.42) raises on any batch of more
than one clip, in ``vae.encode`` and ``vae.decode`` alike; the adapter makes the VAE's attention blocks run one sample
at a time (:func:`_attention_per_sample`), which is what a correct batched block computes.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from refdecoder.backbones._diffusers import class_reason
from refdecoder.backbones.base import Fit, StageSpec
from refdecoder.backbones.diffusers_video import DiffusersVideoAdapter, each_frame_alone, halving_stages
from refdecoder.frames import CAUSAL_1_PLUS_4K, FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

__all__ = ["HunyuanVideo15Adapter"]

# Up-sampling blocks that are stages (the paper's three).
_STAGES = 3


class HunyuanVideo15Adapter(DiffusersVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLHunyuanVideo15``: one window per decode, the backbone's own layout."""

    frame_rule: FrameRule = CAUSAL_1_PLUS_4K
    causal_first_frame = True
    exact_streaming = False  # one window over all latent frames (the base plan_windows)

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        _attention_per_sample(vae)
        self._stages = self._build_stages()

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(lambda: class_reason(vae, "AutoencoderKLHunyuanVideo15"), lambda: _time_reason(vae))

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow HunyuanVideo 1.5 VAE (widths 8..32, one res-block per level, 16x / 4x, 4 latent channels)."""
        from diffusers import AutoencoderKLHunyuanVideo15

        kwargs: dict[str, Any] = dict(latent_channels=4, block_out_channels=(8, 16, 16, 32, 32), layers_per_block=1)
        kwargs.update(overrides)
        return AutoencoderKLHunyuanVideo15(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return int(self.vae.config.spatial_compression_ratio)

    def stages(self) -> list[StageSpec]:
        return list(self._stages)

    def _build_stages(self) -> list[StageSpec]:
        blocks = [(i, b) for i, b in enumerate(self.vae.decoder.up_blocks[:_STAGES]) if b.upsamplers is not None]
        points = [
            (i, b.resnets[0].conv1.conv.in_channels, 2 if b.upsamplers[0].add_temporal_upsample else 1)
            for i, b in blocks
        ]
        return halving_stages(points, self.spatial_factor, grid=2 * self.spatial_factor)  # 2x2 latent positions

    # --- decoding -------------------------------------------------------------------------------------------
    def decode_window(self, x: torch.Tensor, state: None, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        decoder = self.vae.decoder
        # HunyuanVideo15Decoder3D.forward, with the stage hooks between its up-blocks.
        h = decoder.conv_in(x) + x.repeat_interleave(repeats=decoder.repeat, dim=1)
        h, reference = decoder.mid_block(h), None  # reference: its features entering stage i
        for i, block in enumerate(decoder.up_blocks):
            if i < len(self._stages):
                h, reference = self.conditioned_stage(i, h, reference, hooks, ctx)
            h = block(h)
        return decoder.conv_out(decoder.conv_act(decoder.norm_out(h)))

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        # One frame through the block is the image path: causal replicate padding sees only itself, and the DC-AE
        # up-sampler keeps frame 0 one frame. Reference frames are folded into the batch so they never mix in time.
        return each_frame_alone(self.vae.decoder.up_blocks[index], reference)


def _attention_per_sample(vae: nn.Module) -> None:
    """Make ``vae``'s causal attention blocks (``HunyuanVideo15AttnBlock``) take a batch one sample at a time.

    The block hands ``scaled_dot_product_attention`` a ``B, L, L`` mask for ``B, 1, L, L`` queries, so the mask's
    batch axis meets the heads axis and a batch of two or more raises (a fix, ``attn_mask.unsqueeze(1)``, is open
    upstream as diffusers PR 13133). Every sample's attention stays within the sample, so one at a time is what a
    correct batched block gives; a batch of one runs the block unchanged. The instance's own ``forward`` is replaced
    (its ``vae.encode`` / ``vae.decode`` then take batches too, also after ``unwrap()``), once; copies
    (``copy.deepcopy``) keep it, bound to the copy.
    """
    for module in vae.modules():
        replaced = getattr(module.forward, "__func__", None) is _per_sample_forward
        if type(module).__name__ == "HunyuanVideo15AttnBlock" and not replaced:
            module.forward = types.MethodType(_per_sample_forward, module)


def _per_sample_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``type(block).forward`` on ``x`` (``B, C, T, H, W``) one sample at a time."""
    forward = type(block).forward
    if x.shape[0] == 1:
        return forward(block, x)
    return torch.cat([forward(block, sample) for sample in x.split(1)])


def _time_reason(vae: nn.Module) -> str | None:
    """None when the decoder up-samples time 4x (the frame rule 1 + 4k), else why not."""
    time = 2 ** sum(b.upsamplers is not None and b.upsamplers[0].add_temporal_upsample for b in vae.decoder.up_blocks)
    return None if time == 4 else f"the decoder up-samples time {time}x (hunyuan-video-1.5 needs 4x)"
