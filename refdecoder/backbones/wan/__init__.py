"""The Wan family of diffusers VAEs: one causal-cache decode loop (:mod:`.family`) for three adapters.

- ``wan2.1``: :class:`WanAdapter`, ``AutoencoderKLWan`` with the Wan2.1 layout;
- ``wan2.2``: :class:`Wan22Adapter`, ``AutoencoderKLWan`` with residual up-blocks and a patchified output;
- ``qwen-image``: :class:`QwenImageAdapter`, ``AutoencoderKLQwenImage`` (a copy of the Wan2.1 VAE).

Importing this package imports no diffusers module; the adapters do when they build or check a VAE.
"""

from __future__ import annotations

from refdecoder.backbones.wan.family import WanFamilyAdapter
from refdecoder.backbones.wan.qwen_image import QwenImageAdapter
from refdecoder.backbones.wan.wan21 import WanAdapter
from refdecoder.backbones.wan.wan22 import Wan22Adapter

__all__ = ["WanFamilyAdapter", "WanAdapter", "Wan22Adapter", "QwenImageAdapter"]
