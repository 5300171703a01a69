"""The Wan-family adapters (wan2.1, wan2.2, qwen-image): the windowed loop against the stock diffusers decode, the
stage layout, the reference path, and the wrap-time check of the diffusers internals they drive."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import torch

import refdecoder
from refdecoder import BackboneError
from refdecoder.backbones.wan import QwenImageAdapter, Wan22Adapter, WanAdapter
from refdecoder.backbones.wan._diffusers import SUPPORTED_DIFFUSERS
from refdecoder.hooks import DecodeContext, IdentityHooks
from refdecoder.testing import Conformance, check_identity_at_init

ADAPTERS = {"wan2.1": WanAdapter, "wan2.2": Wan22Adapter, "qwen-image": QwenImageAdapter}
# Latent sizes giving 32x48 pixels: 8x for Wan2.1 / Qwen-Image, 16x for Wan2.2.
LATENT_HW = {"wan2.1": (4, 6), "wan2.2": (2, 3), "qwen-image": (4, 6)}
pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingHooks(IdentityHooks):
    """Identity hooks that keep a copy of what enters every stage, window by window."""

    def __init__(self) -> None:
        self.stage_inputs: dict[int, list[torch.Tensor]] = {}
        self.windows: list[int] = []

    def stage(self, index, x, reference, ctx):
        self.stage_inputs.setdefault(index, []).append(x.clone())
        if index == 0:
            self.windows.append(x.shape[2])
        return x, None


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def family(request):
    torch.manual_seed(0)
    vae = ADAPTERS[request.param].build_tiny().eval()
    return request.param, vae, ADAPTERS[request.param](vae)


def _latents(name: str, adapter, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, adapter.latent_channels, frames, *LATENT_HW[name], generator=g)


@pytest.mark.parametrize("frames", [1, 2, 3, 6, 9])
def test_windowed_loop_equals_stock_decode(family, frames):
    name, vae, adapter = family
    z = _latents(name, adapter, frames)
    with torch.no_grad():
        stock = vae.decode(z).sample
        for window in (1, 2, 5):
            out = adapter.decode_windows(z, IdentityHooks(), DecodeContext(), adapter.plan_windows(frames, window))
            assert out.shape == stock.shape == (1, 3, 1 + 4 * (frames - 1), 32, 48)
            assert (out.clamp(-1, 1) - stock).abs().max().item() <= 1e-5, f"window {window}"


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_refdecoder_at_init_equals_stock_decode(name):
    """``model.decode`` with and without a reference, 1, 2, 3, 6, 9 latent frames x windows 1, 2, 5, vs vae.decode."""
    check_identity_at_init(Conformance(name, latent_frames=(1, 2, 3, 6, 9), windows=(1, 2, 5), pixel_size=(32, 48)))


def test_stage_inputs_equal_stock_up_block_inputs(family):
    """With one window over all frames, each stage hook sees exactly what the stock decoder feeds that up-block."""
    name, vae, adapter = family
    frames = 4
    z = _latents(name, adapter, frames, seed=3)
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
        adapter.decode_windows(z, hooks, DecodeContext(), [(0, frames)])
    for i in range(3):
        stock = torch.cat(captured[i], dim=2)  # the stock loop calls the decoder once per latent frame
        (ours,) = hooks.stage_inputs[i]
        assert ours.shape == stock.shape
        assert (ours - stock).abs().max().item() <= 1e-5, f"stage {i}"
    # Frames per stage in the window holding frame 0: T, 1 + 2(T-1), 1 + 4(T-1).
    assert [hooks.stage_inputs[i][0].shape[2] for i in range(3)] == [4, 7, 13]


def test_long_latents_stream_window_by_window(family):
    name, vae, adapter = family
    z = _latents(name, adapter, 9, seed=4)
    hooks = RecordingHooks()
    with torch.no_grad():
        chunks = list(adapter.iter_decode_windows(z, hooks, DecodeContext(), adapter.plan_windows(9, 5)))
        stock = vae.decode(z).sample
    # 17 pixel frames first, then windows one latent frame shorter: 16 pixel frames each (equal-size passes).
    assert hooks.windows == [5, 4] and [c.shape[2] for c in chunks] == [17, 16]
    assert [x.shape[2] for x in hooks.stage_inputs[2]] == [17, 16]
    streamed = torch.cat(chunks, dim=2).clamp(-1, 1)
    assert (streamed - stock).abs().max().item() <= 1e-5  # caches carried over: no seam at the window boundary


def test_stage_specs_follow_the_decoder(family):
    name, vae, adapter = family
    specs = adapter.stages()
    factor = 16 if name == "wan2.2" else 8
    assert adapter.spatial_factor == factor and adapter.output_patch == (2 if name == "wan2.2" else 1)
    assert [s.channels for s in specs] == [b.resnets[0].in_dim for b in vae.decoder.up_blocks[:3]]
    assert [s.scale for s in specs] == [factor, factor // 2, factor // 4]
    assert [s.patch_size for s in specs] == [(1, 2, 2), (1, 4, 4), (1, 8, 8)]
    assert [s.time_factor for s in specs] == [2, 2, 1]


def test_full_width_stage_layouts():
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    with torch.device("meta"):
        wan21, qwen = AutoencoderKLWan(), AutoencoderKLQwenImage()  # the released configs are the defaults
        wan22 = _full_wan22()
    for adapter, layout in (
        (WanAdapter(wan21), [(384, 8), (192, 4), (192, 2)]),
        (QwenImageAdapter(qwen), [(384, 8), (192, 4), (192, 2)]),
        (Wan22Adapter(wan22), [(1024, 16), (1024, 8), (1024, 4)]),
    ):
        assert [(s.channels, s.scale) for s in adapter.stages()] == layout


def _full_wan22():
    """The Wan2.2 TI2V-5B VAE config (Wan-AI/Wan2.2-TI2V-5B-Diffusers, vae/config.json) with zero statistics."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
    )  # fmt: skip


