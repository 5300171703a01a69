"""Typed training configuration: YAML file + dotted command-line overrides, checked strictly at start-up.

    cfg = load_config("recipes/configs/tiny.yaml", ["optim.lr=1e-4", "stages.0.frames=17", "stages.0.steps=50"])

Every section is a dataclass; an unknown key or a value of the wrong type raises
:class:`~refdecoder.errors.ConfigError` naming the dotted key, before anything is built. Overrides are parsed as
YAML values (``1e-4`` is a number, ``[64, 64]`` a list, ``null`` None); a numeric path part indexes a list
(``stages.1.frames=17``). The RefDecoder architecture is a preset plus ``model.refdecoder`` overrides, checked
against :class:`~refdecoder.config.RefDecoderConfig` just as strictly. Each knob has one owner; keys that moved are
still read, with a deprecation warning (:mod:`refdecoder.training.deprecated`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from refdecoder.config import DEFAULT_PRESET, PRESETS, RefDecoderConfig
from refdecoder.config_builder import build_dataclass, to_plain, yaml_load
from refdecoder.data.camera import CameraMotion
from refdecoder.errors import ConfigError
from refdecoder.training.deprecated import upgrade_keys

__all__ = [
    "VAEPretrainConfig",
    "VAEConfig",
    "ComponentConfig",
    "ModelConfig",
    "DatasetConfig",
    "DataConfig",
    "CurriculumStage",
    "OptimConfig",
    "ScheduleConfig",
    "LossConfig",
    "FabricConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ValidationConfig",
    "LatentFinetuneConfig",
    "CompareConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "config_to_dict",
    "changed_keys",
    "yaml_load",
]

Strategy = Literal["auto", "ddp", "ddp_spawn", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"]


@dataclass
class VAEPretrainConfig:
    """Optional short pretraining of a randomly initialised (``source: tiny``) VAE before RefDecoder training."""

    steps: int = 0  # 0: no pretraining
    lr: float = 1e-3  # peak; linear warm-up over `warmup` steps, then cosine to 1 %
    warmup: int = 0
    frames: int | None = None  # clip length (None: the first stage's)
    batch_size: int = 2


@dataclass
class VAEConfig:
    """Where the backbone VAE comes from."""

    # demo: the bundled demo VAE (wan2.1); tiny: random, reduced width (+ pretrain); pretrained: from `path`
    source: Literal["demo", "tiny", "pretrained"] = "pretrained"
    path: str | None = None  # diffusers folder or Hub id (wan2.1), official checkpoint file (videovae+)
    subfolder: str | None = "vae"  # diffusers subfolder of `path` (wan2.1)
    tiny: dict[str, Any] = field(default_factory=dict)  # build_tiny() overrides, e.g. {base_dim: 16, z_dim: 8}
    seed: int = 0  # initialisation seed of a tiny VAE
    pretrain: VAEPretrainConfig = field(default_factory=VAEPretrainConfig)


@dataclass
class ComponentConfig:
    """An extra training-time component registered into ``model.latent_components`` (before token dropout)."""

    name: str
    target: str  # "package.module:Class" (or "package.module.Class"), called as Class(**args)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    # refdecoder: the reference-conditioned decoder; plain: the backbone's decoder fine-tuned alone (a baseline)
    kind: Literal["refdecoder", "plain"] = "refdecoder"
    backbone: str = "wan2.1"
    preset: str = DEFAULT_PRESET
    refdecoder: dict[str, Any] = field(default_factory=dict)  # RefDecoderConfig overrides on top of the preset
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_components: list[ComponentConfig] = field(default_factory=list)


@dataclass
class DatasetConfig:
    """One clip source: WebDataset shards or a CSV of video paths."""

    kind: Literal["shards", "csv"] = "shards"
    path: str = ""  # shard folder/pattern, or the CSV file
    samples: list[str] | None = None  # build these bundled sample clips into shards at `path` when it is missing
    fps: float | None = None  # None: the source frame rate
    # Reference frame: "uniform" (a random clip frame per sample, the paper), a fixed index (0 = image-to-video),
    # or "far" (a frame outside the clip, reference_distance clip frames before or after it; training only).
    reference: str | int = "uniform"
    reference_distance: int = 8
    motion: CameraMotion | None = None  # a virtual camera moving across each clip (refdecoder.data.CameraMotion)
    resize_mode: Literal["crop_center", "crop_random", "resize"] = "crop_center"
    short: Literal["pad", "skip"] = "pad"
    shuffle: int = 100  # shard sample shuffle buffer (shards only)
    resample: bool = False  # draw shards with replacement (shards only; use with few shards and many ranks)
    max_failures: int = 50
    num_workers: int = 0


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig | None = None  # held-out clips for validation metrics and image grids
    size: tuple[int, int] = (256, 256)  # (H, W) unless a stage says otherwise
    batch_size: int = 1  # per device, unless a stage says otherwise


@dataclass
class CurriculumStage:
    """One stage of the curriculum; stages run one after the other on one optimizer and one LR schedule."""

    name: str = "main"
    steps: int = 1000
    frames: int = 17  # clip length: the one owner of the training clip length
    size: tuple[int, int] | None = None
    batch_size: int | None = None


@dataclass
class OptimConfig:
    lr: float = 2e-4
    # The one owner of decoder training: the decoder trains at lr * ratio (the baseline's decoder too); 0 freezes it
    # (model.refdecoder.train_decoder follows from it).
    decoder_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_accum: int = 1
    grad_clip: float | None = 1.0  # max gradient norm; null: no clipping
    scale_lr: bool = False  # lr *= world_size * batch_size * grad_accum (the official VideoVAE+ recipe)
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row


@dataclass
class ScheduleConfig:
    warmup_steps: int = 1000
    warmup_start: float = 0.01  # warm-up starts at lr * warmup_start
    min_ratio: float = 0.01  # cosine floor, lr * min_ratio (reached at the last step of the last stage)


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    pretrained_trunk: bool = True  # false: random LPIPS trunk (smoke tests only)
    trunk_weights: str | None = None


@dataclass
class FabricConfig:
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: Strategy = "auto"
    precision: Precision = "32-true"
    compile: bool = False  # torch.compile the shared transformer
    cpu_threads: int | None = None  # torch intra-op threads (None: torch's default)
    find_unused_parameters: bool = False  # ddp only
    deterministic: bool = False  # torch.use_deterministic_algorithms


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    dir: str | None = None  # default: <run_dir>/checkpoints


@dataclass
class LoggingConfig:
    every_steps: int = 10
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = field(default_factory=lambda: ["csv", "tensorboard"])
    wandb_project: str | None = None
    image_every_steps: int = 500
    image_frames: int = 4
    progress_bar: bool = True


@dataclass
class ValidationConfig:
    every_steps: int = 1000
    clips: int = 4  # held-out clips per validation
    frames: int | None = None  # None: the current stage's clip length
    lpips: Literal["auto", "on", "off"] = "auto"  # auto: AlexNet LPIPS when its trunk weights are available
    at_start: bool = True  # also validate before the first step (the baseline the loss drop is measured from)


@dataclass
class LatentFinetuneConfig:
    """Paper App. G: diffusion-generated latents + their reference image, alternating with video batches."""

    enabled: bool = False
    path: str = ""  # folder of .safetensors latents (refdecoder.data.LatentDataset)
    reference_dir: str | None = None
    every: int = 2  # every `every`-th step is a latent step
    batch_size: int = 1
    reversed_prob: float = 0.0  # bidirectional variant: decode, reverse, re-encode; loss on the last frame
    weight: float = 1.0


@dataclass
class CompareConfig:
    """The equal-budget comparison at the end of a run (what the CPU demo shows).

    With ``baseline``, the backbone's plain decoder is fine-tuned too, with the same data, stages, schedule and
    seed, in ``<run_dir>/baseline``. With ``enabled``, the first ``clips`` held-out clips of ``data.val`` are decoded
    by the VAE as it was, the baseline and the RefDecoder (reference = each clip's ``data.val.reference`` frame);
    the videos, ``metrics.csv`` and an HTML report go to ``<run_dir>/comparison``.
    """

    enabled: bool = False
    baseline: bool = False
    clips: int = 1
    frames: int | None = None  # clip length (None: the last stage's); Wan: 1 + 4k
    size: tuple[int, int] | None = None  # (H, W) (None: the last stage's)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    latent_finetune: LatentFinetuneConfig = field(default_factory=LatentFinetuneConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole curriculum (the learning-rate schedule spans them)."""
        return sum(stage.steps for stage in self.stages)

    def refdecoder_config(self) -> RefDecoderConfig:
        """The model architecture: ``model.preset`` with ``model.refdecoder`` overrides (checked strictly)."""
        # The decoder is fine-tuned with the added modules at optim.lr x decoder_lr_ratio, as in the paper and every
        # shipped recipe; a ratio of 0 freezes it. optim.decoder_lr_ratio is the one owner of that choice.
        preset = {**to_plain(PRESETS[self.model.preset]), "train_decoder": self.optim.decoder_lr_ratio > 0}
        merged = _deep_merge(preset, self.model.refdecoder)
        merged.pop("backbone", None)  # model.backbone is the one owner; wrap() records it in the saved config
        try:
            config = build_dataclass(RefDecoderConfig, merged, "model.refdecoder.")
        except ConfigError as err:
            message = str(err)
            if "model.refdecoder" not in message:  # a check inside RefDecoderConfig, which names its own key
                message = f"model.refdecoder: {message}"
            raise ConfigError(message) from None
        return config


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r} {message}")


