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
    "compile_transformer",
    "build_loss",
    "build_metric_lpips",
    "saved_model_keys",
    "rng_state",
    "set_rng_state",
    "gather_objects",
    "check_model_keys",
    "export_pretrained",
    "restore_checkpoint",
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


def compile_transformer(model: nn.Module) -> None:
    """``torch.compile`` each shared transformer block in place (state-dict keys are unchanged)."""
    for block in model.transformer.blocks:
        block.compile()


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


def restore_checkpoint(
    fabric: Any, path: Path, state: dict[str, Any], model_keys: set[str], config: dict[str, Any]
) -> None:
    """Load a recipe checkpoint into ``state`` in place and restore this rank's RNG states.

    The checkpoint holds only the trained weights (the frozen VAE was rebuilt from its source), so the model loads
    non-strictly and the saved key list is checked against ``model_keys`` instead. A config that differs from the
    checkpoint's is logged, not refused (e.g. more steps, other logging).
    """
    fabric.load(path, state, strict=False)
    progress = state["progress"]
    check_model_keys(model_keys, progress["model_keys"], str(path))
    changed = changed_keys(progress.get("config", {}), config)
    if changed:
        logger.warning("the config differs from the checkpoint's in %s; continuing with the new values", changed)
    ranks = progress["ranks"]
    if len(ranks) != fabric.world_size:
        logger.warning(
            "checkpoint written by %d rank(s), resuming on %d: data positions of rank 0 are reused",
            len(ranks),
            fabric.world_size,
        )
    set_rng_state(ranks[fabric.global_rank if fabric.global_rank < len(ranks) else 0]["rng"])
