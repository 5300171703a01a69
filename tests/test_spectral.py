"""LCR and the latent spectra against independent numpy computations and latents of known structure."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from refdecoder.analysis import channel_eigenspectrum, power_spectrum, power_spectrum_3d
from refdecoder.cli import main as cli_main
from refdecoder.errors import InputError
from refdecoder.losses.spectral import (
    LocalCorrelationLoss,
    local_correlation,
    local_correlation_loss,
    window_correlation,
)


# --- LCR ---------------------------------------------------------------------------------------------------------
def _reference_local_correlation(z: np.ndarray, window=(2, 2, 2)) -> float:
    """Loop-and-corrcoef version of SSVAE's definition (independent of the vectorised implementation)."""
    mean = z.mean(axis=(0, 2, 3, 4), keepdims=True)
    std = z.std(axis=(0, 2, 3, 4), keepdims=True)
    z = (z - mean) / (std + 1e-6)
    b, _, t, h, w = z.shape

    def score(frames: range, wt: int) -> float:
        values = []
        for n, t0, y, x in itertools.product(range(b), frames[::wt], range(0, h, window[1]), range(0, w, window[2])):
            cells = [z[n, :, t0 + dt, y + dy, x + dx] for dt in range(wt) for dy in range(2) for dx in range(2)]
            pairs = itertools.combinations(cells, 2)
            values.append(np.mean([np.corrcoef(p, q)[0, 1] for p, q in pairs]))
        return float(np.mean(values))

    first = score(range(1), 1)
    return first if t == 1 else (first + score(range(1, t), window[0])) / 2


def test_window_correlation_matches_corrcoef():
    windows = torch.randn(5, 8, 6, dtype=torch.float64)
    expected = [
        np.mean([np.corrcoef(p, q)[0, 1] for p, q in itertools.combinations(windows[i].numpy(), 2)]) for i in range(5)
    ]
    np.testing.assert_allclose(window_correlation(windows).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 5])
def test_local_correlation_matches_a_loop_reference(frames):
    z = torch.randn(2, 6, frames, 4, 6, dtype=torch.float64) * torch.linspace(0.5, 3, 6).view(1, 6, 1, 1, 1) + 1.0
    expected = _reference_local_correlation(z.numpy())
    assert local_correlation(z).item() == pytest.approx(expected, abs=1e-6)


def test_known_correlations_and_the_hinge():
    # One 2x2 window of vectors v, -v, v, -v with v = (1, -1, 1, -1): per-channel standardisation only rescales
    # by 1, pairs (v, -v) have correlation -1 (4 pairs) and (v, v) +1 (2 pairs): mean (2 - 4) / 6 = -1/3.
    v = torch.tensor([1.0, -1.0, 1.0, -1.0])
    z = torch.stack([v, -v, -v, v]).T.reshape(1, 4, 1, 2, 2)  # positions (0,0)=v, (0,1)=-v, (1,0)=-v, (1,1)=v
    assert local_correlation(z).item() == pytest.approx(-1 / 3, abs=1e-5)
    assert local_correlation_loss(z, threshold=0.75).item() == pytest.approx(0.75 + 1 / 3, abs=1e-5)
    # Constant within every 2x2(x2) window, random across windows: perfectly locally correlated, so no loss.
    coarse = torch.randn(2, 8, 3, 2, 3)
    smooth = coarse.repeat_interleave(2, 3).repeat_interleave(2, 4)
    smooth = torch.cat([smooth[:, :, :1], smooth[:, :, 1:].repeat_interleave(2, 2)], dim=2)
    assert smooth.shape[2] == 5
    assert local_correlation(smooth).item() == pytest.approx(1.0, abs=1e-5)
    assert local_correlation_loss(smooth).item() == 0.0


def test_local_correlation_rejects_bad_layouts():
    with pytest.raises(InputError, match="T - 1 by 2"):
        local_correlation(torch.randn(1, 4, 4, 4, 4))
    with pytest.raises(InputError, match="H divisible by 2"):
        local_correlation(torch.randn(1, 4, 1, 3, 4))


def test_lcr_loss_weight_and_adaptive_balance():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, 4)
    layer = torch.nn.Conv3d(3, 4, 1)
    latents = layer(x)
    plain = LocalCorrelationLoss(weight=0.5, adaptive=False)(latents)
    assert plain.item() == pytest.approx(0.5 * local_correlation_loss(latents).item(), rel=1e-6)
    lcr = LocalCorrelationLoss(weight=0.5)
    nll = (latents - 1).pow(2).mean()
    grad_nll = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0].norm()
    grad_lcr = torch.autograd.grad(local_correlation_loss(latents), layer.weight, retain_graph=True)[0].norm()
    expected = 0.5 * (grad_nll / (grad_lcr + 1e-4)) * local_correlation_loss(latents)
    balanced = lcr(latents, nll, layer.weight)
    assert balanced.item() == pytest.approx(expected.item(), rel=1e-5)
    # The factor follows the reconstruction gradient's scale: three times the nll, three times the LCR term.
    assert lcr(latents, 3 * nll, layer.weight).item() == pytest.approx(3 * balanced.item(), rel=1e-4)
    balanced.backward()
    assert layer.weight.grad is not None
    with pytest.raises(InputError, match="nll"):
        lcr(latents)