def test_full_width_wan22_shapes_on_meta():
    """17 frames at 704x1280 (the TI2V-5B default) through wrap() and the windowed loop, shapes only."""
    with torch.device("meta"):
        vae = _full_wan22()
    model = refdecoder.wrap(vae, "small")
    z = torch.empty(1, 48, 5, 44, 80, device="meta")
    out = model.decode(z, reference=torch.empty(1, 3, 704, 1280, device="meta"))
    assert out.shape == (1, 3, 17, 704, 1280)
    # The largest stage is stage 1: the reference + 9 frames on the H/32 grid (stage 2 is 2x coarser in `small`).
    assert model.stage_tokens((44, 80), 5) == (1 + 9) * 22 * 40


@pytest.mark.slow
def test_identity_full_width_wan22_slow():
    torch.manual_seed(0)
    vae = _full_wan22().eval()
    model = refdecoder.wrap(vae, "tiny")
    z = torch.randn(1, 48, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        stock = vae.decode(z).sample
        for window in (1, 2):
            assert (model.decode(z, reference=ref, window=window) - stock).abs().max().item() <= 1e-5


def test_reference_branch_is_spatial_only_and_matches_image_decode(family):
    """A single frame through a stage without cache equals what the stock decode does to frame 0."""
    name, vae, adapter = family
    z = _latents(name, adapter, 1, seed=5)
    captured = {}
    handle = vae.decoder.up_blocks[1].register_forward_pre_hook(lambda m, a: captured.setdefault("in", a[0].clone()))
    try:
        with torch.no_grad():
            vae.decode(z)
            hooks = RecordingHooks()
            adapter.decode_windows(z, hooks, DecodeContext(), [(0, 1)])
            pushed = adapter.run_stage_on_reference(0, hooks.stage_inputs[0][0].repeat(1, 1, 2, 1, 1))  # R = 2
    finally:
        handle.remove()
    assert pushed.shape == (1, captured["in"].shape[1], 2, *captured["in"].shape[-2:])
    for r in range(2):  # each reference frame is processed on its own, like an image
        assert (pushed[:, :, r : r + 1] - captured["in"]).abs().max().item() <= 1e-6


def test_encode_chunks_equal_one_encode(family):
    name, vae, adapter = family
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        whole = adapter.encode(video)
        pieces = adapter.encode_chunks([video[:, :, :1], video[:, :, 1:5], video[:, :, 5:]])
    assert pieces.shape == whole.shape == (1, adapter.latent_channels, 3, *LATENT_HW[name])
    assert (pieces - whole).abs().max().item() <= 1e-5


def test_normalize_roundtrip(family):
    name, vae, adapter = family
    z = _latents(name, adapter, 2)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(adapter.denormalize(z), z * std + mean)
    assert torch.allclose(adapter.normalize(adapter.denormalize(z)), z, atol=1e-6)


def test_missing_diffusers_internals_are_refused_with_the_supported_range(monkeypatch):
    vae = Wan22Adapter.build_tiny()
    monkeypatch.delattr(vae, "_cached_conv_counts")
    block = vae.decoder.up_blocks[0]
    monkeypatch.setattr(block, "forward", lambda x, feat_cache=None, feat_idx=None: x)  # no first_chunk any more
    with pytest.raises(BackboneError) as err:
        refdecoder.wrap(vae, "tiny")
    message = str(err.value)
    assert "_cached_conv_counts" in message and "decoder.up_blocks.0.forward(first_chunk=)" in message
    assert f"diffusers{SUPPORTED_DIFFUSERS}" in message and "\n" not in message


def test_supported_diffusers_range_is_the_declared_dependency():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert f"diffusers{SUPPORTED_DIFFUSERS}" in project["dependencies"]
