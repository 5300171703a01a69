"""Inference on whole videos: load a VAE (+ RefDecoder weights), streamed encode / decode, per-file reconstruction.

    from refdecoder.inference import load_decoder, iter_decode, reconstruct_video

    decoder = load_decoder("Wan2.1-I2V-14B-480P-Diffusers/vae", weights="my-refdecoder", device="cuda")
    for chunk in iter_decode(decoder.model, latents, reference=image):   # B, 3, t, H, W in [-1, 1], 17/16/16... frames
        ...
    row = reconstruct_video(decoder, "clip.mp4", "out/", "clip")          # writes out/clip.mp4, returns metrics

Everything here streams: peak memory depends on the decode window (and the encode piece), not on the video
length. The ``refdecoder reconstruct`` and ``refdecoder decode-latents`` commands are thin layers over this package.
"""

from __future__ import annotations

from refdecoder.inference.loading import DTYPES, Decoder, load_decoder, load_vae
from refdecoder.inference.reconstruct import (
    FrameMetrics,
    ReconstructOptions,
    build_lpips,
    frame_plan,
    reconstruct_video,
)
from refdecoder.inference.streaming import RuleChunks, decode_video, encode_chunks, iter_decode, window_pixel_ranges

__all__ = [
    "DTYPES",
    "Decoder",
    "load_vae",
    "load_decoder",
    "RuleChunks",
    "encode_chunks",
    "iter_decode",
    "decode_video",
    "window_pixel_ranges",
    "ReconstructOptions",
    "FrameMetrics",
    "build_lpips",
    "frame_plan",
    "reconstruct_video",
]
