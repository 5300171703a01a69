"""Assembling a run from its config: the Fabric object, the model (+ extra components), losses, metric networks.

Each function here is a small, separately testable piece of ``recipes/train.py``.
"""

from __future__ import annotations

import importlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from refdecoder._deps import require
from refdecoder.errors import CheckpointError, ConfigError
from refdecoder.training.config import ComponentConfig, TrainConfig, changed_keys

__all__ = [
    "build_fabric",
    "attach_components",
    "build_loss",
    "build_metric_lpips",
    "saved_model_keys",
    "rng_state",
    "set_rng_state",
    "gather_objects",
    "check_model_keys",
    "export_pretrained",
    "export_run",
    "wrap_run_model",
    "saved_config",
    "check_resume_config",
    "restore_checkpoint",
    "setup_model_and_optimizer",
]

logger = logging.getLogger("refdecoder.training")


def build_fabric(cfg: TrainConfig, loggers: list[Any] | None = None, callbacks: list[Any] | None = None) -> Any:
    """A ``lightning_fabric.Fabric`` for ``cfg.fabric`` (not launched yet).

    Strategies: ``auto``/``ddp``/``ddp_spawn`` (DDP, gloo on CPU), ``fsdp`` (full state dicts, so checkpoints can
    be filtered to the trained weights), ``deepspeed_stage_1``/``deepspeed_stage_2`` (ZeRO; gradient clipping is
    passed to DeepSpeed's own config). Multi-node runs set ``fabric.num_nodes`` and launch one process per device
    (e.g. ``fabric run`` or SLURM); Fabric handles the rest.
    """
    fabric_mod = require("lightning_fabric", extra="train", package="lightning-fabric")
    fc = cfg.fabric
    try:
        return fabric_mod.Fabric(
            accelerator=fc.accelerator,
            devices=fc.devices,
            num_nodes=fc.num_nodes,
            strategy=_strategy(cfg),
            precision=fc.precision,
            loggers=loggers,
            callbacks=callbacks,
        )
    except (ValueError, RuntimeError) as err:  # Fabric's own check of accelerator/strategy/precision combinations
        raise ConfigError(f"the fabric section does not work on this machine: {err}") from err


def _strategy(cfg: TrainConfig) -> Any:
    name = cfg.fabric.strategy
    strategies = require("lightning_fabric.strategies", extra="train", package="lightning-fabric")
    if name in ("ddp", "ddp_spawn"):
        start = "popen" if name == "ddp" else "spawn"
        return strategies.DDPStrategy(start_method=start, find_unused_parameters=cfg.fabric.find_unused_parameters)
    if name == "fsdp":
        from refdecoder.blocks.transformer import TransformerBlock

        return strategies.FSDPStrategy(auto_wrap_policy={TransformerBlock}, state_dict_type="full")
    if name.startswith("deepspeed"):
        if cfg.optim.grad_accum != 1:
            raise ConfigError("config key 'optim.grad_accum' must be 1 with DeepSpeed (it accumulates on its own)")
        strategy = strategies.DeepSpeedStrategy(stage=int(name[-1]))
        if cfg.optim.grad_clip is not None:
            strategy.config["gradient_clipping"] = cfg.optim.grad_clip
        return strategy
    return name


def attach_components(model: nn.Module, components: list[ComponentConfig]) -> None:
    """Build each configured component and register it in ``model.latent_components`` before token dropout.

    Components are modules called as ``component(x, ctx) -> x`` on the decoder-input latent (training only is
    their own business: they should be identity in eval mode). Order: configured order, then token dropout, so
    dropout zeroes positions of the already degraded latent.
    """
    existing = dict(model.latent_components.items())
    added = {}
    for spec in components:
        if spec.name in existing or spec.name in added:
            raise ConfigError(f"latent component name {spec.name!r} is used twice (model.latent_components)")
        added[spec.name] = _instantiate(spec)
    model.latent_components = nn.ModuleDict({**added, **existing})


