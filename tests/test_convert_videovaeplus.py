"""Loading the paper's released VideoVAE+ RefDecoder checkpoints: key maps, one stage, errors, and the fixture.

Finding pinned here (README §9.18, checked against ``videovaeplus_refdecoder_small``): the official stage adds its
input back to the **video** frames only (``h = h + h0``); the reference slice leaves the stage as the bare
transformer output. The ``official-videovae+`` preset therefore sets ``stages.residual_reference=False``; adding the
input to the reference frames too (our default for new models) misses the official output by ~0.06.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from refdecoder import CheckpointError
from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusAdapter
from refdecoder.blocks import ReferenceTokenizer, SharedTransformer, StageProjector
from refdecoder.convert import (
    _build_videovaeplus_vae,
    _strip,
    detect_layout,
    load_official,
    map_videovaeplus_state,
    official_videovaeplus_config,
)
from refdecoder.model import wrap
from tests.official_fill import fill_state_dict, fill_tensor, load_manifest

# The tiny official-layout checkpoint: 1 block of width 128 (one official 128-channel head), FFN 256.
TINY_DEPTH, TINY_DIM, TINY_FFN = 1, 128, 256
ADDED_PREFIXES = ("ref_conv_in.", "transformer.", "decoder.pre_transformer_norms")


def tiny_official_state(seed_vae: int = 0) -> dict[str, torch.Tensor]:
    """An official VideoVAE+ RefDecoder state dict around ``build_tiny()``, names written from README §8."""
    torch.manual_seed(seed_vae)
    vae = VideoVAEPlusAdapter.build_tiny()
    names = {k: tuple(v.shape) for k, v in vae.state_dict().items()}  # the base keys equal the official ones
    stages = [(64, 8), (64, 16), (32, 16)]  # (channels, patch) of build_tiny's stages 0/1/2
    names.update({"ref_conv_in.proj.weight": (64, 12, 1, 3, 3), "ref_conv_in.proj.bias": (64,)})
    for s, (c, p) in enumerate(stages):
        for norm in ("pre_transformer_norms", "pre_transformer_norms_ref"):
            names.update({f"decoder.{norm}.{s}.weight": (c,), f"decoder.{norm}.{s}.bias": (c,)})
        names.update({f"transformer.patch_embeddings.{s}.weight": (TINY_DIM, c, 1, p, p)})
        names.update({f"transformer.patch_embeddings.{s}.bias": (TINY_DIM,)})
        names.update({f"transformer.proj_outs.{s}.weight": (c * p * p, TINY_DIM)})
        names.update({f"transformer.proj_outs.{s}.bias": (c * p * p,)})
    block = "transformer.transformer.blocks.0."
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        names.update({f"{block}attn1.{proj}.weight": (TINY_DIM, TINY_DIM), f"{block}attn1.{proj}.bias": (TINY_DIM,)})
    names.update({f"{block}attn1.norm_q.weight": (TINY_DIM,), f"{block}attn1.norm_k.weight": (TINY_DIM,)})
    names.update({f"{block}ffn.net.0.proj.weight": (TINY_FFN, TINY_DIM), f"{block}ffn.net.0.proj.bias": (TINY_FFN,)})
    names.update({f"{block}ffn.net.2.weight": (TINY_DIM, TINY_FFN), f"{block}ffn.net.2.bias": (TINY_DIM,)})
    state = {name: fill_tensor(name, shape) for name, shape in names.items()}
    state["loss.logvar"] = torch.zeros(1)  # training-only, dropped at load
    return state


def write_tiny_official(path, state: dict[str, torch.Tensor] | None = None):
    """Write a Lightning-style checkpoint (``{"state_dict": ..., "epoch": ...}``) and return its path."""
    torch.save({"state_dict": tiny_official_state() if state is None else state, "epoch": 7}, path)
    return path


@contextmanager
def residual_on_reference(model, enabled: bool):
    """Temporarily switch whether the stage residual is also added to the reference frames."""
    projectors = list(model.projectors.values())
    saved = [p.residual_reference for p in projectors]
    for projector in projectors:
        projector.residual_reference = enabled
    try:
        yield model
    finally:
        for projector, value in zip(projectors, saved):
            projector.residual_reference = value


# --- key maps on the meta device ------------------------------------------------------------------------------
def _meta_model(entries, real: set[str] = frozenset()):
    """Official state with real fill-rule values for ``real`` keys and meta tensors elsewhere, and its model."""
    state = {
        e["name"]: fill_tensor(e["name"], e["shape"]) if e["name"] in real else torch.empty(e["shape"], device="meta")
        for e in entries
        if not e["name"].startswith("loss")
    }
    assert detect_layout(state.keys()) == "videovae+"
    base = {k: v for k, v in state.items() if not k.startswith(ADDED_PREFIXES)}
    config = official_videovaeplus_config(_strip(state, ("transformer.",)))
    return state, wrap(_build_videovaeplus_vae(base, "meta"), config)


@pytest.mark.parametrize(
    ("manifest", "depth", "heads"),
    [("manifests/videovaeplus_refdecoder_eval.json", 10, 12), ("videovaeplus_refdecoder_small/manifest.json", 2, 2)],
)
def test_official_manifests_map_strictly_on_meta(official_fixtures, manifest, depth, heads):
    """Every released key lands on our modules with its shape, strict, nothing left over."""
    entries = load_manifest(official_fixtures / manifest)
    state, model = _meta_model(entries)
    config = model.config
    assert (config.transformer.depth, config.transformer.num_heads, config.transformer.ffn_dim) == (depth, heads, 8960)
    assert (config.stages.residual, config.stages.input_norm, config.tokenizer.norm) == (True, "group", "none")
    assert config.backbone == "videovae+" and config.train_decoder
    mapped = map_videovaeplus_state(state, model)
    assert set(mapped) == set(model.refdecoder_state_dict())
    model.load_refdecoder_state_dict(mapped)  # strict, shapes checked
    added = sum(p.numel() for _, p in model.added_parameters())
    assert added == sum(v.numel() for k, v in state.items() if k.startswith(ADDED_PREFIXES))
    base = sum(p.numel() for p in model.vae.parameters())
    assert base + added == sum(
        e["shape"] and math.prod(e["shape"]) for e in entries if not e["name"].startswith("loss")
    )
    if depth == 10:  # README §3: transformer 772,609,024 + ref_conv_in 55,808 + six GroupNorms 3,584
        assert added == 772_609_024 + 55_808 + 3_584


# --- one stage and the tokenizer with the fixture's own weights ----------------------------------------------
def _official_stage(h, ref, t, s, patch, transformer):
    """README §9.18 + §9.7 written out with the official tensors ``t`` (the shared transformer is ours)."""
    norm, norm_ref = f"decoder.pre_transformer_norms.{s}.", f"decoder.pre_transformer_norms_ref.{s}."
    joint = torch.cat(
        [
            F.group_norm(ref, 32, t[norm_ref + "weight"], t[norm_ref + "bias"], 1e-6),
            F.group_norm(h, 32, t[norm + "weight"], t[norm + "bias"], 1e-6),
        ],
        dim=2,
    )
    x = F.conv3d(
        joint, t[f"transformer.patch_embeddings.{s}.weight"], t[f"transformer.patch_embeddings.{s}.bias"], stride=patch
    )
    grid = tuple(x.shape[-3:])
    tokens = transformer(x.flatten(2).transpose(1, 2), grid)
    tokens = F.layer_norm(tokens.float(), (tokens.shape[-1],), eps=1e-6)
    tokens = F.linear(tokens, t[f"transformer.proj_outs.{s}.weight"], t[f"transformer.proj_outs.{s}.bias"])
    b, c = h.shape[:2]
    out = tokens.reshape(b, *grid, *patch, c).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, *joint.shape[2:])
    return out[:, :, :1], out[:, :, 1:] + h  # reference: no residual; video: h + h0


@torch.no_grad()
def test_mapped_tokenizer_and_stage0_follow_the_official_rule(official_fixtures):
    entries = load_manifest(official_fixtures / "videovaeplus_refdecoder_small" / "manifest.json")
    real = {
        e["name"]
        for e in entries
        if e["name"].startswith(("ref_conv_in.", "transformer.transformer.", "decoder.pre_transformer_norms"))
        or e["name"].startswith(("transformer.patch_embeddings.0.", "transformer.proj_outs.0."))
    }
    state, model = _meta_model(entries, real)
    mapped = map_videovaeplus_state(state, model)
    tokenizer = ReferenceTokenizer(512, 2, kind="space_to_depth", norm="none").eval()
    tokenizer.load_state_dict(
        {k.removeprefix("tokenizer."): v for k, v in mapped.items() if k.startswith("tokenizer.")}
    )
    components = load_file(official_fixtures / "components" / "components.safetensors")
    tokens = tokenizer(components["vvp_refconvin.in.image"])
    assert (tokens - components["vvp_refconvin.out"]).abs().max().item() <= 1e-4

    transformer = SharedTransformer(256, 2, 2, 8960).eval()
    transformer.load_state_dict({k[12:]: v for k, v in mapped.items() if k.startswith("transformer.")})
    projector = StageProjector(512, 256, (1, 8, 8), residual=True, residual_reference=False, input_norm="group")
    projector.eval()
    projector.load_state_dict({k[18:]: v for k, v in mapped.items() if k.startswith("projectors.stage0.")})
    g = torch.Generator().manual_seed(5)
    h, ref = torch.randn(1, 512, 3, 16, 16, generator=g), torch.randn(1, 512, 1, 16, 16, generator=g)
    official_ref, official_video = _official_stage(h, ref, state, 0, (1, 8, 8), transformer)
    joint = projector(torch.cat([ref, h], dim=2), transformer, num_reference=1)
    assert (joint[:, :, 1:] - official_video).abs().max().item() <= 1e-4
    assert (joint[:, :, :1] - official_ref).abs().max().item() <= 1e-4  # the reference slice: no residual
    projector.residual_reference = True  # our default for new models adds the reference's own input back
    joint = projector(torch.cat([ref, h], dim=2), transformer, num_reference=1)
    assert (joint[:, :, :1] - ref - official_ref).abs().max().item() <= 1e-4


# --- loading a tiny official-layout checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state():
    return tiny_official_state()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_state):
    return write_tiny_official(tmp_path / "videovaeplus_ref.ckpt", tiny_state)


def test_tiny_checkpoint_lands_where_the_official_names_say(tiny_ckpt, tiny_state):
    model = load_official(tiny_ckpt)
    t, config = tiny_state, model.config
    assert model.adapter.name == "videovae+" and isinstance(model.vae, VideoVAEPlus)
    assert model.vae.config == VideoVAEPlusAdapter.build_tiny().config  # widths read from the weights
    assert (config.transformer.depth, config.transformer.num_heads, config.transformer.ffn_dim) == (1, 1, 256)
    pairs = {
        "tokenizer.proj.weight": "ref_conv_in.proj.weight",
        "projectors.stage0.norm_video.weight": "decoder.pre_transformer_norms.0.weight",
        "projectors.stage1.norm_reference.bias": "decoder.pre_transformer_norms_ref.1.bias",
        "projectors.stage2.norm_reference.weight": "decoder.pre_transformer_norms_ref.2.weight",
        "projectors.stage2.embed.weight": "transformer.patch_embeddings.2.weight",
        "projectors.stage1.out.bias": "transformer.proj_outs.1.bias",
        "transformer.blocks.0.attn.to_out.weight": "transformer.transformer.blocks.0.attn1.to_out.0.weight",
        "transformer.blocks.0.attn.norm_k.weight": "transformer.transformer.blocks.0.attn1.norm_k.weight",
        "transformer.blocks.0.ffn.fc2.weight": "transformer.transformer.blocks.0.ffn.net.2.weight",
        "vae.decoder.conv_out.weight": "decoder.conv_out.weight",
        "vae.decoder.up.0.block.0.conv1_tmp.conv.weight": "decoder.up.0.block.0.conv1_tmp.conv.weight",
        "vae.encoder_temporal.conv_in.conv.weight": "encoder_temporal.conv_in.conv.weight",
        "vae.decoder_temporal.conv_last.conv.bias": "decoder_temporal.conv_last.conv.bias",
    }
    ours = model.state_dict()
    for key, official in pairs.items():
        assert torch.equal(ours[key], t[official]), key


def test_given_vae_receives_the_fine_tuned_decoder(tiny_ckpt, tiny_state):
    torch.manual_seed(3)
    vae = VideoVAEPlusAdapter.build_tiny()
    encoder_before = vae.encoder.conv_in.weight.clone()
    model = load_official(tiny_ckpt, vae=vae, backbone="videovae+")
    assert model.vae is vae
    assert torch.equal(vae.decoder.mid.block_1.conv1.weight, tiny_state["decoder.mid.block_1.conv1.weight"])
    assert torch.equal(vae.encoder.conv_in.weight, encoder_before)  # the frozen encoder is the given VAE's


def test_converted_decode_matches_the_official_rule_stage_by_stage(tiny_ckpt, tiny_state):
    """Whole decode of the tiny checkpoint against README §9.18 composed by hand from the official tensors."""
    model = load_official(tiny_ckpt).eval()
    vae, t = model.vae, tiny_state
    g = torch.Generator().manual_seed(9)
    z, reference = torch.randn(1, 16, 1, 4, 4, generator=g), torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1
    patches = [(1, 8, 8), (1, 16, 16), (1, 16, 16)]
    with torch.no_grad():
        out = model.decode(z, reference=reference, clamp=False)
        d = vae.decoder
        ref = model.tokenizer(reference)  # the tokenizer itself is pinned by the components fixture
        h = d.forward_level(2, d.forward_level(3, d.forward_stem(vae.decoder_temporal(z))))
        ref, h = _official_stage(h, ref, t, 0, patches[0], model.transformer)
        ref, h = d.forward_level(1, ref), d.forward_level(1, h)
        ref, h = _official_stage(h, ref, t, 1, patches[1], model.transformer)
        ref, h = d.forward_level(0, ref), d.forward_level(0, h)
        _, h = _official_stage(h, ref, t, 2, patches[2], model.transformer)
        expected = d.forward_head(h)
    assert (out - expected).abs().max().item() <= 1e-4


# --- errors ---------------------------------------------------------------------------------------------------
def test_wrong_backbone(tiny_ckpt):
    with pytest.raises(CheckpointError, match="videovae\\+ RefDecoder checkpoint, not wan2.1"):
        load_official(tiny_ckpt, backbone="wan2.1")


def test_truncated_file(tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    tiny_ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_official(tiny_ckpt)


def test_base_autoencoder_is_not_a_refdecoder_checkpoint(tmp_path, tiny_state):
    base = {k: v for k, v in tiny_state.items() if not k.startswith(ADDED_PREFIXES)}
    path = write_tiny_official(tmp_path / "sota-4-16z.ckpt", base)
    with pytest.raises(CheckpointError, match="ref_conv_in.*decoder_temporal.*transformer.*base autoencoder"):
        load_official(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.pop("decoder.pre_transformer_norms_ref.2.bias"),
            "lacks 'decoder.pre_transformer_norms_ref.2.bias'",
        ),
        (lambda s: s.__setitem__("transformer.proj_outs.3.bias", torch.zeros(2)), "no counterpart.*proj_outs.3.bias"),
        (lambda s: s.__setitem__("ref_conv_in.proj.bias", torch.zeros(65)), "ref_conv_in.proj.bias: shape \\(65,\\)"),
        (lambda s: s.pop("decoder.up.1.upsample.conv.weight"), "missing keys: decoder.up.1.upsample.conv.weight"),
        (lambda s: s.pop("transformer.transformer.blocks.0.attn1.to_q.weight"), "lacks transformer weight.*to_q"),
        (lambda s: s.__setitem__("encoder.extra.weight", torch.zeros(1)), "unexpected keys: encoder.extra.weight"),
    ],
)
def test_key_and_shape_mismatches_are_listed(tmp_path, tiny_state, edit, message):
    state = dict(tiny_state)
    edit(state)
    with pytest.raises(CheckpointError, match=message):
        load_official(write_tiny_official(tmp_path / "edited.ckpt", state))


def test_given_vae_of_other_widths(tiny_ckpt):
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_official(tiny_ckpt, vae=VideoVAEPlusAdapter.build_tiny(ch_mult=(1, 1, 2, 2)))


# --- the numeric fixture --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_refdecoder_small_fixture_reproduced(official_fixtures, tmp_path):
    """Official AE widths + 2-block transformer at 64x64x8 (~1 min and ~6 GB on 2 CPU cores: fill, I/O, decode)."""
    folder = official_fixtures / "videovaeplus_refdecoder_small"
    state = fill_state_dict(load_manifest(folder / "manifest.json"))
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    del state
    model = load_official(path).eval()
    case = load_file(folder / "case.safetensors")

    def close(got, ref):  # README §7
        return bool(((got - ref).abs() <= 5e-4 * ref.abs().clamp(min=1.0)).all())

    with torch.no_grad():
        z = model.encode(case["in.video"])
        assert close(z, case["out.latent"])
        reference = case["in.video"][:, :, :1]  # config.json: the reference is frame 0 of the video
        official_rule = model.decode(z, reference=reference, clamp=False)  # the preset: video-only residual
        with residual_on_reference(model, True):
            joint_residual = model.decode(z, reference=reference, clamp=False)
        plain = model.decode(z, clamp=False)
        plain_adapter = model.adapter.plain_decode(z, clamp=False)
    assert close(official_rule, case["out.reconstruction"])
    # A residual on the reference frames too (our default for new models) is measurably off the official rule.
    assert (joint_residual - case["out.reconstruction"]).abs().max().item() > 1e-2
    assert close(plain, case["out.baseline_plain_decoder"])
    assert close(plain_adapter, case["out.baseline_plain_decoder"])
