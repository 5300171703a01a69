"""The backbone VAE of a training run: load a pretrained one, or build a tiny random one and pretrain it briefly.

Pretraining exists for CPU demos and tests: a randomly initialised VAE reconstructs nothing, so fitting a
RefDecoder to it says little. A few hundred plain autoencoder steps (L1, encoder and decoder trained) give it a
meaningful (if blurry) reconstruction first. The pretrained weights are saved in the run folder and reused by
later runs and resumes, so the frozen parts are identical every time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refdecoder.backbones.registry import BackboneAdapter, get_backbone
from refdecoder.errors import BackboneError, CheckpointError, ConfigError
from refdecoder.training.config import ModelConfig

__all__ = ["backbone_adapter", "load_vae", "pretrain_vae", "PRETRAINED_VAE_NAME"]

logger = logging.getLogger("refdecoder.training")

PRETRAINED_VAE_NAME = "vae_pretrained.safetensors"


def backbone_adapter(name: str) -> type[BackboneAdapter]:
    """The registered adapter class ``name``, with an error that says what to do when it is not available."""
    try:
        return get_backbone(name)
    except BackboneError as err:
        raise BackboneError(
            f"the training config asks for backbone {name!r}, which this installation does not provide ({err}). "
            "Pick a registered backbone in model.backbone, or install/register the adapter first "
            "(refdecoder.register_backbone)."
        ) from None


def load_vae(cfg: ModelConfig, run_dir: str | Path) -> nn.Module:
    """Build the configured VAE (float32, on CPU).

    ``source: tiny`` builds ``adapter.build_tiny(**cfg.vae.tiny)`` seeded by ``cfg.vae.seed`` and loads the run's
    pretrained weights when a previous run saved them. ``source: pretrained`` loads ``cfg.vae.path``: a diffusers
    folder for ``wan2.1``, an official checkpoint file for ``videovae+``.
    """
    adapter = backbone_adapter(cfg.backbone)
    if cfg.vae.source == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(cfg.vae.seed)
            vae = adapter.build_tiny(**cfg.vae.tiny)
        saved = Path(run_dir) / PRETRAINED_VAE_NAME
        if saved.is_file():
            _load_weights(vae, saved)
        return vae.float()
    if not cfg.vae.path:
        raise ConfigError(
            "config key 'model.vae.path' must name the pretrained VAE when model.vae.source is 'pretrained'"
        )
    if not Path(cfg.vae.path).exists():
        raise CheckpointError(
            f"model.vae.path {cfg.vae.path} does not exist; give the local VAE "
            "(a diffusers folder for wan2.1, the checkpoint file for videovae+); the recipe never downloads weights"
        )
    loader = _LOADERS.get(cfg.backbone)
    if loader is None:
        raise ConfigError(
            f"no loader for pretrained {cfg.backbone!r} VAEs in the recipe (known: {sorted(_LOADERS)}); "
            "use model.vae.source: tiny, or load the VAE yourself and call refdecoder.wrap"
        )
    return loader(cfg).float()


def _load_wan(cfg: ModelConfig) -> nn.Module:
    from diffusers import AutoencoderKLWan

    kwargs = {"subfolder": cfg.vae.subfolder} if cfg.vae.subfolder else {}
    try:
        return AutoencoderKLWan.from_pretrained(cfg.vae.path, **kwargs)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot load a diffusers AutoencoderKLWan from {cfg.vae.path} ({kwargs}): {err}"
        ) from err


def _load_videovaeplus(cfg: ModelConfig) -> nn.Module:
    from refdecoder.backbones.videovaeplus import VideoVAEPlus

    return VideoVAEPlus.from_checkpoint(cfg.vae.path)


_LOADERS = {"wan2.1": _load_wan, "videovae+": _load_videovaeplus}


def _load_weights(vae: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        vae.load_state_dict(load_file(path), strict=True)
    except (RuntimeError, OSError) as err:
        raise CheckpointError(
            f"{path} does not fit the configured tiny VAE ({err}); delete it to pretrain again, or restore the "
            "model.vae.tiny settings it was made with"
        ) from err
    logger.info("loaded the pretrained tiny VAE from %s", path)


def pretrain_vae(
    vae: nn.Module,
    backbone: str,
    batches: Iterator[dict[str, Any]],
    steps: int,
    lr: float,
    out: str | Path,
    progress: Any = None,
) -> list[float]:
    """Train the whole VAE as a plain autoencoder (L1 on ``batch["video"]``) and save it to ``out``.

    Args:
        vae: the VAE (trained in place, then left in eval mode and frozen state unchanged otherwise).
        backbone: adapter name, for encode/decode.
        batches: yields batches with ``video`` ``B, 3, T, H, W`` in [-1, 1].
        steps: optimizer steps.
        lr: AdamW learning rate.
        out: safetensors file the weights are written to.
        progress: optional callable ``(step, loss)`` for progress display.

    Returns:
        The loss of every step.
    """
    from safetensors.torch import save_file

    adapter = backbone_adapter(backbone)(vae)
    flags = {name: p.requires_grad for name, p in vae.named_parameters()}
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        video = next(batches)["video"].float()
        loss = (adapter.plain_decode(adapter.encode(video)) - video).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    for name, param in vae.named_parameters():
        param.requires_grad_(flags[name])
    vae.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(tmp))
    tmp.replace(out)
    return losses
