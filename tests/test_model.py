"""The wrapped model: identity at init, reference conditioning, checkpoints, gradients, lifecycle, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import refdecoder
from refdecoder import BackboneError, CheckpointError, InputError, RefDecoderConfig
from refdecoder.config import StageConfig
from tests.helpers import latents_for, randomize_, reference_for, tiny_wan


@pytest.fixture
def vae():
    return tiny_wan()


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 6])
def test_identity_at_init(vae, frames):
    model = refdecoder.wrap(vae, "tiny")  # no .eval(): wrap() returns a model ready for inference
    z = latents_for(vae, frames)
    ref = reference_for(z)
    with torch.no_grad():
        stock = vae.decode(z).sample
        for window in sorted({1, 2, frames}):
            assert _max_diff(model.decode(z, reference=ref, window=window), stock) <= 1e-5
            assert _max_diff(model.decode(z, reference=None, window=window), stock) <= 1e-5


@pytest.mark.slow
def test_identity_full_wan21_width_slow():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()  # Wan2.1 config, random weights
    _check_full_width_identity(vae, frames=3, size=(8, 8))


def test_identity_full_wan21_width():
    """The full Wan2.1 width (base_dim 96, z 16) on a small spatial size, multi-frame."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()
    _check_full_width_identity(vae, frames=2, size=(2, 2))


def _check_full_width_identity(vae, frames, size):
    model = refdecoder.wrap(vae, "tiny").eval()
    z = latents_for(vae, frames, *size)
    with torch.no_grad():
        stock = vae.decode(z).sample
        assert _max_diff(model.decode(z, reference=reference_for(z)), stock) <= 1e-5


def test_reference_changes_output_once_trained(vae):
    model = refdecoder.wrap(vae, "tiny").eval()
    randomize_(model.projectors)
    z = latents_for(vae, 2)
    with torch.no_grad():
        stock = vae.decode(z).sample
        a = model.decode(z, reference=reference_for(z, seed=1))
        b = model.decode(z, reference=reference_for(z, seed=2))
        plain = model.decode(z)
    assert _max_diff(a, stock) > 1e-3  # the reference is used...
    assert _max_diff(a, b) > 1e-4  # ...and which reference matters
    assert _max_diff(plain, stock) <= 1e-5  # without a reference the stages are skipped exactly


def test_replace_mode_is_not_identity(vae):
    config = refdecoder.preset("tiny")
    config.stages = StageConfig(residual=False)
    model = refdecoder.wrap(vae, config).eval()
    z = latents_for(vae, 2)
    with torch.no_grad():
        assert _max_diff(model.decode(z, reference=reference_for(z)), vae.decode(z).sample) > 1e-3


def test_multiple_reference_frames(vae):
    model = refdecoder.wrap(vae, "tiny").eval()
    randomize_(model.projectors)
    z = latents_for(vae, 2)
    with torch.no_grad():
        one = model.decode(z, reference=reference_for(z, frames=1))
        two = model.decode(z, reference=reference_for(z, frames=2))
    assert one.shape == two.shape == (1, 3, 5, 32, 48)
    assert _max_diff(one, two) > 1e-4


def test_default_window_is_the_papers_17_frames(vae):
    model = refdecoder.wrap(vae, "tiny")
    z17 = latents_for(vae, 5)
    assert model.window_size(z17) == 5  # the Wan adapter's default: one 17-frame window
    assert model.adapter.plan_windows(5, model.window_size(z17)) == [(0, 5)]


def test_token_budget_shrinks_the_window(vae):
    config = refdecoder.preset("tiny")
    model = refdecoder.wrap(vae, config)
    z = latents_for(vae, 9, 8, 8)  # token grid 4x4 = 16 tokens per frame
    # Stage 2 of a 5-latent-frame first window holds 17 frames (+1 reference) -> 18 * 16 tokens; later windows
    # hold 4 latent frames = 16 frames, fewer.
    assert model.stage_tokens((8, 8), 5) == 18 * 16
    model.config.window.max_tokens_per_stage = 6 * 16  # fits 2 latent frames: 1 + 4 = 5 frames (+1 reference)
    assert model.window_size(z) == 2
    model.config.window.max_tokens_per_stage = 1
    assert model.window_size(z) == 1  # never below one latent frame


