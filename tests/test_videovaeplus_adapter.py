"""The VideoVAE+ adapter: stage layout, windowed decode loop, reference path, encode, and the wrapped model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import refdecoder
from refdecoder import BackboneError
from refdecoder.backbones.registry import find_backbone
from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusAdapter, VideoVAEPlusConfig
from refdecoder.hooks import DecodeContext, IdentityHooks
from tests.helpers import randomize_
from tests.official_fill import fill_tensor


class RecordingHooks(IdentityHooks):
    """Identity hooks that keep what enters every hook point."""

    def __init__(self) -> None:
        self.latent_inputs: list[torch.Tensor] = []
        self.stage_inputs: dict[int, list[torch.Tensor]] = {}

    def latents(self, x, ctx):
        self.latent_inputs.append(x.clone())
        return x

    def stage(self, index, x, reference, ctx):
        self.stage_inputs.setdefault(index, []).append(x.clone())
        return x, None


@pytest.fixture(scope="module")
def vae() -> VideoVAEPlus:
    """The tiny VAE with every tensor filled (fill rule), so the zero-initialised temporal branches act too."""
    torch.manual_seed(0)
    model = VideoVAEPlusAdapter.build_tiny()
    model.load_state_dict({k: fill_tensor(k, v.shape) for k, v in model.state_dict().items()})
    return model.eval()


def _latents(frames: int, size: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, size, size, generator=g)


def _video(frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


# --- layout ---------------------------------------------------------------------------------------------------
def test_official_stage_layout():
    """README §9.18: 512 ch at H/2 (1,8,8), 256 ch at H (1,16,16), 128 ch at H (1,16,16); time never resampled."""
    with torch.device("meta"):
        adapter = VideoVAEPlusAdapter(VideoVAEPlus())
    got = [(s.name, s.channels, s.scale, s.patch_size, s.time_factor) for s in adapter.stages()]
    assert got == [
        ("stage0", 512, 2, (1, 8, 8), 1),  # before decoder.up.1
        ("stage1", 256, 1, (1, 16, 16), 1),  # before decoder.up.0
        ("stage2", 128, 1, (1, 16, 16), 1),  # before the head (decoder.norm_out)
    ]
    assert (adapter.reference_channels, adapter.reference_scale) == (512, 2)
    assert (adapter.latent_channels, adapter.spatial_factor, adapter.temporal_factor) == (16, 8, 4)
    assert adapter.frame_rule.is_valid(16) and not adapter.frame_rule.is_valid(17)
    assert (adapter.default_window, adapter.causal_first_frame) == (4, False)


def test_stage_channels_follow_the_decoder(vae):
    adapter = VideoVAEPlusAdapter(vae)
    assert [s.channels for s in adapter.stages()] == [64, 64, 32]  # ch 32, ch_mult (1, 2, 2, 2)
    assert [s.scale * s.patch_size[1] for s in adapter.stages()] == [16, 16, 16]  # one H/16 token grid


def test_matches_and_autodetect(vae):
    assert VideoVAEPlusAdapter.matches(vae)
    assert find_backbone(vae) is VideoVAEPlusAdapter
    assert not VideoVAEPlusAdapter.matches(nn.Linear(2, 2))
    with torch.device("meta"):
        other = VideoVAEPlus(VideoVAEPlusConfig(ch=32, temporal_hidden=16, temporal_scale_factor=8))
    assert not VideoVAEPlusAdapter.matches(other)  # 8k frames: not the 4k rule this adapter declares


def test_decoder_parameters_are_the_2plus1d_decoder(vae):
    names = [n for n, _ in VideoVAEPlusAdapter(vae).decoder_parameters()]
    assert names == [f"decoder.{n}" for n, _ in vae.decoder.named_parameters()]
    assert not any(n.startswith("decoder_temporal") for n in names)


# --- decode loop ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 3])
def test_windowed_loop_equals_chunked_decode(vae, frames):
    """Identity hooks reproduce ``vae.decode`` with independent chunks of ``4 * window`` frames, for any window."""
    adapter, z = VideoVAEPlusAdapter(vae), _latents(frames)
    with torch.no_grad():
        for window in sorted({1, 2, frames}):
            windows = adapter.plan_windows(frames, window)
            out = adapter.decode_windows(z, IdentityHooks(), DecodeContext(), windows)
            chunks = [vae.decoder(vae.decoder_temporal(z[:, :, a:b])) for a, b in windows]
            assert (out - torch.cat(chunks, dim=2)).abs().max().item() <= 1e-6
            assert (out - adapter.plain_decode(z, window, clamp=False)).abs().max().item() <= 1e-6
    # VideoVAE+ does not clamp (output_clamp False), and neither does its plain decode unless asked.
    assert (adapter.plain_decode(z) - vae.decode(z)).abs().max().item() <= 1e-6
    assert (adapter.plain_decode(z, clamp=True) - vae.decode(z).clamp(-1, 1)).abs().max().item() <= 1e-6


def test_window_size_changes_the_plain_output(vae):
    """No causal cache: windows are independent chunks, so the split shows (documented consequence)."""
    adapter, z = VideoVAEPlusAdapter(vae), _latents(2)
    with torch.no_grad():
        whole = adapter.plain_decode(z, 2, clamp=False)
        split = adapter.plain_decode(z, 1, clamp=False)
    assert (whole - split).abs().max().item() > 1e-3


def test_hook_points_see_full_rate_latents_and_window_frames(vae):
    adapter, hooks = VideoVAEPlusAdapter(vae), RecordingHooks()
    z = _latents(3)
    with torch.no_grad():
        adapter.decode_windows(z, hooks, DecodeContext(), adapter.plan_windows(3, 2))
        temporal = torch.cat([vae.decoder_temporal(z[:, :, :2]), vae.decoder_temporal(z[:, :, 2:])], dim=2)
    assert len(hooks.latent_inputs) == 1
    assert torch.equal(hooks.latent_inputs[0], temporal)  # once, after the temporal decoder, 12 frames
    shapes = {i: [tuple(x.shape) for x in xs] for i, xs in hooks.stage_inputs.items()}
    assert shapes == {
        0: [(1, 64, 8, 8, 8), (1, 64, 4, 8, 8)],
        1: [(1, 64, 8, 16, 16), (1, 64, 4, 16, 16)],
        2: [(1, 32, 8, 16, 16), (1, 32, 4, 16, 16)],
    }


def test_latents_hook_output_is_what_the_2plus1d_decoder_decodes(vae):
    class Zero(IdentityHooks):
        def latents(self, x, ctx):
            return torch.zeros_like(x)

    adapter, z = VideoVAEPlusAdapter(vae), _latents(1)
    with torch.no_grad():
        out = adapter.decode_windows(z, Zero(), DecodeContext(), adapter.plan_windows(1, 1))
        expected = vae.decoder(torch.zeros(1, 16, 4, 2, 2))
    assert (out - expected).abs().max().item() <= 1e-6


def test_stage_frames_and_token_count(vae):
    """Stages see pixel-rate frames: a 4-latent-frame window is 16 frames (+1 reference) at every stage."""
    model = refdecoder.wrap(vae, "tiny")
    try:
        assert [model.adapter.stage_frames(i, 4, True) for i in range(3)] == [16, 16, 16]
        # 32x32 output: every stage has a 2x2 token grid, so 17 frames x 4 tokens.
        assert model.stage_tokens((4, 4), 4) == 17 * 4
    finally:
        model.unwrap()


# --- reference path -------------------------------------------------------------------------------------------
def test_reference_runs_through_the_next_level_frame_by_frame(vae):
    adapter = VideoVAEPlusAdapter(vae)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for index, level in ((0, 1), (1, 0)):
            channels, size = vae.decoder.level_in_channels[level], 4 * 2 ** (1 - level)
            ref = torch.randn(2, channels, 2, size, size, generator=g)
            out = adapter.run_stage_on_reference(index, ref)
            for b in range(2):
                for r in range(2):
                    alone = vae.decoder.forward_level(level, ref[b : b + 1, :, r : r + 1])
                    assert (out[b : b + 1, :, r : r + 1] - alone).abs().max().item() <= 1e-5
        with pytest.raises(BackboneError, match="stage 2"):
            adapter.run_stage_on_reference(2, torch.zeros(1, 32, 1, 16, 16))


# --- encode ---------------------------------------------------------------------------------------------------
def test_encode_in_16_frame_chunks(vae):
    adapter, video = VideoVAEPlusAdapter(vae), _video(32)
    with torch.no_grad():
        z = adapter.encode(video)
        chunks = [vae.encode(video[:, :, :16]), vae.encode(video[:, :, 16:])]
        short = adapter.encode(video[:, :, :8])
        assert torch.equal(short, vae.encode(video[:, :, :8]))
    assert z.shape == (1, 16, 8, 2, 2)
    assert (z - torch.cat(chunks, dim=2)).abs().max().item() <= 1e-6


# --- the wrapped model ----------------------------------------------------------------------------------------
def test_wrapped_decode_is_identity_at_init_and_conditioned_once_trained(vae):
    model = refdecoder.wrap(vae, "tiny").eval()
    try:
        video = _video(8)
        with torch.no_grad():
            z = model.encode(video)
            plain = model.adapter.plain_decode(z, clamp=False)
            out = model.decode(z, reference=video[:, :, :1], clamp=False)
            assert torch.equal(out, plain)
            randomize_(model.projectors, scale=0.02)
            other = video[:, :, 7:8].flip(-1)
            a = model.decode(z, reference=video[:, :, :1], clamp=False)
            b = model.decode(z, reference=other, clamp=False)
        assert (a - plain).abs().max().item() > 1e-4  # the reference now changes the decode ...
        assert (a - b).abs().max().item() > 1e-4  # ... and which reference matters
    finally:
        model.unwrap()


def test_official_preset_wraps_the_tiny_vae_and_trains_the_decoder(vae):
    config = refdecoder.preset("official-videovae+")
    config.transformer.depth, config.transformer.num_heads, config.transformer.ffn_dim = 1, 1, 256  # CPU-sized
    model = refdecoder.wrap(vae, config)
    try:
        assert {type(p.norm_video) for p in model.projectors.values()} == {nn.GroupNorm}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("vae.")}
        assert trainable == {f"vae.{n}" for n, _ in model.adapter.decoder_parameters()}
        assert model.tokenizer.proj.weight.shape == (64, 12, 1, 3, 3)  # space-to-depth 2 of RGB, first stage 64 ch
    finally:
        model.unwrap()


def test_training_forward_backpropagates_into_added_modules(vae):
    model = refdecoder.wrap(vae, "tiny").train()
    try:
        randomize_(model.projectors, scale=0.02)
        out = model(_video(4), reference_index=0)
        out.sample.square().mean().backward()
        assert out.sample.shape == (1, 3, 4, 16, 16)
        assert model.projectors["stage0"].embed.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in vae.decoder_temporal.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.unwrap()
