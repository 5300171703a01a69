"""Normalisation layers used by the reference tokenizer and the shared transformer.

All of them compute in float32 and return the input dtype, so that fp16/bf16 activations (or bf16 autocast) never
lose the precision the statistics need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.errors import InputError

__all__ = ["ChannelRMSNorm", "FP32LayerNorm", "RMSNorm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ChannelRMSNorm(nn.Module):
    """Wan-style RMS norm over the channel axis of a channel-first tensor.

    ``y = x / max(||x||_2, eps) * sqrt(C) * gamma`` with the L2 norm taken over dim 1 at every position; no bias.
    Computed in float32 for fp16/bf16 inputs and cast back.

    Args:
        channels: C, the size of dim 1.
        eps: lower bound of the channel norm (``F.normalize``'s eps).

    Shapes:
        ``x``: ``B, C, ...`` with at least one trailing axis (``B, C, H, W`` or ``B, C, T, H, W``) -> same shape.

    The parameter ``gamma`` has shape ``(C, 1, 1)``, the shape the official Wan reference-encoder norm stores, and
    is reshaped at call time to broadcast over however many trailing axes the input has.
    """

    def __init__(self, channels: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.scale = math.sqrt(channels)
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3 or x.shape[1] != self.channels:
            raise InputError(
                f"ChannelRMSNorm({self.channels}) expects B, {self.channels}, ... (ndim >= 3), "
                f"got shape {tuple(x.shape)}"
            )
        dtype = x.dtype
        if dtype in _LOW_PRECISION:
            x = x.float()
        # gamma is (C,1,1); a 5-D input needs (C,1,1,1) or C would broadcast against T.
        gamma = self.gamma.reshape(self.channels, *([1] * (x.ndim - 2))).to(x.dtype)
        return (F.normalize(x, dim=1, eps=self.eps) * self.scale * gamma).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim computed in float32, output in the input dtype.

    Args:
        dim: size of the last axis.
        eps: variance epsilon.
        elementwise_affine: learnable weight and bias (off in the RefDecoder transformer).

    Shapes:
        ``x``: ``..., dim`` -> same shape and dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """RMS norm over the last dim with a learnable ``weight``, computed in float32, output in the input dtype.

    ``y = x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        dim: size of the last axis.
        eps: added to the mean square.

    Shapes:
        ``x``: ``..., dim`` -> same shape and dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)
