"""PatchGAN discriminators with spectral norm (2-D per frame and 3-D), their losses, and the adaptive GAN weight.

The discriminators follow pix2pix's PatchGAN layout (4x4 stride-2 convolutions, LeakyReLU 0.2, one logit per
overlapping patch) with spectral norm on every convolution instead of a normalisation layer, which bounds each
layer's Lipschitz constant and keeps the discriminator from overpowering a decoder that starts pretrained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from refdecoder.errors import ConfigError, InputError
from refdecoder.losses._inputs import fold_frames, unfold_frames

__all__ = [
    "PatchDiscriminator2D",
    "PatchDiscriminator3D",
    "discriminator_loss",
    "generator_loss",
    "adaptive_weight",
]

_KINDS = ("hinge", "lsgan")
_MAX_WIDTH_MULT = 8


def _widths(base_channels: int, num_layers: int) -> list[int]:
    return [base_channels * min(2**i, _MAX_WIDTH_MULT) for i in range(num_layers + 1)]


def _check_config(in_channels: int, base_channels: int, num_layers: int) -> None:
    if in_channels < 1 or base_channels < 1 or num_layers < 1:
        raise ConfigError(
            f"discriminator needs in_channels, base_channels, num_layers >= 1, got {in_channels}, {base_channels}, "
            f"{num_layers}"
        )


class PatchDiscriminator2D(nn.Module):
    """Per-frame PatchGAN: ``num_layers`` stride-2 convs (``2**num_layers`` spatial downsampling), then two stride-1.

    Args:
        in_channels: channels of the frames.
        base_channels: width of the first conv; doubles per layer up to 8x.
        num_layers: stride-2 convolutions.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        _check_config(in_channels, base_channels, num_layers)
        widths = _widths(base_channels, num_layers)
        layers: list[nn.Module] = []
        ch = in_channels
        for i, width in enumerate(widths):
            layers += [spectral_norm(nn.Conv2d(ch, width, 4, stride=2 if i < num_layers else 1, padding=1))]
            layers += [nn.LeakyReLU(0.2)]
            ch = width
        layers.append(spectral_norm(nn.Conv2d(ch, 1, 4, stride=1, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits.

        Args:
            x: videos ``B, C, T, H, W`` (frames judged independently) or images ``B, C, H, W``, in ``[-1, 1]``.

        Returns:
            ``B, 1, T, h, w`` (or ``B, 1, h, w``) logits, ``h ~ H / 2**num_layers - 2``.
        """
        if x.ndim == 4:
            return self.net(x)
        if x.ndim != 5:
            raise InputError(f"PatchDiscriminator2D expects B, C, T, H, W or B, C, H, W, got {tuple(x.shape)}")
        return unfold_frames(self.net(fold_frames(x)), x.shape[0])


class PatchDiscriminator3D(nn.Module):
    """Spatio-temporal PatchGAN on ``B, C, T, H, W`` with (3, 4, 4) convs.

    Args:
        in_channels: channels of the video.
        base_channels: width of the first conv; doubles per layer up to 8x.
        num_layers: spatially stride-2 convolutions.
        temporal_downsample: how many of those also halve time (``2**temporal_downsample`` temporal
            downsampling), at most ``num_layers``.
    """

    def __init__(
        self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, temporal_downsample: int = 2
    ) -> None:
        super().__init__()
        _check_config(in_channels, base_channels, num_layers)
        if not 0 <= temporal_downsample <= num_layers:
            raise ConfigError(
                f"temporal_downsample must lie in [0, num_layers={num_layers}], got {temporal_downsample}"
            )
        layers: list[nn.Module] = []
        ch = in_channels
        for i, width in enumerate(_widths(base_channels, num_layers)):
            stride = (2 if i < temporal_downsample else 1, 2 if i < num_layers else 1, 2 if i < num_layers else 1)
            layers += [spectral_norm(nn.Conv3d(ch, width, (3, 4, 4), stride=stride, padding=1)), nn.LeakyReLU(0.2)]
            ch = width
        layers.append(spectral_norm(nn.Conv3d(ch, 1, (3, 4, 4), stride=1, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits.

        Args:
            x: videos ``B, C, T, H, W`` in ``[-1, 1]``.

        Returns:
            ``B, 1, t, h, w`` logits, ``t = ceil(T / 2**temporal_downsample)``, ``h ~ H / 2**num_layers - 2``.
        """
        if x.ndim != 5:
            raise InputError(f"PatchDiscriminator3D expects videos B, C, T, H, W, got shape {tuple(x.shape)}")
        return self.net(x)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ConfigError(f"GAN loss kind must be one of {_KINDS}, got {kind!r}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator objective on logits of real and generated samples (any shapes).

    ``hinge``: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`` (VQGAN's convention).
    ``lsgan``: ``0.5 * (mean((real - 1)**2) + mean(fake**2))`` (Mao et al. 2017).

    Args:
        real_logits: discriminator output on ground truth.
        fake_logits: discriminator output on reconstructions (detach them from the generator).
        kind: ``"hinge"`` or ``"lsgan"``.

    Returns:
        Scalar loss.
    """
    _check_kind(kind)
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
    return 0.5 * ((real_logits - 1).pow(2).mean() + fake_logits.pow(2).mean())


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator objective on the discriminator's logits of reconstructions.

    ``hinge``: ``-mean(fake)``; ``lsgan``: ``0.5 * mean((fake - 1)**2)``.

    Args:
        fake_logits: discriminator output on reconstructions (with the generator's graph).
        kind: ``"hinge"`` or ``"lsgan"``.

    Returns:
        Scalar loss.
    """
    _check_kind(kind)
    if kind == "hinge":
        return -fake_logits.mean()
    return 0.5 * (fake_logits - 1).pow(2).mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's balance ``||d rec / d W|| / (||d gan / d W|| + eps)`` at the decoder's last layer ``W``, clamped.

    Multiply the generator loss by this (and by a configured GAN weight) so that both losses pull on the output
    layer with comparable strength. The graphs are kept for the caller's backward pass.

    Args:
        rec_loss: scalar reconstruction loss.
        gan_loss: scalar generator loss.
        last_layer_weight: the weight tensor of the decoder's output layer (must require grad).
        max_weight: upper clamp.
        eps: keeps the ratio finite when the GAN gradient vanishes.

    Returns:
        A detached scalar in ``[0, max_weight]``.
    """
    if not last_layer_weight.requires_grad:
        raise InputError("adaptive_weight needs a last_layer_weight that requires grad (the decoder's output conv)")
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + eps)).clamp(0, max_weight).detach()
