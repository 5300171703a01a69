"""reference_decoding on the HunyuanVideo 1.5, LTX-Video and CogVideoX image-to-video pipelines, built tiny from
configs (no downloads).

Prompt embeddings are passed in directly, so the pipelines get no text encoders (T5 for LTX and CogVideoX;
Qwen2.5-VL and ByT5 for HunyuanVideo 1.5): only the prompt -> embedding step is skipped. HunyuanVideo 1.5's SigLIP
image encoder is built tiny, since the pipeline always embeds the conditioning image.
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


def hunyuan_video15_i2v() -> Any:
    """``HunyuanVideo15ImageToVideoPipeline`` with the tiny HunyuanVideo 1.5 VAE (4 latent channels, 16x spatial)."""
    import transformers
    from diffusers import (
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Transformer3DModel,
    )

    torch.manual_seed(0)
    vae = get_backbone("hunyuan-video-1.5").build_tiny().eval()
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_refiner_layers=1, text_embed_dim=TEXT_DIM, text_embed_2_dim=8, image_embed_dim=16, rope_axes_dim=(4, 6, 6),
        target_size=32,
    ).eval()  # fmt: skip
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    return HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(), guider=ClassifierFreeGuidance(guidance_scale=3.0),
        image_encoder=transformers.SiglipVisionModel(vision).eval(),
        feature_extractor=transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
    )  # fmt: skip


def hunyuan_skyreels_i2v() -> Any:
    """``HunyuanSkyreelsImageToVideoPipeline`` with the tiny HunyuanVideo (v1) VAE (4 latent channels, 8x spatial)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanSkyreelsImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    vae = get_backbone("hunyuan-video").build_tiny().eval()
    transformer = _hunyuan_video_transformer(HunyuanVideoTransformer3DModel, 2 * 4)  # latents + image latents
    return HunyuanSkyreelsImageToVideoPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip


def _hunyuan_video_transformer(cls: type, in_channels: int, **extra: Any) -> torch.nn.Module:
    return cls(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
        rope_axes_dim=(4, 4, 4), **extra,
    ).eval()  # fmt: skip


def hunyuan_video_i2v(condition: str) -> Any:
    """``HunyuanVideoImageToVideoPipeline`` (the image as concatenated latents, or replacing frame 0's tokens)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    vae = get_backbone("hunyuan-video").build_tiny().eval()
    channels = 2 * 4 + 1 if condition == "latent_concat" else 4
    transformer = _hunyuan_video_transformer(HunyuanVideoTransformer3DModel, channels, image_condition_type=condition)
    return HunyuanVideoImageToVideoPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, image_processor=None, vae=vae,
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip


def hunyuan_video_framepack() -> Any:
    """``HunyuanVideoFramepackPipeline``: the video is decoded section by section (several ``vae.decode`` calls)."""
    import transformers
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoFramepackPipeline,
        HunyuanVideoFramepackTransformer3DModel,
    )

    torch.manual_seed(0)
    vae = get_backbone("hunyuan-video").build_tiny().eval()
    transformer = _hunyuan_video_transformer(
        HunyuanVideoFramepackTransformer3DModel, 4, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    return HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=transformers.SiglipVisionModel(vision).eval(),
        feature_extractor=transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
    )  # fmt: skip


def kandinsky5_i2v() -> Any:
    """``Kandinsky5I2VPipeline`` on the tiny HunyuanVideo (v1) VAE (the image as a visual condition on frame 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5I2VPipeline, Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    vae = get_backbone("hunyuan-video").build_tiny().eval()
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=8, time_dim=16, model_dim=32, ff_dim=64,
        num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=True,
    ).eval()  # fmt: skip
    return Kandinsky5I2VPipeline(
        transformer=transformer, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip


def stable_video_diffusion() -> Any:
    """``StableVideoDiffusionPipeline``: ``vae.decode`` on ``decode_chunk_size`` frames folded into the batch."""
    import transformers
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    # Two Euler steps leave latents of std ~160; this scaling_factor brings the decoder's input to O(1), where the
    # reference branch's perturbed weights are not drowned by it.
    vae = get_backbone("stable-video-diffusion").build_tiny(scaling_factor=200.0).eval()
    unet = UNetSpatioTemporalConditionModel(
        sample_size=4, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, cross_attention_dim=16, num_attention_heads=(2, 2), num_frames=5,
    ).eval()  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
        projection_dim=16,
    )  # fmt: skip  (the pipeline resizes the image to 224 for CLIP)
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=transformers.CLIPVisionModelWithProjection(vision).eval(), unet=unet,
        scheduler=EulerDiscreteScheduler(), feature_extractor=transformers.CLIPImageProcessor(),
    )  # fmt: skip


# Frames each pipeline returns for its call below (9 unless listed).
FRAMES = {"HunyuanVideoFramepackPipeline": 17, "Kandinsky5I2VPipeline": 21, "StableVideoDiffusionPipeline": 5}

# (builder, output size, call arguments)
PIPELINES = {
    # 5 frames decoded 2 + 2 + 1 (decode_chunk_size 2)
    "svd": (stable_video_diffusion, (32, 32), dict(num_frames=5, decode_chunk_size=2)),
    # 21 frames (6 latent): its first-frame normalisation needs > 4 latent frames; decoded in frame-wise groups
    "kandinsky5-i2v": (kandinsky5_i2v, (32, 32), dict(num_frames=21, guidance_scale=1.0)),
    "hunyuan-framepack": (hunyuan_video_framepack, (32, 32), dict(latent_window_size=2)),
    # latent_concat drops the 4 frames its extra image latent decodes to: 13 asked, 9 returned
    "hunyuan-i2v-concat": (lambda: hunyuan_video_i2v("latent_concat"), (32, 32), dict(num_frames=13)),
    "hunyuan-i2v-token-replace": (lambda: hunyuan_video_i2v("token_replace"), (32, 32), {}),
    "hunyuan-skyreels-i2v": (hunyuan_skyreels_i2v, (32, 32), dict(true_cfg_scale=2.0)),
    "hunyuan-video-1.5-i2v": (hunyuan_video15_i2v, (32, 32), {}),
    "ltx-i2v": (ltx_i2v, (32, 32), dict(decode_timestep=0.05, decode_noise_scale=0.0)),
    "cogvideox-i2v": (cogvideox_i2v, (16, 16), {}),
}


