"""Tiny diffusers pipelines built from configs only (no downloads), and calls with fixed seeds.

Prompt embeddings are passed in directly: text encoders only turn prompts into those, and the Wan prompt cleaning
needs ``ftfy``, which is not a dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import refdecoder
from refdecoder.backbones.wan import QwenImageAdapter, Wan22Adapter
from tests.helpers import randomize_, tiny_wan

TEXT_DIM = 16


def _text_parts() -> dict[str, Any]:
    """UMT5 with a word-level tokenizer (what the Wan and SkyReels pipelines take)."""
    transformers = pytest.importorskip("transformers", reason="the pipelines need transformers (extra dev)")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a cat on the mat".split())}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    text = transformers.UMT5Config(
        vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8,
    )  # fmt: skip
    return {"tokenizer": tokenizer, "text_encoder": transformers.UMT5EncoderModel(text).eval()}


def _clip_parts(with_projection: bool = False) -> dict[str, Any]:
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    encoder = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    return {
        "image_processor": transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
        "image_encoder": encoder(vision).eval(),
    }


def _wan_transformer(cls: type, in_channels: int, out_channels: int, image_dim: int | None) -> torch.nn.Module:
    return cls(
        num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=out_channels,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=1, image_dim=image_dim, rope_max_seq_len=32,
    ).eval()  # fmt: skip


def wan21_i2v() -> Any:
    """``WanImageToVideoPipeline`` with Wan2.1 components: UMT5, CLIP image embeddings, 4-channel tiny VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    parts = {**_text_parts(), **_clip_parts()}
    # noisy latents + 4 mask channels + image-condition latents (z_dim 4)
    transformer = _wan_transformer(WanTransformer3DModel, 4 + 4 + 4, 4, image_dim=16)
    return WanImageToVideoPipeline(
        vae=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, **parts
    )


def wan22_ti2v() -> Any:
    """``WanImageToVideoPipeline`` as Wan2.2 TI2V-5B is built: Wan2.2 VAE, ``expand_timesteps``, no image encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = Wan22Adapter.build_tiny().eval()
    z = vae.config.z_dim
    transformer = _wan_transformer(WanTransformer3DModel, z, z, image_dim=None)
    return WanImageToVideoPipeline(
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, expand_timesteps=True,
        **_text_parts(),
    )  # fmt: skip


def skyreels_i2v() -> Any:
    """``SkyReelsV2ImageToVideoPipeline``: the Wan2.1 VAE under another video model."""
    from diffusers import SkyReelsV2ImageToVideoPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    torch.manual_seed(0)
    transformer = _wan_transformer(SkyReelsV2Transformer3DModel, 4 + 4 + 4, 4, image_dim=16)
    scheduler = UniPCMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    return SkyReelsV2ImageToVideoPipeline(
        vae=tiny_wan(), scheduler=scheduler, transformer=transformer, **_text_parts(), **_clip_parts(True)
    )


def qwen(kind: str) -> Any:
    """Qwen-Image ``edit`` or ``img2img`` pipeline: tiny Qwen-Image VAE and transformer, no text encoder."""
    import diffusers

    torch.manual_seed(0)
    vae = QwenImageAdapter.build_tiny().eval()
    z = vae.config.z_dim
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    parts = dict(vae=vae, transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    if kind == "edit":
        return diffusers.QwenImageEditPipeline(text_encoder=None, tokenizer=None, processor=None, **parts)
    return diffusers.QwenImageImg2ImgPipeline(text_encoder=None, tokenizer=None, **parts)


def image(seed: int = 0, size: tuple[int, int] = (32, 48)) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def call(pipe: Any, output_type: str, conditioning: Any, size: tuple[int, int] = (32, 48), **kwargs: Any) -> Any:
    """One generation (2 steps, fixed seeds); returns the pipeline's frames or images."""
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 8, TEXT_DIM, generator=g), torch.randn(1, 8, TEXT_DIM, generator=g)
    common = dict(
        image=conditioning, height=size[0], width=size[1], num_inference_steps=2, output_type=output_type,
        prompt_embeds=embeds[0], **{"generator": torch.Generator().manual_seed(0), **kwargs},
    )  # fmt: skip
    if "Qwen" in type(pipe).__name__:
        mask = torch.ones(1, 8, dtype=torch.long)
        return pipe(prompt_embeds_mask=mask, max_sequence_length=8, **common).images
    out = pipe(negative_prompt_embeds=embeds[1], num_frames=9, max_sequence_length=8, **common)
    return out.frames


@contextlib.contextmanager
def wrapped(pipe: Any, perturb: bool = False) -> Iterator[torch.nn.Module]:
    """``pipe.vae`` wrapped with the tiny preset (added weights moved off the identity when ``perturb``), unwrapped
    again afterwards so the module-scoped pipelines stay plain."""
    model = refdecoder.wrap(pipe.vae, "tiny")
    if perturb:
        for part in (model.tokenizer, model.transformer, model.projectors):
            randomize_(part, scale=0.1)
    try:
        yield model
    finally:
        model.unwrap()