def test_state_dict_untouched_and_unwrap_restores(vae):
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    flags = {n: p.requires_grad for n, p in vae.named_parameters()}
    model = refdecoder.wrap(vae, "tiny")
    assert set(vae.state_dict()) == set(before)
    assert not any(p.requires_grad for p in vae.parameters())
    returned = model.unwrap()
    assert returned is vae
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == flags
    assert not vae.training  # tiny_wan() is in eval mode and stays so


def test_unwrap_restores_training_mode():
    vae = tiny_wan().train()
    model = refdecoder.wrap(vae, "tiny")
    assert not model.training and not vae.training  # wrap() hands back an inference-ready model
    assert model.unwrap().training
    with pytest.raises(BackboneError):
        model.decode(latents_for(vae, 1))


def test_double_wrap_raises_and_unwrap_allows_rewrap(vae):
    model = refdecoder.wrap(vae, "tiny")
    with pytest.raises(BackboneError, match="already wrapped"):
        refdecoder.wrap(vae, "tiny")
    model.unwrap()
    refdecoder.wrap(vae, "tiny")


def test_save_load_roundtrip_is_bit_exact(vae, tmp_path):
    model = refdecoder.wrap(vae, "tiny").eval()
    randomize_(model.projectors)
    z = latents_for(vae, 3)
    ref = reference_for(z)
    with torch.no_grad():
        expected = model.decode(z, reference=ref)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "refdecoder.safetensors")
    assert not any(k.startswith("vae.") for k in saved), "frozen base weights must not be saved"
    assert set(saved) == {k for k, _ in model.added_parameters()}
    meta = json.loads((tmp_path / "refdecoder_config.json").read_text())
    assert meta["backbone"] == "wan2.1" and meta["refdecoder_version"] == refdecoder.__version__
    model.unwrap()
    loaded = refdecoder.load(vae, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, reference=ref), expected)


def test_trained_decoder_weights_are_saved(vae, tmp_path):
    config = refdecoder.preset("tiny")
    config.train_decoder = True
    model = refdecoder.wrap(vae, config)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "refdecoder.safetensors")
    assert any(k.startswith("vae.decoder.") for k in saved)
    assert not any(k.startswith("vae.encoder.") for k in saved)


def test_load_reports_mismatched_weights(vae, tmp_path):
    refdecoder.wrap(tiny_wan(seed=1), "tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "refdecoder_config.json").read_text())
    config["transformer"]["depth"] = 3  # the weights hold 2 blocks
    (tmp_path / "refdecoder_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        refdecoder.load(vae, tmp_path)
    refdecoder.wrap(vae, "tiny")  # the failed load released the VAE
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        refdecoder.load(tiny_wan(), tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a RefDecoder folder"):
        refdecoder.load(tiny_wan(), tmp_path.parent)


def test_gradients_reach_only_new_modules(vae):
    model = refdecoder.wrap(vae, "tiny").train()
    randomize_(model.projectors)
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    out = model(video, reference_index=2)
    out.sample.square().mean().backward()
    assert out.sample.shape == video.shape and out.reference_index.tolist() == [2]
    for name, p in model.added_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    assert all(p.grad is None for p in vae.parameters())


def test_decoder_gradients_when_unfrozen_but_never_encoder(vae):
    config = refdecoder.preset("tiny")
    config.train_decoder = True
    model = refdecoder.wrap(vae, config).train()
    out = model(torch.rand(1, 3, 5, 32, 48) * 2 - 1)
    out.sample.mean().backward()
    assert all(p.grad is not None for p in vae.decoder.parameters())
    assert all(p.grad is None for p in vae.encoder.parameters())
    groups = model.param_groups(lr=1e-3)
    assert [g["name"] for g in groups] == ["refdecoder", "decoder"]
    assert groups[1]["lr"] == pytest.approx(1e-4)
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())


def test_token_dropout_only_in_training(vae):
    model = refdecoder.wrap(vae, "tiny")
    z = latents_for(vae, 2)
    with torch.no_grad():
        model.eval()
        assert _max_diff(model.decode(z), vae.decode(z).sample) <= 1e-5
        model.train()
        g = torch.Generator().manual_seed(0)
        assert _max_diff(model.decode(z, generator=g), vae.decode(z).sample) > 1e-3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda z: (z, torch.rand(1, 3, 1, 16, 48) * 2 - 1), "reference frames are 16x48"),
        (lambda z: (z, torch.rand(1, 4, 1, 32, 48)), r"\(B, 3, H, W\)"),
        (lambda z: (z[:, :2], None), r"\(B, 4, T, h, w\)"),
        (lambda z: (z.clone().index_fill_(2, torch.tensor([0]), float("nan")), None), "NaN"),
        (lambda z: (z, torch.rand(1, 3, 1, 32, 48) * 255), r"\[-1, 1\]"),
    ],
)
def test_bad_decode_input(vae, make, match):
    model = refdecoder.wrap(vae, "tiny")
    z, ref = make(latents_for(vae, 2))
    with pytest.raises(InputError, match=match):
        model.decode(z, reference=ref)