def _instantiate(spec: ComponentConfig) -> nn.Module:
    module_name, _, attr = spec.target.partition(":") if ":" in spec.target else spec.target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"latent component {spec.name!r}: cannot import {spec.target!r} ({err}); give 'package.module:Class'"
        ) from err
    try:
        component = factory(**spec.args)
    except TypeError as err:
        raise ConfigError(f"latent component {spec.name!r}: {spec.target}(**{spec.args}) failed: {err}") from err
    if not isinstance(component, nn.Module):
        raise ConfigError(
            f"latent component {spec.name!r}: {spec.target} built a {type(component).__name__}, not a Module"
        )
    return component


def build_loss(cfg: TrainConfig) -> nn.Module:
    """The reconstruction loss of ``cfg.loss`` (L1 + LPIPS; LPIPS only when its weight is > 0)."""
    from refdecoder.losses import LPIPS, ReconstructionLoss

    lc = cfg.loss
    lpips = None
    if lc.lpips_weight > 0:
        lpips = LPIPS(net=lc.lpips_net, pretrained_trunk=lc.pretrained_trunk, trunk_weights=lc.trunk_weights)
    return ReconstructionLoss(l1_weight=lc.l1_weight, lpips_weight=lc.lpips_weight, lpips=lpips)


def build_metric_lpips(mode: str) -> nn.Module | None:
    """AlexNet LPIPS for validation: ``on`` (required), ``off``, or ``auto`` (None when the trunk is missing)."""
    if mode == "off":
        return None
    from refdecoder.losses import LPIPS

    try:
        return LPIPS(net="alex")
    except CheckpointError as err:
        if mode == "on":
            raise
        logger.warning("validation LPIPS disabled: %s", err)
        return None