# --- power spectrum ----------------------------------------------------------------------------------------------
def _numpy_psd(z: np.ndarray) -> np.ndarray:
    z = z - z.mean(axis=(2, 3, 4), keepdims=True)
    z = z / z.std(axis=(2, 3, 4), keepdims=True)
    n = np.prod(z.shape[2:])
    return (np.abs(np.fft.fftn(z, axes=(2, 3, 4))) ** 2 / n).mean(axis=(0, 1))


def test_power_spectrum_3d_matches_numpy_and_parseval():
    z = torch.randn(2, 3, 4, 6, 5, dtype=torch.float64) * 2 + 1
    psd = power_spectrum_3d(z)
    np.testing.assert_allclose(psd.numpy(), _numpy_psd(z.numpy()), rtol=1e-10, atol=1e-12)
    assert psd.mean().item() == pytest.approx(1.0, rel=1e-10)


def _sinusoids(a: float, b: float, size: int = 16, frames: int = 4) -> torch.Tensor:
    h = torch.arange(size, dtype=torch.float64)
    field = a * torch.cos(2 * torch.pi * 1 * h / size)[:, None] + b * torch.cos(2 * torch.pi * 6 * h / size)[None]
    return field.expand(1, 2, frames, size, size).clone()


def test_known_spatial_spectrum():
    # Power a^2 at spatial frequency 1/16 (low) and b^2 at 6/16 (high): low-energy share a^2 / (a^2 + b^2).
    a, b = 2.0, 1.0
    z = _sinusoids(a, b)
    stats = power_spectrum(z, n_bins=5, cutoff=0.25)  # 5 bins: no frequency of a 16-grid falls on an edge
    assert stats.low_energy == pytest.approx(a**2 / (a**2 + b**2), abs=1e-9)
    # Independent radial binning with numpy: mean power per annulus of the time-averaged spectrum.
    psd = _numpy_psd(z.numpy()).mean(axis=0)
    f = np.fft.fftfreq(16)
    radius = np.sqrt(f[:, None] ** 2 + f[None] ** 2).ravel()
    edges = np.linspace(0, np.sqrt(0.5), 6)
    sums, _ = np.histogram(np.minimum(radius, edges[-1]), bins=edges, weights=psd.ravel())
    counts, _ = np.histogram(np.minimum(radius, edges[-1]), bins=edges)
    np.testing.assert_allclose(stats.spatial_power.numpy(), sums / counts, rtol=1e-9, atol=1e-12)
    peak_bins = {int(np.digitize(1 / 16, edges)) - 1, int(np.digitize(6 / 16, edges)) - 1}
    assert set(np.nonzero(stats.spatial_power.numpy() > 1e-9)[0].tolist()) == peak_bins


def test_known_temporal_spectrum_and_white_noise():
    t = torch.arange(8, dtype=torch.float64)
    z = torch.cos(2 * torch.pi * 2 * t / 8).view(1, 1, 8, 1, 1).expand(1, 3, 8, 4, 4).clone()
    stats = power_spectrum(z, n_temporal_bins=3, cutoff=0.2)
    # All power at |ft| = 0.25 (bin 1 of [0, 1/6, 1/3, 1/2]) and above the cutoff.
    power = stats.temporal_power.numpy()
    np.testing.assert_allclose(power, [0, 4, 0], atol=1e-12)  # +-0.25 hold all 8 units of power: mean 4
    assert stats.low_energy == pytest.approx(0.0, abs=1e-12)
    noise = torch.randn(64, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    white = power_spectrum(noise, cutoff=0.25)
    ft, fh, fw = (np.fft.fftfreq(n) for n in (4, 8, 8))
    radius = np.sqrt(ft[:, None, None] ** 2 + fh[None, :, None] ** 2 + fw[None, None] ** 2)
    share = ((radius <= 0.25).sum() - 1) / (radius.size - 1)  # DC is removed by the standardisation
    assert white.low_energy == pytest.approx(share, abs=0.01)
    # Flat at 256/255 (the DC point is zeroed by the standardisation); bin 0 holds only the spatial DC point,
    # whose temporal average lost one of its 4 temporal frequencies.
    expected = np.full(8, 256 / 255)
    expected[0] *= 3 / 4
    np.testing.assert_allclose(white.spatial_power.numpy(), expected, rtol=0.1)


def test_power_spectrum_pools_files_of_different_sizes():
    a, b = torch.randn(2, 3, 4, 8, 8), torch.randn(1, 3, 2, 6, 10)
    pooled = power_spectrum([a, b])
    assert torch.isfinite(torch.tensor(pooled.low_energy))
    with pytest.raises(InputError, match="one channel count"):
        power_spectrum([a, torch.randn(1, 4, 2, 6, 10)])


# --- channel eigenspectrum ---------------------------------------------------------------------------------------
def test_eigenspectrum_matches_numpy_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1])
    z = torch.einsum("ij,bjthw->bithw", mix, torch.randn(3, 5, 4, 6, 6, generator=g, dtype=torch.float64)) + 2.0
    flat = z.transpose(0, 1).reshape(5, -1).numpy()
    for standardize in (False, True):
        cov = np.corrcoef(flat) if standardize else np.cov(flat, bias=True)
        expected = np.sort(np.linalg.eigvalsh(cov))[::-1]
        expected = expected / expected.sum()
        stats = channel_eigenspectrum(z, standardize=standardize, top_k=2)
        np.testing.assert_allclose(stats.eigenvalues.numpy(), expected, atol=1e-9)
        assert stats.top_k_share == pytest.approx(expected[:2].sum(), abs=1e-9)
        assert stats.effective_rank == pytest.approx(np.exp(-(expected * np.log(expected)).sum()), rel=1e-9)
    # Pooling a list equals pooling the concatenation.
    split = channel_eigenspectrum([z[:1], z[1:]], standardize=True)
    torch.testing.assert_close(split.eigenvalues, channel_eigenspectrum(z).eigenvalues)