def test_bad_video_frame_count(vae):
    model = refdecoder.wrap(vae, "tiny")
    with pytest.raises(InputError, match=r"1 \+ 4k"):
        model(torch.zeros(1, 3, 6, 32, 48))


def test_reference_resize_is_explicit(vae):
    model = refdecoder.wrap(vae, "tiny")
    z = latents_for(vae, 1)
    out = model.decode(z, reference=torch.zeros(1, 3, 16, 24), resize_reference=True)
    assert out.shape == (1, 3, 1, 32, 48)


def test_decode_on_meta_device():
    """Shapes flow through the whole decode without values (what the FLOP benchmark relies on)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan()
    model = refdecoder.wrap(vae, "small")
    z = torch.empty(1, 16, 5, 60, 104, device="meta")
    out = model.decode(z, reference=torch.empty(1, 3, 480, 832, device="meta"))
    assert out.shape == (1, 3, 17, 480, 832) and out.device.type == "meta"


def test_local_attention_scope_is_used_saved_and_loaded(vae, tmp_path):
    config = refdecoder.preset("tiny")
    config.transformer.attention_radius = 0
    local = refdecoder.wrap(vae, config).eval()
    randomize_(local.projectors)
    randomize_(local.transformer, seed=2)
    z = latents_for(vae, 2, h=6, w=8)
    ref = reference_for(z)
    with torch.no_grad():
        expected = local.decode(z, reference=ref)
    state = local.refdecoder_state_dict()
    local.save_pretrained(tmp_path)
    local.unwrap()
    loaded = refdecoder.load(vae, tmp_path).eval()
    assert loaded.transformer.attention_radius == 0
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, reference=ref), expected)
    loaded.unwrap()
    wide = refdecoder.wrap(vae, "tiny").eval()  # the same weights with global attention
    wide.load_refdecoder_state_dict(state)
    with torch.no_grad():
        assert _max_diff(wide.decode(z, reference=ref), expected) > 1e-4
    with pytest.raises(refdecoder.ConfigError, match="attention_radius"):
        RefDecoderConfig.from_dict({"transformer": {"attention_radius": -1}})


@pytest.mark.parametrize(
    "scope",
    [
        {"attention_radius": 2, "locality_bias": True},
        {"attention_radius": 2, "video_attention_radius": 0, "locality_bias": True},
        {"locality_bias": True, "locality_bias_extent": 2},  # global attention with a distance bias
    ],
)
def test_neighbourhood_scope_and_locality_bias_keep_identity_and_save(vae, tmp_path, scope):
    config = refdecoder.preset("tiny")
    for key, value in scope.items():
        setattr(config.transformer, key, value)
    model = refdecoder.wrap(vae, config)
    z = latents_for(vae, 3, h=6, w=8)
    ref = reference_for(z)
    with torch.no_grad():
        # The zero-initialised stage updates make the prior invisible at init: still exactly the backbone.
        assert _max_diff(model.decode(z, reference=ref), vae.decode(z).sample) <= 1e-5
    randomize_(model.projectors)
    randomize_(model.transformer, seed=3)  # also the bias tables
    tables = [k for k in model.refdecoder_state_dict() if k.endswith("locality_bias.table")]
    assert len(tables) == config.transformer.depth
    with torch.no_grad():
        expected = model.decode(z, reference=ref)
    model.save_pretrained(tmp_path)
    model.unwrap()
    loaded = refdecoder.load(vae, tmp_path)
    assert torch.equal(loaded.refdecoder_state_dict()[tables[0]], model.refdecoder_state_dict()[tables[0]])
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, reference=ref), expected)
        # The bias matters: zeroing the tables changes the decode.
        for block in loaded.transformer.blocks:
            block.attn.locality_bias.table.zero_()
        assert _max_diff(loaded.decode(z, reference=ref), expected) > 1e-5


def test_scope_config_is_checked():
    with pytest.raises(refdecoder.ConfigError, match="video_attention_radius"):
        RefDecoderConfig.from_dict({"transformer": {"video_attention_radius": 0}})  # needs a local radius
    with pytest.raises(refdecoder.ConfigError, match="locality_bias"):
        RefDecoderConfig.from_dict({"transformer": {"locality_bias": "yes"}})
    for name in set(refdecoder.config.PRESETS) - {"small-local"}:  # the paper's global attention without a prior
        tf = refdecoder.preset(name).transformer
        assert (tf.attention_radius, tf.video_attention_radius, tf.locality_bias) == (None, None, False)
    tf = refdecoder.preset("small-local").transformer  # the recommended one: radius 2 with the prior
    assert (tf.attention_radius, tf.video_attention_radius, tf.locality_bias) == (2, None, True)


def test_config_roundtrip_and_unknown_keys(tmp_path, caplog):
    config = refdecoder.preset("paper")
    path = tmp_path / "c.json"
    config.save(path)
    assert RefDecoderConfig.load(path) == config
    data = json.loads(path.read_text())
    data["brand_new_option"] = 1
    data["transformer"]["another"] = 2
    restored = RefDecoderConfig.from_dict(data)
    assert restored == config
    assert "brand_new_option" in caplog.text and "transformer.another" in caplog.text
    data["transformer"]["depth"] = 0
    with pytest.raises(refdecoder.ConfigError, match="depth"):
        RefDecoderConfig.from_dict(data)


def test_windows_keep_equal_pixel_length(vae):
    adapter = refdecoder.wrap(vae, "tiny").adapter
    assert adapter.plan_windows(21, 5) == [(0, 5), (5, 9), (9, 13), (13, 17), (17, 21)]  # 17, 16, 16, 16, 16 px
    assert adapter.plan_windows(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert adapter.plan_windows(4, 9) == [(0, 4)]


def test_forward_with_an_explicit_reference(vae):
    model = refdecoder.wrap(vae, "tiny")
    randomize_(model.projectors)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    outside = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(video, reference=outside)
        expected = model.decode(model.encode(video), outside, clamp=False)
    assert torch.equal(out.sample, expected) and out.reference_index.tolist() == [-1, -1]
    with torch.no_grad():
        assert _max_diff(model(video, reference_index=0).sample, out.sample) > 1e-4  # the reference is used
    with pytest.raises(InputError, match="not both"):
        model(video, reference_index=0, reference=outside)


def test_per_stage_tokenizers_keep_identity_matter_and_save(vae, tmp_path):
    config = refdecoder.preset("tiny")
    config.tokenizer.per_stage = True
    model = refdecoder.wrap(vae, config)
    specs = model.adapter.stages()
    # One tokenizer per later conditioned stage, at that stage's width and scale.
    assert sorted(model.stage_tokenizers) == [f"stage{i}" for i in model.stage_indices if i > 0]
    for i in model.stage_indices[1:]:
        tokenizer = model.stage_tokenizers[f"stage{i}"]
        assert (tokenizer.out_channels, tokenizer.patch_size) == (specs[i].channels, specs[i].scale)
    z = latents_for(vae, 3, h=6, w=8)
    ref = reference_for(z)
    with torch.no_grad():
        assert _max_diff(model.decode(z, reference=ref), vae.decode(z).sample) <= 1e-5
    randomize_(model.projectors)
    with torch.no_grad():
        expected = model.decode(z, reference=ref)
        # The later stages read the pixel reference through their own tokenizers: zeroing one changes the decode.
        last = model.stage_tokenizers[f"stage{model.stage_indices[-1]}"]
        saved = last.proj.weight.clone()
        last.proj.weight.zero_()
        assert _max_diff(model.decode(z, reference=ref), expected) > 1e-5
        last.proj.weight.copy_(saved)
    assert any(k.startswith("stage_tokenizers.") for k in model.refdecoder_state_dict())
    model.save_pretrained(tmp_path)
    model.unwrap()
    loaded = refdecoder.load(vae, tmp_path)
    assert loaded.config.tokenizer.per_stage
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, reference=ref), expected)
