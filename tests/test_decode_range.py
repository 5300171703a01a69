"""The decode equals the backbone's own where decoded values leave [-1, 1]: RefDecoder clamps exactly where the
backbone's ``vae.decode`` does (``adapter.output_clamp``).

Every built-in adapter, on tiny random VAEs built straight from their classes with configs other than
``build_tiny``'s (other widths, depths, latent channels), whose decoded values reach beyond [-1, 1]: at init,
``model.decode`` equals the unclamped ``vae.decode`` to <= 1e-5 at three latent lengths, with and without a
reference. ``python -m pytest tests/test_decode_range.py -s`` prints the max differences.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from einops import rearrange
from torch import nn

import refdecoder
from refdecoder.hooks import DecodeContext, IdentityHooks

pytestmark = pytest.mark.usefixtures("one_thread")


def _wan_lists(z: int) -> dict[str, list[float]]:
    return {"latents_mean": [0.2 * i for i in range(z)], "latents_std": [0.5 + 0.1 * i for i in range(z)]}


def _wan21() -> nn.Module:
    from diffusers import AutoencoderKLWan

    layout = dict(dim_mult=[1, 2, 2, 2], num_res_blocks=2, temperal_downsample=[False, True, True])
    return AutoencoderKLWan(base_dim=16, z_dim=8, **layout, **_wan_lists(8))


def _wan22() -> nn.Module:
    from diffusers import AutoencoderKLWan

    layout = dict(dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    patched = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=24, z_dim=12, **layout, **patched, **_wan_lists(12))


def _qwen_image() -> nn.Module:
    from diffusers import AutoencoderKLQwenImage

    layout = dict(dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    return AutoencoderKLQwenImage(base_dim=16, z_dim=8, **layout, **_wan_lists(8))


def _hunyuan_video15() -> nn.Module:
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15(latent_channels=8, block_out_channels=(16, 16, 32, 32, 64), layers_per_block=2)


def _hunyuan_video() -> nn.Module:
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        latent_channels=8, block_out_channels=(16, 16, 32, 32), layers_per_block=2, norm_num_groups=8
    )


def _stable_video_diffusion() -> nn.Module:
    from diffusers import AutoencoderKLTemporalDecoder

    # The decoder's output GroupNorm has 32 groups: widths are multiples of 32.
    return AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        latent_channels=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
    )


def _ltx_video() -> nn.Module:
    from diffusers import AutoencoderKLLTXVideo

    # The 0.9.0 layout (no timestep conditioning), narrow.
    return AutoencoderKLLTXVideo(
        latent_channels=16, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=2,
    )  # fmt: skip


def _ltx2_video() -> nn.Module:
    from diffusers import AutoencoderKLLTX2Video

    return AutoencoderKLLTX2Video(
        latent_channels=16, block_out_channels=(8, 16, 32, 64), layers_per_block=(1, 1, 1, 1, 1), patch_size=2,
        decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 2, 1, 1), timestep_conditioning=False,
        spatial_compression_ratio=16, temporal_compression_ratio=8,
    )  # fmt: skip


def _cogvideox() -> nn.Module:
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        block_out_channels=(16, 16, 32, 32), latent_channels=8, layers_per_block=2, norm_num_groups=8
    )


def _videovaeplus() -> nn.Module:
    from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusConfig

    return VideoVAEPlus(VideoVAEPlusConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, temporal_hidden=32))


def _qwen_image21() -> nn.Module:
    from diffusers import AutoencoderKLQwenImage21

    # The plain (non-residual) up-blocks, which build_tiny does not use; RGBA in and out, as released.
    layout = dict(dim_mult=[1, 2, 2, 2], num_res_blocks=2, temperal_downsample=[False, True, True], is_residual=False)
    return AutoencoderKLQwenImage21(base_dim=16, decoder_base_dim=24, z_dim=8, scale_factor_spatial=8, **layout,
                                    **_wan_lists(8))  # fmt: skip


def _minimax_h3() -> nn.Module:
    from diffusers import AutoencoderKLMiniMaxH3

    vae = AutoencoderKLMiniMaxH3(
        latent_channels=8, block_out_channels=(16, 16, 16), layers_per_block=2, spatial_downsample_factors=(2, 2, 1),
        temporal_downsample_factors=(2, 2, 1), norm_num_groups=8, decoder_num_layers=4,
        decoder_num_attention_heads=2, decoder_attention_head_dim=24, decoder_num_register_tokens=3,
        latents_mean=[0.1] * 8, latents_std=[2.0] * 8,
    )  # fmt: skip
    with torch.no_grad():  # the class zero-initialises what a trained checkpoint has: every block then acts
        for name, param in vae.decoder.named_parameters():
            if name.endswith(("scale1", "scale2", "register_tokens")):
                param.normal_(std=0.5)
        vae.decoder.proj_out.weight.mul_(4.0)  # decoded values beyond [-1, 1] after the ImageNet mapping
    return vae


CONFIGS: dict[str, Callable[[], nn.Module]] = {
    "wan2.1": _wan21,
    "wan2.2": _wan22,
    "qwen-image": _qwen_image,
    "hunyuan-video": _hunyuan_video,
    "hunyuan-video-1.5": _hunyuan_video15,
    "ltx-video": _ltx_video,
    "ltx-2-video": _ltx2_video,
    "cogvideox": _cogvideox,
    "stable-video-diffusion": _stable_video_diffusion,
    "videovae+": _videovaeplus,
    "qwen-image-2.1": _qwen_image21,
    "minimax-h3": _minimax_h3,
}
IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _vae_decode(model: refdecoder.RefDecoder, z: torch.Tensor) -> torch.Tensor:
    """The backbone's own ``vae.decode``, unclamped as it returns it (VideoVAE+ and SVD: one chunk, as RefDecoder's
    default window covers these lengths)."""
    if "num_frames" in inspect.signature(model.vae.decode).parameters:  # SVD: frames folded into the batch
        folded = model.vae.decode(rearrange(z, "b c t h w -> (b t) c h w"), num_frames=z.shape[2]).sample
        return rearrange(folded, "(b t) c h w -> b c t h w", b=z.shape[0])
    kind = type(model.vae).__name__
    if kind == "AutoencoderKLQwenImage21":  # an image VAE: one latent frame per call
        return torch.cat([model.vae.decode(z[:, :, i : i + 1]).sample for i in range(z.shape[2])], dim=2)
    if kind == "AutoencoderKLMiniMaxH3":  # ImageNet-normalised RGB -> RefDecoder's [-1, 1]
        mean, std = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in IMAGENET)
        return (model.vae.decode(z).sample * std + mean) * 2 - 1
    out = model.vae.decode(z, **model.adapter.decode_inputs(z))
    return out.sample if hasattr(out, "sample") else out


def _shapes(vae: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in vae.state_dict().items()}


def test_every_builtin_adapter_has_an_out_of_range_config():
    assert set(CONFIGS) == set(refdecoder.list_backbones())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_decode_equals_the_unclamped_vae_decode_beyond_unit_range(name):
    torch.manual_seed(0)
    vae = CONFIGS[name]().eval()
    model = refdecoder.wrap(vae, "tiny")
    adapter = model.adapter
    assert adapter.name == name and _shapes(vae) != _shapes(adapter.build_tiny())  # not build_tiny's config
    rule, size = adapter.frame_rule, 32 // adapter.spatial_factor
    lengths = [rule.latent_frames(rule.first + rule.step * k) for k in range(3)]
    worst, peak = 0.0, 0.0
    for frames in lengths:
        z = torch.randn(
            1, adapter.latent_channels, frames, size, size, generator=torch.Generator().manual_seed(frames)
        )
        stock = _vae_decode(model, z)
        context = DecodeContext(decode_inputs=adapter.decode_inputs(z))
        raw = adapter.decode_windows(z, IdentityHooks(), context, adapter.plan_windows(frames, 4))  # never clamped
        peak = max(peak, raw.abs().max().item())
        shape = (1, adapter.pixel_channels, 1, *stock.shape[-2:])
        reference = torch.rand(shape, generator=torch.Generator().manual_seed(9)) * 2 - 1
        for ref in (reference, None):
            worst = max(worst, (model.decode(z, reference=ref) - stock).abs().max().item())
    if not adapter.output_clamp:  # the old always-clamping decode would differ from this backbone's vae.decode
        assert (model.decode(z, clamp=True) - stock).abs().max().item() > 1e-3
    print(f"{name}: decoder output peak {peak:.3f}, vae.decode clamps: {adapter.output_clamp}, max diff {worst:.2e}")
    assert peak > 1.0, f"{name}: the config's decoded values stay inside [-1, 1] ({peak})"
    assert worst <= 1e-5, f"{name}: max |model.decode - vae.decode| = {worst}"