def saved_model_keys(model: nn.Module) -> set[str]:
    """State-dict keys a training checkpoint keeps: what ``save_pretrained`` saves (the frozen VAE is rebuilt)."""
    return set(model.refdecoder_state_dict())


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, Python, NumPy) as plain values (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(fabric: Any, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects; a single-element list without distribution)."""
    if fabric.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def check_model_keys(expected: set[str], saved: list[str], path: str) -> None:
    """Raise :class:`CheckpointError` when a checkpoint's trained weights do not match this model's."""
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}. Was the model config (preset, model.refdecoder, "
            "train_decoder, latent components) changed since it was written?"
        )


def export_pretrained(cfg: TrainConfig, model: nn.Module, checkpoint: Path, out: Path) -> None:
    """``save_pretrained`` of the trained weights into ``out``.

    Under FSDP the live parameters are shards, so the weights come from the final (full state dict) checkpoint,
    loaded into a freshly wrapped copy of the VAE.
    """
    if cfg.fabric.strategy != "fsdp":
        model.save_pretrained(out)
        return
    import refdecoder
    from refdecoder.training.vae import load_vae

    fresh = refdecoder.wrap(load_vae(cfg.model, cfg.run_dir), cfg.refdecoder_config(), backbone=cfg.model.backbone)
    attach_components(fresh, cfg.model.latent_components)
    fresh.load_refdecoder_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    fresh.save_pretrained(out)


def saved_config(path: Path) -> dict[str, Any] | None:
    """The training config a recipe checkpoint file holds, read without loading its tensors (None for a folder,
    i.e. a sharded checkpoint, or a checkpoint without one)."""
    if not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several unrelated types for truncated or foreign files
        reason = " ".join(str(err).split())
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {reason}") from err
    progress = state.get("progress") if isinstance(state, dict) else None
    return progress.get("config") if isinstance(progress, dict) else None


def check_resume_config(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse a resume whose config changes the model; log other changes (more steps, other logging, ...).

    Raises:
        CheckpointError: a ``model.*`` key differs; the one-line message lists each key with its old and new value.
    """
    if saved is None:
        return
    changed = changed_keys(saved, current)
    model = [key for key in changed if key.startswith("model.")]
    if model:
        diffs = "; ".join(f"{key}: {_at(saved, key)} -> {_at(current, key)}" for key in model)
        raise CheckpointError(
            f"cannot resume from {path}: the model config differs from the checkpoint's ({diffs}); restore the "
            "checkpoint's values or start a new run_dir"
        )
    if changed:
        logger.warning("the config differs from the checkpoint's in %s; continuing with the new values", changed)


def _at(config: dict[str, Any], key: str) -> str:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "(unset)"
        node = node[part]
    return repr(node)


def wrap_run_model(cfg: TrainConfig, vae: nn.Module) -> nn.Module:
    """The trained model of a run: ``vae`` wrapped by RefDecoder (+ the configured latent components, compiled
    blocks), or, for ``model.kind: plain``, its decoder alone (:class:`~refdecoder.training.plain.PlainDecoder`)."""
    import refdecoder
    from refdecoder.training.plain import PlainDecoder
    from refdecoder.training.vae import backbone_adapter

    if cfg.model.kind == "plain":
        return PlainDecoder(vae, backbone_adapter(cfg.model.backbone)(vae))
    model = refdecoder.wrap(vae, cfg.refdecoder_config(), backbone=cfg.model.backbone)
    attach_components(model, cfg.model.latent_components)
    if cfg.fabric.compile:
        # RefDecoder.compile is the one compile path. Training compiles the transformer blocks only, as it always
        # did: the compiled window pass is checked for decoding (tests/test_compile.py), not for backward.
        model.compile(decoder=False)
    return model


def export_run(cfg: TrainConfig, model: nn.Module, checkpoint: Path) -> Path:
    """What a finished run leaves for inference: ``<run_dir>/refdecoder`` (``save_pretrained``), or for a plain
    decoder the fine-tuned VAE as ``<run_dir>/vae`` (what ``--vae RUN_DIR`` then decodes with)."""
    from refdecoder.inference.loading import save_vae
    from refdecoder.training.vae import RUN_VAE_DIR

    if cfg.model.kind == "plain":
        return save_vae(model.vae, Path(cfg.run_dir) / RUN_VAE_DIR)
    out = Path(cfg.run_dir) / "refdecoder"
    export_pretrained(cfg, model, checkpoint, out)
    return out


def restore_checkpoint(
    fabric: Any, path: Path, state: dict[str, Any], model_keys: set[str], config: dict[str, Any]
) -> None:
    """Load a recipe checkpoint into ``state`` in place and restore this rank's RNG states.

    The checkpoint holds only the trained weights (the frozen VAE was rebuilt from its source), so the model loads
    non-strictly and the saved key list is checked against ``model_keys`` instead. Check a checkpoint file's config
    with :func:`check_resume_config` first (a changed model would fail here with the optimizer's own error); a
    sharded checkpoint (folder) is checked here, after the load.
    """
    try:
        fabric.load(path, state, strict=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"cannot resume from {path}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from err
    progress = state["progress"]
    check_model_keys(model_keys, progress["model_keys"], str(path))
    if not Path(path).is_file():  # a sharded checkpoint: saved_config could not read it before the load
        check_resume_config(path, progress.get("config"), config)
    ranks = progress["ranks"]
    if len(ranks) != fabric.world_size:
        logger.warning(
            "checkpoint written by %d rank(s), resuming on %d: data positions of rank 0 are reused",
            len(ranks),
            fabric.world_size,
        )
    set_rng_state(ranks[fabric.global_rank if fabric.global_rank < len(ranks) else 0]["rng"])


def setup_model_and_optimizer(fabric: Any, cfg: TrainConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """AdamW over ``model.param_groups`` (added modules at lr, decoder at lr x ratio), set up by Fabric."""
    lr = cfg.optim.lr
    if cfg.optim.scale_lr:
        lr *= fabric.world_size * cfg.data.batch_size * cfg.optim.grad_accum

    def make_optimizer(module: Any) -> torch.optim.Optimizer:
        groups = module.param_groups(lr, decoder_lr_ratio=cfg.optim.decoder_lr_ratio)
        oc = cfg.optim
        return torch.optim.AdamW(groups, lr=lr, betas=oc.betas, weight_decay=oc.weight_decay, eps=oc.eps)

    if cfg.fabric.strategy.startswith("deepspeed"):
        model, optimizer = fabric.setup(model, make_optimizer(model))
    else:  # FSDP needs the optimizer built on the already sharded parameters; the others do not mind
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(make_optimizer(model))
    for method in ("decode", "encode"):  # latent finetuning calls these; they must go through DDP/FSDP's forward
        model.mark_forward_method(method)
    return model, optimizer
