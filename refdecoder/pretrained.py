"""The saved RefDecoder folder: what :meth:`RefDecoder.save_pretrained` writes and ``from_pretrained`` reads.

A folder holds ``refdecoder_config.json`` (the :class:`~refdecoder.config.RefDecoderConfig`) and
``refdecoder.safetensors``: the added modules' state dict, plus the decoder's weights under the ``vae.`` prefix when
they were trained, never the frozen backbone's. Both files are written to a temporary folder and moved in, so a
reader never sees half a save; loading is strict, and every mismatch is one :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from refdecoder.config import RefDecoderConfig
from refdecoder.errors import CheckpointError
from refdecoder.validation import check_finite_weights

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "BASE_PREFIX", "write_folder", "read_config", "read_weights", "load_into"]

CONFIG_NAME = "refdecoder_config.json"
WEIGHTS_NAME = "refdecoder.safetensors"
# Saved decoder weights carry this prefix so they can never be confused with the added modules.
BASE_PREFIX = "vae."


def write_folder(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: RefDecoderConfig) -> Path:
    """Write ``state`` and ``config`` into ``directory`` (created if needed) atomically; return the folder."""
    from safetensors.torch import save_file

    from refdecoder._files import use_default_mode

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        save_file(tensors, Path(tmp) / WEIGHTS_NAME, metadata={"format": "pt"})
        use_default_mode(Path(tmp) / WEIGHTS_NAME)  # safetensors writes 0600; the config gets the umask's mode
        config.save(Path(tmp) / CONFIG_NAME)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(Path(tmp) / name, directory / name)
    return directory


def read_config(directory: Path) -> RefDecoderConfig:
    """The config of the RefDecoder folder ``directory``; :class:`CheckpointError` when it is not one."""
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{directory} is not a RefDecoder folder: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    return RefDecoderConfig.load(directory / CONFIG_NAME)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The saved state dict of the RefDecoder folder ``directory``, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_NAME
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def load_into(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the tensors of ``expected`` (a model's own state dict) when the keys and shapes match
    exactly and every value is finite; else raise :class:`CheckpointError` naming what differs."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"RefDecoder weights do not match the model: {len(missing)} missing {missing[:10]}, "
            f"{len(unexpected)} unexpected {unexpected[:10]}, {len(wrong)} with wrong shapes {wrong[:10]}"
        )
    check_finite_weights(state, "RefDecoder weights")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])
