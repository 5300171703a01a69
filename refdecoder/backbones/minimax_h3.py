"""MiniMax-H3 VAE adapter (diffusers ``AutoencoderKLMiniMaxH3``): the first backbone whose decoder is a transformer.

The encoder is a causal 3D CNN (16x spatial, 4x temporal); the decoder is a non-causal ViT
(``MiniMaxH3VideoViTDecoder3d``): ``proj_in`` makes one token per latent voxel, learned register tokens and one zero
token are appended, ``decoder_num_layers`` transformer blocks attend over all of them (3-axis RoPE over the clip's
``t, h, w`` grid), and ``proj_out`` + an unpatchify turn every voxel token into a ``4 x 16 x 16`` pixel block.

**Hook points** (``stage0..2``): the voxel tokens entering blocks ``0``, ``L/3`` and ``2L/3`` of the ``L`` blocks
(0, 12, 24 of the release's 36), handed to the hooks as ``B, dim, t, h, w`` (dim 2048 at H/16, the clip's latent
frames). Token patch (1, 1, 1): one RefDecoder token per ViT token, so the shared transformer's grid *is* the
decoder's patch grid at every stage. The register/zero tokens are not hooked (they hold no position); nothing is
hooked after ``proj_out``: there the tokens are already pixel blocks (``3*4*16*16`` values each), the up-sampling
is a fixed reshape with nothing to condition, and its 256x more positions would make the reference attention cost
more than the decoder. Spreading the three hooks over the depth mirrors the CNN adapters' three resolutions.

**Time**: ``vae.decode`` decodes clips of ``tokens_chunk_size + token_overlap`` = 7 latent frames every 5, keeps
pixel frames 3..19 of each clip, carries frames 23..27 to cross-fade into the next clip's first five
(``_decode``). Encoded videos have ``17n + 5`` frames and ``5n + 2`` latent frames (:class:`ClipFrameRule`; other
latent counts are refused in one line). The adapter's windows are exactly those clips (:meth:`plan_windows`), so
it streams clip by clip in constant memory and equals ``vae.decode``; the output depends on the clips (attention
over each clip), hence ``exact_streaming = False`` and the window argument is ignored.

**Reference branch**: a block mixes the voxel tokens with the register tokens, whose state at a stage depends on the
whole token history. :meth:`run_stage_on_reference` therefore runs each reference frame through the stage's blocks
with the register tokens of the reference image's own one-frame decode (encoded from ``ctx.reference_pixels`` once
per decode, kept in ``ctx.reference_branch_inputs``, this adapter's type for it: a list of those tokens per stage):
exactly the image path.

**Pixels**: ``vae.decode`` returns ImageNet-normalised RGB (``(rgb01 - mean) / std``) and ``vae.encode`` expects it.
The adapter keeps RefDecoder's convention, [-1, 1] RGB: :meth:`encode` maps [-1, 1] to ImageNet space before
``vae.encode``, :meth:`decode_window` maps the ViT's output back (``2 * (x * std + mean) - 1``, per channel), and
:meth:`plain_decode` is ``vae.decode`` mapped the same way. Unclamped (``output_clamp = False``), as ``vae.decode``.
Latents are normalised with ``latents_mean`` / ``latents_std``. diffusers' spatial tiling (on by default, 256-pixel
tiles) leaves frames up to 256x256 untiled; a decode it would tile is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones._diffusers import MeanStdLatents, class_reason, config_reasons
from refdecoder.backbones.base import Fit, StageSpec
from refdecoder.backbones.diffusers_video import DiffusersVideoAdapter, refuse_vae_tiling
from refdecoder.errors import BackboneError, InputError
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks

__all__ = ["MiniMaxH3Adapter", "ClipFrameRule", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The released clip geometry (clip_length 17, token_drop 3, 4x in time), which the frame rule is written for.
CLIP_GEOMETRY = {"clip_length": 17, "token_drop": 3}
CLIP_TOKENS, CLIP_STRIDE, PRE_PADDING, KEPT, OVERLAP = 7, 5, 3, 17, 5


@dataclass(frozen=True)
class ClipFrameRule(FrameRule):
    """Pixel counts ``first + step*k`` <-> latent counts ``latent_first + latent_step*k`` (MiniMax-H3: 22 + 17k <->
    7 + 5k); latent counts off that rule have no pixel count and are refused."""

    latent_first: int = CLIP_TOKENS
    latent_step: int = CLIP_STRIDE

    def latent_frames(self, pixel_frames: int) -> int:
        self.check(pixel_frames)
        return self.latent_first + self.latent_step * ((pixel_frames - self.first) // self.step)

    def pixel_frames(self, latent_frames: int) -> int:
        k, rest = divmod(latent_frames - self.latent_first, self.latent_step)
        if k < 0 or rest:
            raise InputError(
                f"got {latent_frames} latent frames, but this backbone decodes {self.latent_first} + "
                f"{self.latent_step}k ({self.latent_first}, {self.latent_first + self.latent_step}, ...), the latents "
                f"of {self.describe()} pixel frames"
            )
        return self.first + self.step * k


class MiniMaxH3Adapter(MeanStdLatents, DiffusersVideoAdapter):
    """Adapter for diffusers ``AutoencoderKLMiniMaxH3``: hooks on the ViT decoder's voxel tokens, clip by clip."""

    frame_rule: FrameRule = ClipFrameRule(first=KEPT + OVERLAP, step=KEPT)
    causal_first_frame = False  # every latent voxel token becomes 4 pixel frames, frame 0 too
    exact_streaming = False  # attention over each clip: the clips are the windows
    output_clamp = False  # vae.decode leaves its (ImageNet-space) output unclamped
    default_window = CLIP_STRIDE

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        return Fit.run(lambda: class_reason(vae, "AutoencoderKLMiniMaxH3"), lambda: _geometry_reasons(vae))

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A small MiniMax-H3 VAE (4x spatial, the released 4x time and clips, a 3-block ViT of width 32), with
        the blocks' zero-initialised residual scales and register tokens drawn at random so every block acts."""
        from diffusers import AutoencoderKLMiniMaxH3

        kwargs: dict[str, Any] = dict(
            latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
            spatial_downsample_factors=(2, 2, 1), temporal_downsample_factors=(2, 2, 1), norm_num_groups=4,
            decoder_num_layers=3, decoder_num_attention_heads=2, decoder_attention_head_dim=16,
            decoder_num_register_tokens=2, decoder_ffn_mult=2,
        )  # fmt: skip
        kwargs.update(overrides)
        MeanStdLatents.tiny_statistics(kwargs, kwargs["latent_channels"])
        vae = AutoencoderKLMiniMaxH3(**kwargs)
        with torch.no_grad():
            decoder = vae.decoder
            nn.init.normal_(decoder.register_tokens, std=1.0)
            for block in decoder.transformer_blocks:
                nn.init.normal_(block.scale1, std=0.5)
                nn.init.normal_(block.scale2, std=0.5)
        return vae

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.temporal_compression_ratio)

    @property
    def output_patch(self) -> int:
        return self.spatial_factor  # proj_out writes one 16x16 pixel block per token

    def hooked_blocks(self) -> list[int]:
        """Indices of the transformer blocks the stage hooks sit before: 0, L/3, 2L/3 (distinct, L >= 1)."""
        layers = len(self.vae.decoder.transformer_blocks)
        return sorted({layers * k // 3 for k in range(3)})

    def stages(self) -> list[StageSpec]:
        dim = self.vae.decoder.proj_in.out_features
        return [StageSpec(f"stage{i}", dim, self.spatial_factor, (1, 1, 1)) for i in range(len(self.hooked_blocks()))]

    def stage_frames(self, index: int, latent_frames: int, first_window: bool) -> int:
        """Every window is one clip of 7 latent frames (the clip plus the two it shares with the next)."""
        return CLIP_TOKENS

    def plan_windows(self, num_latent_frames: int, window: int) -> list[tuple[int, int]]:
        """diffusers' clips: latent frames ``[5i, 5i + 5)``, the last ``[5(n-1), 5n + 2)``, whatever ``window``."""
        clips = max(1, (num_latent_frames - CLIP_TOKENS) // CLIP_STRIDE + 1)
        starts = [CLIP_STRIDE * i for i in range(clips)]
        return [(s, s + CLIP_STRIDE) for s in starts[:-1]] + [(starts[-1], num_latent_frames)]

    def window_input(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return x[:, :, start : start + CLIP_TOKENS]  # the clip reaches two latent frames into the next window

    def window_frames(self, start: int, stop: int) -> int:
        """17 pixel frames per clip; the last clip adds the 5 frames no later clip cross-fades."""
        return KEPT + (OVERLAP if stop - start == CLIP_TOKENS else 0)

    def check_upscale(self, factor: int) -> None:
        if factor > 1:
            from refdecoder.errors import ConfigError

            raise ConfigError(
                f"upscale.factor={factor}: the minimax-h3 decoder ends in a linear projection to 4x16x16 pixel blocks "
                "per token (no output conv for the upscale head to replace); use factor 1"
            )

    # --- pixels -----------------------------------------------------------------------------------------------
    def _imagenet(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)
        return mean, std

    def to_backbone_pixels(self, video: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB -> the VAE's ImageNet-normalised RGB (its encode input and decode output)."""
        mean, std = self._imagenet(video)
        return ((video + 1) / 2 - mean) / std

    def from_backbone_pixels(self, video: torch.Tensor) -> torch.Tensor:
        """The VAE's ImageNet-normalised RGB -> [-1, 1] RGB (unclamped)."""
        mean, std = self._imagenet(video)
        return (video * std + mean) * 2 - 1

    # --- encode / decode ------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``B, 3, T, H, W`` in [-1, 1] -> raw latents (posterior mode) of its ImageNet-normalised pixels."""
        return self.vae.encode(self.to_backbone_pixels(video)).latent_dist.mode()

    def decoder_input(self, latents: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
        return self.vae.post_quant_conv(latents)  # 1x1x1: once equals diffusers' once per clip

    def begin_decode(self, x: torch.Tensor) -> dict[str, Any]:
        return {"overlap": None}  # the previous clip's 5 trailing frames, cross-faded into the next

    def decode_window(
        self, x: torch.Tensor, state: dict[str, Any], hooks: DecodeHooks, ctx: DecodeContext
    ) -> torch.Tensor:
        """One clip ``B, C, 7, h, w`` -> its [-1, 1] frames, as ``AutoencoderKLMiniMaxH3._decode`` keeps them.

        A shorter ``x`` (one latent frame: the contract's image decode) is one ViT pass returned whole.
        """
        refuse_vae_tiling(self.vae, x, self.spatial_factor, "minimax-h3")
        clip = self.from_backbone_pixels(self._vit_pass(x, hooks, ctx))
        if x.shape[2] != CLIP_TOKENS:
            return clip
        kept = clip[:, :, PRE_PADDING : PRE_PADDING + KEPT]
        if state["overlap"] is not None:  # the blend is affine per frame: blending [-1, 1] frames equals diffusers'
            kept = self.vae._blend(state["overlap"], kept, OVERLAP, dim=-3)
        state["overlap"] = clip[:, :, 4 * CLIP_STRIDE + PRE_PADDING :]
        # The last clip also returns the overlap no clip blends.
        return torch.cat([kept, state["overlap"]], dim=2) if ctx.last_window else kept

    def _vit_pass(self, x: torch.Tensor, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        """``MiniMaxH3VideoViTDecoder3d.forward`` with the stage hooks before the hooked blocks: ``B, C, t, h, w``
        latents (after ``post_quant_conv``) -> ``B, 3, 4t, 16h, 16w`` ImageNet-space pixels."""
        b, _, t, h, w = x.shape
        hidden, count, rotary = self._tokens(x)
        hooked = dict(zip(self.hooked_blocks(), range(len(self.hooked_blocks()))))
        reference = None  # the reference's features entering the next hooked block
        for k, block in enumerate(self.vae.decoder.transformer_blocks):
            if k in hooked:
                grid = rearrange(hidden[:, :count], "b (t h w) c -> b c t h w", t=t, h=h)
                grid, reference = self.conditioned_stage(hooked[k], grid, reference, hooks, ctx)
                hidden = torch.cat([rearrange(grid, "b c t h w -> b (t h w) c"), hidden[:, count:]], dim=1)
            hidden = block(hidden, rotary)
        return self._unpatchify(hidden, count, (t, h, w))

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]:
        """``B, C, t, h, w`` latents -> the ViT's input tokens (voxels, then registers and the zero token), the
        voxel count and the RoPE, as ``MiniMaxH3VideoViTDecoder3d.forward`` makes them."""
        decoder = self.vae.decoder
        tokens = decoder.proj_in(rearrange(x, "b c t h w -> b (t h w) c"))
        registers = decoder.register_tokens.expand(len(x), -1, -1).to(tokens.dtype)
        hidden = torch.cat([tokens, registers, torch.zeros_like(tokens[:, :1])], dim=1)
        return hidden, tokens.shape[1], self._rotary(len(x), tuple(x.shape[2:]), x.device)

    def _unpatchify(self, hidden: torch.Tensor, count: int, grid: tuple[int, int, int]) -> torch.Tensor:
        decoder = self.vae.decoder
        out = decoder.proj_out(decoder.norm_out(hidden).to(decoder.proj_out.weight.dtype))[:, :count]
        t, h, w = grid
        return rearrange(
            out, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w,
            pt=decoder.patch_size_t, ph=decoder.patch_size, pw=decoder.patch_size,
        )  # fmt: skip

    def _rotary(self, batch: int, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
        """The decoder's RoPE for a ``t, h, w`` voxel grid plus the register/zero tokens at position 0."""
        decoder = self.vae.decoder
        axes = [2.0 * (torch.arange(0.5, size, dtype=torch.float32, device=device) / size) - 1.0 for size in grid]
        positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 2)
        positions = positions.unsqueeze(0).expand(batch, -1, -1)
        suffix = positions.new_zeros((batch, decoder.num_register_tokens + 1, 3))
        return decoder.rope(torch.cat([positions, suffix], dim=1))

    def plain_decode(self, latents: torch.Tensor, window: int | None = None, **inputs: Any) -> torch.Tensor:
        """``vae.decode`` in RefDecoder's [-1, 1] convention (unclamped)."""
        return self.from_backbone_pixels(self.vae.decode(latents).sample)

    # --- reference branch -----------------------------------------------------------------------------------
    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        """``B, dim, R, h, w`` reference tokens through the blocks of stage ``index``, each frame as a one-frame
        clip with the register tokens of the reference image's own decode at that stage (:meth:`_registers`)."""
        if ctx is None or ctx.reference_pixels is None:
            raise BackboneError(
                "the minimax-h3 blocks need the reference's register tokens: pass the decode's ctx, with "
                "ctx.reference_pixels set"
            )
        if ctx.reference_branch_inputs is None:  # once per decode, shared by every clip and stage
            ctx.reference_branch_inputs = self._registers(ctx.reference_pixels)
        suffix = ctx.reference_branch_inputs[index].to(reference.dtype)
        b, _, _, h, w = reference.shape
        tokens = rearrange(reference, "b c r h w -> (b r) (h w) c")
        hidden = torch.cat([tokens, suffix], dim=1)
        rotary = self._rotary(hidden.shape[0], (1, h, w), hidden.device)
        blocks = self.hooked_blocks() + [len(self.vae.decoder.transformer_blocks)]
        for block in self.vae.decoder.transformer_blocks[blocks[index] : blocks[index + 1]]:
            hidden = block(hidden, rotary)
        return rearrange(hidden[:, : h * w], "(b r) (h w) c -> b c r h w", b=b, h=h)

    @torch.no_grad()
    def _registers(self, reference: torch.Tensor) -> list[torch.Tensor]:
        """The register + zero tokens entering every hooked block in the one-frame decode of each reference frame
        (``B, C_px, R, H, W`` in [-1, 1]): ``(B*R), registers + 1, dim`` per stage."""
        frames = rearrange(reference, "b c r h w -> (b r) c 1 h w")
        weight = next(self.vae.encoder.parameters())
        x = self.vae.post_quant_conv(self.encode(frames.to(weight.dtype)))
        hidden, count, rotary = self._tokens(x)
        recorded, hooked = [], set(self.hooked_blocks())
        for k, block in enumerate(self.vae.decoder.transformer_blocks):
            if k in hooked:
                recorded.append(hidden[:, count:])
            hidden = block(hidden, rotary)
        return recorded


def _geometry_reasons(vae: nn.Module) -> list[str]:
    """The clip geometry the frame rule is written for: 17-frame clips, 3 dropped tokens, 4x in time, RGB."""
    reasons = config_reasons(vae, {**CLIP_GEOMETRY, "in_channels": 3, "out_channels": 3}, "minimax-h3")
    if vae.temporal_compression_ratio != 4:
        reasons.append(f"temporal compression {vae.temporal_compression_ratio} (minimax-h3 needs 4)")
    return reasons
