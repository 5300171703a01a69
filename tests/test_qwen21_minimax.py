"""The Qwen-Image 2.1 (RGBA image decoder) and MiniMax-H3 (ViT decoder in clips) adapters beyond the conformance
suite, against diffusers' own decode computed here independently of the adapters' plain_decode."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import refdecoder
from refdecoder.backbones.minimax_h3 import IMAGENET_MEAN, IMAGENET_STD
from refdecoder.backbones.registry import get_backbone
from refdecoder.errors import BackboneError, ConfigError, InputError
from refdecoder.testing import check_backbone
from tests.test_backbones_video import _latents, _wrap

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(channels: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, channels, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _imagenet_to_unit(video: torch.Tensor) -> torch.Tensor:
    """diffusers' MiniMax-H3 decode step before its clamp, then to [-1, 1]."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (video * std + mean) * 2 - 1


# --- Qwen-Image 2.1 -----------------------------------------------------------------------------------------------
def test_qwen21_vae_decodes_one_latent_frame_only():
    vae = get_backbone("qwen-image-2.1").build_tiny().eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="Expected 3D .* or 4D .* input to conv2d"):
        vae.decode(torch.randn(1, 4, 2, 8, 8))  # why the adapter decodes every latent frame as its own image


@pytest.mark.parametrize("amplify", [1.0, 30.0])
def test_qwen21_every_frame_equals_vae_decode_of_that_frame(amplify):
    model = _wrap("qwen-image-2.1")
    hooks, ctx = refdecoder.hooks.IdentityHooks(), refdecoder.hooks.DecodeContext()
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.mul_(amplify)  # 30x: the decoder's values leave [-1, 1] (clamped)
        for frames in (1, 2, 3, 5):
            z = _latents(model, frames)
            peak = model.adapter.decode_windows(z, hooks, ctx, [(0, frames)]).abs().max().item()  # unclamped
            stock = torch.cat([model.vae.decode(z[:, :, i : i + 1]).sample for i in range(frames)], dim=2)
            for reference in (_reference(4), None):
                out = model.decode(z, reference=reference, window=2)
                assert out.shape == (1, 4, frames, 32, 32)
                assert (out - stock).abs().max() <= 1e-5 * (1 + peak), frames  # fp32 rounding of the raw values
    assert (peak > 1.5) == (amplify > 1)


def test_qwen21_alpha_is_carried_not_dropped():
    model = _wrap("qwen-image-2.1", perturb=True)
    z = _latents(model, 2)
    assert model.adapter.pixel_channels == 4 and model.tokenizer.in_channels == 4
    with pytest.raises(InputError, match=r"reference must have shape \(B, 4, H, W\)") as err:
        model.decode(z, reference=_reference(3))
    assert "\n" not in str(err.value)
    opaque, clear = _reference(4), _reference(4)
    clear[:, 3] = -1.0  # only the alpha channel differs
    with torch.no_grad():
        assert (model.decode(z, reference=opaque) - model.decode(z, reference=clear)).abs().max() > 1e-4
    with pytest.raises(InputError, match=r"video must have shape \(B, 4, T, H, W\)"):
        model(torch.rand(1, 3, 2, 32, 32) * 2 - 1)


def test_qwen21_refuses_other_pixel_layouts_and_the_upscale_head():
    adapter = get_backbone("qwen-image-2.1")
    fit = adapter.fit(adapter.build_tiny(in_channels=3, out_channels=4))
    assert not fit.ok and "in_channels=3 != out_channels=4" in fit.reasons[0]
    assert adapter.fit(adapter.build_tiny(in_channels=3, out_channels=3)).ok  # an RGB variant is driven as RGB
    config = refdecoder.preset("tiny")
    config.upscale.factor = 2
    with pytest.raises(ConfigError, match="upscale.factor=2"):
        refdecoder.wrap(adapter.build_tiny(), config)


# --- MiniMax-H3 ---------------------------------------------------------------------------------------------------
def test_minimax_frame_rule_is_the_clip_rule():
    rule = get_backbone("minimax-h3").frame_rule
    assert [rule.latent_frames(n) for n in (22, 39, 56)] == [7, 12, 17]
    assert [rule.pixel_frames(n) for n in (7, 12, 17)] == [22, 39, 56]
    for pixels in (17, 21, 23):
        assert not rule.is_valid(pixels)
    with pytest.raises(InputError, match=r"got 8 latent frames, but this backbone decodes 7 \+ 5k") as err:
        _wrap("minimax-h3").decode(torch.randn(1, 4, 8, 8, 8))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("amplify", [1.0, 20.0])
