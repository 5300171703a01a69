"""Clean-room VideoVAE+ autoencoder: official key layout, strict loading, numeric reproduction of the fixtures.

The numeric fixtures (``shared/fixtures/official/videovaeplus_small``) were produced by the official code with
weights from the deterministic fill rule; the same rule fills our model here, so agreement within the README §7
tolerance means the architecture and its semantics match.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusConfig
from refdecoder.backbones.videovaeplus.layers import TemporalAttention
from refdecoder.errors import CheckpointError, ConfigError, InputError
from tests.official_fill import fill_state_dict, fill_tensor, load_manifest

# A fast model with the official depth of levels (8x spatial) but narrow widths and one res-block per level.
TINY = VideoVAEPlusConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, temporal_hidden=16)


def _filled(model: VideoVAEPlus) -> VideoVAEPlus:
    """Give every tensor its fill-rule value, so zero-initialised temporal branches contribute too."""
    state = {k: fill_tensor(k, v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _assert_fixture_close(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """README §7 VideoVAE+ tolerance: ``|got - ref| <= 5e-4 * max(1, |ref|)``."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != fixture {tuple(ref.shape)}"
    err = (got - ref).abs()
    bound = 5e-4 * ref.abs().clamp(min=1.0)
    assert (err <= bound).all(), f"{name}: max |diff| {err.max():.3e} (fixture std {ref.std():.3f})"


def _manifest_layout(path) -> list[tuple[str, list[int]]]:
    return [(e["name"], e["shape"]) for e in load_manifest(path) if not e["name"].startswith("loss")]


def _layout(model: VideoVAEPlus) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


@pytest.fixture(scope="module")
def tiny() -> VideoVAEPlus:
    torch.manual_seed(0)
    return _filled(VideoVAEPlus(TINY))


