"""Video quality metrics: PSNR, SSIM, LPIPS, and temporal consistency (flicker, temporal LPIPS, warping error).

Conventions shared by every metric here:

- Inputs are ``pred`` and ``target`` videos ``B, C, T, H, W`` (or unbatched ``C, T, H, W``, read as ``B = 1``;
  pass images as ``B, C, 1, H, W``) with values in ``[-1, 1]``. Values are clamped to ``[-1, 1]`` first, as
  writing the video would do; values far outside (e.g. ``[0, 255]``) are an :class:`InputError`.
- Pixel metrics (PSNR, SSIM, flicker, warping error) work on values rescaled to ``[0, 1]`` (data range 1).
- Per-frame metrics return ``(B, T)``; temporal metrics return ``(B, T - 1)``, one value per pair of
  consecutive frames ``(t, t + 1)``. :func:`split_reference` and :func:`video_metrics` reduce them.
- Metrics are computed without gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from refdecoder._deps import require
from refdecoder.errors import InputError
from refdecoder.losses._inputs import as_video_pair, fold_frames
from refdecoder.losses.lpips import LPIPS
from refdecoder.validation import check_range, check_reference_index

__all__ = [
    "psnr",
    "ssim",
    "lpips_distance",
    "flicker",
    "temporal_lpips",
    "warping_error",
    "split_reference",
    "video_metrics",
]

# SSIM constants of Wang et al. 2004, as scikit-image uses them with gaussian_weights=True.
_SSIM_WINDOW, _SSIM_SIGMA, _SSIM_K1, _SSIM_K2 = 11, 1.5, 0.01, 0.03
# OpenCV's documented example parameters for dense Farneback flow.
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def _unit_range(pred: torch.Tensor, target: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``B, C, T, H, W`` fp32 copies of both videos, clamped and rescaled to ``[0, 1]``."""
    pred, target = as_video_pair(pred, target, what, allow_unbatched=True)
    check_range(pred, f"{what}: pred")
    check_range(target, f"{what}: target")
    return ((pred.float().clamp(-1, 1) + 1) / 2), ((target.float().clamp(-1, 1) + 1) / 2)


@torch.no_grad()
def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio of each frame, in dB, on ``[0, 1]`` values (``inf`` for identical frames).

    Args:
        pred: ``B, C, T, H, W`` (or ``C, T, H, W``) in ``[-1, 1]``.
        target: same shape and range.
        mask: optional bool ``B, T, H, W``: only these pixels count (all channels); a frame with none gives NaN.

    Returns:
        ``(B, T)`` PSNR values.
    """
    x, y = _unit_range(pred, target, "psnr")
    if mask is None:
        mse = (x - y).pow(2).mean(dim=(1, 3, 4))
    else:
        b, _, t, h, w = x.shape
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, t, h, w):
            raise InputError(
                f"psnr: mask must be bool {(b, t, h, w)} (B, T, H, W), got {mask.dtype} {tuple(mask.shape)}"
            )
        mse = ((x - y).pow(2).mean(dim=1) * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3))
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity of each frame (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1).

    Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=...)``: the SSIM map is averaged over positions
    whose window lies inside the frame, per channel, then over channels.

    Args:
        pred: ``B, C, T, H, W`` (or ``C, T, H, W``) in ``[-1, 1]``, with ``H, W >= 11``.
        target: same shape and range.

    Returns:
        ``(B, T)`` SSIM values in ``[-1, 1]``.
    """
    x, y = _unit_range(pred, target, "ssim")
    if min(x.shape[-2:]) < _SSIM_WINDOW:
        raise InputError(f"ssim needs frames of at least {_SSIM_WINDOW}x{_SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    b, c, t = x.shape[:3]
    x, y = fold_frames(x), fold_frames(y)
    # One filtering pass over the five statistics; "valid" filtering is exactly skimage's border crop.
    stats = _gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    mu_x, mu_y, xx, yy, xy = stats.split(c, dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(1, 2, 3)).reshape(b, t)


def _gaussian_filter(x: torch.Tensor) -> torch.Tensor:
    """Separable normalised Gaussian (``_SSIM_WINDOW`` taps, ``_SSIM_SIGMA``) per channel, no padding."""
    radius = _SSIM_WINDOW // 2
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(taps**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    ch = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(ch, 1, -1, 1), groups=ch)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(ch, 1, 1, -1), groups=ch)


