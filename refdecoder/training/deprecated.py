"""Training-config keys that gave up their knob to one owner, read with a one-line deprecation warning.

:func:`upgrade_keys` rewrites a raw config (the YAML plus overrides, before it is built) so that each old key lands
on the key that owns its knob now (docs/training.md, "One owner per knob"):

- ``data.frames`` -> ``stages[].frames``: the clip length of every stage that does not set one;
- ``model.refdecoder.train_decoder`` -> ``optim.decoder_lr_ratio``: ``false`` is a ratio of 0 (a frozen decoder),
  ``true`` is the default (the decoder trains at ``lr x decoder_lr_ratio``);
- a ``model.latent_components`` entry of ``LatentMaskedReconstruction`` -> ``model.refdecoder.degradation.lmr``
  (with ``lmr_ratios``, ``lmr_probs``, ``lmr_block``), the one place latent masking is configured.

An old key next to its new owner with a different value is a :class:`~refdecoder.errors.ConfigError`, never a
silent choice.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from refdecoder.errors import ConfigError

__all__ = ["upgrade_keys"]

logger = logging.getLogger("refdecoder")

LMR_CLASS = "LatentMaskedReconstruction"
# LatentMaskedReconstruction(...) argument -> its key under model.refdecoder.degradation (channels: the backbone's)
LMR_ARGS = {"ratios": "lmr_ratios", "probs": "lmr_probs", "block": "lmr_block"}


def upgrade_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config ``data`` with every deprecated key moved to its owner (one warning per key)."""
    data = copy.deepcopy(data)
    _clip_length(data)
    _decoder_training(data)
    _latent_masking(data)
    return data


def _warn(old: str, new: str) -> None:
    logger.warning("config key %r is deprecated; set %s instead", old, new)


def _section(data: dict[str, Any], *path: str) -> dict[str, Any] | None:
    node: Any = data
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _clip_length(data: dict[str, Any]) -> None:
    section = _section(data, "data")
    if section is None or "frames" not in section:
        return
    frames = section.pop("frames")
    _warn("data.frames", "stages[].frames (each curriculum stage's clip length)")
    stages = data.setdefault("stages", [{}])  # no stages: the default one
    for stage in stages if isinstance(stages, list) else []:
        if isinstance(stage, dict) and stage.get("frames") is None:
            stage["frames"] = frames


def _decoder_training(data: dict[str, Any]) -> None:
    section = _section(data, "model", "refdecoder")
    if section is None or "train_decoder" not in section:
        return
    train = section.pop("train_decoder")
    _warn("model.refdecoder.train_decoder", "optim.decoder_lr_ratio (0 freezes the decoder)")
    if not isinstance(train, bool):
        raise ConfigError(f"config key 'model.refdecoder.train_decoder' must be true or false, got {train!r}")
    if train:
        return
    optim = data.setdefault("optim", {})
    ratio = optim.get("decoder_lr_ratio", 0.0) if isinstance(optim, dict) else 0.0
    if ratio != 0:
        raise ConfigError(
            f"model.refdecoder.train_decoder: false conflicts with optim.decoder_lr_ratio: {ratio}; "
            "remove train_decoder and set optim.decoder_lr_ratio: 0 to freeze the decoder"
        )
    optim["decoder_lr_ratio"] = 0.0


def _latent_masking(data: dict[str, Any]) -> None:
    model = _section(data, "model")
    components = model.get("latent_components") if model is not None else None
    if not isinstance(components, list):
        return
    kept = []
    for index, entry in enumerate(components):
        target = str(entry.get("target", "")) if isinstance(entry, dict) else ""
        if target.replace(":", ".").rsplit(".", 1)[-1] != LMR_CLASS:
            kept.append(entry)
            continue
        where = f"model.latent_components.{index}"
        if index < len(components) - 1:  # the model's own LMR masks after every configured component
            raise ConfigError(f"{where} ({LMR_CLASS}) must be the last component to move to model.refdecoder."
                              "degradation.lmr (which masks after the others); configure it there")  # fmt: skip
        _warn(
            f"{where} ({LMR_CLASS})", "model.refdecoder.degradation.lmr: true (with lmr_ratios, lmr_probs, lmr_block)"
        )
        args = dict(entry.get("args") or {})
        args.pop("channels", None)  # the backbone's latent channels, known to the model
        if args.get("init_std", 1.0) == 1.0:
            args.pop("init_std", None)  # the default of the model's own LMR
        unknown = sorted(set(args) - set(LMR_ARGS))
        if unknown:
            raise ConfigError(f"{where}.args.{unknown[0]} has no key under model.refdecoder.degradation; remove it")
        degradation = model.setdefault("refdecoder", {}).setdefault("degradation", {})
        if degradation.get("lmr"):
            raise ConfigError(f"{where} repeats model.refdecoder.degradation.lmr; keep the degradation keys only")
        degradation.update({"lmr": True, **{LMR_ARGS[key]: value for key, value in args.items()}})
    model["latent_components"] = kept
