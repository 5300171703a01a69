"""Reference tokenizer: reference frames -> features at the resolution and width of the first decoder stage.

Two designs:

- ``patch_conv`` (our default): one non-overlapping ``p x p`` patch convolution (a ViT patch embedding).
- ``space_to_depth`` (the paper's encoder): rearrange each ``p x p`` pixel block into channels, then a
  ``k x k`` convolution, so neighbouring patches overlap in the receptive field.

Both are followed by a normalisation (Wan-style channel RMS norm, GroupNorm, or none).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from refdecoder.blocks.norms import ChannelRMSNorm
from refdecoder.errors import ConfigError, InputError

__all__ = ["space_to_depth", "ReferenceTokenizer"]


def space_to_depth(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Move each ``patch x patch`` pixel block into channels.

    Args:
        x: ``N, C, H, W`` with H and W divisible by ``patch``.
        patch: block size p.

    Returns:
        ``N, C*p*p, H/p, W/p`` where output channel ``c*p*p + dy*p + dx`` holds input channel ``c`` at offset
        ``(dy, dx)`` inside the block (colour slowest, then row offset, then column offset) — the order the
        official reference encoders use, so their conv weights load unchanged.
    """
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise InputError(f"space_to_depth needs H and W divisible by {patch}, got {h}x{w}; resize or crop the input")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(n, c * patch * patch, h // patch, w // patch)


class ReferenceTokenizer(nn.Module):
    """Encode reference frames into the feature space of the decoder's first conditioned stage.

    Args:
        out_channels: channels of the first stage's features.
        patch_size: p, the spatial down-sampling (the backbone's spatial factor at that stage).
        kind: ``"patch_conv"`` (Conv3d kernel = stride = ``(1, p, p)``) or ``"space_to_depth"`` (space-to-depth p,
            then a stride-1 ``k x k`` conv with padding ``k // 2``).
        kernel_size: k of the ``space_to_depth`` conv (ignored by ``patch_conv``).
        norm: ``"rms"`` (:class:`ChannelRMSNorm`), ``"group"`` (``GroupNorm(groups, out_channels, eps=1e-6)``),
            or ``"none"``.
        in_channels: channels of the reference frames (3 for RGB).
        groups: GroupNorm groups for ``norm="group"``.

    Submodules are named ``proj`` (always an ``nn.Conv3d``) and ``norm`` (``nn.Identity`` for ``"none"``). The
    ``space_to_depth`` conv is stored as Conv3d with kernel ``(1, k, k)``: the official Wan checkpoint stores it as a
    Conv2d weight ``[384, 192, 3, 3]``, which converts by ``weight.unsqueeze(2)``. Official settings: Wan2.1 =
    (out 384, patch 8, k 3, norm "rms"); VideoVAE+ = (out 512, patch 2, k 3, norm "none").

    Weights are Xavier-uniform with zero bias; every reference frame is encoded on its own.
    """

    def __init__(
        self,
        out_channels: int,
        patch_size: int,
        kind: Literal["patch_conv", "space_to_depth"] = "patch_conv",
        kernel_size: int = 3,
        norm: Literal["rms", "group", "none"] = "rms",
        in_channels: int = 3,
        groups: int = 32,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.patch_size, self.kind = patch_size, kind
        if kind == "patch_conv":
            patch = (1, patch_size, patch_size)
            self.proj = nn.Conv3d(in_channels, out_channels, patch, stride=patch)
        elif kind == "space_to_depth":
            pad = kernel_size // 2
            self.proj = nn.Conv3d(
                in_channels * patch_size**2, out_channels, (1, kernel_size, kernel_size), padding=(0, pad, pad)
            )
        else:
            raise ConfigError(f"ReferenceTokenizer kind must be 'patch_conv' or 'space_to_depth', got {kind!r}")
        self.norm = _make_norm(norm, out_channels, groups)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """Tokenize reference frames.

        Args:
            reference: ``B, in_channels, R, H, W`` in [-1, 1], H and W divisible by ``patch_size``.

        Returns:
            ``B, out_channels, R, H/p, W/p`` features.
        """
        self._check(reference)
        b, c, r, h, w = reference.shape
        # Fold the R frames into the batch so that neither the conv nor a GroupNorm mixes frames.
        x = reference.transpose(1, 2).reshape(b * r, c, h, w)
        if self.kind == "space_to_depth":
            x = space_to_depth(x, self.patch_size)
        x = self.norm(self.proj(x.unsqueeze(2)))
        return x.reshape(b, r, self.out_channels, *x.shape[-2:]).transpose(1, 2)

    def _check(self, reference: torch.Tensor) -> None:
        p = self.patch_size
        if reference.ndim != 5 or reference.shape[1] != self.in_channels:
            raise InputError(
                f"reference must be B, {self.in_channels}, R, H, W in [-1, 1], got shape "
                f"{tuple(reference.shape)}; add a frame axis with reference.unsqueeze(2) for images"
            )
        h, w = reference.shape[-2:]
        if h % p or w % p:
            raise InputError(
                f"reference size {h}x{w} is not divisible by the tokenizer patch {p}; resize or crop "
                f"it to a multiple of {p} (e.g. {h - h % p}x{w - w % p})"
            )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, patch_size={self.patch_size}"


def _make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "rms":
        return ChannelRMSNorm(channels)
    if norm == "group":
        if channels % groups:
            raise ConfigError(f"GroupNorm needs channels divisible by groups, got {channels} and {groups} groups")
        return nn.GroupNorm(groups, channels, eps=1e-6)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"norm must be 'rms', 'group' or 'none', got {norm!r}")