def test_minimax_decode_equals_vae_decode_in_unit_range(amplify):
    model = _wrap("minimax-h3")
    with torch.no_grad():
        model.vae.decoder.proj_out.weight.mul_(amplify)
        for frames in (7, 12, 17):
            z = _latents(model, frames)
            stock = _imagenet_to_unit(model.vae.decode(z).sample)
            for reference in (_reference(3), None):
                out = model.decode(z, reference=reference, window=1)
                assert out.shape == stock.shape
                assert (out - stock).abs().max() <= 1e-5 * (1 + stock.abs().max()), frames
    assert (stock.abs().max() > 1.5) == (amplify > 1)  # unclamped, as vae.decode


def test_minimax_without_the_cross_fade_differs_from_vae_decode():
    """The identity above is not vacuous: decoding the clips without diffusers' cross-fade is caught."""
    model = _wrap("minimax-h3")
    z = _latents(model, 12)
    with torch.no_grad(), mock.patch.object(model.vae, "_blend", side_effect=lambda a, b, n, dim: b):
        broken = model.decode(z)
    with torch.no_grad():
        assert (broken - _imagenet_to_unit(model.vae.decode(z).sample)).abs().max() > 1e-3


def test_minimax_windows_are_the_clips_and_the_encode_is_imagenet_normalised():
    model = _wrap("minimax-h3", perturb=True)
    adapter = model.adapter
    assert adapter.plan_windows(7, 2) == [(0, 7)]
    assert adapter.plan_windows(17, 1) == [(0, 5), (5, 10), (10, 17)]
    z = _latents(model, 12)
    with torch.no_grad():
        outs = [model.decode(z, reference=_reference(3), window=w) for w in (1, 5, 12)]
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    video = torch.rand(1, 3, 22, 32, 32) * 2 - 1
    mean, std = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        expected = model.vae.encode(((video + 1) / 2 - mean) / std).latent_dist.mode()
        assert torch.equal(adapter.encode(video), expected)


def test_minimax_reference_registers_come_from_one_encoding_per_decode():
    model = _wrap("minimax-h3", perturb=True)
    z, ref = _latents(model, 12), _reference(3)
    with torch.no_grad(), mock.patch.object(model.adapter, "encode", wraps=model.adapter.encode) as encode:
        out = model.decode(z, reference=ref)
    assert encode.call_count == 1  # 2 clips x 2 reference stage passes share one encoding
    with torch.no_grad():
        assert (out - model.decode(z, reference=_reference(3, seed=5))).abs().max() > 1e-4
    with pytest.raises(BackboneError, match="ctx.reference_pixels set"):
        model.adapter.run_stage_on_reference(0, torch.zeros(1, 32, 1, 8, 8))


def test_minimax_refuses_a_decode_its_own_tiling_would_tile():
    model = _wrap("minimax-h3")
    model.vae.tile_sample_min_height = 16  # 4 latent rows: the 8-row test latent would be tiled
    with pytest.raises(BackboneError, match="vae.disable_tiling") as err:
        model.decode(_latents(model, 7))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "cls, name, stages, pixel_channels",
    [("AutoencoderKLQwenImage21", "qwen-image-2.1", 3, 4), ("AutoencoderKLMiniMaxH3", "minimax-h3", 3, 3)],
)
def test_released_configs_are_detected_and_wrap(cls, name, stages, pixel_channels):
    import diffusers

    with torch.device("meta"):  # the class defaults are the released layouts
        vae = getattr(diffusers, cls)()
        model = refdecoder.wrap(vae, "small")
    assert model.adapter.name == name and len(model.adapter.stages()) == stages
    assert model.adapter.pixel_channels == pixel_channels and model.adapter.spatial_factor == 16
    if name == "minimax-h3":
        assert model.adapter.hooked_blocks() == [0, 12, 24]
        assert {spec.channels for spec in model.adapter.stages()} == {2048}


@pytest.mark.parametrize("name", ["qwen-image-2.1", "minimax-h3"])
def test_the_whole_conformance_suite_holds_on_configs_build_tiny_does_not_make(name):
    """Qwen-Image 2.1 with the plain (non-residual) up-blocks and other widths; MiniMax-H3 with another encoder,
    a 4-block ViT of width 48 and 3 register tokens (the configs of tests/test_decode_range.py)."""
    from tests.test_decode_range import CONFIGS

    assert len(check_backbone(name, make_vae=CONFIGS[name])) == 13
