"""The Stable Video Diffusion adapter against diffusers' ``AutoencoderKLTemporalDecoder.decode`` beyond the
conformance suite: the pipeline's ``decode_chunk_size`` chunks (``window``), outputs outside [-1, 1], per-frame
encoding and the refused upscale head."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

import refdecoder
from refdecoder.backbones.registry import find_backbone, get_backbone
from refdecoder.errors import ConfigError
from refdecoder.testing import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5


def _vae() -> torch.nn.Module:
    """A tiny random VAE built straight from the diffusers class (not build_tiny's widths)."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
    ).eval()  # fmt: skip
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(4)  # outputs outside [-1, 1], which diffusers does not clamp
    return vae


def _chunked_vae_decode(vae: torch.nn.Module, z: torch.Tensor, chunk: int) -> torch.Tensor:
    """``StableVideoDiffusionPipeline.decode_latents`` (batch 1): ``vae.decode`` on ``chunk`` frames at a time."""
    frames = rearrange(z, "b c t h w -> (b t) c h w")
    parts = [vae.decode(frames[i : i + chunk], num_frames=len(frames[i : i + chunk])).sample for i in
             range(0, len(frames), chunk)]  # fmt: skip
    return rearrange(torch.cat(parts), "t c h w -> 1 c t h w")


def _latents(frames: int) -> torch.Tensor:
    return torch.randn(1, 4, frames, 2, 3, generator=torch.Generator().manual_seed(frames))


def _reference(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_decode_at_init_equals_the_pipelines_chunked_vae_decode():
    vae = _vae()
    model = refdecoder.wrap(vae, "tiny")
    assert model.adapter.name == "stable-video-diffusion"
    worst, peak = 0.0, 0.0
    for frames in (1, 3, 5, 9):
        z = _latents(frames)
        for chunk in (2, 4, 14):  # decode_chunk_size: smaller than, and covering, the video
            expected = _chunked_vae_decode(vae, z, chunk)
            for reference in (None, _reference()):
                out = model.decode(z, reference=reference, window=chunk)
                assert out.shape == expected.shape == (1, 3, frames, 16, 24)
                worst = max(worst, (out - expected).abs().max().item())
            peak = max(peak, expected.abs().max().item())
    print(f"stable-video-diffusion: max |model.decode - vae.decode| {worst:.2e}, output peak {peak:.2f}")
    assert worst <= TOLERANCE and peak > 1.0


@torch.no_grad()
def test_chunks_change_the_output_and_the_reference_matters_once_trained():
    model = refdecoder.wrap(_vae(), "tiny")
    z = _latents(6)
    assert (model.decode(z, window=2) - model.decode(z, window=6)).abs().max() > 1e-4  # time_conv_out per chunk
    randomize_([p for _, p in model.added_parameters()], scale=0.1)
    own, other = (model.decode(z, reference=_reference(seed), window=3) for seed in (1, 5))
    assert (own - other).abs().max() > 1e-4


@torch.no_grad()
def test_encode_folds_frames_into_images_and_detection():
    vae = _vae()
    assert find_backbone(vae) is get_backbone("stable-video-diffusion")
    model = refdecoder.wrap(vae, "tiny")
    video = torch.rand(1, 3, 3, 16, 24) * 2 - 1
    per_frame = torch.stack([vae.encode(video[:, :, t]).latent_dist.mode() for t in range(3)], dim=2)
    torch.testing.assert_close(model.adapter.encode(video), per_frame, atol=1e-5, rtol=0)  # batched vs one by one


def test_a_decoder_that_never_up_samples_is_refused():
    from diffusers import AutoencoderKLTemporalDecoder

    fit = get_backbone("stable-video-diffusion").fit(AutoencoderKLTemporalDecoder())  # the class default: one level
    assert fit.reasons == ("block_out_channels has 1 level(s): the decoder never up-samples, so it has no stage to "
                           "condition",)  # fmt: skip


def test_the_upscale_head_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^upscale.factor=2: .*time_conv_out.*use factor 1$"):
        get_backbone("stable-video-diffusion")(_vae()).check_upscale(2)
