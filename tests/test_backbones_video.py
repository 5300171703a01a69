"""The HunyuanVideo (v1 and 1.5), LTX-Video and CogVideoX adapters beyond the conformance suite: their own temporal
layouts, extra decode inputs, reference-branch inputs, output heads and one-line input errors, against diffusers'
decode."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import refdecoder
from refdecoder.backbones.registry import get_backbone
from refdecoder.errors import ConfigError, InputError
from refdecoder.testing import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO = ("hunyuan-video", "hunyuan-video-1.5", "ltx-video", "ltx-2-video", "cogvideox")
LTX = ("ltx-video", "ltx-2-video")


def _wrap(name: str, perturb: bool = False, **overrides: object) -> refdecoder.RefDecoder:
    torch.manual_seed(0)
    model = refdecoder.wrap(get_backbone(name).build_tiny(**overrides).eval(), "tiny")
    if perturb:
        randomize_([p for _, p in model.added_parameters()], scale=0.1)
    return model


def _latents(model: refdecoder.RefDecoder, frames: int, seed: int = 0) -> torch.Tensor:
    size = 32 // model.adapter.spatial_factor
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, model.adapter.latent_channels, frames, size, size, generator=g)


def _reference(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", VIDEO)
def test_the_decode_ignores_the_window_and_keeps_the_backbones_layout(name):
    model = _wrap(name, perturb=True)
    assert not model.adapter.exact_streaming
    z = _latents(model, 5)
    with torch.no_grad():
        outs = [model.decode(z, reference=_reference(), window=w) for w in (1, 2, 5)]
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def test_cogvideox_windows_are_diffusers_frame_batches():
    adapter = _wrap("cogvideox").adapter
    assert adapter.plan_windows(1, 4) == [(0, 1)]
    assert adapter.plan_windows(13, 4) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    assert adapter.frame_rule.latent_frames(49) == 13 and adapter.frame_rule.pixel_frames(13) == 49


@pytest.mark.parametrize("name", ("hunyuan-video", "hunyuan-video-1.5", *LTX))
def test_whole_sequence_backbones_decode_in_one_window(name):
    assert _wrap(name).adapter.plan_windows(7, 2) == [(0, 7)]


@pytest.mark.parametrize("name", LTX)
def test_ltx_temb_is_a_decode_input_equal_to_vae_decode(name):
    model = _wrap(name)
    z, temb = _latents(model, 2), torch.tensor([0.05])
    with torch.no_grad():
        stock = model.vae.decode(z, temb).sample  # unclamped, like the LTX decode (output_clamp False)
        assert (model.decode(z, reference=_reference(), temb=temb) - stock).abs().max() <= 1e-5
        assert (model.decode(z, temb=0.05) - stock).abs().max() <= 1e-5
        assert (model.decode(z) - stock).abs().max() > 1e-4  # the default temb (0.0) is another decode


@pytest.mark.parametrize("name", LTX)
def test_ltx_reference_branch_uses_the_decode_timestep(name):
    model = _wrap(name, perturb=True)
    z = _latents(model, 2)
    cls = type(model.adapter)
    with (
        torch.no_grad(),
        mock.patch.object(cls, "run_stage_on_reference", autospec=True, side_effect=cls.run_stage_on_reference) as run,
    ):
        model.decode(z, reference=_reference(), temb=0.3)
    tembs = [call.args[3].decode_inputs["temb"] for call in run.call_args_list]  # the ctx each call received
    assert len(tembs) == 2 and all(torch.allclose(temb, torch.tensor([0.3])) for temb in tembs)


@pytest.mark.parametrize("name, causal", [("ltx-video", True), ("ltx-2-video", False)])
def test_ltx_other_decoder_causality_matches_vae_decode(name, causal):
    model = _wrap(name, decoder_causal=causal)  # the tiny builds take each family's default
    for frames in (1, 2, 3):
        z = _latents(model, frames)
        with torch.no_grad():
            diff = (model.decode(z, reference=_reference()) - model.adapter.plain_decode(z)).abs().max().item()
        assert diff <= 1e-5, (frames, diff)


@pytest.mark.parametrize("name", LTX)
def test_ltx_upscale_head_refuses_the_patchified_output(name):
    vae = get_backbone(name).build_tiny()
    config = refdecoder.preset("tiny")
    config.upscale.factor = 2
    with pytest.raises(ConfigError, match="patchified output channels") as err:
        refdecoder.wrap(vae, config)
    assert "\n" not in str(err.value) and vae.decoder.conv_out.conv.out_channels == 12  # the VAE is untouched


def test_cogvideox_reference_zq_is_the_frozen_encoding_of_the_reference_once_per_decode():
    model = _wrap("cogvideox", perturb=True)
    z, ref = _latents(model, 5), _reference()
    with torch.no_grad(), mock.patch.object(model.adapter, "encode", wraps=model.adapter.encode) as encode:
        out = model.decode(z, reference=ref)
    assert encode.call_count == 1  # 2 windows x 2 reference stage passes share one encoding
    torch.testing.assert_close(encode.call_args.args[0], ref[:, :, None])
    with torch.no_grad():
        other = model.decode(z, reference=_reference(seed=5))
    assert (out - other).abs().max() > 1e-4


@pytest.mark.parametrize("name", VIDEO)
def test_bad_inputs_are_one_line_input_errors(name):
    model = _wrap(name)
    z = _latents(model, 1)
    rule = model.adapter.frame_rule
    wrong_frames = rule.first + 1
    calls = {
        "channels": lambda: model.decode(torch.cat([z, z[:, :1]], dim=1)),
        "reference size": lambda: model.decode(z, reference=_reference()[..., :-8]),
        "video frames": lambda: model.encode(torch.zeros(1, 3, wrong_frames, 32, 32)),
    }
    if name == "cogvideox":
        calls["latent frames"] = lambda: model.decode(_latents(model, 2))
    if name in LTX:
        calls["temb"] = lambda: model.decode(z, temb=torch.zeros(3))
    if name == "ltx-2-video":
        calls["latent size"] = lambda: model.decode(z[..., :1, :1])
    if name not in LTX:
        calls["decode input"] = lambda: model.decode(z, temb=0.0)
    for what, call in calls.items():
        with pytest.raises(InputError) as err:
            call()
        assert "\n" not in str(err.value), what


@pytest.mark.parametrize("name", VIDEO)
def test_normalize_matches_the_pipelines(name):
    model = _wrap(name)
    vae, z = model.vae, _latents(model, 1)
    if name in LTX:
        from diffusers import LTXImageToVideoPipeline as Pipe

        mean, std, s = vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        expected = Pipe._denormalize_latents(z, mean, std, s)
    else:
        expected = z / vae.config.scaling_factor
    torch.testing.assert_close(model.denormalize(z), expected)
    torch.testing.assert_close(model.normalize(model.denormalize(z)), z)


@pytest.mark.parametrize(
    "cls, name",
    [
        ("AutoencoderKLHunyuanVideo", "hunyuan-video"),
        ("AutoencoderKLHunyuanVideo15", "hunyuan-video-1.5"),
        ("AutoencoderKLLTXVideo", "ltx-video"),
        ("AutoencoderKLCogVideoX", "cogvideox"),
    ],
)
@pytest.mark.parametrize("preset", ["small", "paper"])
def test_released_configs_wrap_with_every_preset(cls, name, preset):
    import diffusers

    with torch.device("meta"):  # the class defaults are the released layouts; nothing is allocated
        vae = getattr(diffusers, cls)()
    model = refdecoder.wrap(vae, preset)
    assert model.adapter.name == name and len(model.adapter.stages()) == 3


def test_decode_overhead_counts_every_video_backbone_on_the_meta_device():
    from benchmarks.decode_overhead import VIDEO_BACKBONES, flops_row

    # SVD, Qwen-Image 2.1 and MiniMax-H3 decode in layouts of their own: tested in their own files
    counted = {*VIDEO, "stable-video-diffusion", "qwen-image-2.1", "minimax-h3"}
    assert {name.split("-0.9")[0] for name in VIDEO_BACKBONES} == counted - {"ltx-2-video"}
    for name in sorted(counted):
        with torch.device("meta"):
            vae = get_backbone(name).build_tiny().to("meta")  # SVD's mix_factor is made on the CPU regardless
        rule = get_backbone(name).frame_rule
        row = flops_row(vae, rule.first + 2 * rule.step, (64, 64), {"tiny": "tiny"})  # the third-shortest clip
        assert row["plain_decoder_tflop"] > 0 and row["tiny"]["ratio_to_plain"] > 1, (name, row)


@pytest.mark.parametrize("name", VIDEO)
def test_a_batch_of_two_clips_decodes_and_encodes_as_each_clip_alone(name):
    # HunyuanVideo 1.5's mid-block attention in diffusers raises on batches (its mask meets the heads axis): the
    # adapter runs it one sample at a time.
    model = _wrap(name, perturb=True)
    frames = 3 if name == "cogvideox" else 2
    latents = torch.cat([_latents(model, frames, seed=0), _latents(model, frames, seed=5)])
    reference = torch.cat([_reference(1), _reference(2)])
    with torch.no_grad():
        both = model.decode(latents, reference)
        alone = torch.cat([model.decode(latents[i : i + 1], reference[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)
        video = both.clamp(-1, 1)
        encoded = model.adapter.encode(video)
        torch.testing.assert_close(
            encoded, torch.cat([model.adapter.encode(video[i : i + 1]) for i in range(2)]), rtol=1e-4, atol=1e-4
        )


def test_hunyuan_video15_attention_per_sample_is_kept_by_copies_and_applied_once():
    import copy

    vae = get_backbone("hunyuan-video-1.5").build_tiny().eval()
    latents = torch.randn(2, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = torch.cat([vae.decode(latents[i : i + 1]).sample for i in range(2)])  # the stock block, batch 1
        refdecoder.wrap(vae, "tiny").unwrap()  # the VAE keeps the per-sample block (it only adds batches)
        refdecoder.wrap(vae, "tiny")  # wrapping again does not wrap the wrapper
        torch.testing.assert_close(vae.decode(latents).sample, alone, rtol=1e-5, atol=1e-5)
        twin = copy.deepcopy(vae)
        randomize_(list(twin.parameters()), scale=0.1)  # the copy's block must use the copy's weights
        assert not torch.allclose(twin.decode(latents).sample, alone, atol=1e-3)
        torch.testing.assert_close(vae.decode(latents).sample, alone, rtol=1e-5, atol=1e-5)
