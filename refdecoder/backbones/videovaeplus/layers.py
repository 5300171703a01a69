"""Building blocks of the VideoVAE+ 2+1D autoencoder (clean-room, written from the architecture facts).

Every module works on video features ``B, C, T, H, W``. "2+1D" means the main convolutions are spatial only
(kernel ``(1, 3, 3)``) and time is mixed by separate residual branches: 3x3x3 convolutions inside each res-block
and a per-pixel temporal attention in the mid-block. Attribute names follow the official checkpoint keys
(``norm1``, ``conv1``, ``conv1_tmp``, ``nin_shortcut``, ``attn_1_tmp.qkv``, ...) so state dicts load strictly.

GroupNorm statistics span all frames of the tensor they see (``C/32 x T x H x W``), so results depend on the
chunk of frames processed together, exactly as in the official model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "group_norm",
    "spatial_conv",
    "TemporalConvLayer",
    "ResnetBlock2plus1D",
    "Downsample",
    "Upsample",
    "SpatialAttention",
    "RelativePosition",
    "TemporalAttention",
]

NORM_GROUPS = 32
NORM_EPS = 1e-6
# The temporal attention's norm is the one exception: eps 1e-5, evaluated in float32.
TEMPORAL_ATTN_NORM_EPS = 1e-5


def group_norm(channels: int, eps: float = NORM_EPS) -> nn.GroupNorm:
    """GroupNorm with 32 groups and affine parameters (the only norm VideoVAE+ uses)."""
    return nn.GroupNorm(NORM_GROUPS, channels, eps=eps, affine=True)


def spatial_conv(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv3d:
    """Per-frame 3x3 convolution as a ``(1, 3, 3)`` Conv3d (zero padding in H and W only)."""
    return nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, stride, stride), padding=(0, padding, padding))


class TemporalConvLayer(nn.Module):
    """Temporal residual branch ``x -> conv3x3x3(SiLU(GroupNorm(x)))``; the caller adds it to ``x``.

    The conv is zero-initialised so a freshly built block starts as its purely spatial counterpart.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


class ResnetBlock2plus1D(nn.Module):
    """Res-block with spatial convs, each followed by a temporal residual branch.

    ``h = conv1(SiLU(norm1(x))); h += tmp1(h); h = conv2(SiLU(norm2(h))); h += tmp2(h)``; when the width changes
    the shortcut is ``nin_shortcut(x)`` plus its own temporal branch ``conv3_tmp``. ``conv3_tmp`` exists (unused)
    in same-width blocks too, because the official checkpoints hold it there.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = spatial_conv(in_channels, out_channels)
        self.conv1_tmp = TemporalConvLayer(out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = spatial_conv(out_channels, out_channels)
        self.conv2_tmp = TemporalConvLayer(out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv3d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None
        self.conv3_tmp = TemporalConvLayer(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.conv1_tmp(h)
        h = self.conv2(F.silu(self.norm2(h)))
        h = h + self.conv2_tmp(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
            x = x + self.conv3_tmp(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: zero-pad one row at the bottom and one column at the right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = spatial_conv(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x per frame, then a 3x3 conv. Time is left unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = spatial_conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class SpatialAttention(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (scale ``C^-1/2``), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv3d(channels, channels, 1)
        self.k = nn.Conv3d(channels, channels, 1)
        self.v = nn.Conv3d(channels, channels, 1)
        self.proj_out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        t, height = x.shape[2], x.shape[3]
        q, k, v = (rearrange(p(h), "b c t h w -> (b t) 1 (h w) c") for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "(b t) 1 (h w) c -> b c t h w", t=t, h=height)
        return x + self.proj_out(out)


class RelativePosition(nn.Module):
    """Learned embeddings of clipped relative offsets, ``table[clamp(offset, -max, max) + max]``."""

    def __init__(self, channels: int, max_distance: int) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_distance + 1, channels))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, length: int) -> torch.Tensor:
        """Return ``E`` of shape ``(length, length, C)`` with ``E[a, b] = table[clamp(b - a) + max]``."""
        pos = torch.arange(length, device=self.embeddings_table.device)
        offset = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance)
        return self.embeddings_table[offset + self.max_distance]


class TemporalAttention(nn.Module):
    """Single-head attention along time at every spatial position, with relative-position terms, residual.

    For one position with per-frame vectors ``q_i, k_i, v_i`` (before scaling) and ``s = C^-1/4`` the logits are
    ``s^2 q_i . k_j + s q_j . Tk[clamp(i - j)]``: the relative-key term pairs the *key* frame's query with the
    offset ``i - j``. This reproduces the official model (a quirk of its implementation, kept on purpose so
    checkpoints behave as trained). Output ``o_i = sum_j w_ij (v_j + Tv[clamp(j - i)])``. Norm and softmax run in
    float32. ``qkv`` and ``proj_out`` are zero-initialised, so a fresh layer is the identity.
    """

    def __init__(self, channels: int, max_distance: int = 64) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps=TEMPORAL_ATTN_NORM_EPS)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.relative_position_k = RelativePosition(channels, max_distance)
        self.relative_position_v = RelativePosition(channels, max_distance)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        for conv in (self.qkv, self.proj_out):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, height, width = x.shape
        seq = rearrange(x, "b c t h w -> (b h w) c t")
        h = F.group_norm(seq.float(), NORM_GROUPS, self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)
        q, k, v = self.qkv(h.to(x.dtype)).chunk(3, dim=1)
        scale = c**-0.25
        q, k = q * scale, k * scale
        rel_k = self.relative_position_k(t)  # rel_k[j, i] = Tk[clamp(i - j)]
        logits = torch.einsum("nci,ncj->nij", q, k) + torch.einsum("ncj,jic->nij", q, rel_k)
        weights = logits.float().softmax(dim=-1).to(v.dtype)
        rel_v = self.relative_position_v(t)  # rel_v[i, j] = Tv[clamp(j - i)]
        out = torch.einsum("nij,ncj->nci", weights, v) + torch.einsum("nij,ijc->nci", weights, rel_v)
        out = rearrange(self.proj_out(out), "(b h w) c t -> b c t h w", b=b, h=height, w=width)
        return x + out
