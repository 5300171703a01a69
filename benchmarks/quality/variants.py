"""Variants of the quality benchmark: typed diffs over one base configuration.

The recipe (``recipes/configs/quality_small.yaml``) holds one base, ``finetune.base`` (a preset and dotted
overrides on it), and under ``finetune.variants`` a short name per variant mapped to what that variant changes:

- ``kind``: ``refdecoder`` (default) or ``plain`` (the VAE's own decoder fine-tuned alone, a baseline);
- ``motion`` / ``reference``: the training clips, instead of ``finetune.motion`` / ``finetune.reference``;
- ``added_lr``: the added modules' learning rate instead of ``finetune.lr`` (the decoder keeps
  ``lr * decoder_lr_ratio`` in every variant);
- ``set``: dotted :class:`~refdecoder.RefDecoderConfig` keys applied on top of the base's.

Whether the decoder trains has one owner, ``finetune.decoder_lr_ratio`` (0: frozen): the base's
``train_decoder`` follows from it and no ``set`` may name it. Nothing is applied after ``set``, so what a file says
is what trains. Errors name the key path
(``finetune.variants.r0.set.transformer.attention_radiu``): unknown keys, a plain variant with RefDecoder settings,
a ``set`` key that repeats the base's value (the diff would not say what differs) and a whole section
(``dropout: {...}``, which would silently replace the base's ``dropout.p_max``): ``set`` takes leaf keys only.
Keys given twice in the YAML file are rejected by :func:`refdecoder.config_builder.yaml_load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import refdecoder
from refdecoder.config_builder import to_plain
from refdecoder.errors import ConfigError

if TYPE_CHECKING:
    from benchmarks.quality.settings import FinetuneSettings

Reference = Literal["first", "random", "far"]


@dataclass
class BaseSettings:
    """What every RefDecoder variant starts from: a preset and dotted overrides on it."""

    preset: str
    set: dict[str, Any]


@dataclass
class VariantDiff:
    """One ``finetune.variants`` entry as written: what the variant changes (``None``: the finetune default)."""

    kind: Literal["plain", "refdecoder"] = "refdecoder"
    motion: bool | None = None
    reference: Reference | None = None
    added_lr: float | None = None
    set: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """A variant with everything resolved: what :mod:`benchmarks.quality_small` trains and evaluates."""

    name: str
    kind: Literal["plain", "refdecoder"]
    motion: bool  # camera moves on the training clips
    reference: str  # the training reference: first | random | far
    added_lr: float | None  # the added modules' lr (None for plain variants)
    config: refdecoder.RefDecoderConfig | None  # the RefDecoder's config (None for plain variants)

    def fingerprint(self) -> dict[str, Any]:
        """What the variant's trained weights depend on, as plain values."""
        config = self.config.to_dict() if self.config is not None else None
        return {"name": self.name, "kind": self.kind, "added_lr": self.added_lr, "config": config}


def resolve(name: str, diff: VariantDiff, ft: FinetuneSettings) -> Variant:
    """``diff`` applied to ``ft.base`` and the finetune defaults (``motion``, ``reference``, ``lr``)."""
    where = f"finetune.variants.{name}"
    motion = diff.motion if diff.motion is not None else ft.motion
    reference = diff.reference or ft.reference
    if diff.kind == "plain":
        if diff.set or diff.added_lr is not None:
            raise ConfigError(f"{where}: a plain variant trains the decoder alone; remove its set / added_lr")
        if ft.decoder_lr_ratio <= 0:
            raise ConfigError(
                f"{where}: a plain variant needs finetune.decoder_lr_ratio > 0 (its decoder is all it trains)"
            )
        return Variant(name, "plain", motion, reference, None, None)
    if diff.added_lr is not None and diff.added_lr <= 0:
        raise ConfigError(f"{where}.added_lr must be a positive number, got {diff.added_lr}")
    raw = to_plain(base_config(ft).to_dict())  # lists, as YAML gives them, so equal values compare equal
    for key, value in diff.set.items():
        if lookup(raw, key, f"{where}.set") == to_plain(value):
            raise ConfigError(f"{where}.set.{key} repeats the base's value {value!r}; a variant lists what differs")
    config = build_config(raw, diff.set, f"{where}.set")
    return Variant(name, "refdecoder", motion, reference, diff.added_lr or ft.lr, config)


def base_config(ft: FinetuneSettings) -> refdecoder.RefDecoderConfig:
    """The base preset, the decoder trained as ``finetune.decoder_lr_ratio`` says, with ``finetune.base.set``."""
    raw = refdecoder.preset(ft.base.preset).to_dict() | {"train_decoder": ft.decoder_lr_ratio > 0}
    return build_config(raw, ft.base.set, "finetune.base.set")


def build_config(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> refdecoder.RefDecoderConfig:
    """``raw`` (a config dict, not changed) with the dotted ``overrides`` set, as a checked config."""
    raw = refdecoder.RefDecoderConfig.from_dict(raw).to_dict()  # a deep copy
    for key, value in overrides.items():
        if key == "train_decoder":
            raise ConfigError(f"{where}.train_decoder is set by finetune.decoder_lr_ratio (0: frozen); remove it")
        *parents, leaf = key.split(".")
        if isinstance(lookup(raw, key, where), dict):
            raise ConfigError(f"{where}.{key} is a section; set its keys one by one ({key}.<name>: value)")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return refdecoder.RefDecoderConfig.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


def lookup(raw: dict[str, Any], key: str, where: str) -> Any:
    """The value at dotted ``key`` of ``raw``; an unknown key raises naming ``where.key`` (typos fail loudly)."""
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown setting {where}.{key}: the RefDecoder config has no {part!r} there")
        node = node[part]
    return node