def test_eigenspectrum_known_extremes():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    hadamard = torch.kron(torch.kron(h2, h2), h2)  # 8 x 8, orthogonal rows; row 0 is constant
    iso = hadamard[1:5].reshape(1, 4, 1, 2, 4)  # 4 zero-mean, equal-variance, uncorrelated channels
    stats = channel_eigenspectrum(iso, standardize=False)
    assert stats.effective_rank == pytest.approx(4.0) and stats.top_k_share == pytest.approx(1.0)
    assert channel_eigenspectrum(iso, top_k=1).top_k_share == pytest.approx(0.25)
    signal = torch.randn(1, 1, 3, 5, 5, dtype=torch.float64)
    rank1 = signal * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1) + torch.tensor([1.0, 2, 3]).view(1, 3, 1, 1, 1)
    stats = channel_eigenspectrum(rank1, top_k=1)
    assert stats.top_k_share == pytest.approx(1.0) and stats.effective_rank == pytest.approx(1.0, abs=1e-6)


# --- CLI -----------------------------------------------------------------------------------------------------------
def _write_latents(folder):
    from safetensors.torch import save_file

    from refdecoder.blocks.latent_degradation import latent_blur

    g = torch.Generator().manual_seed(0)
    smooth = latent_blur(torch.randn(3, 4, 5, 12, 12, generator=g), 1.0)
    save_file({"latents": smooth[0].contiguous()}, str(folder / "a.safetensors"))
    save_file({"latents": smooth[1:2].contiguous()}, str(folder / "b.safetensors"))
    torch.save({"latents": smooth[2]}, folder / "c.pt")


def test_analyze_latents_cli_compares_degradations(tmp_path, capsys):
    from refdecoder.blocks.latent_degradation import DegradationProxy

    data, out = tmp_path / "latents", tmp_path / "report"
    data.mkdir()
    _write_latents(data)
    proxy = DegradationProxy(4, width=4, depth=1, embed_dim=4).save(tmp_path / "proxy.safetensors")
    argv = [
        "analyze-latents",
        str(data),
        "--out",
        str(out),
        "--degrade",
        "blur,noise,lmr,proxy",
        "--proxy",
        str(proxy),
    ]
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["files"]) == 3
    v = report["variants"]
    low = {name: stats["power_spectrum"]["low_energy"] for name, stats in v.items()}
    rank = {name: stats["eigenspectrum"]["effective_rank"] for name, stats in v.items()}
    assert low["blur"] > low["clean"] > low["noise"]
    assert rank["noise"] > rank["clean"]
    assert low["proxy"] == pytest.approx(low["clean"], abs=1e-9)  # an untrained proxy is the identity
    for png in ("spatial_spectrum.png", "temporal_spectrum.png", "eigenspectrum.png"):
        assert (out / png).stat().st_size > 1000
    assert "effective rank" in capsys.readouterr().out


def test_analyze_latents_cli_reports_bad_input(tmp_path, capsys):
    assert cli_main(["analyze-latents", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.pt").write_bytes(b"not a tensor")
    assert cli_main(["analyze-latents", str(tmp_path / "x.pt"), "--out", str(tmp_path)]) == 1
    assert "cannot read latents" in capsys.readouterr().err
    torch.save(torch.randn(4, 1, 4, 4), tmp_path / "y.pt")
    assert cli_main(["analyze-latents", str(tmp_path / "y.pt"), "--out", str(tmp_path), "--degrade", "sharpen"]) == 1
    assert "unknown degradation" in capsys.readouterr().err
