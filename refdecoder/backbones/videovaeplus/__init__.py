"""VideoVAE+ (``sota-4-16z`` layout): a clean-room implementation that loads the official checkpoints strictly.

See :mod:`refdecoder.backbones.videovaeplus.autoencoder` for the model and
:class:`~refdecoder.backbones.videovaeplus.spatial.Decoder2plus1D` for the per-level decoder steps adapters use.
Importing this package registers the ``"videovae+"`` backbone adapter
(:class:`~refdecoder.backbones.videovaeplus.adapter.VideoVAEPlusAdapter`).
"""

from __future__ import annotations

from refdecoder.backbones.videovaeplus.adapter import VideoVAEPlusAdapter
from refdecoder.backbones.videovaeplus.autoencoder import VideoVAEPlus, VideoVAEPlusConfig
from refdecoder.backbones.videovaeplus.spatial import Decoder2plus1D, Encoder2plus1D

__all__ = ["VideoVAEPlus", "VideoVAEPlusConfig", "VideoVAEPlusAdapter", "Decoder2plus1D", "Encoder2plus1D"]
