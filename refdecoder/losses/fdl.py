"""Frequency Distribution Loss (FDL; Ni et al., CVPR 2024, arXiv 2402.18192), 2-D per frame or 3-D over T, H, W.

For every feature map of a trunk, FDL takes the Fourier transform, splits it into amplitude and phase, and compares
the *distributions* of each between prediction and target with a sliced Wasserstein distance: random unit-norm
kernels spanning all channels project the maps, the projected values are sorted, and the sorted vectors are
compared. Sorting discards where a value sits, which is what makes the loss tolerant of small misalignments that
pixel losses punish. The 3-D variant stacks per-frame features over time and transforms over (T, H, W), which
also compares how frames change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.errors import ConfigError, InputError
from refdecoder.losses._inputs import as_video_pair, fold_frames
from refdecoder.losses._trunk import VGGFeatures

__all__ = ["FrequencyDistributionLoss", "sliced_wasserstein", "frequency_distribution"]

FeatureFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Sliced Wasserstein-1 distance between the values of ``x`` and ``y`` under random projections.

    Each kernel projects every (patch, all channels) neighbourhood to one number; the distance of one projection
    is the 1-D Wasserstein-1 distance of the two sets of projected values (mean absolute difference after sorting).

    Args:
        x: maps ``N, C, H, W`` or ``N, C, T, H, W``.
        y: same shape as ``x``.
        kernels: projections ``P, C, kH, kW`` (or ``P, C, kT, kH, kW`` for 5-D maps), applied without padding.

    Returns:
        ``(N,)`` distances, averaged over projections.
    """
    conv = F.conv2d if x.ndim == 4 else F.conv3d
    px = conv(x, kernels).flatten(2).sort(dim=-1).values
    py = conv(y, kernels).flatten(2).sort(dim=-1).values
    return (px - py).abs().mean(dim=(1, 2))


def frequency_distribution(
    fx: torch.Tensor, fy: torch.Tensor, kernels: torch.Tensor, phase_weight: float = 1.0
) -> torch.Tensor:
    """FDL of one feature map: SWD of FFT amplitudes plus ``phase_weight`` times SWD of FFT phases.

    Args:
        fx: features ``N, C, H, W`` (2-D FFT over H, W) or ``N, C, T, H, W`` (3-D FFT over T, H, W).
        fy: same shape as ``fx``.
        kernels: projection kernels for :func:`sliced_wasserstein`.
        phase_weight: weight of the phase term.

    Returns:
        ``(N,)`` distances.
    """
    dims = tuple(range(2, fx.ndim))
    # FFTs need at least fp32 (bf16 is unsupported and fp16 loses the spectrum's dynamic range), and autocast
    # would otherwise run the projections of these wide-range values in half precision.
    dtype = torch.promote_types(fx.dtype, torch.float32)
    with torch.autocast(fx.device.type, enabled=False):
        spec_x = torch.fft.fftn(fx.to(dtype), dim=dims)
        spec_y = torch.fft.fftn(fy.to(dtype), dim=dims)
        kernels = kernels.to(dtype)
        amplitude = sliced_wasserstein(spec_x.abs(), spec_y.abs(), kernels)
        if phase_weight == 0:
            return amplitude
        return amplitude + phase_weight * sliced_wasserstein(spec_x.angle(), spec_y.angle(), kernels)


