"""Building blocks of the Fabric training recipe (``recipes/train.py``), usable on their own.

- :mod:`~refdecoder.training.config`: typed YAML config with dotted overrides, strict at start-up.
- :mod:`~refdecoder.training.checkpoint`: atomic keep-last-k checkpoints and SIGTERM/SIGINT stop requests.
- :mod:`~refdecoder.training.schedule`: warm-up + cosine learning-rate schedule with a floor.
- :mod:`~refdecoder.training.data`: datasets from the config and an exactly resumable batch stream.
- :mod:`~refdecoder.training.steps`: video / latent losses, the non-finite guard, validation.
- :mod:`~refdecoder.training.loggers`: CSV / TensorBoard / W&B loggers and the reconstruction image grid.
- :mod:`~refdecoder.training.vae`: the backbone VAE of a run (pretrained, or tiny + brief pretraining).

Nothing here is imported by ``import refdecoder``; Lightning Fabric, PyYAML and TensorBoard (extra ``train``) load
only when a function needs them.
"""

from __future__ import annotations

from refdecoder.training.checkpoint import CheckpointManager, StopSignal
from refdecoder.training.config import TrainConfig, config_to_dict, load_config
from refdecoder.training.schedule import warmup_cosine, warmup_cosine_factor

__all__ = [
    "TrainConfig",
    "load_config",
    "config_to_dict",
    "CheckpointManager",
    "StopSignal",
    "warmup_cosine",
    "warmup_cosine_factor",
]
