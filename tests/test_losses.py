"""Losses against independent computations: by-hand formulas, numpy/scipy, torchvision's layer layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from refdecoder.errors import CheckpointError, ConfigError, InputError
from refdecoder.losses import (
    LPIPS,
    TRUNK_FILES,
    FrequencyDistributionLoss,
    PatchDiscriminator2D,
    PatchDiscriminator3D,
    ReconstructionLoss,
    VGGFeatures,
    adaptive_weight,
    discriminator_loss,
    frequency_distribution,
    generator_loss,
    sliced_wasserstein,
)

LPIPS_PKG = Path(pytest.importorskip("lpips").__file__).parent
# LPIPS v0.1 input scaling constants (Zhang et al. 2018), applied to [-1, 1] inputs.
LPIPS_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
LPIPS_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def lpips_alex() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(net="alex", pretrained_trunk=False)


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch's hub cache at an empty folder and make any download attempt fail the test."""

    def no_network(*args, **kwargs):
        raise AssertionError("refdecoder tried to download weights")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def video(b: int = 2, t: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


# --------------------------------------------------------------------------------------------------- LPIPS


def lpips_by_hand(module: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS from its definition: unit-normalised trunk features, squared difference, linear weights, mean."""
    feats_x = module.model.net((x - LPIPS_SHIFT) / LPIPS_SCALE)
    feats_y = module.model.net((y - LPIPS_SHIFT) / LPIPS_SCALE)
    total = torch.zeros(x.shape[0])
    for layer, (fx, fy) in enumerate(zip(feats_x, feats_y)):
        fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weight = module.model.lins[layer].model[-1].weight[0, :, 0, 0]
        total += ((fx - fy).pow(2) * weight.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def test_lpips_zero_for_identical_and_positive_otherwise(lpips_alex):
    x = video(t=1)[:, :, 0]
    assert lpips_alex(x, x, reduction="none").abs().max() < 1e-6
    assert (lpips_alex(x, x.flip(-1), reduction="none") > 1e-3).all()


def test_lpips_matches_definition(lpips_alex):
    x, y = video(t=1, seed=1)[:, :, 0], video(t=1, seed=2)[:, :, 0]
    with torch.no_grad():
        torch.testing.assert_close(lpips_alex(x, y, reduction="none"), lpips_by_hand(lpips_alex, x, y))


def test_lpips_video_is_per_frame(lpips_alex):
    x, y = video(t=3, seed=1), video(t=3, seed=2)
    per_frame = lpips_alex(x, y, reduction="none")
    assert per_frame.shape == (2, 3)
    for t in range(3):
        torch.testing.assert_close(per_frame[:, t], lpips_alex(x[:, :, t], y[:, :, t], reduction="none"))
    torch.testing.assert_close(lpips_alex(x, y), per_frame.mean())


def test_lpips_linear_layers_are_the_calibrated_ones(lpips_alex):
    shipped = torch.load(LPIPS_PKG / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    for key, value in shipped.items():
        torch.testing.assert_close(lpips_alex.model.state_dict()[key], value)


def test_lpips_is_frozen_but_passes_gradients(lpips_alex):
    assert not any(p.requires_grad for p in lpips_alex.parameters())
    lpips_alex.train()
    assert not lpips_alex.model.training  # its linear layers carry dropout
    x = video(t=1, seed=1)[:, :, 0].requires_grad_(True)
    a = lpips_alex(x, video(t=1, seed=2)[:, :, 0])
    assert a == lpips_alex(x, video(t=1, seed=2)[:, :, 0])  # deterministic, so no dropout
    a.backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_missing_trunk_is_a_clear_error(empty_hub, net):
    filename = TRUNK_FILES["vgg16" if net == "vgg" else "alexnet"]
    with pytest.raises(CheckpointError) as err:
        LPIPS(net=net)
    message = str(err.value)
    assert filename in message and str(empty_hub) in message and "pretrained_trunk=False" in message
    with pytest.raises(CheckpointError, match="trunk_weights path"):
        LPIPS(net=net, trunk_weights=empty_hub / "nope.pth")


def test_lpips_loads_trunk_from_hub_cache(empty_hub, lpips_alex):
    # A torchvision-layout checkpoint: features.<index>.* plus a classifier the loader must ignore.
    source = {
        f"features.{k.split('.', 1)[1]}": torch.randn_like(v) for k, v in lpips_alex.model.net.state_dict().items()
    }
    source["classifier.1.weight"] = torch.zeros(2, 2)
    (empty_hub / "checkpoints").mkdir()
    torch.save(source, empty_hub / "checkpoints" / TRUNK_FILES["alexnet"])
    loaded = LPIPS(net="alex")
    for key, value in loaded.model.net.state_dict().items():
        torch.testing.assert_close(value, source[f"features.{key.split('.', 1)[1]}"])


def test_lpips_rejects_a_foreign_checkpoint(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1, 1, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="lack"):
        LPIPS(net="alex", trunk_weights=path)


def test_lpips_input_errors(lpips_alex):
    with pytest.raises(InputError, match="at least 31"):
        lpips_alex(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="same shape"):
        lpips_alex(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 40))
    with pytest.raises(ConfigError):
        LPIPS(net="squeeze", pretrained_trunk=False)


# ---------------------------------------------------------------------------------------------- reconstruction


def test_reconstruction_l1_by_hand():
    x, y = video(seed=1), video(seed=2)
    out = ReconstructionLoss(l1_weight=2.0, lpips_weight=0.0)(x, y)
    expected = np.abs(x.numpy() - y.numpy()).mean()
    assert set(out) == {"loss", "l1"}
    assert out["l1"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2 * expected, rel=1e-5)


def test_reconstruction_adds_weighted_lpips(lpips_alex):
    x, y = video(seed=1), video(seed=2)
    out = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.5, lpips=lpips_alex)(x, y)
    lp = np.mean([lpips_alex(x[:, :, t], y[:, :, t], reduction="none").detach().numpy() for t in range(3)])
    l1 = np.abs(x.numpy() - y.numpy()).mean()
    assert out["lpips"].item() == pytest.approx(lp, rel=1e-5)
    assert out["loss"].item() == pytest.approx(l1 + 0.5 * lp, rel=1e-5)


def test_reconstruction_frame_weights_by_hand():
    x, y = video(seed=1), video(seed=2)
    weights = torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = ReconstructionLoss(lpips_weight=0.0)(x, y, frame_weights=weights)
    per_frame = np.abs(x.numpy() - y.numpy()).mean(axis=(1, 3, 4))
    expected = (per_frame * weights.numpy()).sum() / weights.numpy().sum()
    assert out["l1"].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(InputError, match="frame_weights"):
        ReconstructionLoss(lpips_weight=0.0)(x, y, frame_weights=torch.ones(4))


def test_reconstruction_never_falls_back_to_a_random_trunk(empty_hub):
    with pytest.raises(CheckpointError, match="pretrained_trunk=False"):
        ReconstructionLoss()
    with pytest.raises(ConfigError):
        ReconstructionLoss(l1_weight=-1.0, lpips_weight=0.0)


# ----------------------------------------------------------------------------------------------------- FDL


def test_sliced_wasserstein_matches_scipy():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 6, 5, generator=g), torch.randn(2, 3, 6, 5, generator=g) * 2 + 1
    kernels = torch.randn(4, 3, 2, 2, generator=g)
    got = sliced_wasserstein(x, y, kernels)
    windows = np.lib.stride_tricks.sliding_window_view
    for n in range(2):
        px = np.einsum("clij,pcij->pl", windows(x[n].numpy(), (2, 2), axis=(1, 2)).reshape(3, -1, 2, 2), kernels)
        py = np.einsum("clij,pcij->pl", windows(y[n].numpy(), (2, 2), axis=(1, 2)).reshape(3, -1, 2, 2), kernels)
        expected = np.mean([wasserstein_distance(a, b) for a, b in zip(px, py)])
        assert got[n].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("ndim", [4, 5])
def test_frequency_distribution_matches_numpy(ndim):
    g = torch.Generator().manual_seed(1)
    # float64 and odd sizes: only the DC bin is real-valued, so no phase sits on the +-pi branch cut.
    shape = (1, 2, 7, 5) if ndim == 4 else (1, 2, 3, 7, 5)
    x, y = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    kernels = torch.randn(3, 2, *([1] * (ndim - 2)), generator=g, dtype=torch.float64)
    got = frequency_distribution(x, y, kernels, phase_weight=0.3)
    axes = tuple(range(2, ndim))
    spec_x, spec_y = np.fft.fftn(x.numpy(), axes=axes), np.fft.fftn(y.numpy(), axes=axes)
    k = kernels.numpy().reshape(3, 2)

    def swd(a, b):
        pa, pb = np.einsum("pc,cl->pl", k, a[0].reshape(2, -1)), np.einsum("pc,cl->pl", k, b[0].reshape(2, -1))
        return np.mean([wasserstein_distance(u, v) for u, v in zip(pa, pb)])

    expected = swd(np.abs(spec_x), np.abs(spec_y)) + 0.3 * swd(np.angle(spec_x), np.angle(spec_y))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_fdl_3d_module_uses_the_video_spectrum():
    fdl = FrequencyDistributionLoss(mode="3d", features=lambda x: [x], num_proj=5, patch_size=1)
    x, y = video(b=1, t=4, h=6, w=6, seed=1), video(b=1, t=4, h=6, w=6, seed=2)
    kernels = fdl.projection_kernels(3, (1, 1, 1), torch.device("cpu"))
    torch.testing.assert_close(kernels.flatten(1).norm(dim=1), torch.ones(5))
    torch.testing.assert_close(fdl(x, y), frequency_distribution(x, y, kernels).mean())
    assert fdl(x, x).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InputError, match="3d"):
        fdl(x[:, :, 0], y[:, :, 0])


def smooth_texture(size: int, pad: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 3, size + pad, size + pad, generator=g)
    return torch.tanh(2 * F.avg_pool2d(noise, 5, stride=1))


def test_fdl_amplitude_is_invariant_to_translation_unlike_l1():
    x = smooth_texture(32, 4)
    shifted = torch.roll(x, shifts=(1, 2), dims=(-2, -1))
    fdl = FrequencyDistributionLoss(features=lambda z: [z], num_proj=16, phase_weight=0.0)
    assert (x - shifted).abs().mean() > 0.1
    assert fdl(shifted, x).item() < 1e-4 * fdl(smooth_texture(32, 4, seed=1), x).item()


def test_fdl_tolerates_misalignment_more_than_noise_of_equal_l1():
    x = smooth_texture(32, 8)
    base, shifted = x[..., 2:34, 2:34], x[..., 3:35, 2:34]  # 1-pixel translation, no wrap-around
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(3))
    noisy = base + noise * (shifted - base).abs().mean() / noise.abs().mean()
    torch.manual_seed(1)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    fdl = FrequencyDistributionLoss(features=lambda z: [z, trunk(z)], num_proj=32)
    assert (noisy - base).abs().mean().item() == pytest.approx((shifted - base).abs().mean().item(), rel=1e-4)
    assert fdl(shifted, base).item() < 0.5 * fdl(noisy, base).item()


def test_fdl_projections_are_seeded_and_gradients_are_finite():
    x, y = video(b=1, t=2, h=8, w=8, seed=1), video(b=1, t=2, h=8, w=8, seed=2)
    fixed = [FrequencyDistributionLoss(features=lambda z: [z], num_proj=8, seed=s) for s in (0, 0, 1)]
    assert fixed[0](x, y) == fixed[1](x, y)
    assert fixed[0](x, y) != fixed[2](x, y)
    pred = x.clone().requires_grad_(True)
    FrequencyDistributionLoss(features=lambda z: [z, z.clamp_min(0)], num_proj=8)(pred, y).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.parametrize(("arch", "cfg"), [("vgg16", "D"), ("vgg19", "E")])
def test_vgg_features_have_torchvision_layout(arch, cfg):
    vgg = pytest.importorskip("torchvision.models.vgg")
    with torch.device("meta"):
        ours = VGGFeatures(arch, pretrained=False).features.state_dict()
        theirs = vgg.make_layers(vgg.cfgs[cfg]).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_vgg_features_load_and_missing_weights(empty_hub):
    with pytest.raises(CheckpointError, match=TRUNK_FILES["vgg19"]):
        FrequencyDistributionLoss()
    with torch.device("meta"):
        shapes = {
            f"features.{k}": v.shape for k, v in VGGFeatures("vgg16", pretrained=False).features.state_dict().items()
        }
    source = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(shapes.items())}
    path = empty_hub / "vgg16.pth"
    torch.save(source, path)
    loaded = VGGFeatures("vgg16", weights=path).features.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, source[f"features.{key}"])
    assert not any(p.requires_grad for p in VGGFeatures("vgg16", weights=path).parameters())


# ----------------------------------------------------------------------------------------------------- GAN

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_discriminator_and_generator_losses_by_hand():
    # hinge: relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2.5]
    assert discriminator_loss(REAL, FAKE, "hinge").item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    # lsgan: (real - 1)^2 = [1, .25, 4], fake^2 = [4, 0, 2.25]
    assert discriminator_loss(REAL, FAKE, "lsgan").item() == pytest.approx(0.5 * (5.25 / 3 + 6.25 / 3))
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(0.5 / 3)
    assert generator_loss(FAKE, "lsgan").item() == pytest.approx(0.5 * (9 + 1 + 0.25) / 3)
    with pytest.raises(ConfigError):
        discriminator_loss(REAL, FAKE, "wgan")


def spectral_norms(module: torch.nn.Module) -> list[float]:
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    return [torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() for m in convs]


def test_patch_discriminators_shapes_and_spectral_norm():
    d2, d3 = PatchDiscriminator2D(base_channels=8), PatchDiscriminator3D(base_channels=8, temporal_downsample=2)
    x = video(b=1, t=8, h=32, w=32)
    for _ in range(3):  # a few power iterations, as training would run
        out2, out3 = d2(x), d3(x)
    assert out2.shape == (1, 1, 8, 2, 2) and d2(x[:, :, 0]).shape == (1, 1, 2, 2)
    assert out3.shape == (1, 1, 2, 2, 2)
    for sigma in spectral_norms(d2) + spectral_norms(d3):
        assert sigma == pytest.approx(1.0, abs=0.05)
    with pytest.raises(InputError):
        d3(x[:, :, 0])


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 3, generator=g, requires_grad=True)
    x, y, c = torch.randn(3, generator=g), torch.randn(2, generator=g), torch.tensor([0.3, -2.0])
    out = weight @ x
    rec, gan = (out - y).pow(2).sum(), (c * out).sum()
    # d rec / dW = 2 (Wx - y) x^T and d gan / dW = c x^T, so both norms factor through ||x||.
    residual = (weight.detach() @ x - y).numpy()
    expected = np.linalg.norm(2 * residual) * np.linalg.norm(x) / (np.linalg.norm(c) * np.linalg.norm(x) + 1e-4)
    assert adaptive_weight(rec, gan, weight).item() == pytest.approx(expected, rel=1e-5)
    assert adaptive_weight(rec, 0 * gan, weight, max_weight=7.0).item() == 7.0
    rec.backward()  # graphs were retained for the caller
    with pytest.raises(InputError):
        adaptive_weight(rec, gan, weight.detach())
