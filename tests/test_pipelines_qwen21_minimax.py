"""``reference_decoding`` on ``QwenImage21Pipeline`` (RGBA image conditioning) and on the MiniMax-H3 modular
pipeline's video decode step, with tiny random components: identity at init, dependence on the image once the added
weights move.

The Qwen-Image 2.1 text encoder is a Qwen3-VL model whose processor needs tokenizer files (none offline): the
pipeline gets a stand-in processor for its constructor and fixed prompt embeddings (with the image-slot mask the
vision-language encoder would return) in place of ``encode_prompt``. Everything the VAE sees is the pipeline's own.
A whole MiniMax-H3 modular pipeline needs its text and audio models; its decode step is the block that calls the
VAE, and is built here as a modular pipeline of its own.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch

import refdecoder
from refdecoder.backbones.registry import get_backbone
from refdecoder.pipelines import reference_decoding
from refdecoder.testing import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_DIM = 16


class _Processor:
    """Stands in ``Qwen3VLProcessor`` for ``QwenImage21Pipeline.__init__`` (its system-prompt length, image token)."""

    tokenizer = types.SimpleNamespace(encode=lambda text: [7])

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> list[list[int]]:
        return [[0, 1, 2]]


@pytest.fixture(scope="module")
def qwen21() -> Any:
    import diffusers

    torch.manual_seed(0)
    vae = (
        get_backbone("qwen-image-2.1")
        .build_tiny(dim_mult=[1, 1, 1, 1, 1], temperal_downsample=[False, True, True, True], scale_factor_spatial=16)
        .eval()
    )  # 16x, as the pipeline's vae_scale_factor
    z = vae.config.z_dim
    transformer = diffusers.QwenImage21Transformer2DModel(
        in_channels=z, out_channels=z, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        context_in_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    pipe = diffusers.QwenImage21Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, processor=_Processor(),
        transformer=transformer,
    )  # fmt: skip
    embeds = torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    image_slots = torch.zeros(1, 8, dtype=torch.bool)
    image_slots[0, 2] = True  # one slot: the 32x32 condition image is 2x2 latents, one 2x2 group
    pipe.encode_prompt = lambda **kwargs: (embeds, None, image_slots)
    return pipe


def _rgba(seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 4)) * 255).astype("uint8"), "RGBA")


def _generate(pipe: Any, image: Any) -> torch.Tensor:
    return pipe(
        image=[image], prompt_embeds=torch.zeros(1, 8, TEXT_DIM), height=32, width=32, num_inference_steps=2,
        output_type="pt", output_resolution=32, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def _wrapped(vae: torch.nn.Module, perturb: bool = False) -> refdecoder.RefDecoder:
    model = refdecoder.wrap(vae, "tiny")
    if perturb:
        randomize_([p for _, p in model.added_parameters()], scale=0.1)
    return model


def test_qwen21_images_at_init_equal_the_stock_pipeline(qwen21) -> None:
    stock = _generate(qwen21, _rgba(0))
    model = _wrapped(qwen21.vae)
    try:
        with reference_decoding(qwen21, model):
            inside = _generate(qwen21, _rgba(0))
    finally:
        model.unwrap()
    assert inside.shape == stock.shape == (1, 4, 32, 32)  # RGBA images, alpha included
    assert (inside - stock).abs().max() <= 1e-5


def test_qwen21_trained_weights_decode_with_the_condition_image(qwen21) -> None:
    model = _wrapped(qwen21.vae, perturb=True)
    try:
        with reference_decoding(qwen21, model):
            own = _generate(qwen21, _rgba(0))
        with reference_decoding(qwen21, model, image=_rgba(7)):  # same generation, another (RGBA) reference
            swapped = _generate(qwen21, _rgba(0))
    finally:
        model.unwrap()
    assert (own - swapped).abs().max() > 0.05


@pytest.fixture(scope="module")
def minimax_decode() -> Any:
    from diffusers.modular_pipelines.minimax_h3.decoders import MiniMaxH3VideoDecodeStep

    torch.manual_seed(0)
    pipe = MiniMaxH3VideoDecodeStep().init_pipeline()
    pipe.update_components(vae=get_backbone("minimax-h3").build_tiny().eval())
    return pipe


@pytest.mark.parametrize("latent_frames", [7, 12])
def test_minimax_decode_step_at_init_equals_the_stock_step(minimax_decode, latent_frames) -> None:
    z = torch.randn(1, 4, latent_frames, 8, 8, generator=torch.Generator().manual_seed(latent_frames))
    stock = minimax_decode(latents=z, output_type="pt").get("videos")
    reference = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    model = _wrapped(minimax_decode.vae)
    try:
        with reference_decoding(minimax_decode, model, image=reference):
            inside = minimax_decode(latents=z, output_type="pt").get("videos")
    finally:
        model.unwrap()
    assert inside.shape == stock.shape == (1, 5 + 17 * (latent_frames - 2) // 5, 3, 32, 32)
    assert (inside - stock).abs().max() <= 1e-5  # the stand-in hands the step ImageNet-space pixels, as vae.decode


def test_minimax_decode_step_with_trained_weights_depends_on_the_image(minimax_decode) -> None:
    z = torch.randn(1, 4, 7, 8, 8, generator=torch.Generator().manual_seed(0))
    images = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (3, 4)]
    model = _wrapped(minimax_decode.vae, perturb=True)
    try:
        outs = []
        for image in images:
            with reference_decoding(minimax_decode, model, image=image):
                outs.append(minimax_decode(latents=z, output_type="pt").get("videos"))
    finally:
        model.unwrap()
    assert (outs[0] - outs[1]).abs().max() > 0.01
