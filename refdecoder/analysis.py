"""Latent statistics that predict how easy a latent space is to model: power spectrum and channel eigenspectrum.

SSVAE (arXiv 2512.05394) links diffusability to two properties: (1) a spatio-temporal power spectrum biased
towards low frequencies, and (2) a channel eigenspectrum dominated by a few modes. SSVAE publishes no analysis
code; these are direct implementations of the two quantities:

- :func:`power_spectrum`: every (sample, channel) is standardised over ``T, H, W`` (so the mean does not sit in
  the DC bin and channels of any scale weigh the same), its ``|FFT|^2 / (T*H*W)`` over ``T, H, W`` is averaged over
  samples and channels. White noise has power 1 at every frequency. Reported: the radial spatial profile (mean
  power per annulus of ``sqrt(fh^2 + fw^2)``, averaged over temporal frequencies), the temporal profile (mean power
  per ``|ft|``, averaged over spatial frequencies), and the fraction of energy at 3-D frequency radius
  ``sqrt(ft^2 + fh^2 + fw^2) <= cutoff``. Frequencies are in cycles per latent position (Nyquist = 0.5), so
  latents of different sizes share one set of bins.
- :func:`channel_eigenspectrum`: the ``C x C`` covariance (or correlation, ``standardize=True``) of the channels
  over every position of every sample, its eigenvalues sorted and normalised to sum 1, their cumulative sum, the
  effective rank ``exp(entropy)`` (Roy & Vetterli) and the share of the top ``k`` modes.

Both are invariant to a per-channel affine map of the latents (with ``standardize=True``), so normalised and raw
diffusion latents give the same numbers. Inputs are latents ``B, C, T, H, W`` (one tensor or a list of tensors
that may differ in ``B, T, H, W``); the work is done in float64 on the tensors' device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from refdecoder.errors import InputError

__all__ = ["power_spectrum_3d", "PowerSpectrum", "power_spectrum", "ChannelEigenspectrum", "channel_eigenspectrum"]

# Largest spatial frequency radius on a grid with Nyquist 0.5 on both axes.
_MAX_SPATIAL = 0.5 * math.sqrt(2.0)


def _as_list(latents: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    items = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    if not items:
        raise InputError("no latents given: pass a B, C, T, H, W tensor or a non-empty list of them")
    channels = {x.shape[1] if x.ndim == 5 else None for x in items}
    if None in channels or len(channels) != 1:
        shapes = [tuple(x.shape) for x in items[:5]]
        raise InputError(f"latents must all be B, C, T, H, W with one channel count C, got shapes {shapes}")
    return items


def power_spectrum_3d(latents: torch.Tensor) -> torch.Tensor:
    """Mean power spectrum ``T, H, W`` (FFT order, frequencies ``torch.fft.fftfreq``) of latents ``B, C, T, H, W``.

    Each (sample, channel) is standardised over ``T, H, W`` first (a constant one becomes all zeros), so the
    spectrum averages to 1 over all frequencies (Parseval), less the share of such constant signals.
    """
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"power_spectrum_3d takes one B, C, T, H, W tensor, got {type(latents).__name__}")
    x = _as_list(latents)[0].to(torch.float64)
    x = x - x.mean(dim=(2, 3, 4), keepdim=True)
    std = x.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt()
    x = torch.where(std > 0, x / std.clamp_min(1e-30), torch.zeros_like(x))
    n = x.shape[2] * x.shape[3] * x.shape[4]
    return (torch.fft.fftn(x, dim=(2, 3, 4)).abs().pow(2) / n).mean(dim=(0, 1))


def _frequencies(shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, h, w = shape
    ft, fh, fw = (torch.fft.fftfreq(n, device=device, dtype=torch.float64) for n in (t, h, w))
    spatial = torch.sqrt(fh[:, None] ** 2 + fw[None, :] ** 2)
    radius = torch.sqrt(ft[:, None, None] ** 2 + spatial[None] ** 2)
    return ft.abs(), spatial, radius


@dataclass
class PowerSpectrum:
    """Summary of latents' power spectrum (see the module docstring for the definitions).

    Attributes:
        spatial_freqs: ``(n_bins,)`` centres of the radial spatial bins (cycles / latent position, 0..0.707).
        spatial_power: ``(n_bins,)`` mean power in each bin (NaN for a bin no frequency falls into).
        temporal_freqs: ``(n_temporal_bins,)`` centres of the ``|ft|`` bins (0..0.5).
        temporal_power: ``(n_temporal_bins,)`` mean power per bin (NaN where empty).
        low_energy: fraction of the energy at 3-D frequency radius <= ``cutoff``.
        cutoff: that radius.
    """

    spatial_freqs: torch.Tensor
    spatial_power: torch.Tensor
    temporal_freqs: torch.Tensor
    temporal_power: torch.Tensor
    low_energy: float
    cutoff: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (NaN becomes None)."""

        def clean(x: torch.Tensor) -> list[float | None]:
            return [None if math.isnan(v) else v for v in x.tolist()]

        return {
            "spatial_freqs": clean(self.spatial_freqs),
            "spatial_power": clean(self.spatial_power),
            "temporal_freqs": clean(self.temporal_freqs),
            "temporal_power": clean(self.temporal_power),
            "low_energy": self.low_energy,
            "cutoff": self.cutoff,
        }


