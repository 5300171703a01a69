"""Training losses: L1 + LPIPS reconstruction, Frequency Distribution Loss, PatchGAN discriminators.

Importing this package does not import ``lpips``; it loads when an :class:`LPIPS` is built. Tensors are videos
``B, C, T, H, W`` (or images ``B, C, H, W``) in ``[-1, 1]``.
"""

from __future__ import annotations

from refdecoder.losses._trunk import TRUNK_FILES, VGGFeatures, resolve_trunk_weights
from refdecoder.losses.fdl import FrequencyDistributionLoss, frequency_distribution, sliced_wasserstein
from refdecoder.losses.gan import (
    PatchDiscriminator2D,
    PatchDiscriminator3D,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from refdecoder.losses.lpips import LPIPS
from refdecoder.losses.reconstruction import ReconstructionLoss
from refdecoder.losses.spectral import LocalCorrelationLoss, local_correlation, local_correlation_loss

__all__ = [
    "LPIPS",
    "ReconstructionLoss",
    "FrequencyDistributionLoss",
    "frequency_distribution",
    "sliced_wasserstein",
    "PatchDiscriminator2D",
    "PatchDiscriminator3D",
    "discriminator_loss",
    "generator_loss",
    "adaptive_weight",
    "VGGFeatures",
    "TRUNK_FILES",
    "resolve_trunk_weights",
    "LocalCorrelationLoss",
    "local_correlation",
    "local_correlation_loss",
]
