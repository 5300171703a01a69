"""LTX-Video VAE adapter (diffusers ``AutoencoderKLLTXVideo``: LTX-Video 0.9.x).

The decoder has no cache: ``vae.decode`` runs the whole latent sequence at once, and by default it is not causal
(``decoder_causal=False``: every temporal conv pads both ends by replicating edge frames, so frame ``t`` sees frame
``t + 1``). Nothing can be carried from one window to the next, so this adapter does not stream
(``exact_streaming = False``): a decode is one window over all latent frames, the backbone's own layout, and equals
``vae.decode``; memory grows linearly with the length. The causal decoder option decodes the same way.

Frames: 8x temporal compression with a causal first frame (each depth-to-space up-sampler drops its first frame,
``t -> 2t - 1``), so ``1 + 8k`` pixel frames; 32x spatial compression, of which the last ``patch_size`` x
``patch_size`` is a patchified output (``3 * p**2`` channels at H/p, unpatchified by the decoder). The upscale head
refuses it (:meth:`~refdecoder.backbones.base.BackboneAdapter.check_upscale`).

Timestep conditioning (0.9.1 and later, ``timestep_conditioning=True``): ``vae.decode(z, temb)`` takes the decode
timestep. :meth:`LTXVideoAdapter.decode_inputs` accepts it as ``temb`` (a number or ``B`` values; default 0.0, the
LTX pipelines' ``decode_timestep`` default), and the reference branch's stage passes use the same ``temb``: the
reference has no latent of its own, and is decoded as a clean frame of the same decode. Noise injection
(``decoder_inject_noise``) draws from torch's global RNG, as diffusers does; such a decode equals ``vae.decode`` only
under the same seed.

Stage layout (0.9.0: decoder_block_out_channels 128, 256, 512, 512): hook points before the three up-sampling
``decoder.up_blocks[1..3]`` (block 0 refines at the latent resolution) with 512 / 512 / 256 channels at H/32, H/16,
H/8. Default token patches (1,1,1), (1,2,2), (1,4,4) put every stage on the latent grid (H/32).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones._diffusers import class_reason, config_reasons
from refdecoder.backbones.base import Fit, StageSpec
from refdecoder.backbones.diffusers_video import DiffusersVideoAdapter
from refdecoder.errors import InputError
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

__all__ = ["LTXVideoAdapter", "LTX2VideoAdapter"]

# The LTX pipelines' default decode_timestep.
DEFAULT_TEMB = 0.0


class LTXVideoAdapter(DiffusersVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLLTXVideo``: one window per decode; ``temb`` as an extra decode input."""

    frame_rule: FrameRule = FrameRule(first=1, step=8)
    causal_first_frame = True
    exact_streaming = False  # one window over all latent frames (the base plan_windows)
    decode_arguments = ("temb",)
    vae_class: ClassVar[str] = "AutoencoderKLLTXVideo"

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(
            lambda: class_reason(vae, cls.vae_class),
            lambda: config_reasons(vae, {"patch_size_t": 1}, cls.name),
            lambda: _geometry_reason(vae, cls.frame_rule.step, cls.name),
        )

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow LTX 0.9.1-layout VAE (widths 8..32, patch 2: 16x spatial, 8x temporal, 8 latent channels)."""
        from diffusers import AutoencoderKLLTXVideo

        # The 0.9.1 decoder layout (residual depth-to-space halving the channels, timestep conditioning), narrow.
        kwargs: dict[str, Any] = dict(
            latent_channels=8, block_out_channels=(8, 16, 32, 32), layers_per_block=(1, 1, 1, 1, 1), patch_size=2,
            decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 1, 1, 1),
            decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False, False, False, False),
            upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
        )  # fmt: skip
        kwargs.update(overrides)
        return AutoencoderKLLTXVideo(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    @property
    def output_patch(self) -> int:
        return int(self.vae.config.patch_size)

    def stages(self) -> list[StageSpec]:
        # Blocks without an up-sampler refine (LTX's first, at the latent grid): not stage boundaries. Up-samplers
        # scale time and space by their stride (2, 2, 2 in the released configs; LTX-2 may scale one alone).
        specs, scale = [], self.spatial_factor
        for k, block in enumerate(self._stage_blocks()):
            first = block.conv_in.conv1 if block.conv_in is not None else block.upsamplers[0].conv
            stride_t, stride_s = block.upsamplers[0].stride[:2]
            patch = self.spatial_factor // scale  # every stage on the latent grid
            specs.append(StageSpec(f"stage{k}", first.in_channels, scale, (1, patch, patch), time_factor=stride_t))
            scale //= stride_s
        return specs

    # --- latent conventions ---------------------------------------------------------------------------------
    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return (latents - mean) * self.vae.config.scaling_factor / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std / self.vae.config.scaling_factor + mean

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1, 1, 1, 1)
        mean, std = self.vae.latents_mean.view(view), self.vae.latents_std.view(view)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    # --- decoding -------------------------------------------------------------------------------------------
    def decode_inputs(self, latents: torch.Tensor, **inputs: Any) -> dict[str, Any]:
        """``temb``: None, a number or ``B`` values -> a ``(B,)`` tensor (0.0 when the VAE is timestep-conditioned
        and none is given; kept None otherwise, as diffusers ignores it)."""
        temb = super().decode_inputs(latents, **inputs).get("temb")
        if temb is None and not self.vae.config.timestep_conditioning:
            return {"temb": None}
        temb = torch.as_tensor(DEFAULT_TEMB if temb is None else temb, dtype=latents.dtype, device=latents.device)
        batch = latents.shape[0]
        if temb.numel() not in (1, batch):
            raise InputError(f"temb must be one value or {batch} (one per latent), got shape {tuple(temb.shape)}")
        return {"temb": temb.flatten().expand(batch).contiguous()}

    def decode_window(self, x: torch.Tensor, state: None, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        decoder, temb = self.vae.decoder, self._block_temb(self._temb(x, ctx))
        # LTXVideoDecoder3d.forward, with the stage hooks before the up-sampling blocks.
        causal = self._causal()
        h = decoder.mid_block(decoder.conv_in(x, **causal), temb, **causal)
        stage, reference = 0, None  # reference: its features entering the stage
        for block in decoder.up_blocks:
            if block.upsamplers is not None:
                h, reference = self.conditioned_stage(stage, h, reference, hooks, ctx)
                stage += 1
            h = block(h, temb, **causal)
        h = self._norm_out(h)
        if decoder.time_embedder is not None:
            emb = decoder.time_embedder(
                timestep=temb.flatten(), resolution=None, aspect_ratio=None, batch_size=h.size(0), hidden_dtype=h.dtype
            )
            emb = emb.view(h.size(0), 2, -1, 1, 1, 1) + decoder.scale_shift_table[..., None, None, None]
            shift, scale = emb.unbind(dim=1)
            h = h * (1 + scale) + shift
        h = decoder.conv_out(decoder.conv_act(h), **causal)
        # diffusers' unpatchify: channel c * p**2 + w_i * p + h_i holds sub-pixel row h_i, column w_i (p_t = 1).
        p = decoder.patch_size
        return rearrange(h, "b (c pt pw ph) t h w -> b c (t pt) (h ph) (w pw)", pt=decoder.patch_size_t, pw=p, ph=p)

    def _causal(self) -> dict[str, bool]:
        """Extra keyword of every decoder module call (LTX-2 passes its causality down; LTX modules fix it)."""
        return {}

    def _norm_out(self, h: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder.norm_out(h.movedim(1, -1)).movedim(-1, 1)  # an RMSNorm over the last dimension

    def _temb(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor | None:
        """The decode's ``(B,)`` timestep; the default when the context was made without decode inputs (a plain
        decode driven directly through the window loop)."""
        if "temb" not in ctx.decode_inputs:
            ctx.decode_inputs.update(self.decode_inputs(x))
        return ctx.decode_inputs["temb"]

    def _block_temb(self, temb: torch.Tensor | None) -> torch.Tensor | None:
        """The ``temb`` the decoder hands its blocks (scaled by its learnt multiplier)."""
        multiplier = self.vae.decoder.timestep_scale_multiplier
        return temb if multiplier is None or temb is None else temb * multiplier

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        """Stage ``index``'s block on ``B, C_i, R, h_i, w_i`` reference features, each frame alone.

        A lone frame is decoded as a one-frame video: replicate padding in time sees only itself, and the up-sampler
        keeps one frame. The block's ``temb`` is the decode's (``ctx.decode_inputs``; :meth:`decode_inputs`' default
        outside a decode).
        """
        b, r = reference.shape[0], reference.shape[2]
        frames = rearrange(reference, "b c r h w -> (b r) c 1 h w")
        temb = self._block_temb(self._temb(reference, ctx if ctx is not None else DecodeContext()))
        temb = None if temb is None else temb.repeat_interleave(r)
        out = self._stage_blocks()[index](frames, temb, **self._causal())
        return rearrange(out, "(b r) c 1 h w -> b c r h w", b=b)

    def _stage_blocks(self) -> list[nn.Module]:
        return [block for block in self.vae.decoder.up_blocks if block.upsamplers is not None]

    def plain_decode(self, latents: torch.Tensor, window: int | None = None, **inputs: Any) -> torch.Tensor:
        """``vae.decode(latents, temb)`` with :meth:`decode_inputs`' default ``temb``: ``B, 3, T, H, W``, unclamped."""
        return super().plain_decode(latents, window, **self.decode_inputs(latents, **inputs))


