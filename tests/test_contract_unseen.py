"""The conformance suite on an adapter written from docs/backbones.md alone (the walkthrough, minimal): diffusers'
HunyuanVideo (v1) VAE, a causal decoder that expands time (frame 0 stays one frame), GroupNorm over time, no clamp.
It was written before the library shipped ``hunyuan-video`` and is kept independent of it: the correct adapter passes
every check beside the built-in one (chosen by name), decodes as the built-in does where both decode one pass, and
each mutated copy fails the check that holds the broken declaration."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

import refdecoder
from refdecoder import BackboneAdapter, Fit, StageSpec
from refdecoder.frames import FrameRule
from refdecoder.testing import Conformance, check_backbone, checks_for, randomize_
from tests.test_contract_mutants import MUTANTS

pytestmark = pytest.mark.usefixtures("one_thread")


class HunyuanVideoV1Adapter(BackboneAdapter):
    """diffusers ``AutoencoderKLHunyuanVideo``: whole-sequence decode, stages before the up-sampling blocks."""

    frame_rule = FrameRule(first=1, step=4)
    causal_first_frame = True  # the causal up-samplers keep frame 0 one frame
    exact_streaming = False  # GroupNorm over all frames: one window, as vae.decode
    output_clamp = False  # vae.decode returns the decoder's output as it is

    @classmethod
    def fit(cls, vae):
        from diffusers import AutoencoderKLHunyuanVideo

        return Fit.run(lambda: None if isinstance(vae, AutoencoderKLHunyuanVideo) else "not AutoencoderKLHunyuanVideo")

    @classmethod
    def build_tiny(cls, **overrides):
        from diffusers import AutoencoderKLHunyuanVideo

        kwargs = dict(latent_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)
        return AutoencoderKLHunyuanVideo(**{**kwargs, **overrides})

    @property
    def latent_channels(self):
        return self.vae.config.latent_channels

    @property
    def spatial_factor(self):
        return self.vae.config.spatial_compression_ratio

    def stages(self):
        specs, scale = [], self.spatial_factor
        for i, block in enumerate(self.vae.decoder.up_blocks):
            if block.upsamplers is None:
                break
            time, space = block.upsamplers[0].upsample_factor[:2]
            patch = 2 * self.spatial_factor // scale
            channels = block.resnets[0].conv1.conv.in_channels
            specs.append(StageSpec(f"stage{i}", channels, scale, (1, patch, patch), time_factor=time))
            scale //= space
        return specs

    def normalize(self, latents):
        return latents * self.vae.config.scaling_factor

    def denormalize(self, latents):
        return latents / self.vae.config.scaling_factor

    def decoder_input(self, latents, windows):
        return self.vae.post_quant_conv(latents)

    def decode_window(self, x, state, hooks, ctx):
        decoder = self.vae.decoder
        h, reference = decoder.mid_block(decoder.conv_in(x)), None
        for i, block in enumerate(decoder.up_blocks):
            if i < len(self.stages()):
                h, reference = self.conditioned_stage(i, h, reference, hooks, ctx)
            h = block(h)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))

    def run_stage_on_reference(self, index, reference, ctx=None):
        frames = rearrange(reference, "b c r h w -> (b r) c 1 h w")
        out = self.vae.decoder.up_blocks[index](frames)
        return rearrange(out, "(b r) c 1 h w -> b c r h w", b=reference.shape[0])

    def decoder_parameters(self):
        for prefix in ("post_quant_conv", "decoder"):
            for name, param in getattr(self.vae, prefix).named_parameters():
                yield f"{prefix}.{name}", param


def test_the_unseen_adapter_passes_the_whole_suite(registered):
    registered("hunyuan-video-v1", HunyuanVideoV1Adapter)
    ran = check_backbone("hunyuan-video-v1")
    assert len(ran) == len(checks_for("hunyuan-video-v1")) and "check_reference_branch" in ran


def test_the_docs_adapter_and_the_shipped_one_decode_alike(registered):
    registered("hunyuan-video-v1", HunyuanVideoV1Adapter)
    torch.manual_seed(0)
    vae = HunyuanVideoV1Adapter.build_tiny().eval()
    ours = refdecoder.wrap(vae, "tiny", backbone="hunyuan-video-v1")
    shipped = refdecoder.wrap(copy.deepcopy(vae), "tiny", backbone="hunyuan-video")
    z, reference = torch.randn(1, 4, 3, 2, 2), torch.rand(1, 3, 16, 16) * 2 - 1
    randomize_([p for _, p in ours.added_parameters()], scale=0.1)
    shipped.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(ours.decode(z, reference=reference), shipped.decode(z, reference=reference))


@pytest.mark.parametrize(
    "mutation, check, reason",
    [(mutation, check, reason) for mutation, _, check, reason in MUTANTS],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_each_mutant_of_the_unseen_adapter_is_caught(registered, mutation, check, reason):
    mutant = type("Mutant", (HunyuanVideoV1Adapter,), mutation(HunyuanVideoV1Adapter))
    registered("hunyuan-video-v1-mutant", mutant)
    (found,) = [c for c in checks_for("hunyuan-video-v1-mutant") if c.__name__ == check]
    with pytest.raises(AssertionError, match=reason):
        found(Conformance("hunyuan-video-v1-mutant"))