def _checked_lpips_inputs(pred: torch.Tensor, target: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _unit_range(pred, target, what)
    return x * 2 - 1, y * 2 - 1


@torch.no_grad()
def lpips_distance(pred: torch.Tensor, target: torch.Tensor, lpips: LPIPS) -> torch.Tensor:
    """LPIPS of each frame (lower is better).

    Args:
        pred: ``B, 3, T, H, W`` (or ``3, T, H, W``) in ``[-1, 1]``.
        target: same shape and range.
        lpips: the network; metrics conventionally use ``LPIPS(net="alex")``.

    Returns:
        ``(B, T)`` LPIPS values.
    """
    x, y = _checked_lpips_inputs(pred, target, "lpips")
    return lpips.to(x.device)(x, y, reduction="none")


@torch.no_grad()
def temporal_lpips(pred: torch.Tensor, target: torch.Tensor, lpips: LPIPS) -> torch.Tensor:
    """How differently ``pred`` changes between consecutive frames than ``target``, perceptually.

    ``|LPIPS(pred_t, pred_{t+1}) - LPIPS(target_t, target_{t+1})|`` for each pair ``(t, t + 1)``: 0 when the
    prediction's frame-to-frame perceptual change equals the ground truth's (lower is better).

    Args:
        pred: ``B, 3, T, H, W`` (or ``3, T, H, W``) in ``[-1, 1]``, ``T >= 2``.
        target: same shape and range.
        lpips: the network; metrics conventionally use ``LPIPS(net="alex")``.

    Returns:
        ``(B, T - 1)`` values.
    """
    x, y = _checked_lpips_inputs(pred, target, "temporal_lpips")
    _require_pairs(x, "temporal_lpips")
    lpips = lpips.to(x.device)
    change_pred = lpips(x[:, :, :-1], x[:, :, 1:], reduction="none")
    change_target = lpips(y[:, :, :-1], y[:, :, 1:], reduction="none")
    return (change_pred - change_target).abs()


def _require_pairs(video: torch.Tensor, what: str) -> None:
    if video.shape[2] < 2:
        raise InputError(f"{what} compares consecutive frames and needs T >= 2, got shape {tuple(video.shape)}")


@torch.no_grad()
def flicker(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the frame-to-frame changes of ``pred`` and of ``target``, on [0, 1].

    ``mean |(pred_{t+1} - pred_t) - (target_{t+1} - target_t)|`` over channels and pixels, for each pair
    ``(t, t + 1)``; 0 when the prediction changes exactly as the ground truth does (lower is better).

    Args:
        pred: ``B, C, T, H, W`` (or ``C, T, H, W``) in ``[-1, 1]``, ``T >= 2``.
        target: same shape and range.

    Returns:
        ``(B, T - 1)`` values.
    """
    x, y = _unit_range(pred, target, "flicker")
    _require_pairs(x, "flicker")
    return (x.diff(dim=2) - y.diff(dim=2)).abs().mean(dim=(1, 3, 4))


@torch.no_grad()
def warping_error(pred: torch.Tensor, target: torch.Tensor, consistency_mask: bool = False) -> torch.Tensor:
    """Flow warping error: how well ``pred_t`` moved by the ground truth's motion predicts ``pred_{t+1}``.

    Dense Farneback flow (OpenCV) is estimated on the ground truth from frame ``t + 1`` back to ``t``; frame
    ``t`` of the prediction is warped along it (bilinear) onto frame ``t + 1``, and the mean absolute difference
    (over channels, on ``[0, 1]`` values) to ``pred_{t+1}`` is taken over pixels whose source lies inside the
    frame. With ``consistency_mask``, pixels failing the forward-backward flow check (occlusions, unreliable
    flow; Sundaram et al. 2010) are excluded as well. Needs ``opencv-python-headless`` (extra ``eval``).

    Args:
        pred: ``B, C, T, H, W`` (or ``C, T, H, W``) in ``[-1, 1]``, ``C`` 1 or 3, ``T >= 2``.
        target: same shape and range; only its motion is used.
        consistency_mask: also drop pixels whose forward and backward flows disagree.

    Returns:
        ``(B, T - 1)`` values (lower is better).
    """
    x, y = _unit_range(pred, target, "warping_error")
    _require_pairs(x, "warping_error")
    if x.shape[1] not in (1, 3):
        raise InputError(f"warping_error needs 1 or 3 channels, got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    gray = _gray_uint8(y)
    backward = _farneback(gray[:, 1:], gray[:, :-1]).to(x.device)
    warped, valid = _backward_warp(fold_frames(x[:, :, :-1]), backward)
    if consistency_mask:
        forward = _farneback(gray[:, :-1], gray[:, 1:]).to(x.device)
        valid = valid & _flows_agree(backward, forward)
    err = (warped - fold_frames(x[:, :, 1:])).abs().mean(dim=1)
    valid = valid.float()
    return ((err * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1)).reshape(b, t - 1)


def _gray_uint8(video: torch.Tensor) -> np.ndarray:
    """``B, C, T, H, W`` in ``[0, 1]`` -> ``B, T, H, W`` uint8 luma (ITU-R BT.601 weights, as OpenCV)."""
    if video.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=video.device).view(1, 3, 1, 1, 1)
        video = (video * weights).sum(dim=1, keepdim=True)
    return (video[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _farneback(src: np.ndarray, dst: np.ndarray) -> torch.Tensor:
    """Flow ``f`` with ``src(p) ~ dst(p + f(p))`` for frame stacks ``B, T', H, W`` -> ``B*T', H, W, 2`` (dx, dy)."""
    cv2 = require("cv2", extra="eval", package="opencv-python-headless")
    flows = [
        cv2.calcOpticalFlowFarneback(a, b, None, **_FARNEBACK)
        for a, b in zip(src.reshape(-1, *src.shape[2:]), dst.reshape(-1, *dst.shape[2:]))
    ]
    return torch.from_numpy(np.stack(flows)).float()


def _backward_warp(frames: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``frames`` (``N, C, H, W``) at ``p + flow(p)``; also return where that point lies inside the frame."""
    n, _, h, w = frames.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=flow.dtype),
        torch.arange(w, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    px, py = xs + flow[..., 0], ys + flow[..., 1]
    valid = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    grid = torch.stack([2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1], dim=-1)
    warped = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped, valid


def _flows_agree(backward: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    # Following the backward flow and then the forward flow should return to the start (up to a tolerance that
    # grows with the motion), except where the pixel was occluded or the flow is wrong.
    forward_at_target, _ = _backward_warp(forward.permute(0, 3, 1, 2), backward)
    round_trip = backward + forward_at_target.permute(0, 2, 3, 1)
    magnitude = backward.pow(2).sum(-1) + forward_at_target.pow(2).sum(1)
    return round_trip.pow(2).sum(-1) < 0.01 * magnitude + 0.5


def split_reference(per_frame: torch.Tensor, reference_index: torch.Tensor | int) -> dict[str, torch.Tensor]:
    """Average a per-frame metric over all frames, the reference frame, and the other frames, per sample.

    Args:
        per_frame: ``(B, T)`` metric values.
        reference_index: ``(B,)`` long tensor (or one int for every sample) of each sample's reference frame.

    Returns:
        ``{"all": (B,), "reference": (B,), "others": (B,)}``; ``"others"`` is NaN when ``T == 1``.
    """
    if per_frame.ndim != 2:
        raise InputError(f"split_reference expects per-frame values (B, T), got shape {tuple(per_frame.shape)}")
    b, t = per_frame.shape
    index = check_reference_index(reference_index, b, t).to(per_frame.device)
    reference = per_frame.gather(1, index[:, None])[:, 0]
    if t == 1:
        return {"all": per_frame[:, 0], "reference": reference, "others": torch.full_like(reference, math.nan)}
    is_other = torch.ones_like(per_frame, dtype=torch.bool)
    is_other[torch.arange(b, device=per_frame.device), index] = False
    # Boolean selection rather than a masked sum: PSNR of an exact frame is inf, and inf * 0 would be NaN.
    others = per_frame[is_other].reshape(b, t - 1).mean(dim=1)
    return {"all": per_frame.mean(dim=1), "reference": reference, "others": others}


@torch.no_grad()
def video_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    reference_index: torch.Tensor | int | None = None,
    lpips: LPIPS | None = None,
) -> dict[str, float]:
    """PSNR, SSIM (and LPIPS) averaged over frames and samples, plus flicker; split by reference frame if given.

    Frame averages are means of per-frame values (the PSNR of a video is the mean of its frames' PSNRs).

    Args:
        pred: ``B, 3, T, H, W`` (or ``3, T, H, W``) in ``[-1, 1]``.
        target: same shape and range.
        reference_index: ``(B,)`` or int reference frame per sample; adds ``<metric>_reference`` and
            ``<metric>_others`` entries.
        lpips: LPIPS network (``LPIPS(net="alex")`` is the usual metric); ``None`` leaves LPIPS out.

    Returns:
        ``{"psnr", "ssim"[, "lpips"][, "flicker"]}`` and, with ``reference_index``, the ``_reference`` and
        ``_others`` variants of the per-frame metrics; ``flicker`` only when ``T >= 2``.
    """
    per_frame = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if lpips is not None:
        per_frame["lpips"] = lpips_distance(pred, target, lpips)
    out: dict[str, float] = {}
    for name, values in per_frame.items():
        out[name] = values.mean().item()
        if reference_index is not None:
            parts = split_reference(values, reference_index)
            out[f"{name}_reference"] = parts["reference"].mean().item()
            out[f"{name}_others"] = parts["others"].mean().item()
    if per_frame["psnr"].shape[1] >= 2:
        out["flicker"] = flicker(pred, target).mean().item()
    return out
