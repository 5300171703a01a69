"""Local Correlation Regularisation (LCR, SSVAE): push neighbouring latent vectors to be correlated across channels.

SSVAE ("Delving into Latent Spectral Biasing of Video VAEs", arXiv 2512.05394) biases a video VAE's latents
towards low spatio-temporal frequencies by rewarding local similarity. On the encoder's posterior *mode*:

1. standardise every channel over ``B, T, H, W`` with detached statistics;
2. split frame 0 (the causal first frame, or an image) into non-overlapping 2x2 spatial windows and the remaining
   frames into 2x2x2 spatio-temporal windows;
3. inside a window, centre each position's C-dim vector over channels and L2-normalise it; the window's score is
   the mean cosine over all distinct position pairs, i.e. the mean pairwise Pearson correlation across channels;
4. average the window scores of frame 0 and of the video part separately, then average the two;
5. loss = ``relu(threshold - score)`` (threshold 0.75), weighted by ``0.1 * 0.02`` and optionally by an adaptive
   factor ``||grad nll|| / ||grad lcr||`` at the encoder's last layer (clamped to 1e8, detached).

The regulariser only has a target when the encoder trains; RefDecoder's recipes freeze the encoder, so there LCR
is a diagnostic (:func:`local_correlation`) rather than a loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.errors import InputError
from refdecoder.losses.gan import adaptive_weight

__all__ = ["window_correlation", "local_correlation", "local_correlation_loss", "LocalCorrelationLoss"]

Window = tuple[int, int, int]


def window_correlation(windows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean pairwise Pearson correlation (across channels) of the positions inside each window.

    Args:
        windows: ``N, P, C``: N windows of P positions with C channels each (P >= 2).
        eps: guards the normalisation of a position whose channels are all equal.

    Returns:
        ``(N,)`` scores in [-1, 1].
    """
    if windows.ndim != 3 or windows.shape[1] < 2:
        raise InputError(f"window_correlation expects N, P, C with P >= 2 positions, got {tuple(windows.shape)}")
    p = windows.shape[1]
    unit = F.normalize(windows - windows.mean(dim=2, keepdim=True), dim=2, eps=eps)
    # For unit vectors, sum_{i<j} <u_i, u_j> = (||sum_i u_i||^2 - P) / 2: all pairs without a P x P matrix.
    total = unit.sum(dim=1).pow(2).sum(dim=1)
    return (total - p) / (p * (p - 1))


def _windows(x: torch.Tensor, window: Window) -> torch.Tensor:
    """``B, C, T, H, W`` -> ``N, P, C`` non-overlapping windows of ``window = (t, h, w)`` positions."""
    b, c, t, h, w = x.shape
    wt, wh, ww = window
    x = x.reshape(b, c, t // wt, wt, h // wh, wh, w // ww, ww)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, wt * wh * ww, c)


def _standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # Detached statistics: the loss must shape the latents' local structure, not their per-channel scale.
    mean = x.mean(dim=(0, 2, 3, 4), keepdim=True).detach()
    std = x.std(dim=(0, 2, 3, 4), keepdim=True, unbiased=False).detach()
    return (x - mean) / (std + eps)


def _check_layout(latents: torch.Tensor, window: Window) -> None:
    if latents.ndim != 5:
        raise InputError(f"local correlation expects latents B, C, T, H, W, got shape {tuple(latents.shape)}")
    _, _, t, h, w = latents.shape
    wt, wh, ww = window
    if h % wh or w % ww or (t - 1) % wt:
        raise InputError(
            f"local correlation needs H divisible by {wh}, W by {ww} and T - 1 by {wt} (causal 1 + {wt}k frames), "
            f"got T, H, W = {t}, {h}, {w}; crop the latents or change the window"
        )


def local_correlation(latents: torch.Tensor, window: Window = (2, 2, 2)) -> torch.Tensor:
    """SSVAE's local correlation score of latents (higher = smoother across neighbouring positions).

    Args:
        latents: ``B, C, T, H, W`` (the posterior mode), any scale; ``T = 1 + window[0] * k``, ``H``, ``W``
            divisible by the window.
        window: ``(t, h, w)``; frame 0 uses ``(1, h, w)``.

    Returns:
        Scalar: the mean window score of frame 0 averaged with that of frames 1.. (frame 0 alone when T = 1).
    """
    _check_layout(latents, window)
    x = _standardize(latents if latents.dtype == torch.float64 else latents.float())
    first = window_correlation(_windows(x[:, :, :1], (1, window[1], window[2]))).mean()
    if x.shape[2] == 1:
        return first
    rest = window_correlation(_windows(x[:, :, 1:], window)).mean()
    return (first + rest) / 2


def local_correlation_loss(latents: torch.Tensor, threshold: float = 0.75, window: Window = (2, 2, 2)) -> torch.Tensor:
    """Hinge ``relu(threshold - local_correlation(latents))``: zero once the latents are locally correlated enough."""
    return F.relu(threshold - local_correlation(latents, window))


class LocalCorrelationLoss(nn.Module):
    """LCR as a weighted loss term, optionally balanced against the reconstruction loss like SSVAE.

    Args:
        threshold: hinge threshold on the correlation score (SSVAE: 0.75).
        weight: constant factor (SSVAE: 0.1 * 0.02).
        window: ``(t, h, w)`` window.
        adaptive: multiply by ``||d nll / d W|| / ||d lcr / d W||`` at the encoder's last layer ``W``.
        max_adaptive: upper clamp of the adaptive factor (SSVAE: 1e8).

    ``forward(latents, nll=None, last_layer=None)`` takes the posterior mode ``B, C, T, H, W`` and, when adaptive,
    the scalar reconstruction loss and the weight tensor of the encoder's last layer; returns a scalar.
    """

    def __init__(
        self,
        threshold: float = 0.75,
        weight: float = 0.1 * 0.02,
        window: Window = (2, 2, 2),
        adaptive: bool = True,
        max_adaptive: float = 1e8,
    ) -> None:
        super().__init__()
        self.threshold, self.weight, self.window = threshold, weight, tuple(window)
        self.adaptive, self.max_adaptive = adaptive, max_adaptive

    def forward(
        self, latents: torch.Tensor, nll: torch.Tensor | None = None, last_layer: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss = local_correlation_loss(latents, self.threshold, self.window)
        if not self.adaptive:
            return self.weight * loss
        if nll is None or last_layer is None:
            raise InputError(
                "adaptive LCR needs nll (the reconstruction loss) and last_layer (the encoder's output weight)"
            )
        if not loss.requires_grad or not bool(loss.detach() > 0):
            return self.weight * loss  # at or above the threshold (or no graph): no gradient to balance
        factor = adaptive_weight(nll, loss, last_layer, max_weight=self.max_adaptive)
        return self.weight * factor * loss

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, weight={self.weight}, window={self.window}, adaptive={self.adaptive}"
