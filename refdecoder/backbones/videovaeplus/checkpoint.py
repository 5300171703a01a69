"""Reading official VideoVAE+ checkpoints and checking them against a model, with errors that say what differs.

The official loader deletes keys starting with ``loss`` and loads with ``strict=False``, so a wrong file fails
silently. Here every mismatch is reported: missing and unexpected keys (the first few of each, plus counts)
and shape differences.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from refdecoder.errors import CheckpointError

__all__ = ["read_state_dict", "clean_state_dict", "check_state_dict"]

logger = logging.getLogger("refdecoder.backbones.videovaeplus")

# Wrapper prefixes that Lightning (pre-2.1 strategies) and torch.compile insert into parameter names.
_WRAPPER_SUBSTRINGS = ("_forward_module.", "_orig_mod.")
_SHOWN = 10


def read_state_dict(
    path: str | Path, map_location: str | torch.device = "cpu", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load the tensors of a ``.safetensors`` file or a (Lightning) ``.ckpt`` / ``.pt`` file.

    A pickled file may be a plain state dict or a dict holding one under ``state_dict`` (Lightning) or
    ``module`` (DeepSpeed). It is read with ``weights_only=True``; files that also pickle arbitrary objects
    (e.g. hyper-parameters as OmegaConf objects) are refused unless ``allow_pickle`` is set.

    Raises:
        CheckpointError: the file is missing, truncated, not a checkpoint, or needs ``allow_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    return _unwrap(_read_pickle(path, map_location, allow_pickle), path)


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"could not read safetensors file {path} (truncated or corrupt?): {err}") from err


def _read_pickle(path: Path, map_location: str | torch.device, allow_pickle: bool) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() and not allow_pickle:
            raise CheckpointError(
                f"{path} pickles objects other than tensors, which weights_only loading refuses. If you trust the "
                "file, pass allow_pickle=True (this runs its pickled code), or re-save its state_dict as "
                ".safetensors."
            ) from err
        raise CheckpointError(f"could not unpickle {path} (truncated or corrupt?): {err}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"could not read checkpoint {path} (truncated or corrupt?): {err}") from err


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no state dict: expected a mapping of tensors, or a dict with one under 'state_dict' "
            f"or 'module'; got {type(obj).__name__}"
        )
    return dict(obj)


def clean_state_dict(
    state_dict: Mapping[str, torch.Tensor], drop_prefixes: tuple[str, ...] = ("loss",)
) -> dict[str, torch.Tensor]:
    """Strip wrapper substrings (``_forward_module.``, ``_orig_mod.``) and drop keys starting with ``drop_prefixes``.

    The default drops the training loss (LPIPS, discriminator, ``logvar``) that Lightning checkpoints carry.
    """
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for sub in _WRAPPER_SUBSTRINGS:
            key = key.replace(sub, "")
        if not key.startswith(drop_prefixes):
            cleaned[key] = value
    dropped = len(state_dict) - len(cleaned)
    if dropped:
        logger.debug("dropped %d checkpoint entries starting with %s", dropped, drop_prefixes)
    return cleaned


def check_state_dict(expected: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the ``expected`` keys and shapes.

    Args:
        expected: key -> shape of the model's own state dict.
        state_dict: the cleaned checkpoint.
        what: the model's description for the message (e.g. its config).
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k])}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = [f"checkpoint does not match {what}:"]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOWN])}{more}")
    parts.append(_hint(unexpected, wrong))
    raise CheckpointError("\n".join(parts))


def _hint(unexpected: list[str], wrong: list[str]) -> str:
    if any(k.startswith(("transformer.", "ref_conv_in.", "decoder.pre_transformer_norms")) for k in unexpected):
        return "Hint: this looks like a RefDecoder checkpoint; load the base VideoVAE+ checkpoint here instead."
    if wrong:
        return "Hint: the widths differ; pass the config the checkpoint was trained with (ch, temporal_hidden, ...)."
    return "Hint: is this a VideoVAE+ 'sota-4-16z' style checkpoint (no caption layers, no quant convs)?"
