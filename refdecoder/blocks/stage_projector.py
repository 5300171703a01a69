"""Stage projector: the per-stage bridge between decoder features and the shared transformer's tokens.

For one decoder stage it patch-embeds the joint ``[reference, video]`` feature map onto the common token grid,
runs the shared transformer, and projects the tokens back to feature patches. With ``residual=True`` the result is
added to the input through a zero-initialised projection, so the stage is an exact identity at initialisation;
``residual=False`` replaces the features, as the official Wan checkpoints do.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.blocks.norms import FP32LayerNorm
from refdecoder.errors import ConfigError, InputError

if TYPE_CHECKING:
    from refdecoder.blocks.transformer import SharedTransformer

__all__ = ["StageProjector"]


class StageProjector(nn.Module):
    """Patch embedding, output norm and output projection of one decoder stage.

    Args:
        channels: C, feature channels at this stage.
        dim: token width of the shared transformer.
        patch_size: ``(pt, ph, pw)`` token patch (kernel = stride of the embedding).
        residual_reference: with ``residual``, also add the input back to the reference frames (False: the
            reference frames take the bare update, as in the official VideoVAE+ checkpoints).
        residual: add the update to the input (zero-initialised ``out``: identity at init) or replace the input
            (Xavier-uniform ``out``, the official Wan behaviour).
        input_norm: ``"group"`` adds ``norm_video`` / ``norm_reference`` GroupNorms applied before embedding
            (official VideoVAE+), ``"none"`` skips them.
        groups: GroupNorm groups.

    Submodules: ``embed`` (Conv3d C -> dim), ``out_norm`` (float32 LayerNorm, no affine), ``out``
    (Linear dim -> ``pt*ph*pw*C``, per-token vector laid out ``[pt][ph][pw][C]``, C fastest), and with
    ``input_norm="group"`` ``norm_video`` and ``norm_reference``.
    """

    def __init__(
        self,
        channels: int,
        dim: int,
        patch_size: tuple[int, int, int],
        residual: bool = True,
        residual_reference: bool = True,
        input_norm: Literal["none", "group"] = "none",
        groups: int = 32,
    ) -> None:
        super().__init__()
        self.channels, self.dim, self.residual = channels, dim, residual
        self.residual_reference = residual_reference
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size must be a (t, h, w) triple of positive ints, got {patch_size}")
        self.embed = nn.Conv3d(channels, dim, self.patch_size, stride=self.patch_size)
        self.out_norm = FP32LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.out = nn.Linear(dim, math.prod(self.patch_size) * channels)
        self.input_norm = input_norm
        if input_norm == "group":
            if channels % groups:
                raise ConfigError(
                    f"input_norm='group' needs channels divisible by groups, got {channels} channels "
                    f"and {groups} groups; pass groups= a divisor of {channels}"
                )
            self.norm_video = nn.GroupNorm(groups, channels, eps=1e-6)
            self.norm_reference = nn.GroupNorm(groups, channels, eps=1e-6)
        elif input_norm != "none":
            raise ConfigError(f"input_norm must be 'none' or 'group', got {input_norm!r}")
        if residual:
            nn.init.zeros_(self.out.weight)
        else:
            nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def token_count(self, t: int, h: int, w: int) -> int:
        """Tokens produced for a ``t, h, w`` feature map (each axis padded up to a multiple of the patch)."""
        pt, ph, pw = self.patch_size
        return -(-t // pt) * -(-h // ph) * -(-w // pw)

    def forward(
        self,
        x: torch.Tensor,
        transformer: SharedTransformer,
        num_reference: int,
        displacement: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Joint attention over reference and video features of this stage.

        Args:
            x: ``B, C, T, H, W`` features, the first ``num_reference`` frames being the reference and the rest the
                video (concatenated on time, reference first).
            transformer: the shared transformer (its width must equal ``dim``).
            num_reference: R, the number of leading reference frames (0..T); they get RoPE time positions
                ``0..R-1`` (with ``pt = 1``), the video frames the positions after them.
            displacement: optional ``B, R, 2, T - R, h, w`` in tokens of this stage's grid (``pt = 1``): where each
                video token's content lies in each reference frame (correspondence-guided reference attention).

        Returns:
            ``B, C, T, H, W``: ``x + update`` when ``residual`` (reference frames: the bare update unless
            ``residual_reference``), else the update itself.
        """
        self._check(x, num_reference)
        t, h, w = x.shape[-3:]
        tokens, grid = self._embed(self._normalize(x, num_reference))
        # Token frames holding any reference frame count as reference frames for the attention scope.
        num_reference_token_frames = -(-num_reference // self.patch_size[0])
        # Passed only when given, so transformers written before correspondence (test stubs) keep working.
        guide = {} if displacement is None else {"displacement": displacement}
        tokens = transformer(tokens, grid, num_reference=num_reference_token_frames, **guide)
        tokens = self.out(self.out_norm(tokens))
        delta = self._unpatchify(tokens, grid)[:, :, :t, :h, :w]
        if not self.residual:
            return delta
        if self.residual_reference:
            return x + delta
        # The official VideoVAE+ stages add the input back to the video frames only.
        return torch.cat([delta[:, :, :num_reference], x[:, :, num_reference:] + delta[:, :, num_reference:]], dim=2)

    def _normalize(self, x: torch.Tensor, num_reference: int) -> torch.Tensor:
        if self.input_norm != "group":
            return x
        # Separate statistics: each part is normalised over its own frames only.
        parts = [self.norm_reference(x[:, :, :num_reference])] if num_reference else []
        if num_reference < x.shape[2]:
            parts.append(self.norm_video(x[:, :, num_reference:]))
        return torch.cat(parts, dim=2)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        pads = [(-size) % p for size, p in zip(x.shape[-3:], self.patch_size)]
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        x = self.embed(x)
        grid = tuple(x.shape[-3:])
        return x.flatten(2).transpose(1, 2), grid

    def _unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        (t, h, w), (pt, ph, pw) = grid, self.patch_size
        x = tokens.reshape(tokens.shape[0], t, h, w, pt, ph, pw, self.channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(tokens.shape[0], self.channels, t * pt, h * ph, w * pw)

    def _check(self, x: torch.Tensor, num_reference: int) -> None:
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise InputError(f"stage features must be B, {self.channels}, T, H, W, got shape {tuple(x.shape)}")
        if not 0 <= num_reference <= x.shape[2]:
            raise InputError(f"num_reference must be in 0..T={x.shape[2]}, got {num_reference}")

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}, patch_size={self.patch_size}, residual={self.residual}"
