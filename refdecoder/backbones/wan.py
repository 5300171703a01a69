"""Wan2.1 VAE adapter (diffusers ``AutoencoderKLWan``).

The stock diffusers decode runs the decoder once per latent frame, threading a list of causal-conv caches. This
adapter drives the same diffusers modules with the same caches, but over *windows* of several latent frames per
decoder pass, so that a stage hook sees every frame of a window at once (the joint attention of the paper spans
a whole 17-frame chunk). Frame 0 is special in Wan: it is decoded like an image and its temporal up-samplers
must not run. Inside the window that holds frame 0, each temporally up-sampling block is therefore called twice,
first on the frame-0 slice and then on the rest, with the cache index rewound in between; every other module
sees the whole window. Caches carry from window to window, so the output equals the stock decode (to float
rounding) whatever the window size.

Stage layout (Wan2.1, base_dim 96): hook points before ``decoder.up_blocks[0..2]`` with 384 / 192 / 192 channels
at H/8, H/4, H/2; blocks 0 and 1 double the frame count. Default token patches (1,2,2), (1,4,4), (1,8,8) put every
stage on the same H/16 token grid (the paper's layout).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones.registry import BackboneAdapter, StageSpec, register_backbone
from refdecoder.frames import CAUSAL_1_PLUS_4K, FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

__all__ = ["WanAdapter"]

# Frames each causal conv keeps from the previous chunk (diffusers' CACHE_T): a 3-tap temporal kernel needs two.
_CACHE_FRAMES = 2


def _is_wan(vae: nn.Module) -> bool:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        return False
    return isinstance(vae, AutoencoderKLWan)


@register_backbone("wan2.1")
class WanAdapter(BackboneAdapter):
    """Adapter for diffusers ``AutoencoderKLWan`` with the Wan2.1 layout (``is_residual=False``, no patchify)."""

    frame_rule: FrameRule = CAUSAL_1_PLUS_4K
    causal_first_frame = True
    default_window = 5  # 5 latent frames = 17 pixel frames, the paper's chunk

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        self._stages = self._build_stages()
        # One cache slot per causal conv (the decoder's own count, which diffusers also uses).
        self._num_cache_slots = vae._cached_conv_counts["decoder"]
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_mean, self._latents_std = mean, std

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, vae: nn.Module) -> bool:
        return _is_wan(vae) and not vae.config.is_residual and vae.config.patch_size is None

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A reduced-width Wan2.1-architecture VAE (base_dim 8, z_dim 4): milliseconds per decode on CPU."""
        from diffusers import AutoencoderKLWan

        kwargs: dict[str, Any] = dict(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        kwargs.update(overrides)
        z = kwargs["z_dim"]
        kwargs.setdefault("latents_mean", [0.1 * i for i in range(z)])
        kwargs.setdefault("latents_std", [1.0 + 0.1 * i for i in range(z)])
        return AutoencoderKLWan(**kwargs)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def stages(self) -> list[StageSpec]:
        return list(self._stages)

    def _build_stages(self) -> list[StageSpec]:
        specs, scale = [], self.spatial_factor
        for i, block in enumerate(self.vae.decoder.up_blocks):
            if block.upsamplers is None:
                break  # the last block only refines at full resolution: no up-sampling stage to attach before
            time_factor = 2 if block.upsamplers[0].mode == "upsample3d" else 1
            # The patch grows as the stage resolution grows, so every stage lands on one H/(2*spatial) token grid.
            patch = 2 * self.spatial_factor // scale
            specs.append(
                StageSpec(
                    name=f"stage{i}",
                    module=f"decoder.up_blocks.{i}",
                    channels=block.resnets[0].in_dim,
                    scale=scale,
                    patch_size=(1, patch, patch),
                    time_factor=time_factor,
                )
            )
            scale //= 2
        return specs

    # --- encode / latent conventions ------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video).latent_dist.mode()

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std + mean

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._latents_mean.to(like.device, like.dtype), self._latents_std.to(like.device, like.dtype)

    # --- decoding -------------------------------------------------------------------------------------------
    def iter_decode_windows(
        self, latents: torch.Tensor, hooks: DecodeHooks, ctx: DecodeContext, windows: list[tuple[int, int]]
    ) -> Iterator[torch.Tensor]:
        x = hooks.latents(self.vae.post_quant_conv(latents), ctx)
        cache: list[Any] = [None] * self._num_cache_slots
        for index, (start, stop) in enumerate(windows):
            ctx.window_index, ctx.first_window = index, index == 0
            part = self._decode_window(_settled(x[:, :, start:stop]), cache, hooks, ctx)
            cache[:] = [_settled(entry) if isinstance(entry, torch.Tensor) else entry for entry in cache]
            yield part

    def compile_window(self, **options: Any) -> bool:
        self._decode_window = torch.compile(self._decode_window, **options)
        return True

    def _decode_window(
        self, x: torch.Tensor, cache: list[Any], hooks: DecodeHooks, ctx: DecodeContext
    ) -> torch.Tensor:
        decoder, cursor = self.vae.decoder, [0]
        h = _cached_conv(decoder.conv_in, x, cache, cursor)
        h = decoder.mid_block(h, feat_cache=cache, feat_idx=cursor)
        for i, block in enumerate(decoder.up_blocks):
            if i < len(self._stages):
                h = hooks.stage(i, h, ctx)
            h = self._run_up_block(block, h, cache, cursor, ctx.first_window)
        h = decoder.nonlinearity(decoder.norm_out(h))
        return _cached_conv(decoder.conv_out, h, cache, cursor)

    @staticmethod
    def _run_up_block(
        block: nn.Module, h: torch.Tensor, cache: list[Any], cursor: list[int], first_window: bool
    ) -> torch.Tensor:
        upsamples_time = block.upsamplers is not None and block.upsamplers[0].mode == "upsample3d"
        if not (first_window and upsamples_time):
            return block(h, feat_cache=cache, feat_idx=cursor, first_chunk=False)
        # Frame 0 must pass alone: its first visit to the temporal up-sampler marks the cache slot instead of
        # up-sampling, exactly as diffusers' first chunk. The rest of the window then continues from that cache.
        start = cursor[0]
        head = block(h[:, :, :1], feat_cache=cache, feat_idx=cursor, first_chunk=True)
        if h.shape[2] == 1:
            return head
        stop, cursor[0] = cursor[0], start
        tail = block(h[:, :, 1:], feat_cache=cache, feat_idx=cursor, first_chunk=False)
        assert cursor[0] == stop, "up-block used a different number of cache slots on its second call"
        return torch.cat([head, tail], dim=2)

    def run_stage_on_reference(self, index: int, reference: torch.Tensor) -> torch.Tensor:
        # Without a cache the block treats each input as an image: causal zero padding in time and no temporal
        # up-sampling. Reference frames are folded into the batch so several of them never mix in time.
        frames = rearrange(reference, "b c r h w -> (b r) c 1 h w")
        out = self.vae.decoder.up_blocks[index](frames, first_chunk=True)
        return rearrange(out, "(b r) c 1 h w -> b c r h w", b=reference.shape[0])

    # --- parameters -----------------------------------------------------------------------------------------
    def decoder_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for prefix in ("post_quant_conv", "decoder"):
            for name, param in getattr(self.vae, prefix).named_parameters():
                yield f"{prefix}.{name}", param


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
