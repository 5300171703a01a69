"""Generation decode: decode_with_reference, the WanImageToVideoPipeline context manager, the paired recipe."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import refdecoder
from refdecoder.cli import main
from refdecoder.data import load_latents, read_image
from refdecoder.errors import InputError
from refdecoder.inference import decode_video
from refdecoder.pipelines import decode_with_reference, reference_decoding, vae_tiles
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
    """A WanImageToVideoPipeline built from tiny configs only (no downloads): UMT5 + word-level tokenizer, CLIP."""
    transformers = pytest.importorskip("transformers", reason="the Wan pipeline needs transformers (extra dev)")
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a cat on the mat".split())}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    text = transformers.UMT5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    transformer = WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4 + 4 + 4,  # noisy latents + 4 mask channels + image-condition latents (z_dim 4)
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        image_dim=16,
        rope_max_seq_len=32,
    )
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=transformers.UMT5EncoderModel(text).eval(),
        vae=tiny_wan(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
        image_encoder=transformers.CLIPVisionModel(vision).eval(),
        transformer=transformer.eval(),
    )


def _image(seed: int = 0) -> object:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 48, 3)) * 255).astype("uint8"))


def _call(pipe: object, output_type: str, image: object) -> torch.Tensor:
    # Embeddings are passed in directly: the pipeline's prompt cleaning needs `ftfy`, which is not a dependency.
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    return pipe(
        image=image,
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        height=32,
        width=48,
        num_frames=9,
        num_inference_steps=2,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    ).frames


def test_context_manager_decodes_like_the_manual_path(pipeline: object) -> None:
    from diffusers import AutoencoderKLWan

    model, image = refdecoder.wrap(pipeline.vae, "tiny").eval(), _image()
    for part in (model.tokenizer, model.transformer, model.projectors):
        randomize_(part, scale=0.1)
    try:
        latents = _call(pipeline, "latent", image)
        manual = decode_with_reference(pipeline, latents, image, normalized=True, model=model)
        manual = pipeline.video_processor.postprocess_video(manual, output_type="pt")
        with reference_decoding(pipeline, model):
            assert type(pipeline.vae) is AutoencoderKLWan  # pipe.vae is never replaced
            inside = _call(pipeline, "pt", image)
        plain = _call(pipeline, "pt", image)
    finally:
        model.unwrap()
    torch.testing.assert_close(inside, manual, atol=1e-5, rtol=0)
    assert (inside - plain).abs().max() > 0.05  # the reference did change the frames
    assert "decode" not in vars(pipeline.vae) and "preprocess" not in vars(pipeline.video_processor)


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
    _image(3).save(image_path)
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
    args = ["decode-latents", str(tmp_path / "gen" / "latents"), "--out", str(tmp_path / "videos"), "--no-progress"]
    args += ["--vae", str(tmp_path / "vae"), "--weights", str(tmp_path / "weights"), "--compare-base"]
    assert main(args) == 0
    assert {p.name for p in (tmp_path / "videos").glob("cat_s5.*")} == {
        "cat_s5.mp4",
        "cat_s5.base.mp4",
        "cat_s5.compare.mp4",
        "cat_s5.grid.png",
    }
