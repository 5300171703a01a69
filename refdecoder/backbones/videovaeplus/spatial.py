"""The 2+1D ("temporal-aware spatial") encoder and decoder of VideoVAE+: 8x spatial, no temporal compression.

Level ``L`` of either side works at ``H / 2^L`` with ``ch * ch_mult[L]`` channels (128/256/512/512 for the
official ``ch=128, ch_mult=(1,2,4,4)``). Module names follow the official checkpoint keys: ``down.L.block.K``,
``down.L.downsample``, ``mid.{block_1,attn_1,attn_1_tmp,block_2}``, ``up.L.block.K``, ``up.L.upsample``.
The decoder's ``up`` list is indexed by level (``up.0`` is full resolution) and executed from the last level
down to level 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.backbones.videovaeplus.layers import (
    Downsample,
    ResnetBlock2plus1D,
    SpatialAttention,
    TemporalAttention,
    Upsample,
    group_norm,
    spatial_conv,
)
from refdecoder.errors import InputError

__all__ = ["MidBlock2plus1D", "Encoder2plus1D", "Decoder2plus1D"]


class MidBlock2plus1D(nn.Module):
    """Res-block, per-frame spatial attention, per-pixel temporal attention, res-block."""

    def __init__(self, channels: int, max_relative_distance: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock2plus1D(channels, channels)
        self.attn_1 = SpatialAttention(channels)
        self.attn_1_tmp = TemporalAttention(channels, max_relative_distance)
        self.block_2 = ResnetBlock2plus1D(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1_tmp(self.attn_1(self.block_1(x))))


def _blocks(widths: list[int]) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock2plus1D(a, b) for a, b in zip(widths[:-1], widths[1:]))


class _DownLevel(nn.Module):
    """Res-blocks of one encoder level (widths ``widths[0] -> ... -> widths[-1]``), then an optional downsample."""

    def __init__(self, widths: list[int], downsample: bool) -> None:
        super().__init__()
        self.block = _blocks(widths)
        self.downsample = Downsample(widths[-1]) if downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        return h if self.downsample is None else self.downsample(h)


class _UpLevel(nn.Module):
    """Res-blocks of one decoder level, then an optional 2x upsample."""

    def __init__(self, widths: list[int], upsample: bool) -> None:
        super().__init__()
        self.block = _blocks(widths)
        self.upsample = Upsample(widths[-1]) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        return h if self.upsample is None else self.upsample(h)


class Encoder2plus1D(nn.Module):
    """Video ``B, C_in, T, H, W`` -> posterior moments ``B, 2z (or z), T, H/2^(levels-1), W/2^(levels-1)``."""

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        double_z: bool,
        max_relative_distance: int,
    ) -> None:
        super().__init__()
        self.conv_in = spatial_conv(in_channels, ch)
        widths_in = [ch] + [ch * m for m in ch_mult[:-1]]
        last = len(ch_mult) - 1
        self.down = nn.ModuleList(
            _DownLevel([w_in] + [ch * m] * num_res_blocks, downsample=i < last)
            for i, (w_in, m) in enumerate(zip(widths_in, ch_mult))
        )
        top = ch * ch_mult[-1]
        self.mid = MidBlock2plus1D(top, max_relative_distance)
        self.norm_out = group_norm(top)
        self.conv_out = spatial_conv(top, 2 * z_channels if double_z else z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder2plus1D(nn.Module):
    """Latent ``B, z, T, h, w`` -> video ``B, C_out, T, h * 2^(levels-1), w * 2^(levels-1)`` (not clamped).

    The forward pass is exposed as small public steps so that an adapter can insert work between levels and run
    single reference frames through a level spatially only::

        h = decoder.forward_stem(z)                 # conv_in + mid-block, at the latent resolution
        for level in reversed(range(decoder.num_levels)):
            h = decoder.forward_level(level, h)     # res-blocks of up[level], then its upsample (level > 0)
        video = decoder.forward_head(h)             # GroupNorm -> SiLU -> conv_out

    Level ``L`` receives ``level_in_channels[L]`` channels at ``H / 2^L`` and returns ``level_out_channels[L]``
    channels at ``H / 2^(L-1)`` (``H`` for level 0, which does not up-sample). With the official widths:
    level 3: 512 -> 512 at H/8, level 2: 512 -> 512 at H/4, level 1: 512 -> 256 at H/2, level 0: 256 -> 128 at H.
    """

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        max_relative_distance: int,
    ) -> None:
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = spatial_conv(z_channels, top)
        self.mid = MidBlock2plus1D(top, max_relative_distance)
        # Level L takes the output width of level L+1 (the top width for the last level).
        self.level_in_channels = [ch * m for m in ch_mult[1:]] + [top]
        self.level_out_channels = [ch * m for m in ch_mult]
        self.up = nn.ModuleList(
            _UpLevel([w_in] + [w_out] * (num_res_blocks + 1), upsample=i > 0)
            for i, (w_in, w_out) in enumerate(zip(self.level_in_channels, self.level_out_channels))
        )
        self.norm_out = group_norm(ch * ch_mult[0])
        self.conv_out = spatial_conv(ch * ch_mult[0], out_channels)

    @property
    def num_levels(self) -> int:
        """Number of resolution levels (4 for the official model); levels run from ``num_levels - 1`` to 0."""
        return len(self.up)

    def forward_stem(self, z: torch.Tensor) -> torch.Tensor:
        """``conv_in`` and the mid-block: ``B, z, T, h, w`` -> ``B, level_in_channels[-1], T, h, w``."""
        return self.mid(self.conv_in(z))

    def forward_level(self, level: int, h: torch.Tensor) -> torch.Tensor:
        """Run the res-blocks of ``up[level]`` and, for ``level > 0``, its 2x spatial upsample.

        Args:
            level: resolution level, ``0 <= level < num_levels``.
            h: features ``B, level_in_channels[level], T, H / 2^level, W / 2^level``. ``T`` may be 1 (e.g. a
                reference frame): GroupNorm then uses that frame's statistics and the temporal convs see zero
                padding on both sides, which is how the official RefDecoder runs its reference spatially only.

        Returns:
            ``B, level_out_channels[level], T, H', W'`` with ``H' = 2 H / 2^level`` for ``level > 0``, else ``H``.

        Raises:
            InputError: ``level`` out of range.
        """
        if not 0 <= level < self.num_levels:
            raise InputError(f"decoder level must lie in [0, {self.num_levels}), got {level}")
        return self.up[level](h)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        """GroupNorm -> SiLU -> ``conv_out``: ``B, level_out_channels[0], T, H, W`` -> ``B, C_out, T, H, W``."""
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.forward_stem(z)
        for level in reversed(range(self.num_levels)):
            h = self.forward_level(level, h)
        return self.forward_head(h)
