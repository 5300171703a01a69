"""Issue 7 components inside a wrapped model: upscale head, degradations, a frozen proxy (not saved)."""

from __future__ import annotations

import pytest
import torch

import refdecoder
from refdecoder.blocks.latent_degradation import DegradationProxy, LatentDegradationConfig
from refdecoder.blocks.upscale_head import UpscaleConfig
from refdecoder.inference import iter_decode
from tests.helpers import latents_for, randomize_, reference_for, tiny_wan


def _nearest(v):
    return v.repeat_interleave(2, -2).repeat_interleave(2, -1)


def test_upscale_config(tmp_path):
    vae = tiny_wan()
    z = latents_for(vae, 2)
    with torch.no_grad():
        base = vae.decode(z).sample
    config = refdecoder.preset("tiny")
    config.upscale = UpscaleConfig(factor=2)
    config.degradation = LatentDegradationConfig(lmr=True, blur_sigma=(0, 0.5))
    model = refdecoder.wrap(vae, config).eval()
    ref = reference_for(z, spatial=16)
    with torch.no_grad():
        out = model.decode(z, ref)
    assert out.shape[-2:] == (2 * base.shape[-2], 2 * base.shape[-1])
    torch.testing.assert_close(out, _nearest(base), atol=1e-5, rtol=0)
    keys = set(model.refdecoder_state_dict())
    assert {"vae.decoder.conv_out.weight", "vae.decoder.conv_out.bias", "latent_components.lmr.mask_token"} <= keys
    assert model.vae.decoder.conv_out.weight.requires_grad
    randomize_(model.vae.decoder.conv_out, 0.1)
    for p in model.projectors.values():
        randomize_(p, 0.1)
    with torch.no_grad():
        trained = model.decode(z, ref)
        streamed = torch.cat(list(iter_decode(model, z, ref)), dim=2)  # its reference check is at 2x too
    torch.testing.assert_close(streamed, trained, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)
    model.unwrap()
    assert vae.decoder.conv_out.weight.shape[0] == 3 and vae.decoder.conv_out.weight.requires_grad  # as built
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, base, atol=0, rtol=0)
    loaded = refdecoder.load(vae, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z, ref), trained, atol=1e-6, rtol=0)
    loaded.unwrap()


@pytest.mark.parametrize("per_stage", [False, True])
def test_training_forward_with_upscale(per_stage):
    vae = tiny_wan()
    config = refdecoder.preset("tiny")
    config.upscale = UpscaleConfig(factor=2)
    config.tokenizer.per_stage = per_stage
    model = refdecoder.wrap(vae, config)
    video = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    out = model(video, generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == video.shape
    out.sample.mean().backward()
    # The reference comes at the output size: every tokenizer's patch is twice its stage's scale.
    for name, tokenizer in model.stage_tokenizers.items():
        assert tokenizer.patch_size == 2 * model.adapter.stages()[int(name[-1])].scale
        assert tokenizer.proj.weight.grad is not None
    assert len(model.stage_tokenizers) == (2 if per_stage else 0)


def test_proxy_in_config_not_needed_at_load(tmp_path):
    proxy = DegradationProxy(4, 8, 1, 8).save(tmp_path / "p.safetensors")
    config = refdecoder.preset("tiny")
    config.degradation = LatentDegradationConfig(proxy=str(proxy))
    model = refdecoder.wrap(tiny_wan(), config)
    assert "degrade_proxy" in model.latent_components
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "p.safetensors").unlink()
    vae = model.unwrap()
    loaded = refdecoder.load(vae, tmp_path / "ckpt")
    assert "degrade_proxy" not in loaded.latent_components
    assert loaded.config.degradation.proxy == str(proxy)


def test_reconstruct_refuses_an_upscale_head(tmp_path):
    # reconstruct scores the decode against the source at the encoded size; a 2x output cannot be compared.
    import pytest

    from refdecoder.data import bundled_clips
    from refdecoder.errors import ConfigError
    from refdecoder.inference import reconstruct_video
    from refdecoder.inference.loading import Decoder

    config = refdecoder.preset("tiny")
    config.upscale = UpscaleConfig(factor=2)
    model = refdecoder.wrap(tiny_wan(), config)
    with pytest.raises(ConfigError, match="2x upscale head"):
        reconstruct_video(Decoder(model.adapter, model), bundled_clips()[0], tmp_path, "clip")
    assert not any(tmp_path.iterdir())  # refused before anything was written
