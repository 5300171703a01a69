"""The decode loop shared by diffusers' Wan-family VAEs: ``AutoencoderKLWan`` (Wan2.1, Wan2.2) and its copy
``AutoencoderKLQwenImage``.

The stock diffusers decode runs the decoder once per latent frame, threading a list of causal-conv caches. The
adapters here drive the same diffusers modules with the same caches, but over *windows* of several latent frames
per decoder pass, so that a stage hook sees every frame of a window at once (the joint attention of the paper
spans a whole 17-frame chunk). Frame 0 is special: it is decoded like an image and its temporal up-samplers must
not run. Inside the window that holds frame 0, each temporally up-sampling block is therefore called twice, first
on the frame-0 slice and then on the rest, with the cache index rewound in between; every other module sees the
whole window. Caches carry from window to window, so the output equals the stock decode (to float rounding)
whatever the window size.

Stages are the up-blocks that up-sample, in order; the hook points sit before them. The default token patch grows
with the stage resolution so that every stage lands on one grid of 2x2 latent positions (the paper's H/16 grid for
Wan2.1's 8x latents, H/32 for Wan2.2's 16x).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones._diffusers import MeanStdLatents, class_reason, config_reasons
from refdecoder.backbones.base import BackboneAdapter, Fit, StageSpec
from refdecoder.backbones.wan._diffusers import check_internals
from refdecoder.blocks.upscale_head import depth_to_space
from refdecoder.frames import CAUSAL_1_PLUS_4K, FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

if TYPE_CHECKING:
    from refdecoder.tiling import TilePlan

__all__ = ["WanFamilyAdapter"]

# Frames each causal conv keeps from the previous chunk (diffusers' CACHE_T): a 3-tap temporal kernel needs two.
_CACHE_FRAMES = 2


class WanFamilyAdapter(MeanStdLatents, BackboneAdapter):
    """Shared adapter for VAEs built from diffusers' Wan causal-cache decoder; subclasses name the class and config.

    Class attributes of a subclass: ``vae_class`` (the diffusers class name), ``expected_config`` (config fields
    that must hold, e.g. ``{"is_residual": False}``) and ``passes_first_chunk`` (whether the decoder's up-blocks take
    diffusers' ``first_chunk`` flag; Wan2.2's residual shortcut needs it, Qwen-Image's blocks have none).
    """

    frame_rule: FrameRule = CAUSAL_1_PLUS_4K
    causal_first_frame = True
    default_window = 5  # 5 latent frames = 17 pixel frames, the paper's chunk
    tiling = True
    vae_class: ClassVar[str]
    expected_config: ClassVar[dict[str, Any]] = {}
    passes_first_chunk: ClassVar[bool] = True

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        check_internals(vae, self.name, self.passes_first_chunk)
        self._stages = self._build_stages()
        # One cache slot per causal conv (the decoder's own count, which diffusers also uses).
        self._num_cache_slots = vae._cached_conv_counts["decoder"]

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(
            lambda: class_reason(vae, cls.vae_class, explain_cache=True),
            lambda: config_reasons(vae, cls.expected_config, cls.name),
            lambda: cls._geometry_reasons(vae),
        )

    @classmethod
    def _geometry_reasons(cls, vae: nn.Module) -> list[str]:
        """Where the decoder's real up-sampling disagrees with the frame rule or the VAE's declared spatial factor."""
        upsamplers = [u for u in map(_upsampler, vae.decoder.up_blocks) if u is not None]
        time = 2 ** sum(u.mode == "upsample3d" for u in upsamplers)
        space = 2 ** len(upsamplers) * int(vae.config.get("patch_size") or 1)
        reasons = []
        if time != cls.frame_rule.step:
            reasons.append(f"the decoder up-samples time {time}x ({cls.name} needs {cls.frame_rule.step}x)")
        if space != vae.spatial_compression_ratio:
            reasons.append(
                f"the decoder up-samples space {space}x but the VAE declares {vae.spatial_compression_ratio}x "
                f"(set scale_factor_spatial={space})"
            )
        return reasons

    @classmethod
    def _tiny(cls, vae_class: type[nn.Module], overrides: dict[str, Any], **defaults: Any) -> nn.Module:
        """``vae_class(**defaults, **overrides)`` with made-up latent statistics of the right length."""
        kwargs = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True], **defaults)
        kwargs.update(overrides)
        MeanStdLatents.tiny_statistics(kwargs, kwargs["z_dim"])
        return vae_class(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    @property
    def output_patch(self) -> int:
        return int(self.vae.config.get("patch_size") or 1)

    def stages(self) -> list[StageSpec]:
        return list(self._stages)

    def _build_stages(self) -> list[StageSpec]:
        specs, scale = [], self.spatial_factor
        for i, block in enumerate(self.vae.decoder.up_blocks):
            upsampler = _upsampler(block)
            if upsampler is None:
                break  # the last block only refines at the final resolution: no up-sampling stage to attach before
            patch = 2 * self.spatial_factor // scale  # every stage on one grid of 2x2 latent positions
            time_factor = 2 if upsampler.mode == "upsample3d" else 1
            specs.append(StageSpec(f"stage{i}", block.resnets[0].in_dim, scale, (1, patch, patch), time_factor))
            scale //= 2
        return specs

    # --- encode / latent conventions ------------------------------------------------------------------------
    def encode_chunks(self, chunks: Iterable[torch.Tensor]) -> torch.Tensor:
        # The encoder's causal caches carry from piece to piece, as in diffusers' own per-chunk encode loop.
        vae, p = self.vae, self.output_patch
        cache: list[Any] = [None] * vae._cached_conv_counts["encoder"]
        parts = []
        for chunk in chunks:
            if p > 1:  # diffusers' patchify: channel c * p**2 + j * p + i holds sub-pixel row i, column j
                chunk = rearrange(chunk, "b c t (h i) (w j) -> b (c j i) t h w", i=p, j=p)
            moments = vae.quant_conv(vae.encoder(chunk, feat_cache=cache, feat_idx=[0]))
            parts.append(moments[:, : self.latent_channels])  # posterior mode = the mean half of the moments
        return torch.cat(parts, dim=2)

    # --- decoding -------------------------------------------------------------------------------------------
    def decoder_input(self, latents: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
        return self.vae.post_quant_conv(latents)

    def begin_decode(self, x: torch.Tensor) -> list[Any]:
        return [None] * self._num_cache_slots

    def window_input(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return _settled(x[:, :, start:stop])

    def decode_window(self, x: torch.Tensor, cache: list[Any], hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        decoder, cursor = self.vae.decoder, [0]
        h = _cached_conv(decoder.conv_in, x, cache, cursor)
        h = decoder.mid_block(h, feat_cache=cache, feat_idx=cursor)
        reference = None  # the reference's features entering stage i (the hook starts them at stage 0)
        for i, block in enumerate(decoder.up_blocks):
            if i < len(self._stages):
                h, reference = self.conditioned_stage(i, h, reference, hooks, ctx)
            h = self._run_up_block(block, h, cache, cursor, ctx.first_window)
        h = decoder.nonlinearity(decoder.norm_out(h))
        h = _cached_conv(decoder.conv_out, h, cache, cursor)
        cache[:] = [_settled(entry) if isinstance(entry, torch.Tensor) else entry for entry in cache]
        return depth_to_space(h, self.output_patch, order="unpatchify")

    def compile_window(self, **options: Any) -> bool:
        self.decode_window = torch.compile(self.decode_window, **options)
        return True

    def _run_up_block(
        self, block: nn.Module, h: torch.Tensor, cache: list[Any], cursor: list[int], first_window: bool
    ) -> torch.Tensor:
        upsampler = _upsampler(block)
        if not (first_window and upsampler is not None and upsampler.mode == "upsample3d"):
            return block(h, feat_cache=cache, feat_idx=cursor, **self._first_chunk(False))
        # Frame 0 must pass alone: its first visit to the temporal up-sampler marks the cache slot instead of
        # up-sampling, exactly as diffusers' first chunk (Wan2.2's shortcut drops its extra frame likewise). The
        # rest of the window then continues from that cache.
        start = cursor[0]
        head = block(h[:, :, :1], feat_cache=cache, feat_idx=cursor, **self._first_chunk(True))
        if h.shape[2] == 1:
            return head
        stop, cursor[0] = cursor[0], start
        tail = block(h[:, :, 1:], feat_cache=cache, feat_idx=cursor, **self._first_chunk(False))
        assert cursor[0] == stop, "up-block used a different number of cache slots on its second call"
        return torch.cat([head, tail], dim=2)

    def _first_chunk(self, value: bool) -> dict[str, bool]:
        return {"first_chunk": value} if self.passes_first_chunk else {}

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        # Without a cache the block treats each input as an image: causal zero padding in time and no temporal
        # up-sampling. Reference frames are folded into the batch so several of them never mix in time.
        frames = rearrange(reference, "b c r h w -> (b r) c 1 h w")
        out = self.vae.decoder.up_blocks[index](frames, **self._first_chunk(True))
        return rearrange(out, "(b r) c 1 h w -> b c r h w", b=reference.shape[0])

    def plain_tiled_decode(self, latents: torch.Tensor, plan: TilePlan) -> torch.Tensor:
        """diffusers' own ``tiled_decode`` with the plan's tile and stride (the VAE's tiling settings restored)."""
        vae = self.vae
        saved = {name: getattr(vae, name) for name in _TILING_ATTRIBUTES}
        vae.enable_tiling(plan.tile[0], plan.tile[1], plan.stride[0], plan.stride[1])
        try:
            return vae.decode(latents).sample
        finally:
            for name, value in saved.items():
                setattr(vae, name, value)

    # --- parameters -----------------------------------------------------------------------------------------
    def decoder_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for prefix in ("post_quant_conv", "decoder"):
            for name, param in getattr(self.vae, prefix).named_parameters():
                yield f"{prefix}.{name}", param


_TILING_ATTRIBUTES = (
    "use_tiling",
    "tile_sample_min_height",
    "tile_sample_min_width",
    "tile_sample_stride_height",
    "tile_sample_stride_width",
)


def _upsampler(block: nn.Module) -> nn.Module | None:
    """The block's up-sampler: ``upsamplers[0]`` (Wan2.1, Qwen-Image) or ``upsampler`` (Wan2.2), or None."""
    if getattr(block, "upsampler", None) is not None:
        return block.upsampler
    upsamplers = getattr(block, "upsamplers", None)
    return upsamplers[0] if upsamplers else None


def _cached_conv(conv: nn.Module, x: torch.Tensor, cache: list[Any], cursor: list[int]) -> torch.Tensor:
    """Run a causal conv of the decoder's own head/stem with the cache protocol of ``WanDecoder3d.forward``."""
    idx = cursor[0]
    keep = x[:, :, -_CACHE_FRAMES:].clone()
    if keep.shape[2] < _CACHE_FRAMES and cache[idx] is not None:
        # A one-frame chunk keeps the previous chunk's last frame as well, so the next chunk still sees two.
        keep = torch.cat([cache[idx][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, cache[idx])
    cache[idx] = keep
    cursor[0] += 1
    return out


def _settled(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a new contiguous tensor, size-1 dimensions included (copied only if it differs).

    A window slice keeps the batch stride of the whole video, and a cache slot after the mid-block's attention
    the layout of the window it was cut from. A compiled window pass guards on strides, so without this it would
    trace again for each video length and for the second window of each size.
    """
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.insert(0, step)
        step *= size
    return x if list(x.stride()) == strides else x.clone(memory_format=torch.contiguous_format)
