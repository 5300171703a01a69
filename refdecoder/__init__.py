"""refdecoder: reference-conditioned decoders for video VAEs.

    import refdecoder
    model = refdecoder.wrap(vae)                      # any registered backbone, e.g. diffusers AutoencoderKLWan
    video = model.decode(latents, reference=image)    # B,3,T,H,W in [-1, 1]

Heavy optional dependencies (diffusers models, lightning, webdataset, lpips, PyAV) load only when a feature that
needs them is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refdecoder._version import __version__
from refdecoder.backbones.base import BackboneAdapter, Fit, StageSpec
from refdecoder.backbones.registry import get_backbone, list_backbones, register_backbone
from refdecoder.config import PRESETS, RefDecoderConfig, preset
from refdecoder.errors import (
    BackboneError,
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    MissingDependencyError,
    RefDecoderError,
)

if TYPE_CHECKING:  # what __getattr__ hands out lazily, for type checkers and IDEs
    from refdecoder.model import RefDecoder, RefDecoderOutput, load, wrap

_LAZY = {"wrap", "load", "RefDecoder", "RefDecoderOutput"}


def __getattr__(name: str):
    # The model module pulls in every block; importing it lazily keeps `import refdecoder.errors` (and friends)
    # cheap for code that only needs a corner of the library.
    if name in _LAZY:
        from refdecoder import model

        return getattr(model, name)
    raise AttributeError(f"module 'refdecoder' has no attribute {name!r}")


__all__ = [
    "__version__",
    "wrap",
    "load",
    "RefDecoder",
    "RefDecoderOutput",
    "RefDecoderConfig",
    "PRESETS",
    "preset",
    "list_backbones",
    "get_backbone",
    "register_backbone",
    "BackboneAdapter",
    "Fit",
    "StageSpec",
    "RefDecoderError",
    "ConfigError",
    "InputError",
    "CheckpointError",
    "BackboneError",
    "DataError",
    "MissingDependencyError",
]
