"""Generation decode: decode_with_reference, reference_decoding on the Wan-family pipelines, the paired recipe."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import refdecoder
from refdecoder.cli import main
from refdecoder.data import load_latents, read_image
from refdecoder.errors import ConfigError, InputError
from refdecoder.inference import decode_video
from refdecoder.pipelines import decode_with_reference, reference_decoding, vae_tiles
from tests import tiny_pipelines
from tests.helpers import latents_for, randomize_, reference_for, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[1]


def _model() -> torch.nn.Module:
    model = refdecoder.wrap(tiny_wan(), "tiny").eval()
    for part in (model.tokenizer, model.transformer, model.projectors):
        randomize_(part, scale=0.1)
    return model


def test_decode_with_reference_denormalises_like_by_hand() -> None:
    model = _model()
    z = latents_for(model.vae, 2)
    ref = reference_for(z)[:, :, 0]
    mean = torch.tensor(model.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        by_hand = model.decode(z * std + mean, reference=ref)
        raw = model.decode(z, reference=ref)
    torch.testing.assert_close(decode_with_reference(model, z, ref, normalized=True), by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(decode_with_reference(model.vae, z, ref, False, model=model), raw, atol=0, rtol=0)
    assert not torch.allclose(by_hand, raw)


def test_decode_with_reference_needs_the_right_model() -> None:
    model, other = _model(), tiny_wan()
    z = latents_for(model.vae, 1)
    with pytest.raises(InputError, match="pass model="):
        decode_with_reference(model.vae, z, reference_for(z)[:, :, 0])
    with pytest.raises(InputError, match="different VAE"):
        decode_with_reference(other, z, reference_for(z)[:, :, 0], model=model)


def test_vae_tiling_settings_are_honoured() -> None:
    model = _model()
    z = latents_for(model.vae, 2, h=4, w=4)
    ref = reference_for(z)[:, :, 0]
    model.vae.enable_tiling(24, 24, 16, 16)
    plan = vae_tiles(model.vae, model, (4, 4))
    assert plan is not None and plan.num_tiles == 4 and plan.blend == (8, 8)
    expected = decode_video(model, z, reference=ref, tiles=plan)
    torch.testing.assert_close(decode_with_reference(model, z, ref, normalized=False), expected, atol=0, rtol=0)
    model.vae.disable_tiling()
    assert vae_tiles(model.vae, model, (4, 4)) is None


@pytest.fixture(scope="module")
def pipeline() -> object:
    return tiny_pipelines.wan21_i2v()


def test_context_manager_decodes_like_the_manual_path(pipeline: object) -> None:
    from diffusers import AutoencoderKLWan

    model, image = refdecoder.wrap(pipeline.vae, "tiny").eval(), tiny_pipelines.image()
    for part in (model.tokenizer, model.transformer, model.projectors):
        randomize_(part, scale=0.1)
    try:
        latents = tiny_pipelines.call(pipeline, "latent", image)
        manual = decode_with_reference(pipeline, latents, image, normalized=True, model=model)
        manual = pipeline.video_processor.postprocess_video(manual, output_type="pt")
        vae = pipeline.vae
        with reference_decoding(pipeline, model) as stand_in:
            assert pipeline.vae is stand_in and stand_in.vae is vae and type(vae) is AutoencoderKLWan
            assert (stand_in.config, stand_in.dtype) == (vae.config, vae.dtype)  # the VAE's, as the pipeline reads
            inside = tiny_pipelines.call(pipeline, "pt", image)
        plain = tiny_pipelines.call(pipeline, "pt", image)
    finally:
        model.unwrap()
    torch.testing.assert_close(inside, manual, atol=1e-5, rtol=0)
    assert (inside - plain).abs().max() > 0.05  # the reference did change the frames
    assert pipeline.vae is vae and "decode" not in vars(pipeline.vae)
    assert "preprocess" not in vars(pipeline.video_processor)


def test_context_manager_restores_on_errors(pipeline: object) -> None:
    model = refdecoder.wrap(pipeline.vae, "tiny").eval()
    try:
        with pytest.raises(RuntimeError, match="boom"), reference_decoding(pipeline, model):
            raise RuntimeError("boom")
        with reference_decoding(pipeline, model), pytest.raises(InputError, match="already replaced"):
            with reference_decoding(pipeline, model):
                pass
        assert "decode" not in vars(pipeline.vae)
        with pytest.raises(InputError, match="different VAE"), reference_decoding(pipeline, _model()):
            pass
    finally:
        model.unwrap()


class _Stop(RuntimeError):
    pass


def _raise_on_step(pipe, step, timestep, kwargs):
    raise _Stop("a call that fails half way")


# (builder, output size): Wan2.2's 16x latents must stay even for its transformer's 2x2 patches.
WAN_PIPELINES = {
    "wan2.1-i2v": (tiny_pipelines.wan21_i2v, (32, 48)),
    "wan2.2-ti2v": (tiny_pipelines.wan22_ti2v, (32, 64)),
    "skyreels-v2-i2v": (tiny_pipelines.skyreels_i2v, (32, 48)),
}


@pytest.fixture(scope="module", params=sorted(WAN_PIPELINES))
def wan_pipeline(request) -> tuple[object, tuple[int, int]]:
    build, size = WAN_PIPELINES[request.param]
    return build(), size


def test_frames_at_init_equal_the_stock_pipeline(wan_pipeline) -> None:
    pipe, size = wan_pipeline
    image = tiny_pipelines.image(size=size)
    stock = tiny_pipelines.call(pipe, "pt", image, size)
    with tiny_pipelines.wrapped(pipe) as model, reference_decoding(pipe, model):
        inside = tiny_pipelines.call(pipe, "pt", image, size)
    assert inside.shape == stock.shape == (1, 9, 3, *size)
    assert (inside - stock).abs().max() <= 1e-5


def test_trained_weights_decode_with_the_conditioning_image(wan_pipeline) -> None:
    """Same generation (same latents), two references: the frames follow the reference once weights move."""
    pipe, size = wan_pipeline
    image, other = tiny_pipelines.image(0, size), tiny_pipelines.image(7, size)
    with tiny_pipelines.wrapped(pipe, perturb=True) as model:
        latents = tiny_pipelines.call(pipe, "latent", image, size)
        manual = decode_with_reference(pipe, latents, image, model=model)
        with reference_decoding(pipe, model):
            own = tiny_pipelines.call(pipe, "pt", image, size)
        with reference_decoding(pipe, model, image=other):
            swapped = tiny_pipelines.call(pipe, "pt", image, size)
    manual = pipe.video_processor.postprocess_video(manual, output_type="pt")
    torch.testing.assert_close(own, manual, atol=1e-5, rtol=0)
    assert (own - swapped).abs().max() > 0.05


def test_each_call_decodes_with_its_own_image(wan_pipeline) -> None:
    """A call that returns latents or fails leaves no image behind for the next call of the block."""
    pipe, size = wan_pipeline
    first, second = tiny_pipelines.image(0, size), tiny_pipelines.image(7, size)
    with tiny_pipelines.wrapped(pipe, perturb=True) as model:
        latents = tiny_pipelines.call(pipe, "latent", second, size)
        by_hand = {
            name: pipe.video_processor.postprocess_video(decode_with_reference(pipe, latents, ref, model=model), "pt")
            for name, ref in (("second", second), ("first", first))
        }
        with reference_decoding(pipe, model):
            tiny_pipelines.call(pipe, "latent", first, size)
            after_latent = tiny_pipelines.call(pipe, "pt", second, size)
            with pytest.raises(_Stop):
                tiny_pipelines.call(pipe, "pt", first, size, callback_on_step_end=_raise_on_step)
            after_failure = tiny_pipelines.call(pipe, "pt", second, size)
    for out in (after_latent, after_failure):
        torch.testing.assert_close(out, by_hand["second"], atol=1e-5, rtol=0)
        assert (out - by_hand["first"]).abs().max() > 0.05


def test_a_call_that_fails_before_encoding_leaves_no_image(wan_pipeline) -> None:
    """Wan checks its generators after preprocessing the image and before encoding it: that image is not reused."""
    pipe, size = wan_pipeline
    first, second = tiny_pipelines.image(0, size), tiny_pipelines.image(7, size)
    with tiny_pipelines.wrapped(pipe, perturb=True) as model:
        latents = tiny_pipelines.call(pipe, "latent", second, size)
        by_hand = pipe.video_processor.postprocess_video(
            decode_with_reference(pipe, latents, second, model=model), "pt"
        )
        with reference_decoding(pipe, model):
            two_generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
            with pytest.raises(ValueError, match="list of generators"):
                tiny_pipelines.call(pipe, "pt", first, size, generator=two_generators)
            after = tiny_pipelines.call(pipe, "pt", second, size)
    torch.testing.assert_close(after, by_hand, atol=1e-5, rtol=0)


def test_the_pipeline_is_restored_exactly(pipeline: object) -> None:
    """Nothing about the pipeline changes but pipe.vae and its pixel processor, and those only for the block."""
    before = (type(pipeline), pipeline.vae, pipeline.video_processor, dict(pipeline.config), dict(vars(pipeline)))
    with tiny_pipelines.wrapped(pipeline) as model:
        with reference_decoding(pipeline, model):
            assert type(pipeline) is before[0] and "__call__" not in vars(pipeline)
            assert pipeline.vae is not before[1] and pipeline.video_processor is not before[2]
        with pytest.raises(RuntimeError, match="boom"), reference_decoding(pipeline, model):
            raise RuntimeError("boom")
    assert (type(pipeline), pipeline.vae, pipeline.video_processor) == before[:3]
    assert dict(pipeline.config) == before[3] and dict(vars(pipeline)) == before[4]
    assert vars(pipeline.vae).keys() == vars(before[1]).keys()


def test_model_cpu_offload_is_refused_in_one_line(pipeline: object) -> None:
    """enable_model_cpu_offload() needs an accelerator; diffusers records its hooks in pipe._all_hooks."""
    with tiny_pipelines.wrapped(pipeline) as model:
        pipeline._all_hooks = [object()]
        try:
            with pytest.raises(InputError, match="enable_model_cpu_offload") as err:
                with reference_decoding(pipeline, model):
                    pass
        finally:
            del pipeline._all_hooks
    assert "\n" not in str(err.value) and pipeline.vae is model.vae


def test_pipelines_it_cannot_serve_are_refused_by_name(pipeline: object) -> None:
    class NoProcessor:
        vae = pipeline.vae

    with tiny_pipelines.wrapped(pipeline) as model:
        with pytest.raises(InputError, match="object has no .vae"), reference_decoding(object(), model):
            pass
        with pytest.raises(InputError, match="NoProcessor has no video_processor or image_processor"):
            with reference_decoding(NoProcessor(), model):
                pass


def test_tiling_errors_name_the_vae_settings(pipeline: object) -> None:
    pipeline.vae.enable_tiling(16, 16, 8, 8)
    try:
        with tiny_pipelines.wrapped(pipeline) as model, reference_decoding(pipeline, model):
            with pytest.raises(ConfigError) as err:
                tiny_pipelines.call(pipeline, "pt", tiny_pipelines.image())
    finally:
        pipeline.vae.disable_tiling()
    message = str(err.value)
    assert "vae.enable_tiling(tile_sample_min_height=16" in message and "multiple of 16 pixels" in message
    assert "--" not in message


def _recipe(monkeypatch: pytest.MonkeyPatch) -> object:
    """recipes/ is not a package: load the script as a module (registered, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location("paired_generation", ROOT / "recipes" / "paired_generation.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_paired_generation_recipe(pipeline: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    monkeypatch.setattr(wan_i2v, "prompt_clean", lambda text: text.strip())  # needs ftfy otherwise
    recipe = _recipe(monkeypatch)
    image_path = tmp_path / "cat.png"
    tiny_pipelines.image(3).save(image_path)
    (tmp_path / "prompts.csv").write_text("image,prompt\ncat.png,a cat on the mat\n")
    jobs = recipe.read_jobs(tmp_path / "prompts.csv", seeds=[5, 6])
    paths = recipe.generate_latents(
        pipeline, jobs, tmp_path / "gen", num_frames=5, steps=2, size=(32, 48), max_sequence_length=8
    )
    assert [p.name for p in paths] == ["cat_s5.safetensors", "cat_s6.safetensors"]
    latents, meta = load_latents(paths[0])
    assert (meta["seed"], meta["prompt"], meta["normalized"], latents.shape) == (
        "5",
        "a cat on the mat",
        "true",
        (4, 2, 4, 6),
    )
    assert not torch.equal(latents, load_latents(paths[1])[0])  # the seeds differ
    assert read_image(tmp_path / "gen" / "images" / "cat_s5.png").shape == (3, 1, 32, 48)
    manifest = [json.loads(line) for line in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in manifest] == [5, 6]
    # Decode the same latents with the base decoder and RefDecoder (the paired protocol).
    pipeline.vae.save_pretrained(tmp_path / "vae")
    model = refdecoder.wrap(pipeline.vae, "tiny")
    model.save_pretrained(tmp_path / "weights")
    model.unwrap()
    # As the recipe documents it: the images sit beside the latents folder, so --reference-dir names them (a
    # latents file's own '../images/...' metadata may not lead out of its folder).
    args = ["decode-latents", str(tmp_path / "gen" / "latents"), "--out", str(tmp_path / "videos"), "--no-progress"]
    args += ["--reference-dir", str(tmp_path / "gen" / "images")]
    args += ["--vae", str(tmp_path / "vae"), "--weights", str(tmp_path / "weights"), "--compare-base"]
    assert main(args) == 0
    assert {p.name for p in (tmp_path / "videos").glob("cat_s5.*")} == {
        "cat_s5.mp4",
        "cat_s5.base.mp4",
        "cat_s5.compare.mp4",
        "cat_s5.grid.png",
    }
