"""diffusers VAEs of image-conditioned or video pipelines that no built-in adapter drives yet, and why.

Each entry names the built-in adapter nearest to the VAE (the one an adapter for it would start from) and what keeps
that adapter (or any other) from driving it, as read from the installed diffusers (0.42) sources.
:func:`~refdecoder.backbones.registry.list_backbones` lists them with ``refused=True``, and
:func:`~refdecoder.backbones.registry.find_backbone` (``wrap()``) names the nearest adapter and the reason when one
of them is wrapped. A VAE a registered adapter drives (an entry point, ``register_backbone``) is not refused.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Refusal", "REFUSED"]


class Refusal(NamedTuple):
    """Why no built-in adapter drives a diffusers VAE class.

    Attributes:
        nearest: the built-in adapter an adapter for it would start from.
        reason: what differs from that adapter (one clause, no final full stop).
    """

    nearest: str
    reason: str


REFUSED: dict[str, Refusal] = {
    "AutoencoderKLMochi": Refusal(
        "cogvideox",
        "a causal decoder whose blocks take and return a conv_cache dict (as CogVideoX's) but with blocks and a "
        "per-frame chunked GroupNorm of its own; not written yet",
    ),
    "AutoencoderKLAllegro": Refusal(
        "cogvideox",
        "its decode exists only as a spatio-temporally tiled decode (diffusers raises NotImplementedError without "
        "tiling), which RefDecoder's tiles do not reproduce",
    ),
    "AutoencoderKLMagvit": Refusal(
        "cogvideox",
        "EasyAnimate's causal decoder decodes frame 0 alone, then batches of num_latent_frames_batch_size latent "
        "frames with its own per-conv cache; not written yet",
    ),
    "AutoencoderKLCosmos": Refusal(
        "hunyuan-video",
        "a decoder ending in an inverse Haar wavelet unpatcher (patch 4 over space and time), so its output conv "
        "writes wavelet channels rather than RGB; not written yet",
    ),
    "AutoencoderKLKVAEVideo": Refusal(
        "wan2.1",
        "a causal decoder with a cache object of its own, decoding in segments of 16 pixel frames; not written yet",
    ),
    "AutoencoderVidTok": Refusal(
        "cogvideox",
        "a tokenizer whose latents may be FSQ indices (decode_from_indices) and whose causal convolutions keep their "
        "cache on the modules; not written yet",
    ),
}
