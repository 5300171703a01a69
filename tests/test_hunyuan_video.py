"""The HunyuanVideo (v1) adapter against diffusers' ``AutoencoderKLHunyuanVideo.decode`` beyond the conformance
suite: lengths past diffusers' frame-wise threshold (overlapping groups cross-faded), other group settings, the
whole-sequence pass, outputs outside [-1, 1], and the one-line refusals."""

from __future__ import annotations

import pytest
import torch

import refdecoder
from refdecoder.backbones.registry import find_backbone, get_backbone
from refdecoder.errors import BackboneError
from refdecoder.testing import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5


def _vae(framewise: bool = True, min_frames: int = 16, stride: int = 12, **overrides: object) -> torch.nn.Module:
    """A tiny random VAE built straight from the diffusers class, with its frame-wise decode settings."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    kwargs = dict(latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    vae = AutoencoderKLHunyuanVideo(**{**kwargs, **overrides}).eval()
    vae.use_framewise_decoding = framewise
    vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = min_frames, stride
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.mul_(4)  # outputs well outside [-1, 1], which diffusers does not clamp
    return vae


def _latents(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, frames, 2, 3, generator=torch.Generator().manual_seed(seed))


def _reference(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(framewise=False), dict(min_frames=8, stride=4), dict(min_frames=12, stride=8)],
    ids=["framewise-default", "whole-sequence", "groups-8-stride-4", "groups-12-stride-8"],
)
def test_decode_at_init_equals_vae_decode_at_every_length(settings):
    vae = _vae(**settings)
    model = refdecoder.wrap(vae, "tiny")
    assert model.adapter.name == "hunyuan-video"
    left_range = False
    for frames in (1, 2, 3, 5, 6, 9):  # past 4 (2, 3) latent frames diffusers decodes overlapping groups
        z = _latents(frames)
        with torch.no_grad():
            expected = vae.decode(z).sample
            plain, referenced = model.decode(z), model.decode(z, reference=_reference())
        assert plain.shape == expected.shape == (1, 3, 4 * frames - 3, 16, 24)
        assert (plain - expected).abs().max() <= TOLERANCE, frames
        assert (referenced - expected).abs().max() <= TOLERANCE, frames
        left_range |= bool(expected.abs().max() > 1)
    assert left_range, "the check needs outputs outside [-1, 1] to show nothing clamps"


def test_the_decode_ignores_the_window_and_the_reference_matters_once_trained():
    model = refdecoder.wrap(_vae(min_frames=8, stride=4), "tiny")
    randomize_([p for _, p in model.added_parameters()], scale=0.1)
    z = _latents(6)
    with torch.no_grad():
        outs = [model.decode(z, reference=_reference(), window=w) for w in (1, 3, 6)]
        other = model.decode(z, reference=_reference(seed=5))
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    assert (outs[0] - other).abs().max() > 1e-4  # every frame-wise group sees the reference


def test_detection_tells_v1_from_1_5():
    assert find_backbone(_vae()) is get_backbone("hunyuan-video")
    assert not get_backbone("hunyuan-video-1.5").fit(_vae()).ok
    fit = get_backbone("hunyuan-video").fit(get_backbone("hunyuan-video-1.5").build_tiny())
    assert fit.reasons == ("it drives diffusers AutoencoderKLHunyuanVideo only, not AutoencoderKLHunyuanVideo15",)


def test_the_vaes_own_spatial_tiling_is_refused_in_one_line():
    vae = _vae()
    model = refdecoder.wrap(vae, "tiny")
    vae.use_tiling, vae.tile_sample_min_height = True, 8  # would tile this 16-pixel-high decode
    with pytest.raises(BackboneError, match=r"^the VAE's own spatial tiling is on .* call vae.disable_tiling\(\)"):
        model.decode(_latents(2))
    vae.tile_sample_min_height = 256  # too small to tile: decoded as usual
    with torch.no_grad():
        assert (model.decode(_latents(2)) - vae.decode(_latents(2)).sample).abs().max() <= TOLERANCE