def _video(frames: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


# --- layout ---------------------------------------------------------------------------------------------------
def test_full_size_state_dict_equals_official_manifest(official_fixtures):
    with torch.device("meta"):
        model = VideoVAEPlus()
    expected = _manifest_layout(official_fixtures / "manifests" / "videovaeplus_base_sota-4-16z.json")
    assert _layout(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 176_165_536 + 240_552_323 + 22_622_624 + 46_348_560


def test_small_state_dict_equals_fixture_manifest(official_fixtures):
    with torch.device("meta"):
        model = VideoVAEPlus(VideoVAEPlusConfig.small())
    assert _layout(model) == _manifest_layout(official_fixtures / "videovaeplus_small" / "manifest.json")


def test_configs_follow_the_official_construction_arguments(official_fixtures):
    small = json.loads((official_fixtures / "videovaeplus_small" / "config.json").read_text())
    assert VideoVAEPlusConfig.from_official(small["ddconfig"], small["ppconfig"]) == VideoVAEPlusConfig.small()
    full = json.loads((official_fixtures / "manifests" / "videovaeplus_base_sota-4-16z.json").read_text())
    params = full["config_params_resolved"]
    assert VideoVAEPlusConfig.from_official(params["ddconfig"], params["ppconfig"]) == VideoVAEPlusConfig()


@pytest.mark.parametrize(
    ("dd", "pp"),
    [({"attn_resolutions": [27]}, {}), ({"temporal_down_factor": 2}, {}), ({}, {"attn_temporal_factor": [2, 4]})],
)
def test_from_official_rejects_unsupported_variants(dd, pp):
    base = {"z_channels": 16, "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    with pytest.raises(ConfigError):
        VideoVAEPlusConfig.from_official({**base, **dd}, {"hidden_channel": 32, **pp})


@pytest.mark.parametrize("kwargs", [{"ch": 20}, {"temporal_scale_factor": 3}, {"ch_mult": ()}, {"z_channels": 0}])
def test_config_rejects_invalid_values(kwargs):
    with pytest.raises(ConfigError):
        VideoVAEPlusConfig(**kwargs)


def test_decoder_levels_expose_official_widths():
    with torch.device("meta"):
        decoder = VideoVAEPlus().decoder
    assert decoder.num_levels == 4
    assert decoder.level_in_channels == [256, 512, 512, 512]
    assert decoder.level_out_channels == [128, 256, 512, 512]


# --- numeric reproduction of the official small model ----------------------------------------------------------
@pytest.fixture(scope="module")
def small_case(official_fixtures):
    from safetensors.torch import load_file

    folder = official_fixtures / "videovaeplus_small"
    with torch.device("meta"):  # skips the default init; every tensor is replaced by its filled value
        model = VideoVAEPlus(VideoVAEPlusConfig.small())
    model.load_state_dict(fill_state_dict(load_manifest(folder / "manifest.json")), strict=True, assign=True)
    return model.eval(), load_file(folder / "case.safetensors")


def _capture_input(module: torch.nn.Module, store: dict) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda _m, args: store.__setitem__("x", args[0].clone()))


def test_encode_reproduces_official_small(small_case):
    model, case = small_case
    seen: dict = {}
    handle = _capture_input(model.encoder_temporal, seen)
    try:
        with torch.no_grad():
            latents = model.encode(case["in.video"])
    finally:
        handle.remove()
    _assert_fixture_close(seen["x"], case["mid.z_2plus1d_mode"], "2+1D encoder mode")
    _assert_fixture_close(latents, case["out.latent"], "temporal encoder mode (latent)")


def test_temporal_stages_reproduce_official_small_from_fixture_inputs(small_case):
    model, case = small_case
    with torch.no_grad():
        latents = model.encode_temporal(case["mid.z_2plus1d_mode"])
        z = model.decode_temporal(case["out.latent"])
    _assert_fixture_close(latents, case["out.latent"], "temporal encoder alone")
    _assert_fixture_close(z, case["mid.decoder_temporal_out"], "temporal decoder alone")


def test_decode_reproduces_official_small(small_case):
    model, case = small_case
    seen: dict = {}
    handle = _capture_input(model.decoder, seen)
    try:
        with torch.no_grad():
            video = model.decode(case["out.latent"])
    finally:
        handle.remove()
    _assert_fixture_close(seen["x"], case["mid.decoder_temporal_out"], "temporal decoder output")
    _assert_fixture_close(video, case["out.reconstruction"], "2+1D decoder output (reconstruction)")
    assert video.abs().max() > 1, "the official output is not clamped, and neither may ours be"


@pytest.mark.slow
def test_full_width_reproduces_official_encoder_and_plain_decoder(official_fixtures):
    """Official widths (ch 128): encoder latents and the plain-decoder baseline of the RefDecoder fixture."""
    from safetensors.torch import load_file

    folder = official_fixtures / "videovaeplus_refdecoder_small"
    case = load_file(folder / "case.safetensors")
    with torch.device("meta"):
        model = VideoVAEPlus().eval()
    own = model.state_dict().keys()
    filled = fill_state_dict([e for e in load_manifest(folder / "manifest.json") if e["name"] in own])
    model.load_state_dict(filled, strict=True, assign=True)
    with torch.no_grad():
        z = model.encode_spatial(case["in.video"])
        latents = model.encode_temporal(z)
        video = model.decode(case["out.latent"])
    _assert_fixture_close(z, case["mid.z_2plus1d_mode"], "2+1D encoder mode")
    _assert_fixture_close(latents, case["out.latent"], "latent")
    _assert_fixture_close(video, case["out.baseline_plain_decoder"], "plain decoder baseline")


# --- semantics pinned by independent computations -----------------------------------------------------------------
def test_temporal_attention_matches_by_hand_formula():
    """README §9.14 written out with loops, including offset clipping (max distance 2 over 6 frames)."""
    c, t, dist = 32, 6, 2
    layer = TemporalAttention(c, max_distance=dist)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(1, c, t, 2, 1, generator=g, dtype=torch.float64).float()
    with torch.no_grad():
        got = layer(x)
    tk, tv = layer.relative_position_k.embeddings_table, layer.relative_position_v.embeddings_table
    expected = torch.empty_like(x)
    for pos in range(2):
        seq = x[0, :, :, pos, 0].double()
        h = torch.nn.functional.group_norm(seq[None], 32, layer.norm.weight.double(), layer.norm.bias.double(), 1e-5)
        qkv = torch.einsum("oc,ct->ot", layer.qkv.weight[:, :, 0].double(), h[0]) + layer.qkv.bias.double()[:, None]
        q, k, v = qkv[:c], qkv[c : 2 * c], qkv[2 * c :]
        s = c**-0.25
        logits = torch.empty(t, t, dtype=torch.float64)
        for i in range(t):
            for j in range(t):
                rel = tk[max(-dist, min(dist, i - j)) + dist].double()
                logits[i, j] = (s * q[:, i]) @ (s * k[:, j]) + s * (q[:, j] @ rel)
        w = logits.softmax(dim=-1)
        out = torch.zeros(c, t, dtype=torch.float64)
        for i in range(t):
            for j in range(t):
                out[:, i] += w[i, j] * (v[:, j] + tv[max(-dist, min(dist, j - i)) + dist].double())
        out = torch.einsum("oc,ct->ot", layer.proj_out.weight[:, :, 0].double(), out) + layer.proj_out.bias[:, None]
        expected[0, :, :, pos, 0] = (seq + out).float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_decoder_steps_compose_to_forward(tiny):
    z = torch.randn(1, TINY.z_channels, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    dec = tiny.decoder
    with torch.no_grad():
        h = dec.forward_stem(z)
        assert h.shape == (1, dec.level_in_channels[-1], 4, 2, 3)
        for level in reversed(range(dec.num_levels)):
            h = dec.forward_level(level, h)
            scale = 2 ** (dec.num_levels - level) if level else 2 ** (dec.num_levels - 1)
            assert h.shape == (1, dec.level_out_channels[level], 4, 2 * scale, 3 * scale)
        torch.testing.assert_close(dec.forward_head(h), dec(z), rtol=0, atol=0)


def test_decoder_level_runs_a_single_reference_frame(tiny):
    dec = tiny.decoder
    ref = torch.randn(2, dec.level_in_channels[1], 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = dec.forward_level(1, ref)
    assert out.shape == (2, dec.level_out_channels[1], 1, 8, 8)
    assert torch.isfinite(out).all()


def test_chunked_encode_and_decode_equal_independent_chunks(tiny):
    video = _video(frames=8)
    with torch.no_grad():
        latents = tiny.encode(video, chunk_frames=4)
        parts = [tiny.encode(video[:, :, :4]), tiny.encode(video[:, :, 4:])]
        torch.testing.assert_close(latents, torch.cat(parts, dim=2), rtol=0, atol=0)
        assert not torch.allclose(latents, tiny.encode(video), atol=1e-4), "GroupNorm spans the chunk"
        decoded = tiny.decode(latents, chunk_frames=4)
        parts = [tiny.decode(latents[:, :, :1]), tiny.decode(latents[:, :, 1:])]
        torch.testing.assert_close(decoded, torch.cat(parts, dim=2), rtol=0, atol=0)


def test_encode_decode_shapes(tiny):
    video = _video(frames=8, size=16)
    with torch.no_grad():
        latents = tiny.encode(video)
        assert latents.shape == (1, 16, 2, 2, 2)
        assert tiny.decode_temporal(latents).shape == (1, 16, 8, 2, 2)
        assert tiny(video).shape == video.shape


# --- input errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ((1, 3, 6, 16, 16), "nearest valid counts are 4 and 8"),
        ((1, 3, 2, 16, 16), "4k"),
        ((1, 4, 8, 16, 16), "(B, 3, T, H, W)"),
        ((1, 3, 8, 12, 16), "multiples of 8"),
        ((3, 8, 16, 16), "(B, 3, T, H, W)"),
    ],
)
def test_encode_rejects_bad_videos(tiny, shape, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        tiny.encode(torch.zeros(shape))


def test_encode_rejects_out_of_range_values(tiny):
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        tiny.encode(_video() * 127.5 + 127.5)


def test_decode_rejects_bad_latents_and_chunks(tiny):
    with pytest.raises(InputError, match=r"\(B, 16, T, h, w\)"):
        tiny.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(InputError, match="multiple of 4"):
        tiny.decode(torch.zeros(1, 16, 2, 2, 2), chunk_frames=6)
    with pytest.raises(InputError, match="nearest valid"):
        tiny.encode_temporal(torch.zeros(1, 16, 5, 2, 2))


# --- checkpoints ------------------------------------------------------------------------------------------------
def _tiny_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = VideoVAEPlus(TINY)
    return {k: fill_tensor(k, v.shape) for k, v in model.state_dict().items()}


def test_strict_load_of_small_fixture_weights_from_lightning_ckpt_and_safetensors(official_fixtures, tmp_path):
    from safetensors.torch import save_file

    filled = fill_state_dict(load_manifest(official_fixtures / "videovaeplus_small" / "manifest.json"))
    wrapped = {f"_forward_module.{k}": v for k, v in filled.items()}
    wrapped["loss.logvar"] = torch.zeros(())
    wrapped["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 3, 3, 3)
    torch.save({"state_dict": wrapped, "epoch": 3, "global_step": 10}, tmp_path / "model.ckpt")
    save_file(filled, tmp_path / "model.safetensors")
    for name in ("model.ckpt", "model.safetensors"):
        model = VideoVAEPlus.from_checkpoint(tmp_path / name, config=VideoVAEPlusConfig.small())
        loaded = model.state_dict()
        assert loaded.keys() == filled.keys()
        assert all(torch.equal(loaded[k], filled[k]) for k in filled), name
        assert not model.training and all(p.requires_grad for p in model.parameters())


def _error_for(tmp_path, state: dict, name: str = "bad.pt") -> str:
    torch.save(state, tmp_path / name)
    with pytest.raises(CheckpointError) as info:
        VideoVAEPlus.from_checkpoint(tmp_path / name, config=TINY)
    return str(info.value)


def test_checkpoint_error_lists_missing_key(tmp_path):
    state = _tiny_state()
    state.pop("decoder.conv_out.bias")
    message = _error_for(tmp_path, state)
    assert "1 missing keys: decoder.conv_out.bias" in message


def test_checkpoint_error_lists_unexpected_keys_with_count(tmp_path):
    state = _tiny_state()
    state.update({f"transformer.blocks.{i}.weight": torch.zeros(2) for i in range(12)})
    message = _error_for(tmp_path, state)
    assert "12 unexpected keys: transformer.blocks.0.weight" in message and "(+2 more)" in message
    assert "RefDecoder checkpoint" in message


def test_checkpoint_error_lists_shape_mismatch(tmp_path):
    state = _tiny_state()
    state["encoder.conv_in.weight"] = torch.zeros(64, 3, 1, 3, 3)
    message = _error_for(tmp_path, state)
    assert "encoder.conv_in.weight: checkpoint [64, 3, 1, 3, 3] vs model [32, 3, 1, 3, 3]" in message


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_checkpoint_error_on_truncated_file(tmp_path, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"model{suffix}"
    state = _tiny_state()
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)
    data = path.read_bytes()
    path.write_bytes(data[: math.floor(len(data) * 0.6)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        VideoVAEPlus.from_checkpoint(path, config=TINY)


def test_checkpoint_error_on_missing_file_and_non_tensor_pickles(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        VideoVAEPlus.from_checkpoint(tmp_path / "absent.ckpt", config=TINY)
    state = {"state_dict": _tiny_state(), "hyper_parameters": argparse.Namespace(lr=1.0)}
    torch.save(state, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        VideoVAEPlus.from_checkpoint(tmp_path / "pickled.ckpt", config=TINY)
    model = VideoVAEPlus.from_checkpoint(tmp_path / "pickled.ckpt", config=TINY, allow_pickle=True)
    assert torch.equal(model.state_dict()["decoder.conv_out.bias"], state["state_dict"]["decoder.conv_out.bias"])


def test_decoder_level_out_of_range_is_an_input_error(tiny):
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        tiny.decoder.forward_level(4, torch.zeros(1, 32, 1, 2, 2))
