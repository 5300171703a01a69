"""Shape checks and frame folding shared by the losses and the metrics."""

from __future__ import annotations

import torch

from refdecoder.errors import InputError

__all__ = ["as_video_pair", "fold_frames", "unfold_frames"]


def as_video_pair(
    pred: torch.Tensor, target: torch.Tensor, what: str, allow_unbatched: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``pred`` and ``target`` as ``B, C, T, H, W`` after checking they are float tensors of equal shape.

    Images ``B, C, H, W`` become one-frame videos, unless ``allow_unbatched`` is set, in which case a 4-D tensor
    is read as an unbatched video ``C, T, H, W`` (the metrics' convention).
    """
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"{what}: {name} must be a floating-point torch.Tensor, got {got}")
    if pred.shape != target.shape:
        raise InputError(
            f"{what}: pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.ndim == 4:
        new_axis = 0 if allow_unbatched else 2
        return pred.unsqueeze(new_axis), target.unsqueeze(new_axis)
    if pred.ndim != 5:
        layouts = "B, C, T, H, W or C, T, H, W" if allow_unbatched else "B, C, T, H, W or B, C, H, W"
        raise InputError(f"{what}: expected tensors of layout {layouts}, got shape {tuple(pred.shape)}")
    return pred, target


def fold_frames(video: torch.Tensor) -> torch.Tensor:
    """``B, C, T, H, W`` -> ``B*T, C, H, W`` (frame-major within each sample)."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def unfold_frames(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """``B*T, C, H, W`` -> ``B, C, T, H, W``; the inverse of :func:`fold_frames`."""
    n, c, h, w = frames.shape
    return frames.reshape(batch, n // batch, c, h, w).transpose(1, 2)
