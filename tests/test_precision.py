"""Reduced precision: bf16 and fp16 weights, and bf16 autocast over fp32 weights, against the fp32 decode.

Tolerance: every decoded frame at least ``BF16_DB`` dB PSNR from the fp32 decode in bf16, ``FP16_DB`` in fp16
(videos in [-1, 1]). Measured on these tiny models with random weights, worst frame: bf16 47.1-48.6 dB, fp16
66.5 dB. A dtype mismatch anywhere in the decode raises instead. At this size the check is not sensitive to
each float32 island on its own (norms computed in bf16 cost 0.1 dB here); it pins the whole decode. Every
registered adapter's bf16 decode is also checked by the conformance suite (``refdecoder.testing.check_bf16``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import refdecoder
from refdecoder.backbones.registry import get_backbone
from refdecoder.metrics import psnr
from tests.helpers import randomize_

BF16_DB, FP16_DB = 40.0, 48.0

SCOPES = {
    "global": {},
    "radius 0 + locality bias": {"attention_radius": 0, "locality_bias": True},
    "radius 1 + locality bias": {"attention_radius": 1, "locality_bias": True},
}


def conditioned(**transformer) -> refdecoder.RefDecoder:
    """A tiny model whose added modules (norm scales included) are away from their identity init."""
    torch.manual_seed(0)
    config = refdecoder.preset("tiny")
    for key, value in transformer.items():
        setattr(config.transformer, key, value)
    model = refdecoder.wrap(get_backbone("wan2.1").build_tiny().eval(), config)
    for module in (model.tokenizer, model.transformer, *model.projectors.values()):
        randomize_(module, 0.05)
    return model


def inputs(model: refdecoder.RefDecoder, latent_frames: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, model.adapter.latent_channels, latent_frames, 4, 6, generator=g)
    return z, torch.rand(1, 3, 1, *model.output_size((4, 6)), generator=g) * 2 - 1


def assert_close_in_db(out: torch.Tensor, fp32: torch.Tensor, dtype: torch.dtype, min_db: float) -> None:
    assert out.dtype == dtype
    worst = psnr(out.float(), fp32).min().item()
    assert worst >= min_db, f"a frame is only {worst:.1f} dB from the fp32 decode (need >= {min_db})"


@pytest.mark.parametrize(("channels", "kernel", "stride"), [(8, 8, 1), (12, 8, 1), (16, 4, 4), (24, 4, 4)])
def test_cpu_bf16_convolution_matches_fp32_in_the_test_process(channels, kernel, stride):
    """The shapes oneDNN's AMX bf16 kernels got wrong (tests/conftest.py): correct to bf16 rounding here (0.003
    relative error measured, 1.1-1.3 with the faulty kernels), so the precision checks above measure this project."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, channels, 16, 16, generator=g), torch.randn(64, channels, kernel, kernel, generator=g)
    fp32 = F.conv2d(x, w, stride=stride)
    bf16 = F.conv2d(x.bfloat16(), w.bfloat16(), stride=stride).float()
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.01


@pytest.mark.parametrize("scope", SCOPES)
def test_bf16_weights_decode_fp32_inputs_close_to_fp32(scope):
    model = conditioned(**SCOPES[scope])
    z, ref = inputs(model)
    with torch.no_grad():
        fp32 = model.decode(z, reference=ref)
        model.to(torch.bfloat16)
        # fp32 latents and reference: cast at the boundary, as a diffusers pipeline casts to vae.dtype.
        assert_close_in_db(model.decode(z, reference=ref), fp32, torch.bfloat16, BF16_DB)
        assert_close_in_db(model.decode(z.bfloat16(), reference=ref.bfloat16()), fp32, torch.bfloat16, BF16_DB)


@pytest.mark.parametrize("scope", ["global", "radius 1 + locality bias"])
def test_bf16_autocast_decode_close_to_fp32(scope):
    model = conditioned(**SCOPES[scope])
    z, ref = inputs(model)
    with torch.no_grad():
        fp32 = model.decode(z, reference=ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.decode(z, reference=ref)
    assert next(model.parameters()).dtype == torch.float32
    assert_close_in_db(out, fp32, torch.bfloat16, BF16_DB)


def test_fp16_weights_decode_close_to_fp32():
    model = conditioned()
    z, ref = inputs(model)
    with torch.no_grad():
        fp32 = model.decode(z, reference=ref)
        assert_close_in_db(model.to(torch.float16).decode(z, reference=ref), fp32, torch.float16, FP16_DB)


def test_rope_tables_stay_fp32_in_a_bf16_model():
    model = conditioned().to(torch.bfloat16)
    cos, sin = model.transformer.rope((2, 3, 4))
    assert cos.dtype == sin.dtype == torch.float32


def test_bf16_autocast_training_step_with_checkpointing_follows_the_fp32_gradient():
    torch.manual_seed(0)
    config = refdecoder.preset("tiny")
    config.train_decoder, config.dropout.p_max = True, 0.0
    config.transformer.gradient_checkpointing = True
    model = refdecoder.wrap(get_backbone("wan2.1").build_tiny(), config).train()
    for module in (model.transformer, *model.projectors.values()):
        randomize_(module, 0.05)
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def gradient(autocast: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            out = model(video, reference_index=4).sample
        (out.float() - video).abs().mean().backward()
        return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])

    fp32, bf16 = gradient(False), gradient(True)
    assert torch.isfinite(bf16).all()
    assert F.cosine_similarity(fp32, bf16, dim=0) > 0.99