def _validate(cfg: TrainConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    _check(cfg.model.preset in PRESETS, "model.preset", f"must be one of {sorted(PRESETS)}, got {cfg.model.preset!r}")
    cfg.refdecoder_config()  # raises on a bad model.refdecoder entry
    named = cfg.model.refdecoder.get("backbone", cfg.model.backbone)
    _check(
        named == cfg.model.backbone,
        "model.refdecoder.backbone",
        f"is {named!r} but model.backbone is {cfg.model.backbone!r}; the backbone is model.backbone, remove this key",
    )
    _check(
        "train_decoder" not in cfg.model.refdecoder,
        "model.refdecoder.train_decoder",
        "is set by optim.decoder_lr_ratio (0: a frozen decoder); remove this key",
    )
    _check(
        cfg.optim.decoder_lr_ratio >= 0, "optim.decoder_lr_ratio", f"must be >= 0, got {cfg.optim.decoder_lr_ratio}"
    )
    _check(len(cfg.stages) >= 1, "stages", "needs at least one stage")
    for i, stage in enumerate(cfg.stages):
        _check(stage.steps >= 1, f"stages.{i}.steps", f"must be >= 1, got {stage.steps}")
    for key, value in (
        ("optim.lr", cfg.optim.lr),
        ("optim.grad_accum", cfg.optim.grad_accum),
        ("optim.max_nonfinite", cfg.optim.max_nonfinite),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
        ("logging.every_steps", cfg.logging.every_steps),
        ("data.batch_size", cfg.data.batch_size),
    ):
        _check(value > 0, key, f"must be > 0, got {value}")
    _check(0 <= cfg.schedule.warmup_steps, "schedule.warmup_steps", "must be >= 0")
    _check(0 < cfg.schedule.warmup_start <= 1, "schedule.warmup_start", "must be in (0, 1]")
    _check(0 <= cfg.schedule.min_ratio <= 1, "schedule.min_ratio", "must be in [0, 1]")
    _check(not cfg.data.train.path == "", "data.train.path", "must name the training shards or CSV")
    _check(
        isinstance(cfg.data.train.reference, int) or cfg.data.train.reference in ("uniform", "far"),
        "data.train.reference",
        f"must be 'uniform', 'far' or a frame index, got {cfg.data.train.reference!r}",
    )
    val = cfg.data.val
    _check(
        val is None or isinstance(val.reference, int) or val.reference == "uniform",
        "data.val.reference",
        "must be 'uniform' or a frame index (validation scores the reference frame apart from the others), "
        f"got {None if val is None else val.reference!r}",
    )
    lf = cfg.latent_finetune
    _check(not lf.enabled or bool(lf.path), "latent_finetune.path", "must be set when latent_finetune.enabled")
    _check(lf.every >= 1, "latent_finetune.every", f"must be >= 1, got {lf.every}")
    _check(0 <= lf.reversed_prob <= 1, "latent_finetune.reversed_prob", "must be in [0, 1]")
    if cfg.model.kind == "plain":
        for key, used in (
            ("latent_finetune.enabled", lf.enabled),
            ("model.latent_components", bool(cfg.model.latent_components)),
            ("compare.baseline", cfg.compare.baseline),
        ):
            _check(not used, key, "needs model.kind: refdecoder (a plain decoder has no reference path)")
        _check(cfg.fabric.strategy != "fsdp", "fabric.strategy", "fsdp is not supported with model.kind: plain")
        _check(
            cfg.optim.decoder_lr_ratio > 0,
            "optim.decoder_lr_ratio",
            "must be > 0 with model.kind: plain (the decoder is all that trains)",
        )
    cc = cfg.compare
    _check(not cc.enabled or cfg.data.val is not None, "compare.enabled", "needs held-out clips in data.val")
    _check(cc.clips >= 1, "compare.clips", f"must be >= 1, got {cc.clips}")


# Keys that were removed, and the one key that owns the setting now.
_MOVED = {
    "fabric.activation_checkpointing": "model.refdecoder.transformer.gradient_checkpointing",
    "schedule.total_steps": "stages (the schedule spans the steps of all stages)",
}


def _check_moved(data: Mapping[str, Any]) -> None:
    for old, new in _MOVED.items():
        section, key = old.split(".")
        if isinstance(data.get(section), Mapping) and key in data[section]:
            raise ConfigError(f"config key {old!r} was removed; set {new} instead")


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=1e-4", ...]`` -> ``[("optim.lr", 0.0001), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-4")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except Exception as err:  # yaml.YAMLError; the module is imported lazily
            raise ConfigError(f"override {item!r}: cannot parse the value {raw!r} ({err})") from err
        parsed.append((key.strip(), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a copy of ``data``, creating mappings on the way; numeric parts index lists."""
    data = copy.deepcopy(data)
    for key, value in overrides:
        *parents, last = key.split(".")
        node: Any = data
        for depth, part in enumerate(parents):
            node = _child(node, part, ".".join(parents[: depth + 1]))
        _set(node, last, value, key)
    return data


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"override path {path!r} goes through a value that is not a mapping or list: {node!r}")
    if node.get(part) is None:
        _no_list(part, path)
        node[part] = {}
    return node[part]


def _no_list(part: str, path: str) -> None:
    if part.isdigit():
        parent = path.rsplit(".", 1)[0] if "." in path else path
        raise ConfigError(
            f"override path {path!r}: {parent!r} holds no list in the config file; "
            f"set the whole list instead, e.g. {parent}=[{{...}}, {{...}}]"
        )


def _set(node: Any, last: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        if last not in node:
            _no_list(last, key)
        node[last] = value
    else:
        raise ConfigError(f"override {key!r} sets a key inside a value that is not a mapping: {node!r}")


def _index(items: list[Any], part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override path {path!r}: {part!r} is not an index of a list of {len(items)} entries")
    return int(part)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply dotted overrides, and build a checked :class:`TrainConfig`.

    Args:
        path: YAML file (None: defaults only).
        overrides: ``"dotted.key=value"`` strings, applied in order after the file.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or inconsistent values; the message names the key.
    """
    data: Any = {}
    if path is not None:
        try:
            data = yaml_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        except Exception as err:  # yaml.YAMLError
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, parse_overrides(overrides))
    source = f" (in {path} or its overrides)" if path is not None else ""
    try:
        _check_moved(data)
        cfg = build_dataclass(TrainConfig, upgrade_keys(data))
        _validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{err}{source}") from None
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain values (what ``config.yaml`` in the run folder holds)."""
    return to_plain(cfg)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts (e.g. a checkpoint's and the current)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys
