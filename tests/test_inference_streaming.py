"""Streamed encode / decode: equal to the one-shot calls, bounded memory, clean errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import refdecoder
from refdecoder.data import bundled_clips, read_clip, write_video
from refdecoder.errors import InputError
from refdecoder.frames import CAUSAL_1_PLUS_4K
from refdecoder.inference import (
    Decoder,
    ReconstructOptions,
    RuleChunks,
    decode_video,
    encode_chunks,
    iter_decode,
    reconstruct_video,
    window_pixel_ranges,
)
from refdecoder.profiling import LiveTensorMeter
from tests.helpers import latents_for, randomize_, reference_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_model(backbone: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = refdecoder.wrap(refdecoder.get_backbone(backbone).build_tiny(**overrides).eval(), "tiny").eval()
    for part in (model.tokenizer, model.transformer, model.projectors):
        randomize_(part, scale=0.1)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _random_model("wan2.1")


@pytest.mark.parametrize("backbone", refdecoder.list_backbones())
def test_iter_decode_equals_model_decode(backbone: str) -> None:
    model = _random_model(backbone)
    g = torch.Generator().manual_seed(0)
    frames = 12 if backbone == "minimax-h3" else 5  # two of its clips (7 + 5k latent frames)
    z = torch.randn(1, model.adapter.latent_channels, frames, 4, 6, generator=g)
    ref = torch.rand(1, model.adapter.pixel_channels, *model.output_size(z.shape[-2:]), generator=g) * 2 - 1
    with torch.no_grad():
        expected = model.decode(z, reference=ref, window=2)
    chunks = list(iter_decode(model, z, ref, window=2))
    windows = model.adapter.plan_windows(frames, 2)
    ranges = window_pixel_ranges(model.adapter, windows)
    assert [c.shape[2] for c in chunks] == [b - a for a, b in ranges]
    if backbone != "minimax-h3":  # its clips overlap and end off the frame rule: only the adapter counts them
        assert ranges == window_pixel_ranges(model.adapter.frame_rule, windows)
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=0, rtol=0)
    assert not torch.allclose(expected, model.decode(z, window=2))  # the reference does change the result


@pytest.mark.parametrize("backbone", refdecoder.list_backbones())
def test_encode_chunks_equal_one_encode(backbone: str) -> None:
    # Wan carries its causal encoder caches from piece to piece; other backbones encode the joined pieces.
    model = _random_model(backbone)
    channels = model.adapter.pixel_channels  # 4 for Qwen-Image 2.1's RGBA VAE
    video = torch.rand(1, channels, 22, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    valid = model.adapter.frame_rule.round(22, "up")
    padded = torch.cat([video, video[:, :, -1:].expand(1, channels, valid - 22, 32, 48)], dim=2)
    pieces = RuleChunks(video[0].split(7, dim=1), model.adapter.frame_rule, group=2)
    torch.testing.assert_close(encode_chunks(model.adapter, pieces), model.encode(padded), atol=1e-5, rtol=0)
    assert (pieces.frames, pieces.padded) == (22, valid)


def test_plain_iter_decode_equals_vae_decode(model: torch.nn.Module) -> None:
    z = latents_for(model.vae, 4)
    with torch.no_grad():
        expected = model.vae.decode(z).sample
    torch.testing.assert_close(decode_video(model.adapter, z, window=2), expected, atol=1e-5, rtol=0)


def test_iter_decode_checks_inputs(model: torch.nn.Module) -> None:
    z = latents_for(model.vae, 2)
    with pytest.raises(InputError, match="latents must have shape"):
        next(iter_decode(model, torch.zeros(1, 7, 2, 4, 6)))
    with pytest.raises(InputError, match="reference frames are 16x16"):
        next(iter_decode(model, z, torch.zeros(1, 3, 16, 16)))
    with pytest.raises(InputError, match="needs RefDecoder weights"):
        next(iter_decode(model.adapter, z, reference_for(z)))
    resized = decode_video(model, z, reference=torch.zeros(1, 3, 16, 16), resize_reference=True)
    assert resized.shape == (1, 3, 5, 32, 48)


def test_rule_chunks_pad_with_the_last_frame() -> None:
    frames = torch.arange(22.0).view(1, 22, 1, 1).expand(3, 22, 2, 2)
    chunks = RuleChunks(frames.split(5, dim=1), CAUSAL_1_PLUS_4K, group=2)
    pieces = list(chunks)
    assert [p.shape[2] for p in pieces] == [1, 8, 8, 8]  # 22 frames -> padded to 25 = 1 + 4 * 6
    assert (chunks.frames, chunks.padded) == (22, 25)
    joined = torch.cat(pieces, dim=2)[0, 0, :, 0, 0]
    assert joined.tolist() == list(range(22)) + [21, 21, 21]


def _moving_video(path: Path, frames: int) -> Path:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    t = torch.linspace(0, 1, frames).view(1, frames, 1, 1)
    return write_video(path, (0.5 * base + 0.3 * torch.sin(6 * t + 3 * base)).clamp(-1, 1), fps=25)


def test_peak_memory_does_not_grow_with_length(model: torch.nn.Module, tmp_path: Path) -> None:
    # Live tensor bytes of the whole per-file reconstruction: read, encode, decode, metrics, mp4 writing.
    decoder = Decoder(model.adapter, model)
    peaks = {}
    for frames in (17, 250):
        video, meter = _moving_video(tmp_path / f"{frames}.mp4", frames), LiveTensorMeter()
        with torch.inference_mode(), meter:
            row = reconstruct_video(decoder, video, tmp_path, f"o{frames}")
        assert row["frames"] == frames
        peaks[frames] = meter.peak
    # The decoded video alone is 250 * 3 * 16 * 16 * 4 B = 768 kB, about half the 17-frame peak.
    assert peaks[250] / peaks[17] == pytest.approx(1.0, abs=0.15), peaks


def test_reconstruct_options_reject_bad_reference_index(model: torch.nn.Module, tmp_path: Path) -> None:
    decoder = Decoder(model.adapter, model)
    options = ReconstructOptions(reference_index=30)
    with pytest.raises(InputError, match="outside the video's 17 frames"):
        reconstruct_video(decoder, _moving_video(tmp_path / "a.mp4", 17), tmp_path, "a", options)


@pytest.mark.parametrize("backbone", refdecoder.list_backbones())
def test_reconstruct_any_backbone(backbone: str, tmp_path: Path) -> None:
    # 11 frames fit neither 1 + 4k nor 4k: padded for the VAE, trimmed back in the output and the metrics. Media
    # are RGB: Qwen-Image 2.1 runs as its RGB variant (its RGBA layout refuses RGB media in one line, below).
    rgb = {"in_channels": 3, "out_channels": 3} if backbone == "qwen-image-2.1" else {}
    model = _random_model(backbone, **rgb)
    side = max(16, 2 * model.adapter.spatial_factor)  # at least 2x2 latent positions (LTX-2's reflect padding)
    options = ReconstructOptions(size=(side, side), max_frames=11, compare_base=True)
    with torch.inference_mode():
        row = reconstruct_video(Decoder(model.adapter, model), bundled_clips()[0], tmp_path, "clip", options)
    assert row["frames"] == 11 and math.isfinite(row["psnr"]) and math.isfinite(row["delta_psnr"])
    assert read_clip(tmp_path / "clip.mp4", range(11)).shape == (3, 11, side, side)


def test_an_rgba_backbone_refuses_rgb_media_in_one_line(tmp_path: Path) -> None:
    model = _random_model("qwen-image-2.1")  # the released layout: RGBA in and out
    options = ReconstructOptions(size=(16, 16), max_frames=3)
    with torch.inference_mode(), pytest.raises(InputError, match="takes 4-channel pixels, got 3") as err:
        reconstruct_video(Decoder(model.adapter, model), bundled_clips()[0], tmp_path, "clip", options)
    assert "\n" not in str(err.value)