class LTX2VideoAdapter(LTXVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLLTX2Video`` (the LTX-2 video VAE): the LTX decode with LTX-2's modules.

    The decoder is the LTX layout with other modules: every call takes the decoder's causality (``causal``, the
    config's ``decoder_causal``, True by default), the output norm is a per-position RMS norm over channels, and
    up-samplers may scale space or time alone (``upsample_type``). Decoded as one window, like LTX. Only the
    adapter is provided: the LTX-2 pipelines (audio + video, Gemma text encoder) are not tested with
    ``reference_decoding``.
    """

    vae_class = "AutoencoderKLLTX2Video"

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow LTX-2 video VAE (widths 8..64, patch 2: 16x spatial, 8x temporal, 8 latent channels).

        The ratios are given: diffusers derives them from the encoder's scaling flags alone, which over-counts
        LTX-2's space-only and time-only down-samplers.
        """
        from diffusers import AutoencoderKLLTX2Video

        kwargs: dict[str, Any] = dict(
            latent_channels=8, block_out_channels=(8, 16, 32, 64), layers_per_block=(1, 1, 1, 1, 1), patch_size=2,
            decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 1, 1, 1),
            timestep_conditioning=True, spatial_compression_ratio=16, temporal_compression_ratio=8,
        )  # fmt: skip
        kwargs.update(overrides)
        return AutoencoderKLLTX2Video(**kwargs)

    def check_latents(self, latents: torch.Tensor) -> None:
        super().check_latents(latents)
        if self.vae.config.decoder_spatial_padding_mode == "reflect" and min(latents.shape[-2:]) < 2:
            raise InputError(
                f"latents of {latents.shape[-2]}x{latents.shape[-1]} positions are too small for the LTX-2 decoder's "
                f"reflect padding: need at least 2x2 ({2 * self.spatial_factor}x{2 * self.spatial_factor} pixels)"
            )

    def _causal(self) -> dict[str, bool]:
        return {"causal": bool(self.vae.decoder.is_causal)}

    def _norm_out(self, h: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder.norm_out(h)  # PerChannelRMSNorm: channels-first


def _geometry_reason(vae: nn.Module, step: int, name: str) -> str | None:
    """None when the decoder up-samples time ``step``x and space as the VAE declares, else why not."""
    time, space = 1, int(vae.config.patch_size)
    for block in vae.decoder.up_blocks:
        if block.upsamplers is not None:
            time, space = time * block.upsamplers[0].stride[0], space * block.upsamplers[0].stride[1]
    if time != step:
        return f"the decoder up-samples time {time}x ({name} needs {step}x)"
    if space != vae.spatial_compression_ratio:
        return (
            f"the decoder up-samples space {space}x but the VAE declares {vae.spatial_compression_ratio}x "
            f"(set spatial_compression_ratio={space})"
        )
    return None
