"""Latent degradations: blur/noise/LMR against independent computations, the proxy and its training recipe."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from refdecoder.blocks.latent_degradation import (
    DegradationProxy,
    LatentBlur,
    LatentDegradationConfig,
    LatentDegrader,
    LatentMaskedReconstruction,
    LatentNoise,
    build_latent_components,
    freeze_as_constants,
    latent_blur,
    latent_masked_reconstruction,
    latent_noise,
    lmr_mask,
    timestep_embedding,
)
from refdecoder.errors import CheckpointError, ConfigError, InputError
from refdecoder.hooks import DecodeContext
from tests.conftest import PROJECT_ROOT
from tests.helpers import latents_for, reference_for, tiny_wan


def _load_recipe():
    spec = importlib.util.spec_from_file_location("train_degrader", PROJECT_ROOT / "recipes" / "train_degrader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_degrader"] = module
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()


# --- parametric degradations ---------------------------------------------------------------------------------
def test_blur_matches_scipy_per_sample():
    x = torch.randn(2, 3, 2, 9, 11, dtype=torch.float64)
    out = latent_blur(x, torch.tensor([0.0, 2.0]))
    assert torch.equal(out[0], x[0])  # sigma 0 leaves a sample untouched
    expected = gaussian_filter(x[1].numpy(), sigma=(0, 0, 2.0, 2.0), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(out[1].numpy(), expected, atol=1e-10)
    same = gaussian_filter(x.numpy(), sigma=(0, 0, 0, 1.0, 1.0), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(latent_blur(x, 1.0).numpy(), same, atol=1e-10)


def test_blur_rejects_bad_input():
    with pytest.raises(InputError, match=r"\(B, C, T, H, W\)"):
        latent_blur(torch.zeros(3, 4, 4), 1.0)
    with pytest.raises(InputError, match="shape \\(2,\\)"):
        latent_blur(torch.zeros(2, 1, 1, 4, 4), torch.ones(3))
    with pytest.raises(InputError, match=">= 0"):
        latent_blur(torch.zeros(1, 1, 1, 4, 4), -1.0)


def test_noise_is_relative_to_channel_std_and_reproducible():
    scales = torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1, 1)
    x = torch.randn(2, 3, 4, 16, 16) * scales
    out = latent_noise(x, 0.5, torch.Generator().manual_seed(3))
    added_std = (out - x).std(dim=(0, 2, 3, 4))
    torch.testing.assert_close(added_std, 0.5 * x.std(dim=(0, 2, 3, 4)), rtol=0.05, atol=0)
    again = latent_noise(x, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    absolute = latent_noise(x, 0.5, torch.Generator().manual_seed(3), relative=False)
    torch.testing.assert_close((absolute - x).std(dim=(0, 2, 3, 4)), torch.full((3,), 0.5), rtol=0.05, atol=0)


def test_parametric_modules_are_identity_in_eval_and_use_ctx_generator():
    x = torch.randn(2, 4, 2, 8, 8)
    for module in (LatentBlur((0.5, 1.0)), LatentNoise((0.1, 0.2))):
        assert module.eval()(x, DecodeContext()) is x
        module.train()
        a = module(x, DecodeContext(generator=torch.Generator().manual_seed(1)))
        b = module(x, DecodeContext(generator=torch.Generator().manual_seed(1)))
        assert torch.equal(a, b) and not torch.allclose(a, x)
        assert len(list(module.parameters())) == 0


# --- LMR -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "ratio", "block"), [((5, 8, 6), 0.5, (1, 1, 1)), ((5, 8, 6), 0.25, (2, 2, 2))])
def test_lmr_mask_counts_whole_blocks(size, ratio, block):
    mask = lmr_mask(size, ratio, block, torch.Generator().manual_seed(0))[0, 0]
    grid = [math.ceil(s / b) for s, b in zip(size, block)]
    expected_blocks = max(1, int(np.prod(size) * ratio / np.prod(block)))
    padded = torch.zeros([g * b for g, b in zip(grid, block)], dtype=torch.bool)
    padded[: size[0], : size[1], : size[2]] = mask
    blocks = padded.view(grid[0], block[0], grid[1], block[1], grid[2], block[2]).permute(0, 2, 4, 1, 3, 5)
    per_block = blocks.reshape(*grid, -1)
    # Every block is masked entirely or not at all (up to its cropped part at the border).
    inside = torch.zeros_like(padded)
    inside[: size[0], : size[1], : size[2]] = True
    valid = inside.view(grid[0], block[0], grid[1], block[1], grid[2], block[2]).permute(0, 2, 4, 1, 3, 5)
    valid = valid.reshape(*grid, -1)
    masked_blocks = (per_block & valid).any(-1)
    assert torch.equal((per_block & valid).sum(-1), masked_blocks * valid.sum(-1))
    assert int(masked_blocks.sum()) == expected_blocks


def test_lmr_replaces_same_positions_in_every_sample_and_channel_with_token():
    x = torch.randn(3, 4, 5, 6, 6)
    token = torch.arange(4.0).view(1, 4, 1, 1, 1).requires_grad_(True)
    out = latent_masked_reconstruction(x, token, 0.5, generator=torch.Generator().manual_seed(2))
    changed = out != x
    mask = changed.all(dim=1)  # masked positions differ in every channel (token values differ from randn draws)
    assert torch.equal(changed.any(dim=1), mask)
    assert torch.equal(mask, mask[:1].expand_as(mask))
    assert int(mask[0].sum()) == int(5 * 6 * 6 * 0.5)
    torch.testing.assert_close(out.permute(0, 2, 3, 4, 1)[mask], token.view(1, 4).expand(int(mask.sum()), 4))
    out.sum().backward()
    torch.testing.assert_close(token.grad.view(4), torch.full((4,), float(mask.sum())))
    assert torch.equal(latent_masked_reconstruction(x, token, 0.0), x)


def test_lmr_module_schedule_eval_identity_and_saved_token():
    module = LatentMaskedReconstruction(4, ratios=(0.0, 0.5), probs=(0.25, 0.75), block=(1, 2, 2))
    assert [n for n, _ in module.named_parameters()] == ["mask_token"]
    g = torch.Generator().manual_seed(0)
    draws = [module.draw_ratio(g) for _ in range(2000)]
    assert abs(draws.count(0.5) / 2000 - 0.75) < 0.03
    x = torch.randn(2, 4, 3, 4, 4)
    assert module.eval()(x, DecodeContext()) is x
    out = module.train()(x, DecodeContext(generator=torch.Generator().manual_seed(5)))
    assert out.requires_grad  # the token stays in the graph even when nothing is masked
    with pytest.raises(ConfigError, match="sum to 1"):
        LatentMaskedReconstruction(4, ratios=(0.0, 0.5), probs=(0.5, 0.6))


# --- proxy -----------------------------------------------------------------------------------------------------
def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 0.05, 0.12])
    emb = timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    angles = t.numpy()[:, None] * 1000 * freqs[None]
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), rtol=1e-5, atol=1e-5)


def test_proxy_is_identity_at_init_and_round_trips(tmp_path):
    proxy = DegradationProxy(4, width=8, depth=1, embed_dim=8)
    x = torch.randn(2, 4, 3, 6, 6)
    assert torch.equal(proxy(x, 0.1), x)
    torch.nn.init.normal_(proxy.conv_out.weight, std=0.1)
    path = proxy.save(tmp_path / "p.safetensors")
    loaded = DegradationProxy.load(path)
    torch.testing.assert_close(loaded(x, torch.tensor([0.0, 0.1])), proxy(x, torch.tensor([0.0, 0.1])))
    with pytest.raises(CheckpointError):
        DegradationProxy.load(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match=r"\(B, 4, T, H, W\)"):
        proxy(torch.randn(2, 3, 1, 6, 6), 0.1)


def test_freeze_as_constants_keeps_values_out_of_state_dict_and_optimizers():
    proxy = DegradationProxy(4, width=8, depth=1, embed_dim=8)
    torch.nn.init.normal_(proxy.conv_out.weight, std=0.1)
    x = torch.randn(1, 4, 1, 5, 5, requires_grad=True)
    before = proxy(x, 0.1).detach()
    freeze_as_constants(proxy)
    assert list(proxy.parameters()) == [] and proxy.state_dict() == {}
    torch.testing.assert_close(proxy(x, 0.1), before)
    proxy(x, 0.1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # still differentiable w.r.t. its input
    assert proxy.to(torch.float64).conv_in.weight.dtype == torch.float64


def test_proxy_recovers_a_known_t_dependent_blur_on_held_out_latents(one_thread):
    """Must-hold: after training on (clean, blur(clean, sigma = t)) pairs, error < 20% of the identity's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pool = recipe.LatentPool(recipe.synthetic_latents(256, 4, 1, 12, seed=1), crop=12)
    held = recipe.LatentPool(recipe.synthetic_latents(64, 4, 1, 12, seed=2), crop=12)
    degrade = recipe.blur_degradation(1.0)
    proxy = DegradationProxy(4, width=16, depth=2, embed_dim=32)
    losses = recipe.train_proxy(
        proxy, lambda b: pool.sample(b, g), degrade, (0.0, 1.0), steps=400, lr=1e-2, generator=g
    )
    assert losses[-1] < losses[0]
    batches = [held.sample(32, g) for _ in range(2)]
    metrics = recipe.evaluate_proxy(freeze_as_constants(proxy), batches, degrade, (0.0, 1.0), g)
    assert metrics["identity_error"] > 0
    assert metrics["ratio"] < 0.2, metrics


