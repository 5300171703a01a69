"""VideoVAE+ (``sota-4-16z`` layout) as a clean-room PyTorch module that loads the official checkpoints strictly.

Two cascaded autoencoders: a 2+1D autoencoder compresses space 8x (``B, 3, T, H, W`` -> ``B, 16, T, H/8, W/8``)
and a temporal 1D-CNN autoencoder compresses time 4x (-> ``B, 16, T/4, H/8, W/8``). Encoding takes the posterior
mode (the mean, i.e. the first 16 channels) at both stages; decoding runs the temporal decoder and then the 2+1D
decoder. The model is not causal: a clip is processed as one chunk whose frame count is a multiple of 4, and
GroupNorm statistics span the whole chunk, so results depend on the chunking (the official inference script uses
non-overlapping chunks, reproduced by ``chunk_frames``).

Written from the architecture facts in the project's reference notes; no VideoVAE+ code (CC BY-NC-ND 4.0) was
used. The checkpoint keys (``encoder.*``, ``decoder.*``, ``encoder_temporal.*``, ``decoder_temporal.*``) equal the
official ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refdecoder.backbones.videovaeplus.checkpoint import check_state_dict, clean_state_dict, read_state_dict
from refdecoder.backbones.videovaeplus.layers import NORM_GROUPS
from refdecoder.backbones.videovaeplus.spatial import Decoder2plus1D, Encoder2plus1D
from refdecoder.backbones.videovaeplus.temporal import DecoderTemporal1DCNN, EncoderTemporal1DCNN
from refdecoder.errors import ConfigError, InputError
from refdecoder.frames import FrameRule
from refdecoder.validation import check_latents, check_video

__all__ = ["VideoVAEPlusConfig", "VideoVAEPlus"]

logger = logging.getLogger("refdecoder.backbones.videovaeplus")

# Official ddconfig entries this implementation supports only at these values (``resolution`` is ignored: the
# model is resolution-independent).
_OFFICIAL_FIXED = {"dropout": 0.0, "temporal_down_factor": 1, "attn_resolutions": []}


@dataclass(frozen=True)
class VideoVAEPlusConfig:
    """Construction arguments of :class:`VideoVAEPlus`; the defaults are the official ``sota-4-16z`` model.

    Attributes:
        in_channels: video channels entering the encoder.
        out_channels: video channels leaving the decoder.
        ch: base width of the 2+1D autoencoder.
        ch_mult: width multiplier per resolution level (``len - 1`` halvings of H and W).
        num_res_blocks: res-blocks per encoder level; decoder levels have one more.
        z_channels: latent channels of both stages.
        double_z: whether the 2+1D encoder outputs mean and log-variance (the mode is the mean).
        temporal_hidden: first hidden width of the temporal autoencoder (official ``hidden_channel``).
        temporal_scale_factor: temporal compression, a power of two (official 4).
        max_relative_distance: clipping distance of the temporal attention's relative positions.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    double_z: bool = True
    temporal_hidden: int = 128
    temporal_scale_factor: int = 4
    max_relative_distance: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        positive = ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "temporal_hidden")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"VideoVAEPlusConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"VideoVAEPlusConfig.ch_mult must be non-empty positive ints, got {self.ch_mult}")
        f = self.temporal_scale_factor
        if f < 2 or f & (f - 1):
            raise ConfigError(f"temporal_scale_factor must be a power of two >= 2 (official 4), got {f}")
        normed = [self.ch * m for m in self.ch_mult] + [self.temporal_hidden * 2]
        if any(w % NORM_GROUPS for w in normed):
            raise ConfigError(
                f"every normalised width must be divisible by {NORM_GROUPS} (GroupNorm groups); got widths "
                f"{normed} from ch={self.ch}, ch_mult={self.ch_mult}, temporal_hidden={self.temporal_hidden}"
            )

    @classmethod
    def small(cls) -> VideoVAEPlusConfig:
        """The reduced test model of the official fixtures: ``ch`` 32 and temporal hidden width 32."""
        return cls(ch=32, temporal_hidden=32)

    @classmethod
    def from_official(cls, ddconfig: Mapping[str, Any], ppconfig: Mapping[str, Any]) -> VideoVAEPlusConfig:
        """Build from the official YAML sections ``ddconfig`` (2+1D AE) and ``ppconfig`` (temporal AE).

        Raises:
            ConfigError: the sections describe a variant this implementation does not cover (caption
                cross-attention, temporal down-sampling inside the 2+1D part, dropout, differing latent widths).
        """
        for key, fixed in _OFFICIAL_FIXED.items():
            if key in ddconfig and ddconfig[key] != fixed:
                raise ConfigError(f"ddconfig.{key}={ddconfig[key]!r} is not supported (only {fixed!r})")
        if ppconfig.get("attn_temporal_factor"):
            raise ConfigError("ppconfig.attn_temporal_factor (caption cross-attention) is not supported")
        z = int(ddconfig["z_channels"])
        widths = {k: ppconfig.get(k, z) for k in ("ch", "out_ch", "z_channels")}
        if any(int(w) != z for w in widths.values()):
            raise ConfigError(f"ppconfig widths {widths} must all equal ddconfig.z_channels={z}")
        return cls(
            in_channels=int(ddconfig.get("in_channels", 3)),
            out_channels=int(ddconfig.get("out_ch", 3)),
            ch=int(ddconfig["ch"]),
            ch_mult=tuple(ddconfig["ch_mult"]),
            num_res_blocks=int(ddconfig["num_res_blocks"]),
            z_channels=z,
            double_z=bool(ddconfig.get("double_z", True)),
            temporal_hidden=int(ppconfig.get("hidden_channel", 128)),
            temporal_scale_factor=int(ppconfig.get("temporal_scale_factor", 4)),
        )

    @property
    def spatial_factor(self) -> int:
        """Down-sampling of H and W from pixels to latents (8 for the official model)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def frame_rule(self) -> FrameRule:
        """Valid pixel frame counts: multiples of the temporal factor (4, 8, 12, ... for the official model)."""
        return FrameRule(first=self.temporal_scale_factor, step=self.temporal_scale_factor)


class VideoVAEPlus(nn.Module):
    """The VideoVAE+ autoencoder: a 2+1D spatial autoencoder cascaded with a temporal 1D-CNN autoencoder.

    Submodules (named as in the official checkpoints): ``encoder`` and ``encoder_temporal`` encode,
    ``decoder_temporal`` and ``decoder`` decode.

    Args:
        config: architecture; ``None`` gives the official ``sota-4-16z`` model.

    Example::

        vae = VideoVAEPlus.from_checkpoint("sota-4-16z.ckpt").eval()
        latents = vae.encode(video)          # (B, 3, 16, 216, 216) in [-1, 1] -> (B, 16, 4, 27, 27)
        video_hat = vae.decode(latents)      # -> (B, 3, 16, 216, 216), not clamped
    """

    def __init__(self, config: VideoVAEPlusConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VideoVAEPlusConfig()
        self.encoder = Encoder2plus1D(
            config.in_channels,
            config.ch,
            config.ch_mult,
            config.num_res_blocks,
            config.z_channels,
            config.double_z,
            config.max_relative_distance,
        )
        self.decoder = Decoder2plus1D(
            config.out_channels,
            config.ch,
            config.ch_mult,
            config.num_res_blocks,
            config.z_channels,
            config.max_relative_distance,
        )
        z, hidden, factor = config.z_channels, config.temporal_hidden, config.temporal_scale_factor
        self.encoder_temporal = EncoderTemporal1DCNN(z, hidden, factor)
        self.decoder_temporal = DecoderTemporal1DCNN(z, hidden, factor)

    # --- layout -----------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the latents (16 for the official model)."""
        return self.config.z_channels

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent position along H and W (8)."""
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame (4)."""
        return self.config.temporal_scale_factor

    @property
    def frame_rule(self) -> FrameRule:
        """Valid pixel frame counts (multiples of 4)."""
        return self.config.frame_rule

    # --- encode -----------------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Encode a video to latents (posterior mode at both stages).

        Args:
            video: ``B, 3, T, H, W`` in [-1, 1]; ``T`` a multiple of 4, ``H`` and ``W`` multiples of 8.
            chunk_frames: encode non-overlapping chunks of this many frames independently (a multiple of 4), as
                the official inference script does; ``None`` encodes the clip as one chunk.

        Returns:
            Latents ``B, 16, T/4, H/8, W/8``.

        Raises:
            InputError: bad layout, channel count, frame count, size, value range, or ``chunk_frames``.
        """
        check_video(video, self.frame_rule, self.spatial_factor)
        chunks = self._split(video, chunk_frames, 1)
        return torch.cat([self.encoder_temporal_mode(self.encoder_spatial_mode(c)) for c in chunks], dim=2)

    def encode_spatial(self, video: torch.Tensor) -> torch.Tensor:
        """First stage only: the 2+1D posterior mode, ``B, 3, T, H, W`` in [-1, 1] -> ``B, 16, T, H/8, W/8``.

        Any ``T >= 1`` is accepted (the 2+1D autoencoder does not compress time).
        """
        check_video(video, FrameRule(first=1, step=1), self.spatial_factor)
        return self.encoder_spatial_mode(video)

    def encode_temporal(self, z: torch.Tensor) -> torch.Tensor:
        """Second stage only: ``B, 16, T, h, w`` (2+1D latents, T a multiple of 4) -> ``B, 16, T/4, h, w``."""
        check_latents(z, self.latent_channels)
        self.frame_rule.check(z.shape[2])
        return self.encoder_temporal_mode(z)

    def encoder_spatial_mode(self, video: torch.Tensor) -> torch.Tensor:
        """Unchecked 2+1D encoder posterior mode (the mean channels)."""
        return self.encoder(video)[:, : self.latent_channels]

    def encoder_temporal_mode(self, z: torch.Tensor) -> torch.Tensor:
        """Unchecked temporal encoder posterior mode (the mean channels)."""
        return self.encoder_temporal(z)[:, : self.latent_channels]

    # --- decode -----------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Decode latents to a video (``decode_temporal`` then ``decode_spatial``).

        Args:
            latents: ``B, 16, t, h, w`` raw latents as :meth:`encode` returns them.
            chunk_frames: decode non-overlapping chunks of this many *pixel* frames (a multiple of 4)
                independently; ``None`` decodes everything as one chunk.

        Returns:
            Video ``B, 3, 4t, 8h, 8w``, nominally in [-1, 1] but **not clamped** (the official model does not
            clamp either).
        """
        check_latents(latents, self.latent_channels)
        chunks = self._split(latents, chunk_frames, self.temporal_factor)
        return torch.cat([self.decoder(self.decoder_temporal(c)) for c in chunks], dim=2)

    def decode_temporal(self, latents: torch.Tensor) -> torch.Tensor:
        """Temporal decoder only: ``B, 16, t, h, w`` -> 2+1D latents ``B, 16, 4t, h, w``."""
        check_latents(latents, self.latent_channels)
        return self.decoder_temporal(latents)

    def decode_spatial(self, z: torch.Tensor) -> torch.Tensor:
        """2+1D decoder only: ``B, 16, T, h, w`` -> video ``B, 3, T, 8h, 8w`` (not clamped).

        For finer control (hooks between levels) call ``decoder.forward_stem``, ``decoder.forward_level`` and
        ``decoder.forward_head`` directly; see :class:`Decoder2plus1D`.
        """
        check_latents(z, self.latent_channels)
        return self.decoder(z)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``B, 3, T, H, W`` in [-1, 1] through the latent mode (output not clamped)."""
        return self.decode(self.encode(video))

    def _split(self, x: torch.Tensor, chunk_frames: int | None, frames_per_step: int) -> tuple[torch.Tensor, ...]:
        """Non-overlapping time chunks of ``chunk_frames`` pixel frames (``frames_per_step`` pixel frames per step)."""
        if chunk_frames is None:
            return (x,)
        f = self.temporal_factor
        if chunk_frames < f or chunk_frames % f:
            raise InputError(f"chunk_frames must be a positive multiple of {f}, got {chunk_frames}")
        return x.split(chunk_frames // frames_per_step, dim=2)

    # --- checkpoints ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: VideoVAEPlusConfig | None = None,
        map_location: str | torch.device = "cpu",
        allow_pickle: bool = False,
    ) -> VideoVAEPlus:
        """Build the model and load an official checkpoint strictly.

        Accepts a Lightning ``.ckpt`` (``{"state_dict": ...}``), a plain pickled state dict or a ``.safetensors``
        file. Keys starting with ``loss`` are dropped and ``_forward_module.`` / ``_orig_mod.`` are stripped.
        The model is built on the meta device and takes the checkpoint's tensors (cast to float32), so no
        second copy of the weights is allocated.

        Args:
            path: checkpoint file.
            config: architecture; ``None`` means the official ``sota-4-16z`` model.
            map_location: device the tensors are loaded to.
            allow_pickle: allow pickled files that hold more than tensors (runs their code; trusted files only).

        Returns:
            The model in eval mode.

        Raises:
            CheckpointError: unreadable file, or keys/shapes that do not match ``config`` (listed in the message).
        """
        config = config or VideoVAEPlusConfig()
        state = clean_state_dict(read_state_dict(path, map_location, allow_pickle))
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_state_dict(expected, state, f"VideoVAEPlus({_describe(config)})")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        logger.info("loaded VideoVAE+ checkpoint %s (%d tensors)", path, len(state))
        return model.eval()


def _describe(config: VideoVAEPlusConfig) -> str:
    defaults = VideoVAEPlusConfig()
    changed = [
        f"{f.name}={getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(defaults, f.name)
    ]
    return ", ".join(changed) or "official sota-4-16z config"
