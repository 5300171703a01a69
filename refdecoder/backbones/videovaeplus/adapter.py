"""VideoVAE+ adapter: drives :class:`VideoVAEPlus` window by window and calls the RefDecoder hook points.

Decode order (the paper's layout, reference notes §9.18): the temporal decoder first turns each latent frame into
4 frames of 2+1D latents; the ``latents`` hook sees that full-frame-rate 16-channel latent (where the official
token dropout acts); then, per window, the 2+1D decoder runs its stem and levels 3 and 2, and the stage hooks sit

- ``stage0`` before level 1 (``level_in_channels[1]`` = 512 channels at H/2, patch (1, 8, 8)),
- ``stage1`` before level 0 (``level_in_channels[0]`` = 256 channels at H, patch (1, 16, 16)),
- ``stage2`` after level 0, i.e. before the head (``level_out_channels[0]`` = 128 channels at H, patch (1, 16, 16)),

which puts every stage on one H/16 token grid. The 2+1D decoder never resamples time, so every stage has
``time_factor`` 1 and sees the window's pixel frames.

Windows. VideoVAE+ is not causal: the temporal decoder pads by replicating edge frames and every GroupNorm
normalises over all frames it is given, so there is no cache to carry and the result depends on how frames are
grouped. The official inference cuts a video into independent 16-frame chunks; this adapter does the same with
its windows (window ``w`` of latent frames ``[start, stop)`` is pixel frames ``[4 start, 4 stop)``), running the
temporal decoder *and* the 2+1D decoder per window. Consequences: the plain output changes with the window size
(seams between windows are the backbone's own), and :meth:`VideoVAEPlusAdapter.plain_decode` decodes with the same
windows (``vae.decode(..., chunk_frames=4 * window)``) so that "RefDecoder at initialisation equals the backbone"
compares like with like. Peak memory depends on the window, not on the video length.

Clamping: VideoVAE+ does not clamp its output (nor does the official RefDecoder), so neither do
:meth:`VideoVAEPlusAdapter.plain_decode` and ``RefDecoder.decode`` by default (``output_clamp = False``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from torch import nn

from refdecoder.backbones.base import BackboneAdapter, Fit, StageSpec
from refdecoder.backbones.videovaeplus.autoencoder import VideoVAEPlus, VideoVAEPlusConfig
from refdecoder.errors import BackboneError
from refdecoder.frames import GROUPS_OF_4, FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks, plan_windows

__all__ = ["VideoVAEPlusAdapter"]

# Decoder level each stage precedes (stage index -> level); the last stage follows level 0 (before the head).
_STAGE_LEVELS = (1, 0)
_HEAD_STAGE = len(_STAGE_LEVELS)


class VideoVAEPlusAdapter(BackboneAdapter):
    """Adapter for :class:`~refdecoder.backbones.videovaeplus.VideoVAEPlus` (the ``sota-4-16z`` layout).

    Frame rule 4k (``GROUPS_OF_4``), no causal first frame, default window 4 latent frames (16 pixel frames, the
    paper's chunk), spatial factor and latent channels from the VAE (8 and 16 for the official model), no latent
    normalisation. Only the 2+1D decoder (``decoder.*``) is fine-tuned by the official recipe; the temporal
    decoder stays frozen.
    """

    frame_rule: FrameRule = GROUPS_OF_4
    causal_first_frame = False
    default_window = 4  # 4 latent frames = 16 pixel frames, the paper's chunk
    exact_streaming = False  # independent chunks: the output depends on the window (plain_decode uses the same)
    output_clamp = False
    # The temporal decoder runs in every decode, but the official recipe fine-tunes the 2+1D decoder only.
    decoder_exclusions = ("decoder_temporal.",)

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        if vae.decoder.num_levels <= max(_STAGE_LEVELS):
            raise BackboneError(
                f"the VideoVAE+ adapter needs a decoder with at least {max(_STAGE_LEVELS) + 1} resolution levels "
                f"(stages sit before levels {_STAGE_LEVELS}), got {vae.decoder.num_levels}; use len(ch_mult) >= 2"
            )
        self._stages = self._build_stages()

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, vae: nn.Module) -> Fit:
        # The frame rule is a class attribute of the contract, so only the 4x temporal variant fits.
        if not isinstance(vae, VideoVAEPlus):
            return Fit(0, (f"it drives VideoVAEPlus only, not {type(vae).__name__}",))
        if vae.frame_rule != cls.frame_rule:
            return Fit(1, (f"frames {vae.frame_rule.describe()} ({cls.name} needs {cls.frame_rule.describe()})",))
        return Fit(2)

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A narrow VideoVAE+ (``ch`` 32, one res-block per level): well under a second per decode on CPU.

        Stage widths 64 / 64 / 32 stay divisible by 32, as the GroupNorms of the ``official-videovae+`` preset need.
        """
        kwargs: dict[str, Any] = dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_hidden=16)
        kwargs.update(overrides)
        return VideoVAEPlus(VideoVAEPlusConfig(**kwargs))

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.latent_channels)

    @property
    def spatial_factor(self) -> int:
        return int(self.vae.spatial_factor)

    def stages(self) -> list[StageSpec]:
        return list(self._stages)

    def _build_stages(self) -> list[StageSpec]:
        decoder = self.vae.decoder
        grid = 2 * self.spatial_factor  # the paper's H/16 token grid for the official 8x model
        points = [(decoder.level_in_channels[level], 2**level) for level in _STAGE_LEVELS]
        points.append((decoder.level_out_channels[0], 1))  # before the head
        return [
            StageSpec(f"stage{i}", channels, scale, (1, grid // scale, grid // scale), time_factor=1)
            for i, (channels, scale) in enumerate(points)
        ]

    def stage_frames(self, index: int, latent_frames: int, first_window: bool) -> int:
        # The temporal decoder runs before the first stage, so every stage sees pixel-rate frames.
        return super().stage_frames(index, self.temporal_factor * latent_frames, first_window)

    # --- encode ---------------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``B, 3, T, H, W`` in [-1, 1] -> latents ``B, 16, T/4, H/8, W/8`` (posterior mode).

        Encoded in independent chunks of one default window (16 frames), as the official inference does, so a
        long video costs memory for one chunk only; clips of up to 16 frames are encoded in one piece.
        """
        return self.vae.encode(video, chunk_frames=self.temporal_factor * self.default_window)

    # --- decoding -------------------------------------------------------------------------------------------
    def plan_windows(self, num_latent_frames: int, window: int) -> list[tuple[int, int]]:
        """Independent chunks of ``window`` latent frames (the output depends on them; plain_decode uses the same)."""
        return plan_windows(num_latent_frames, window)

    def decoder_input(self, latents: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
        # Independent chunks, as the official inference decodes them (replicate padding at every window edge).
        # The latents hook sees the whole full-rate latent at once, so per-decode draws (token dropout masks)
        # stay shared by all windows.
        return torch.cat([self.vae.decoder_temporal(latents[:, :, a:b]) for a, b in windows], dim=2)

    def window_input(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return x[:, :, self.temporal_factor * start : self.temporal_factor * stop]  # full-frame-rate latents

    def decode_window(self, z: torch.Tensor, state: None, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        decoder = self.vae.decoder
        h, reference = decoder.forward_stem(z), None  # reference: its features entering the next stage
        for level in reversed(range(decoder.num_levels)):
            if level in _STAGE_LEVELS:
                h, reference = self.conditioned_stage(_STAGE_LEVELS.index(level), h, reference, hooks, ctx)
            h = decoder.forward_level(level, h)
        h, _ = hooks.stage(_HEAD_STAGE, h, reference, ctx)  # the last stage: no level after it for the reference
        return decoder.forward_head(h)

    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        """Push ``B, C_i, R, h_i, w_i`` reference features through the decoder level after stage ``index``.

        Stage 0 -> level 1 (res-blocks and 2x upsample), stage 1 -> level 0 (res-blocks). Reference frames are
        folded into the batch, so each is normalised over its own frame and never mixed in time with another,
        as the official model runs its single reference frame. Stage 2 is the last stage: nothing follows it.
        """
        if not 0 <= index < len(_STAGE_LEVELS):
            raise BackboneError(
                f"run_stage_on_reference: stage {index} has no decoder level after it that the reference needs "
                f"(levels follow stages 0..{len(_STAGE_LEVELS) - 1}; the last stage's reference is discarded)"
            )
        frames = rearrange(reference, "b c r h w -> (b r) c 1 h w")
        out = self.vae.decoder.forward_level(_STAGE_LEVELS[index], frames)
        return rearrange(out, "(b r) c 1 h w -> b c r h w", b=reference.shape[0])

    def plain_decode(self, latents: torch.Tensor, window: int | None = None, clamp: bool = False) -> torch.Tensor:
        """The backbone's own decode with the windows RefDecoder uses (independent chunks of ``window`` latents).

        Args:
            latents: raw latents ``B, 16, t, h, w``.
            window: latent frames per chunk; default :attr:`default_window` (the window ``decode`` uses when the
                config does not set one).
            clamp: clamp to [-1, 1]; VideoVAE+ itself never clamps (nor does ``RefDecoder.decode`` by default).

        Returns:
            Video ``B, 3, 4t, 8h, 8w``.
        """
        window = self.default_window if window is None else window
        video = self.vae.decode(latents, chunk_frames=self.temporal_factor * window)
        return video.clamp(-1.0, 1.0) if clamp else video

    # --- parameters -----------------------------------------------------------------------------------------
    def decoder_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.vae.decoder.named_parameters():
            yield f"decoder.{name}", param