# --- the component at the hook point ---------------------------------------------------------------------------
class _RecordingProxy(DegradationProxy):
    def forward(self, x, t):
        self.seen = t
        return x + t.view(-1, 1, 1, 1, 1)


def test_degrader_timesteps_from_extras_or_range_and_eval_identity():
    degrader = LatentDegrader(_RecordingProxy(4, width=4, depth=1, embed_dim=4), t_range=(0.02, 0.1))
    x = torch.zeros(64, 4, 1, 2, 2)
    assert degrader.eval()(x, DecodeContext()) is x
    degrader.train()
    assert not degrader.proxy.training
    degrader(x, DecodeContext(generator=torch.Generator().manual_seed(0)))
    t = degrader.proxy.seen
    assert t.shape == (64,) and t.min() >= 0.02 and t.max() <= 0.1 and t.std() > 0.01
    out = degrader(x, DecodeContext(degradation_timestep=0.05))
    torch.testing.assert_close(out, torch.full_like(x, 0.05))


def test_components_attached_to_a_refdecoder_save_only_the_lmr_token(tmp_path, one_thread):
    import refdecoder

    model = refdecoder.wrap(tiny_wan(), "tiny")
    proxy_path = DegradationProxy(4, width=8, depth=1, embed_dim=8).save(tmp_path / "proxy.safetensors")
    config = LatentDegradationConfig(proxy=str(proxy_path), blur_sigma=(0.0, 0.5), noise_std=(0, 0.1), lmr=True)
    components = build_latent_components(config, channels=4)
    assert list(components) == ["degrade_proxy", "latent_blur", "latent_noise", "lmr"]
    before = set(model.refdecoder_state_dict())
    model.latent_components.update(components)
    added = set(model.refdecoder_state_dict()) - before
    assert added == {"latent_components.lmr.mask_token"}
    assert "degrade_proxy" not in build_latent_components(config, 4, include_proxy=False)
    z = latents_for(model.vae, 2)
    ref = reference_for(z)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.decode(z, ref), model.vae.decode(z).sample, atol=1e-5, rtol=0)
        model.train()
        trained = model.decode(z, ref, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(trained, model.vae.decode(z).sample, atol=1e-4)
    model.save_pretrained(tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "refdecoder.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
    assert "latent_components.lmr.mask_token" in saved and not any("degrade_proxy" in k for k in saved)


def test_config_validation_and_json_round_trip():
    config = LatentDegradationConfig(t_range=[0, 0.12], lmr_block=[2, 2, 2])
    assert config.t_range == (0.0, 0.12) and config.lmr_block == (2, 2, 2)
    assert LatentDegradationConfig(**json.loads(json.dumps(config.__dict__))) == config
    with pytest.raises(ConfigError, match="t_range"):
        LatentDegradationConfig(t_range=(0.2, 0.1))
    with pytest.raises(ConfigError, match="block"):
        LatentDegradationConfig(lmr_block=(0, 1, 1))


# --- the recipe ------------------------------------------------------------------------------------------------
def test_flow_matching_pairs_with_exact_and_bayes_optimal_denoisers():
    clean = torch.randn(3, 4, 1, 5, 5, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)).double()  # as the recipe draws it
    # An oracle that knows x0 and the noise predicts the straight-path velocity; Euler is then exact at any steps.
    oracle = lambda x, now: noise - clean  # noqa: E731
    for steps in (1, 3):
        out = recipe.flow_matching_degradation(oracle, steps=steps)(clean, t, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, clean)
    # For x0 ~ N(0, I) the optimal x0 estimate is a shrinkage of x_t: E[x0 | x_t] = (1-t) / ((1-t)^2 + t^2) x_t.
    bayes = lambda x, now: (1 - now.view(-1, 1, 1, 1, 1)) / ((1 - now) ** 2 + now**2).view(-1, 1, 1, 1, 1) * x  # noqa: E731
    out = recipe.flow_matching_degradation(bayes, prediction="x0")(clean, t, g)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * clean + t.view(-1, 1, 1, 1, 1) * noise
    torch.testing.assert_close(out, bayes(x_t, t))


def test_hook_space_is_what_the_wan_latents_hook_sees():
    import refdecoder

    model = refdecoder.wrap(tiny_wan(), "tiny")
    u = torch.randn(1, 4, 2, 3, 3)
    with torch.no_grad():
        expected = model.vae.post_quant_conv(model.denormalize(u))
    torch.testing.assert_close(recipe.hook_space(model)(u), expected)


def test_recipe_main_writes_a_loadable_frozen_proxy(tmp_path, capsys, one_thread):
    out = tmp_path / "proxy.safetensors"
    argv = f"--synthetic 6 --channels 4 --crop 8 --demo-blur 1.0 --t-max 1 --out {out}".split()
    assert recipe.main([*argv, "--steps", "5", "--width", "8", "--depth", "1", "--eval-batches", "1"]) == 0
    metrics = json.loads((tmp_path / "proxy.safetensors.metrics.json").read_text())
    assert metrics["heldout"] and metrics["steps"] == 5 and metrics["identity_error"] > 0
    degrader = LatentDegrader(DegradationProxy.load(out))
    assert degrader.state_dict() == {} and "error vs identity" in capsys.readouterr().out
