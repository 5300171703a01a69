"""The temporal 1D-CNN autoencoder of VideoVAE+: 4x compression of time on the 2+1D latent.

It works on the first stage's latent ``B, 16, T, H/8, W/8`` and never changes H or W. Every convolution is
3x3x3 with *replicate* padding. The encoder halves time ``log2(factor)`` times with stride-2 convs padded one
frame in front and none behind; the decoder doubles it with transposed convs (kernel 3, stride (2,1,1),
padding 1, output padding (1,0,0)). Being non-causal, it needs frame counts that are multiples of the factor.
Attribute names follow the official checkpoint keys (``conv_in.conv``, ``mid_blocks.N.down.conv``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.backbones.videovaeplus.layers import group_norm

__all__ = ["ReplicatePadConv3d", "TemporalResBlock", "EncoderTemporal1DCNN", "DecoderTemporal1DCNN"]


def _xavier_(module: nn.Module) -> None:
    nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)


class ReplicatePadConv3d(nn.Module):
    """3x3x3 conv on replicate-padded input; ``time_pad`` = (frames in front, frames behind)."""

    def __init__(
        self, in_channels: int, out_channels: int, time_stride: int = 1, time_pad: tuple[int, int] = (1, 1)
    ) -> None:
        super().__init__()
        self.pad = (1, 1, 1, 1, *time_pad)  # F.pad order: W, H, T
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=(time_stride, 1, 1))
        _xavier_(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class TemporalResBlock(nn.Module):
    """Same-width residual block ``x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = ReplicatePadConv3d(channels, channels)
        self.norm2 = group_norm(channels)
        self.conv2 = ReplicatePadConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class _DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = ReplicatePadConv3d(in_channels, out_channels, time_stride=2, time_pad=(1, 0))
        self.res = TemporalResBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.down(x))


class _UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(
            in_channels, out_channels, 3, stride=(2, 1, 1), padding=1, output_padding=(1, 0, 0)
        )
        _xavier_(self.up)
        self.res1 = TemporalResBlock(out_channels)
        self.res2 = TemporalResBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.res1(self.up(x)))


def _num_halvings(scale_factor: int) -> int:
    return scale_factor.bit_length() - 1


class EncoderTemporal1DCNN(nn.Module):
    """``B, z, T, h, w`` -> moments ``B, 2z, T/factor, h, w`` (mean first, then log-variance).

    Widths: ``hidden`` after ``conv_in``, doubled by each stride-2 stage (128 -> 256 -> 512 for the official
    factor 4, hidden 128).
    """

    def __init__(self, z_channels: int, hidden: int, scale_factor: int) -> None:
        super().__init__()
        n = _num_halvings(scale_factor)
        self.conv_in = ReplicatePadConv3d(z_channels, hidden)
        self.mid_blocks = nn.ModuleList(_DownBlock(hidden * 2**i, hidden * 2 ** (i + 1)) for i in range(n))
        top = hidden * 2**n
        self.final_block = nn.Sequential(group_norm(top), nn.SiLU(), ReplicatePadConv3d(top, 2 * z_channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid_blocks:
            h = block(h)
        return self.final_block(h)


class DecoderTemporal1DCNN(nn.Module):
    """``B, z, t, h, w`` -> ``B, z, t*factor, h, w``.

    Widths: ``conv_in`` to ``hidden * factor``; up-step ``i`` outputs ``hidden * factor / 2^i`` (512 -> 512 ->
    256 for the official factor 4, hidden 128); ``conv_last`` back to ``z`` channels.
    """

    def __init__(self, z_channels: int, hidden: int, scale_factor: int) -> None:
        super().__init__()
        n = _num_halvings(scale_factor)
        widths = [hidden * 2**n] + [hidden * 2 ** (n - i) for i in range(n)]
        self.conv_in = ReplicatePadConv3d(z_channels, widths[0])
        self.mid_blocks = nn.ModuleList(_UpBlock(widths[i], widths[i + 1]) for i in range(n))
        self.conv_last = ReplicatePadConv3d(widths[-1], z_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid_blocks:
            h = block(h)
        return self.conv_last(h)