def _call(pipe: Any, image: Any, size: tuple[int, int], extra: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    embeds = [torch.randn(1, 8, TEXT_DIM, generator=g) for _ in range(2)]
    mask = torch.ones(1, 8, dtype=torch.long)
    kwargs = dict(
        image=image, num_frames=9, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
        prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
    )  # fmt: skip
    kwargs.update(extra)
    name = type(pipe).__name__
    if name == "StableVideoDiffusionPipeline":  # the image is its only condition: no prompt
        del kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]
        return pipe(**kwargs, height=size[0], width=size[1]).frames
    if name == "Kandinsky5I2VPipeline":  # Qwen and CLIP embeddings, no guidance (no negative prompt encoded)
        del kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]
        kwargs.update(prompt_embeds_qwen=embeds[0], prompt_embeds_clip=torch.randn(1, 8, generator=g))
        kwargs.update(prompt_cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), height=size[0], width=size[1])
        return pipe(**kwargs).frames
    if name.startswith(("HunyuanVideoImage", "HunyuanVideoFramepack")):  # no negative prompt: guidance is embedded
        del kwargs["negative_prompt_embeds"]
        kwargs.update(pooled_prompt_embeds=torch.randn(1, 8, generator=g), prompt_attention_mask=mask)
        return pipe(**kwargs, height=size[0], width=size[1]).frames
    if "Skyreels" in name:  # a pooled (CLIP) embedding beside the Llama one
        pooled = [torch.randn(1, 8, generator=g) for _ in range(2)]
        kwargs.update(prompt_attention_mask=mask, negative_prompt_attention_mask=mask, pooled_prompt_embeds=pooled[0])
        kwargs.update(negative_pooled_prompt_embeds=pooled[1], height=size[0], width=size[1])
        return pipe(**kwargs).frames
    if "Hunyuan" in name:  # sized by the pipeline from the image; a second (glyph) text embedding
        second = [torch.randn(1, 4, 8, generator=g) for _ in range(2)]
        mask_2 = torch.ones(1, 4, dtype=torch.long)
        kwargs.update(prompt_embeds_mask=mask, negative_prompt_embeds_mask=mask, prompt_embeds_2=second[0])
        kwargs.update(
            negative_prompt_embeds_2=second[1], prompt_embeds_mask_2=mask_2, negative_prompt_embeds_mask_2=mask_2
        )
        return pipe(**kwargs).frames
    kwargs.update(height=size[0], width=size[1], max_sequence_length=8)
    if "LTX" in name:
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
    assert inside.shape == stock.shape and stock.shape[0] == 1 and stock.shape[2:] == (3, *size)
    assert stock.shape[1] == FRAMES.get(type(pipe).__name__, 9)
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


def test_framepack_sections_share_the_calls_image_and_the_next_decode_needs_its_own() -> None:
    from refdecoder.errors import InputError

    pipe, image = hunyuan_video_framepack(), tiny_pipelines.image(size=(32, 32))
    with tiny_pipelines.wrapped(pipe) as model, reference_decoding(pipe, model) as stand_in:
        _call(pipe, image, (32, 32), dict(latent_window_size=2))  # decodes two sections with the call's image
        assert "maybe_free_model_hooks" in vars(pipe)
        with pytest.raises(InputError, match="decoded without preprocessing a conditioning image"):
            stand_in.decode(torch.zeros(1, 4, 2, 4, 4))  # the call ended: its image is not reused
    assert "maybe_free_model_hooks" not in vars(pipe)


def test_folded_chunks_that_mix_videos_are_refused_in_one_line() -> None:
    from refdecoder.errors import InputError

    pipe, image = stable_video_diffusion(), tiny_pipelines.image(size=(32, 32))
    with tiny_pipelines.wrapped(pipe) as model, reference_decoding(pipe, model, image=image) as stand_in:
        with pytest.raises(InputError, match=r"^vae.decode got 5 folded latent frames with num_frames=2 .*chunk"):
            stand_in.decode(torch.zeros(5, 4, 4, 4), num_frames=2)
        assert stand_in.decode(torch.zeros(4, 4, 4, 4), num_frames=2).sample.shape == (4, 3, 32, 32)  # two videos


def test_vae_tiling_is_refused_by_name_for_adapters_without_a_tiled_decode() -> None:
    from refdecoder.errors import ConfigError

    pipe = cogvideox_i2v()
    pipe.vae.enable_tiling()
    try:
        with tiny_pipelines.wrapped(pipe) as model:
            with reference_decoding(pipe, model):
                # Within one tile diffusers decodes the frame whole, and so does RefDecoder: no refusal.
                _call(pipe, tiny_pipelines.image(size=(16, 16)), (16, 16), {})
            pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
            z = torch.zeros(1, model.adapter.latent_channels, 1, 4, 4)  # 32x32 pixels: two tiles a side
            with reference_decoding(pipe, model, image=torch.zeros(1, 3, 32, 32)) as stand_in:
                with pytest.raises(
                    ConfigError, match=r"the cogvideox adapter has no tiled decode .* vae.disable_tiling\(\)"
                ):
                    stand_in.decode(z)
    finally:
        pipe.vae.disable_tiling()
