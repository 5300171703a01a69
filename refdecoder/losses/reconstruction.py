"""The paper's reconstruction loss: per-pixel L1 plus weighted LPIPS, per frame, frames folded into the batch."""

from __future__ import annotations

import torch
from torch import nn

from refdecoder.errors import ConfigError, InputError
from refdecoder.losses._inputs import as_video_pair
from refdecoder.losses.lpips import LPIPS

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    """``l1_weight * L1 + lpips_weight * LPIPS`` averaged over frames (paper: both weights 1.0, VGG LPIPS).

    Each frame contributes its mean absolute error and its LPIPS distance; the frame values are averaged over
    samples and frames, optionally with per-frame weights (e.g. to weigh the reference frame differently).
    Input ranges are not checked here, to keep the training step free of device synchronisations.

    Args:
        l1_weight: weight of the mean absolute error.
        lpips_weight: weight of LPIPS; ``0`` skips LPIPS entirely.
        lpips: the LPIPS module to use; ``None`` builds ``LPIPS(net="vgg")`` (pretrained trunk, which must be
            available locally) when ``lpips_weight > 0``.
    """

    def __init__(self, l1_weight: float = 1.0, lpips_weight: float = 1.0, lpips: LPIPS | None = None) -> None:
        super().__init__()
        if l1_weight < 0 or lpips_weight < 0:
            raise ConfigError(f"loss weights must be >= 0, got l1_weight={l1_weight}, lpips_weight={lpips_weight}")
        self.l1_weight = float(l1_weight)
        self.lpips_weight = float(lpips_weight)
        if lpips_weight > 0 and lpips is None:
            lpips = LPIPS(net="vgg")
        self.lpips = lpips if lpips_weight > 0 else None

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, frame_weights: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss and its parts.

        Args:
            pred: reconstruction ``B, 3, T, H, W`` (or images ``B, 3, H, W``) in ``[-1, 1]``.
            target: ground truth, same shape and range.
            frame_weights: optional non-negative weights ``(T,)`` or ``(B, T)``; frame values are then averaged
                with these weights instead of uniformly.

        Returns:
            ``{"loss": weighted total, "l1": mean L1, "lpips": mean LPIPS}``, scalars; the parts are unweighted
            (for logging) and ``"lpips"`` is absent when ``lpips_weight == 0``.
        """
        pred, target = as_video_pair(pred, target, "ReconstructionLoss")
        weights = _frame_weights(frame_weights, pred.shape[0], pred.shape[2], pred.device)
        l1 = _weighted_mean((pred - target).abs().mean(dim=(1, 3, 4)), weights)
        out = {"loss": self.l1_weight * l1, "l1": l1}
        if self.lpips is not None:
            lpips = _weighted_mean(self.lpips(pred, target, reduction="none"), weights)
            out["loss"] = out["loss"] + self.lpips_weight * lpips
            out["lpips"] = lpips
        return out


def _frame_weights(weights: torch.Tensor | None, batch: int, frames: int, device: torch.device) -> torch.Tensor | None:
    if weights is None:
        return None
    weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
    if weights.shape not in ((frames,), (batch, frames)):
        raise InputError(
            f"frame_weights must have shape ({frames},) or ({batch}, {frames}), got {tuple(weights.shape)}"
        )
    return weights.expand(batch, frames)


def _weighted_mean(per_frame: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_frame.mean()
    # Normalising by the weight sum keeps the loss scale independent of how the weights are scaled.
    return (per_frame * weights).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
