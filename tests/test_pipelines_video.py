"""reference_decoding on the LTX-Video and CogVideoX image-to-video pipelines, built tiny from configs (no downloads).

Prompt embeddings are passed in directly, so the pipelines get no T5 text encoder (only the prompt -> embedding
step is skipped). HunyuanVideo 1.5's image-to-video pipeline is not covered here: it needs a Qwen2.5-VL text
encoder, a ByT5 glyph encoder and a SigLIP image encoder.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from refdecoder.backbones.registry import get_backbone
from refdecoder.pipelines import reference_decoding
from tests import tiny_pipelines

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_DIM = 16


def ltx_i2v() -> Any:
    """``LTXImageToVideoPipeline`` with the tiny timestep-conditioned LTX VAE (8 latent channels, 16x spatial)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    vae = get_backbone("ltx-video").build_tiny().eval()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=TEXT_DIM,
    ).eval()  # fmt: skip
    return LTXImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )


def cogvideox_i2v() -> Any:
    """``CogVideoXImageToVideoPipeline`` with the tiny CogVideoX VAE (4 latent channels, 8x spatial)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    vae = get_backbone("cogvideox").build_tiny().eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=2,
        text_embed_dim=TEXT_DIM, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    ).eval()  # fmt: skip
    return CogVideoXImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=CogVideoXDDIMScheduler()
    )


# (builder, output size, call arguments)
PIPELINES = {
    "ltx-i2v": (ltx_i2v, (32, 32), dict(decode_timestep=0.05, decode_noise_scale=0.0)),
    "cogvideox-i2v": (cogvideox_i2v, (16, 16), {}),
}


def _call(pipe: Any, image: Any, size: tuple[int, int], extra: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 8, TEXT_DIM, generator=g), torch.randn(1, 8, TEXT_DIM, generator=g)
    kwargs = dict(
        image=image, height=size[0], width=size[1], num_frames=9, num_inference_steps=2, output_type="pt",
        generator=torch.Generator().manual_seed(0), prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
        max_sequence_length=8, **extra,
    )  # fmt: skip
    if "LTX" in type(pipe).__name__:
        mask = torch.ones(1, 8, dtype=torch.long)
        kwargs.update(prompt_attention_mask=mask, negative_prompt_attention_mask=mask)
    return pipe(**kwargs).frames


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def video_pipeline(request) -> tuple[Any, tuple[int, int], dict[str, Any]]:
    build, size, extra = PIPELINES[request.param]
    return build(), size, extra


def test_frames_at_init_equal_the_stock_pipeline(video_pipeline) -> None:
    pipe, size, extra = video_pipeline
    image = tiny_pipelines.image(size=size)
    stock = _call(pipe, image, size, extra)
    with tiny_pipelines.wrapped(pipe) as model, reference_decoding(pipe, model):
        inside = _call(pipe, image, size, extra)
    assert inside.shape == stock.shape == (1, 9, 3, *size)
    assert (inside - stock).abs().max() <= 1e-5


def test_trained_weights_decode_with_the_conditioning_image(video_pipeline) -> None:
    """Same generation, two references: once the added weights move, the frames follow the reference."""
    pipe, size, extra = video_pipeline
    image, other = tiny_pipelines.image(0, size), tiny_pipelines.image(7, size)
    with tiny_pipelines.wrapped(pipe, perturb=True) as model:
        with reference_decoding(pipe, model):
            own = _call(pipe, image, size, extra)
        with reference_decoding(pipe, model, image=other):
            swapped = _call(pipe, image, size, extra)
        with reference_decoding(pipe, model, image=image):
            fixed = _call(pipe, image, size, extra)
    torch.testing.assert_close(own, fixed, atol=1e-6, rtol=0)  # the call's own image is the one it was given
    assert (own - swapped).abs().max() > 0.02
