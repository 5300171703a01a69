"""Metrics against independent computations: scikit-image, numpy loops, and videos with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refdecoder.errors import InputError
from refdecoder.losses import LPIPS
from refdecoder.metrics import (
    flicker,
    lpips_distance,
    psnr,
    split_reference,
    ssim,
    temporal_lpips,
    video_metrics,
    warping_error,
)

skimage_metrics = pytest.importorskip("skimage.metrics")


@pytest.fixture(scope="module")
def lpips_alex() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(net="alex", pretrained_trunk=False)


def noisy_pair(b: int = 2, c: int = 3, t: int = 3, h: int = 24, w: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, c, t, h, w, generator=g) * 2 - 1
    pred = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    return pred, target


def frame01(video: torch.Tensor, b: int, t: int) -> np.ndarray:
    """One frame as an H, W, C float64 array in [0, 1], as scikit-image takes it."""
    return ((video[b, :, t] + 1) / 2).permute(1, 2, 0).double().numpy()


# ------------------------------------------------------------------------------------------------ PSNR / SSIM


@pytest.mark.parametrize("channels", [1, 3])
def test_psnr_and_ssim_match_scikit_image(channels):
    pred, target = noisy_pair(c=channels)
    got_psnr, got_ssim = psnr(pred, target), ssim(pred, target)
    assert got_psnr.shape == got_ssim.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            x, y = frame01(pred, b, t), frame01(target, b, t)
            expected_psnr = skimage_metrics.peak_signal_noise_ratio(y, x, data_range=1)
            expected_ssim = skimage_metrics.structural_similarity(
                x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2
            )
            assert got_psnr[b, t].item() == pytest.approx(expected_psnr, abs=1e-4)
            assert got_ssim[b, t].item() == pytest.approx(expected_ssim, abs=1e-4)


def test_psnr_over_a_mask_counts_only_its_pixels():
    pred, target = noisy_pair()  # B 2, T 3
    b, _, t, h, w = pred.shape
    every = torch.ones(b, t, h, w, dtype=torch.bool)
    torch.testing.assert_close(psnr(pred, target, every), psnr(pred, target))
    left = torch.zeros_like(every)
    left[..., : w // 2] = True
    x = frame01(pred, 1, 2)[:, : w // 2]
    y = frame01(target, 1, 2)[:, : w // 2]
    expected = skimage_metrics.peak_signal_noise_ratio(y, x, data_range=1)
    assert psnr(pred, target, left)[1, 2].item() == pytest.approx(expected, abs=1e-4)
    wrong_outside = torch.where(left[:, None], target, -target)  # errors only where the mask is off
    assert psnr(wrong_outside, target, left).isinf().all()
    assert psnr(pred, target, torch.zeros_like(every)).isnan().all()  # no pixel counted
    for bad in (every.float(), every[:, :1], every[..., :-1]):
        with pytest.raises(InputError, match="mask must be bool"):
            psnr(pred, target, bad)


def test_metrics_accept_unbatched_video_and_clamp_overshoot():
    pred, target = noisy_pair(b=1)
    torch.testing.assert_close(psnr(pred[0], target[0]), psnr(pred, target))
    overshoot = pred.clone()
    overshoot[..., 0, 0] = 1.1  # a decoder overshoot is clamped, as writing the video would do
    clamped = overshoot.clamp(-1, 1)
    torch.testing.assert_close(ssim(overshoot, target), ssim(clamped, target))
    assert psnr(target, target).isinf().all()


def test_metric_input_errors():
    pred, target = noisy_pair()
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        psnr(pred * 127.5 + 127.5, target)
    with pytest.raises(InputError, match="same shape"):
        psnr(pred, target[:, :, :2])
    with pytest.raises(InputError, match="at least 11"):
        ssim(pred[..., :8, :8], target[..., :8, :8])
    with pytest.raises(InputError, match="T >= 2"):
        flicker(pred[:, :, :1], target[:, :, :1])


# ------------------------------------------------------------------------------------------------- temporal


def test_flicker_by_hand():
    pred, target = noisy_pair()
    x, y = ((pred + 1) / 2).numpy(), ((target + 1) / 2).numpy()
    expected = np.array(
        [
            [np.abs((x[b, :, t + 1] - x[b, :, t]) - (y[b, :, t + 1] - y[b, :, t])).mean() for t in range(2)]
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(flicker(pred, target).numpy(), expected, rtol=1e-5)
    # A constant offset changes every frame the same way: no flicker.
    assert flicker((target * 0.5) + 0.1, target * 0.5).abs().max() < 1e-6


def test_lpips_metrics_by_hand(lpips_alex):
    pred, target = noisy_pair(b=1, t=3, h=32, w=32)
    frames = [lpips_alex(pred[:, :, t], target[:, :, t], reduction="none") for t in range(3)]
    torch.testing.assert_close(lpips_distance(pred, target, lpips_alex), torch.stack(frames, dim=1))
    change = [
        (
            lpips_alex(pred[:, :, t], pred[:, :, t + 1], reduction="none")
            - lpips_alex(target[:, :, t], target[:, :, t + 1], reduction="none")
        ).abs()
        for t in range(2)
    ]
    torch.testing.assert_close(temporal_lpips(pred, target, lpips_alex), torch.stack(change, dim=1))
    assert temporal_lpips(target, target, lpips_alex).abs().max() < 1e-6


def translating_video(frames: int = 4, dy: int = 1, dx: int = 2, size: int = 64) -> torch.Tensor:
    """A smooth texture seen through a window moving (dy, dx) pixels per frame: an exact translation."""
    g = torch.Generator().manual_seed(0)
    texture = torch.tanh(6 * F.avg_pool2d(torch.randn(1, 3, 120, 120, generator=g), 7, stride=1, padding=3))[0]
    crops = [texture[:, 10 + dy * t : 10 + dy * t + size, 10 + dx * t : 10 + dx * t + size] for t in range(frames)]
    return torch.stack(crops, dim=1)[None]


@pytest.mark.parametrize("consistency_mask", [False, True])
def test_warping_error_known_answers(consistency_mask):
    pytest.importorskip("cv2")
    target = translating_video()
    exact = warping_error(target, target, consistency_mask=consistency_mask)
    assert exact.shape == (1, 3)
    assert exact.max() < 0.005
    # Brightening every other frame by 0.2 (0.1 on the [0, 1] scale) makes each warp miss by exactly that.
    flickering = target.clone()
    flickering[:, :, 1::2] = (flickering[:, :, 1::2] + 0.2).clamp(-1, 1)
    torch.testing.assert_close(
        warping_error(flickering, target, consistency_mask=consistency_mask),
        torch.full((1, 3), 0.1),
        atol=0.01,
        rtol=0,
    )
    # A frozen video does not follow the ground truth's motion.
    frozen = target[:, :, :1].expand_as(target)
    assert (warping_error(frozen, target, consistency_mask=consistency_mask) > 20 * exact).all()


# ---------------------------------------------------------------------------------------- reference split


def test_split_reference_by_hand():
    per_frame = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, math.inf, 40.0]])
    parts = split_reference(per_frame, torch.tensor([0, 2]))
    torch.testing.assert_close(parts["reference"], torch.tensor([1.0, math.inf]))
    torch.testing.assert_close(parts["others"], torch.tensor([3.0, 70.0 / 3]))
    torch.testing.assert_close(parts["all"], torch.tensor([2.5, math.inf]))
    torch.testing.assert_close(split_reference(per_frame, 3)["reference"], torch.tensor([4.0, 40.0]))
    single = split_reference(per_frame[:, :1], torch.tensor([0, 0]))
    assert single["others"].isnan().all()
    with pytest.raises(InputError, match="reference_index"):
        split_reference(per_frame, torch.tensor([0, 4]))


def test_video_metrics_collects_the_per_frame_metrics(lpips_alex):
    pred, target = noisy_pair(b=2, t=3, h=32, w=32)
    index = torch.tensor([1, 0])
    out = video_metrics(pred, target, reference_index=index, lpips=lpips_alex)
    for name, per_frame in {
        "psnr": psnr(pred, target),
        "ssim": ssim(pred, target),
        "lpips": lpips_distance(pred, target, lpips_alex),
    }.items():
        assert out[name] == pytest.approx(per_frame.mean().item(), rel=1e-6)
        reference = torch.stack([per_frame[0, 1], per_frame[1, 0]]).mean().item()
        others = torch.stack([per_frame[0, [0, 2]].mean(), per_frame[1, [1, 2]].mean()]).mean().item()
        assert out[f"{name}_reference"] == pytest.approx(reference, rel=1e-6)
        assert out[f"{name}_others"] == pytest.approx(others, rel=1e-6)
    assert out["flicker"] == pytest.approx(flicker(pred, target).mean().item(), rel=1e-6)
    assert set(video_metrics(pred[:, :, :1], target[:, :, :1])) == {"psnr", "ssim"}