class FrequencyDistributionLoss(nn.Module):
    """FDL between predictions and targets in ``[-1, 1]``, summed over the layers of a feature trunk.

    Args:
        mode: ``"2d"`` compares each frame's spectrum (frames folded into the batch, values averaged over
            frames); ``"3d"`` stacks per-frame features over time and compares (T, H, W) spectra.
        features: callable mapping images ``N, 3, H, W`` in ``[-1, 1]`` to a list of ``N, C_l, H_l, W_l`` maps;
            ``None`` builds a frozen :class:`VGGFeatures` trunk (paper: VGG19, five ReLU layers). An
            ``nn.Module`` here is registered as a submodule (so it follows ``.to()``); freezing it is the caller's
            choice.
        arch: VGG variant when ``features`` is ``None``: ``"vgg19"`` or ``"vgg16"``.
        pretrained_trunk: load the VGG ImageNet weights (must be available locally); ``False`` is for tests.
        trunk_weights: explicit path of torchvision's VGG checkpoint.
        num_proj: random projections per layer (paper: 256).
        patch_size: projection kernel side (paper: 5), clipped to each map's size.
        phase_weight: weight of the phase term (paper: 1.0).
        resample: draw new projections at every call (as the reference code does); ``False`` draws them once from
            ``seed``, which makes the loss a deterministic function of its inputs.
        seed: seed of the fixed projections.
    """

    def __init__(
        self,
        mode: str = "2d",
        features: FeatureFn | None = None,
        arch: str = "vgg19",
        pretrained_trunk: bool = True,
        trunk_weights: str | Path | None = None,
        num_proj: int = 256,
        patch_size: int = 5,
        phase_weight: float = 1.0,
        resample: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("2d", "3d"):
            raise ConfigError(f"FDL mode must be '2d' or '3d', got {mode!r}")
        if num_proj < 1 or patch_size < 1 or phase_weight < 0:
            raise ConfigError(
                f"FDL needs num_proj >= 1, patch_size >= 1 and phase_weight >= 0, got {num_proj}, {patch_size}, "
                f"{phase_weight}"
            )
        self.mode, self.num_proj, self.patch_size = mode, num_proj, patch_size
        self.phase_weight, self.resample, self.seed = float(phase_weight), resample, seed
        self.features = features if features is not None else VGGFeatures(arch, pretrained_trunk, trunk_weights)
        self._kernels: dict[tuple, torch.Tensor] = {}

    def forward(self, pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """FDL of ``pred`` against ``target``.

        Args:
            pred: ``B, 3, T, H, W`` videos (``"3d"`` and ``"2d"``) or ``B, 3, H, W`` images (``"2d"`` only), in
                ``[-1, 1]``.
            target: same shape and range; no gradient is taken through it.
            reduction: ``"mean"`` for a scalar, ``"none"`` for per-sample ``(B,)`` values.

        Returns:
            The loss, ``>= 0``, ``0`` for identical inputs.
        """
        if reduction not in ("mean", "none"):
            raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if self.mode == "3d" and isinstance(pred, torch.Tensor) and pred.ndim != 5:
            raise InputError(f"FDL mode '3d' needs videos B, C, T, H, W, got shape {tuple(pred.shape)}")
        pred, target = as_video_pair(pred, target, "FrequencyDistributionLoss")
        batch = pred.shape[0]
        feats_pred = self.features(fold_frames(pred))
        with torch.no_grad():
            feats_target = self.features(fold_frames(target))
        total = sum(self._layer_loss(fp, ft, batch) for fp, ft in zip(feats_pred, feats_target, strict=True))
        per_sample = total.reshape(batch, -1).mean(dim=1) if self.mode == "2d" else total
        return per_sample.mean() if reduction == "mean" else per_sample

    def _layer_loss(self, fx: torch.Tensor, fy: torch.Tensor, batch: int) -> torch.Tensor:
        if self.mode == "3d":
            # Frames were folded into the batch for the 2-D trunk; put time back as an FFT axis.
            n, c, h, w = fx.shape
            fx = fx.reshape(batch, n // batch, c, h, w).transpose(1, 2)
            fy = fy.reshape(batch, n // batch, c, h, w).transpose(1, 2)
        kernel_size = tuple(min(self.patch_size, s) for s in fx.shape[2:])
        kernels = self.projection_kernels(fx.shape[1], kernel_size, fx.device)
        return frequency_distribution(fx, fy, kernels, self.phase_weight)

    def projection_kernels(self, channels: int, kernel_size: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Unit-norm projection kernels ``num_proj, channels, *kernel_size`` (fixed per shape unless ``resample``).

        Args:
            channels: channels of the feature map.
            kernel_size: spatial (2-D) or temporal-spatial (3-D) kernel extent.
            device: device of the feature map.

        Returns:
            fp32 kernels, each with L2 norm 1 over channels and extent.
        """
        key = (channels, kernel_size, str(device))
        if self.resample or key not in self._kernels:
            generator = None if self.resample else torch.Generator().manual_seed(self.seed)
            kernels = torch.randn(self.num_proj, channels, *kernel_size, generator=generator)
            kernels = kernels / kernels.flatten(1).norm(dim=1).view(-1, *([1] * (kernels.ndim - 1)))
            if self.resample:
                return kernels.to(device)
            self._kernels[key] = kernels.to(device)
        return self._kernels[key]
