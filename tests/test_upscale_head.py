"""The upscale decoder head: sub-pixel orders, nearest-upsample initialisation, diffusers round trip, RefDecoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

import refdecoder
from refdecoder.blocks.upscale_head import UpscaleConfig, attach_upscale_head, depth_to_space, replicate_subpixels
from refdecoder.errors import ConfigError, InputError
from tests.helpers import latents_for, randomize_, reference_for, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


def _nearest(video: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return video.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def test_depth_to_space_matches_pixel_shuffle_per_frame():
    x = torch.randn(2, 12, 3, 4, 5)
    out = depth_to_space(x, 2)
    assert out.shape == (2, 3, 3, 8, 10)
    for t in range(3):
        torch.testing.assert_close(out[:, :, t], F.pixel_shuffle(x[:, :, t], 2), rtol=0, atol=0)
    torch.testing.assert_close(depth_to_space(x[:, :, 0], 2), F.pixel_shuffle(x[:, :, 0], 2), rtol=0, atol=0)
    # Channel c*4 + i*2 + j is sub-pixel (row i, column j) of colour c.
    assert out[0, 1, 0, 1, 0] == x[0, 4 + 2, 0, 0, 0] and out[0, 1, 0, 0, 1] == x[0, 4 + 1, 0, 0, 0]


def test_depth_to_space_unpatchify_order_matches_diffusers():
    x = torch.randn(1, 27, 2, 3, 4)
    torch.testing.assert_close(depth_to_space(x, 3, order="unpatchify"), unpatchify(x, 3), rtol=0, atol=0)
    assert not torch.equal(depth_to_space(x, 3, order="unpatchify"), depth_to_space(x, 3))


def test_depth_to_space_rejects_bad_shapes_and_orders():
    with pytest.raises(InputError, match=r"divisible by 4, got shape \(1, 6, 2, 3, 3\)"):
        depth_to_space(torch.zeros(1, 6, 2, 3, 3), 2)
    with pytest.raises(ConfigError, match="order"):
        depth_to_space(torch.zeros(1, 12, 2, 3, 3), 2, order="rows")
    with pytest.raises(ConfigError, match="factor"):
        UpscaleConfig(factor=0)


def test_replicate_subpixels_repeats_each_channel():
    w = torch.arange(6.0).view(3, 2)
    assert replicate_subpixels(w, 2)[:, 0].tolist() == [0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4]


def test_head_at_init_equals_nearest_upsample_and_round_trips_through_diffusers(tmp_path):
    vae = tiny_wan()
    randomize_(vae.decoder.conv_out, scale=0.1)
    z = latents_for(vae, 3)
    keys = {k: v.shape for k, v in vae.state_dict().items()}
    with torch.no_grad():
        base = vae.decode(z).sample
        head = attach_upscale_head(vae, 2)
        decoded = vae.decode(z).sample
    assert decoded.shape[1] == 12 and vae.config.out_channels == 12
    up = head.apply(decoded)
    assert up.shape == (1, 3, base.shape[2], 2 * base.shape[3], 2 * base.shape[4])
    torch.testing.assert_close(up, _nearest(base), atol=1e-5, rtol=0)
    assert set(vae.state_dict()) == set(keys)  # same keys; only the head's shapes changed
    assert [n for n, _ in head.named_parameters()] == ["decoder.conv_out.weight", "decoder.conv_out.bias"]
    vae.save_pretrained(tmp_path / "vae12")
    reloaded = AutoencoderKLWan.from_pretrained(tmp_path / "vae12").eval()
    assert reloaded.decoder.conv_out.weight.shape[0] == 12
    with torch.no_grad():
        torch.testing.assert_close(reloaded.decode(z).sample, decoded, atol=1e-6, rtol=0)
    head.restore()
    assert vae.config.out_channels == 3 and {k: v.shape for k, v in vae.state_dict().items()} == keys
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, base, atol=0, rtol=0)


def test_attach_rejects_a_second_head_and_unknown_paths():
    vae = tiny_wan()
    attach_upscale_head(vae, 2)
    with pytest.raises(InputError, match="3 output channels, got weight shape \\(12,"):
        attach_upscale_head(vae, 2)
    with pytest.raises(InputError, match="no module 'decoder.head'"):
        attach_upscale_head(tiny_wan(), 2, conv_name="decoder.head")


def test_reference_conditioning_stays_identity_with_the_head_and_composes_after_training():
    vae = tiny_wan()
    z = latents_for(vae, 2)
    with torch.no_grad():
        base = vae.decode(z).sample
    model = refdecoder.wrap(vae, "tiny").eval()  # eval: no token dropout
    head = attach_upscale_head(model, 2)
    assert not head.conv.weight.requires_grad  # keeps the frozen decoder's flag
    ref = reference_for(z)
    with torch.no_grad():
        at_init = head.apply(model.decode(z, ref))
    torch.testing.assert_close(at_init, _nearest(base), atol=1e-5, rtol=0)
    for projector in model.projectors.values():
        randomize_(projector, scale=0.1)
    with torch.no_grad():
        conditioned = head.apply(model.decode(z, ref))
    assert conditioned.shape == at_init.shape
    assert (conditioned - at_init).abs().max() > 1e-3  # the reference now changes the upscaled video
