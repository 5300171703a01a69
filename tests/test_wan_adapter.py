"""The Wan adapter's windowed decode loop against the stock diffusers decode and its per-frame internals."""

from __future__ import annotations

import pytest
import torch

from refdecoder.backbones.wan import WanAdapter
from refdecoder.hooks import DecodeContext, IdentityHooks
from tests.helpers import latents_for, tiny_wan


class RecordingHooks(IdentityHooks):
    """Identity hooks that keep a copy of what enters every stage, window by window."""

    def __init__(self) -> None:
        self.stage_inputs: dict[int, list[torch.Tensor]] = {}
        self.windows: list[int] = []

    def stage(self, index, x, ctx):
        self.stage_inputs.setdefault(index, []).append(x.clone())
        if index == 0:
            self.windows.append(x.shape[2])
        return x


@pytest.fixture(scope="module")
def vae():
    return tiny_wan()


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 6])
def test_windowed_loop_equals_stock_decode(vae, frames):
    adapter = WanAdapter(vae)
    z = latents_for(vae, frames)
    with torch.no_grad():
        stock = vae.decode(z).sample
        for window in sorted({1, 2, frames}):
            out = adapter.decode_windows(z, IdentityHooks(), DecodeContext(), adapter.plan_windows(frames, window))
            out = out.clamp(-1, 1)
            assert out.shape == stock.shape == (1, 3, 1 + 4 * (frames - 1), 32, 48)
            assert (out - stock).abs().max().item() <= 1e-5, f"window {window}"


def test_stage_inputs_equal_stock_up_block_inputs(vae):
    """With one window over all frames, each stage hook sees exactly what the stock decoder feeds that up-block."""
    frames = 4
    z = latents_for(vae, frames, seed=3)
    captured: dict[int, list[torch.Tensor]] = {}
    handles = [
        block.register_forward_pre_hook(lambda m, args, i=i: captured.setdefault(i, []).append(args[0].clone()))
        for i, block in enumerate(vae.decoder.up_blocks[:3])
    ]
    try:
        with torch.no_grad():
            vae.decode(z)
    finally:
        for h in handles:
            h.remove()
    hooks = RecordingHooks()
    with torch.no_grad():
        WanAdapter(vae).decode_windows(z, hooks, DecodeContext(), [(0, frames)])
    for i in range(3):
        stock = torch.cat(captured[i], dim=2)  # the stock loop calls the decoder once per latent frame
        (ours,) = hooks.stage_inputs[i]
        assert ours.shape == stock.shape
        assert (ours - stock).abs().max().item() <= 1e-5, f"stage {i}"
    # Frames per stage in the window holding frame 0: T, 1 + 2(T-1), 1 + 4(T-1).
    assert [hooks.stage_inputs[i][0].shape[2] for i in range(3)] == [4, 7, 13]


def test_long_latents_stream_window_by_window(vae):
    z = latents_for(vae, 9, seed=4)
    hooks = RecordingHooks()
    adapter = WanAdapter(vae)
    with torch.no_grad():
        out = adapter.decode_windows(z, hooks, DecodeContext(), adapter.plan_windows(9, 5)).clamp(-1, 1)
        stock = vae.decode(z).sample
    # 17 pixel frames first, then windows one latent frame shorter: 16 pixel frames each (equal-size passes).
    assert hooks.windows == [5, 4]
    assert [x.shape[2] for x in hooks.stage_inputs[2]] == [17, 16]
    assert (out - stock).abs().max().item() <= 1e-5  # caches carried over: no seam at the window boundary


def test_stage_specs_follow_the_decoder(vae):
    specs = WanAdapter(vae).stages()
    assert [s.channels for s in specs] == [b.resnets[0].in_dim for b in vae.decoder.up_blocks[:3]]
    assert [s.scale for s in specs] == [8, 4, 2]
    assert [s.patch_size for s in specs] == [(1, 2, 2), (1, 4, 4), (1, 8, 8)]
    assert [s.time_factor for s in specs] == [2, 2, 1]


def test_full_wan21_stage_layout():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # the Wan2.1 config (base_dim 96, z_dim 16)
    specs = WanAdapter(vae).stages()
    assert [(s.channels, s.scale) for s in specs] == [(384, 8), (192, 4), (192, 2)]


def test_reference_branch_is_spatial_only_and_matches_image_decode(vae):
    """A single frame through a stage without cache equals what the stock decode does to frame 0."""
    adapter = WanAdapter(vae)
    z = latents_for(vae, 1, seed=5)
    captured = {}
    handle = vae.decoder.up_blocks[1].register_forward_pre_hook(lambda m, a: captured.setdefault("in", a[0].clone()))
    try:
        with torch.no_grad():
            vae.decode(z)
            stage0_in = None
            hooks = RecordingHooks()
            adapter.decode_windows(z, hooks, DecodeContext(), [(0, 1)])
            stage0_in = hooks.stage_inputs[0][0]
            pushed = adapter.run_stage_on_reference(0, stage0_in.repeat(1, 1, 2, 1, 1))  # R = 2 frames
    finally:
        handle.remove()
    assert pushed.shape == (1, captured["in"].shape[1], 2, *captured["in"].shape[-2:])
    for r in range(2):  # each reference frame is processed on its own, like an image
        assert (pushed[:, :, r : r + 1] - captured["in"]).abs().max().item() <= 1e-6


def test_normalize_roundtrip(vae):
    adapter = WanAdapter(vae)
    z = latents_for(vae, 2)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(adapter.denormalize(z), z * std + mean)
    assert torch.allclose(adapter.normalize(adapter.denormalize(z)), z, atol=1e-6)
