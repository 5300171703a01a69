"""VideoVAE+ (``sota-4-16z`` layout): a clean-room implementation that loads the official checkpoints strictly.

See :mod:`refdecoder.backbones.videovaeplus.autoencoder` for the model and
:class:`~refdecoder.backbones.videovaeplus.spatial.Decoder2plus1D` for the per-level decoder steps adapters use.
"""

from __future__ import annotations

from refdecoder.backbones.videovaeplus.autoencoder import VideoVAEPlus, VideoVAEPlusConfig
from refdecoder.backbones.videovaeplus.spatial import Decoder2plus1D, Encoder2plus1D

__all__ = ["VideoVAEPlus", "VideoVAEPlusConfig", "Decoder2plus1D", "Encoder2plus1D"]