def _binned(values: torch.Tensor, freqs: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``values`` and count of points per bin of ``freqs`` (bins ``[lo, hi)``, the last one closed)."""
    index = torch.bucketize(freqs.flatten(), edges[1:-1], right=True)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64, device=values.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, index, values.flatten())
    counts.index_add_(0, index, torch.ones_like(values.flatten()))
    return sums, counts


def power_spectrum(
    latents: torch.Tensor | Iterable[torch.Tensor],
    n_bins: int = 8,
    n_temporal_bins: int = 4,
    cutoff: float = 0.25,
) -> PowerSpectrum:
    """Radial spatial and temporal power profiles and the low-frequency energy share of latents.

    Args:
        latents: ``B, C, T, H, W`` or a list of such tensors (shapes may differ except C); samples are weighted
            by their count, every frequency point of every sample counts once in its bin.
        n_bins: radial spatial bins over [0, 0.5 * sqrt(2)].
        n_temporal_bins: temporal bins over [0, 0.5].
        cutoff: 3-D frequency radius (cycles / position) below which energy counts as low-frequency.

    Returns:
        A :class:`PowerSpectrum`.
    """
    items = _as_list(latents)
    device = items[0].device
    s_edges = torch.linspace(0, _MAX_SPATIAL, n_bins + 1, dtype=torch.float64, device=device)
    t_edges = torch.linspace(0, 0.5, n_temporal_bins + 1, dtype=torch.float64, device=device)
    s_sum, s_count, t_sum, t_count = (
        torch.zeros(n, dtype=torch.float64, device=device) for n in (n_bins, n_bins, n_temporal_bins, n_temporal_bins)
    )
    low = total = 0.0
    for x in items:
        psd, weight = power_spectrum_3d(x.to(device)), x.shape[0]
        ft, spatial, radius = _frequencies(psd.shape, device)
        sums, counts = _binned(psd.mean(dim=0), spatial, s_edges)
        s_sum, s_count = s_sum + weight * sums, s_count + weight * counts
        sums, counts = _binned(psd.mean(dim=(1, 2)), ft, t_edges)
        t_sum, t_count = t_sum + weight * sums, t_count + weight * counts
        low += weight * float(psd[radius <= cutoff + 1e-12].sum())
        total += weight * float(psd.sum())
    return PowerSpectrum(
        spatial_freqs=(s_edges[1:] + s_edges[:-1]) / 2,
        spatial_power=s_sum / s_count,
        temporal_freqs=(t_edges[1:] + t_edges[:-1]) / 2,
        temporal_power=t_sum / t_count,
        low_energy=low / total if total > 0 else float("nan"),
        cutoff=cutoff,
    )


@dataclass
class ChannelEigenspectrum:
    """Eigen-decomposition summary of the latents' channel covariance.

    Attributes:
        eigenvalues: ``(C,)`` sorted descending, normalised to sum 1.
        cumulative: ``(C,)`` their cumulative sum (explained variance of the top-k modes).
        effective_rank: ``exp(-sum p log p)`` of the normalised eigenvalues, in [1, C].
        top_k: k.
        top_k_share: share of the top-k modes.
    """

    eigenvalues: torch.Tensor
    cumulative: torch.Tensor
    effective_rank: float
    top_k: int
    top_k_share: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "cumulative": self.cumulative.tolist(),
            "effective_rank": self.effective_rank,
            "top_k": self.top_k,
            "top_k_share": self.top_k_share,
        }


def channel_eigenspectrum(
    latents: torch.Tensor | Iterable[torch.Tensor], standardize: bool = True, top_k: int = 4
) -> ChannelEigenspectrum:
    """Eigenspectrum of the channel covariance of latents, pooled over every position of every sample.

    Args:
        latents: ``B, C, T, H, W`` or a list of such tensors (C must agree).
        standardize: use the correlation matrix (every channel scaled to unit variance first), so that channels
            with large raw variance do not dominate; False uses the covariance.
        top_k: k for the top-k share (clipped to C).

    Returns:
        A :class:`ChannelEigenspectrum`.
    """
    items = _as_list(latents)
    c, device = items[0].shape[1], items[0].device
    first = torch.zeros(c, dtype=torch.float64, device=device)
    second = torch.zeros(c, c, dtype=torch.float64, device=device)
    count = 0
    for x in items:
        flat = x.to(device, torch.float64).transpose(0, 1).reshape(c, -1)
        first += flat.sum(dim=1)
        second += flat @ flat.T
        count += flat.shape[1]
    mean = first / count
    cov = second / count - torch.outer(mean, mean)
    if standardize:
        scale = cov.diagonal().clamp_min(1e-30).rsqrt()
        cov = cov * torch.outer(scale, scale)
    values = torch.linalg.eigvalsh(cov).clamp_min(0).flip(0)
    values = values / values.sum()
    nonzero = values[values > 0]
    k = min(top_k, c)
    return ChannelEigenspectrum(
        eigenvalues=values,
        cumulative=values.cumsum(0),
        effective_rank=float(torch.exp(-(nonzero * nonzero.log()).sum())),
        top_k=k,
        top_k_share=float(values[:k].sum()),
    )
