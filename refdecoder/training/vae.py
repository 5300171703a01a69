"""The backbone VAE of a training run: the bundled demo VAE, a pretrained one, or a tiny random one pretrained briefly.

``source: demo`` is the small Wan2.1-layout VAE shipped with the package (``refdecoder/data/demo_vae``, made by
``recipes/make_demo_vae.py``); the CPU demo starts from it. ``source: tiny`` builds a random reduced-width VAE and,
with ``pretrain.steps``, trains it as a plain autoencoder first (tests and experiments). A run saves the VAE it
made or took from the package as a diffusers folder ``<run_dir>/vae``, which later runs, resumes and the CLI
(``--vae RUN_DIR``) read; ``source: pretrained`` VAEs stay where they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refdecoder.backbones.registry import BackboneAdapter, get_backbone
from refdecoder.errors import BackboneError, CheckpointError, ConfigError
from refdecoder.training.config import ModelConfig, TrainConfig

__all__ = [
    "backbone_adapter",
    "load_vae",
    "save_run_vae",
    "pretrain_vae",
    "pretrain_run_vae",
    "he_init",
    "unclamped_decode",
    "RUN_VAE_DIR",
]

logger = logging.getLogger("refdecoder.training")

RUN_VAE_DIR = "vae"  # <run_dir>/vae: the run's VAE as a diffusers folder


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
    """Build the configured VAE (float32, on CPU, eval mode).

    ``source: tiny`` loads ``<run_dir>/vae`` when an earlier run saved it, else builds
    ``adapter.build_tiny(**cfg.vae.tiny)`` seeded by ``cfg.vae.seed``. ``source: demo`` loads the bundled demo VAE.
    ``source: pretrained`` loads ``cfg.vae.path`` (a diffusers folder or a Hugging Face repo id for ``wan2.1``,
    an official checkpoint file for ``videovae+``).
    """
    from refdecoder.inference.loading import load_vae as load_vae_path

    adapter = backbone_adapter(cfg.backbone)
    saved = Path(run_dir) / RUN_VAE_DIR
    if cfg.vae.source == "tiny" and (saved / "config.json").is_file():
        return load_vae_path(saved)
    if cfg.vae.source == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(cfg.vae.seed)
            vae = adapter.build_tiny(**cfg.vae.tiny)
        return vae.float().eval()
    if cfg.vae.source == "demo":
        from refdecoder.data.samples import demo_vae_dir

        if cfg.backbone != "wan2.1":
            raise ConfigError(f"model.vae.source 'demo' is a wan2.1 VAE; model.backbone is {cfg.backbone!r}")
        return load_vae_path(demo_vae_dir())
    if not cfg.vae.path:
        raise ConfigError(
            "config key 'model.vae.path' must name the pretrained VAE when model.vae.source is 'pretrained'"
        )
    try:
        return load_vae_path(cfg.vae.path, subfolder=cfg.vae.subfolder if cfg.backbone == "wan2.1" else None)
    except CheckpointError as err:
        raise CheckpointError(f"model.vae.path: {err}") from None


def save_run_vae(cfg: ModelConfig, vae: nn.Module, run_dir: str | Path) -> Path:
    """Save the run's VAE as ``<run_dir>/vae`` (the bundled demo VAE is copied as it is, in float16)."""
    import shutil

    from refdecoder.inference.loading import save_vae

    out = Path(run_dir) / RUN_VAE_DIR
    if cfg.vae.source != "demo":
        return save_vae(vae, out)
    from refdecoder.data.samples import demo_vae_dir

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(demo_vae_dir(), tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def pretrain_run_vae(
    cfg: TrainConfig, vae: nn.Module, run_dir: str | Path, tick: Callable[[float], None] | None = None
) -> list[float]:
    """The recipe's first-run pretraining of a ``source: tiny`` VAE: He init, then ``model.vae.pretrain`` steps
    of :func:`pretrain_vae` on ``data.train`` clips; the losses go to ``<run_dir>/vae_pretrain.json``."""
    from refdecoder.training.data import BatchStream, build_clip_dataset
    from refdecoder.training.loggers import write_json

    pretrain = cfg.model.vae.pretrain
    he_init(vae, cfg.model.vae.seed)
    size = cfg.stages[0].size or cfg.data.size
    frame_rule = backbone_adapter(cfg.model.backbone).frame_rule
    frames = pretrain.frames or cfg.stages[0].frames  # like the size: the first stage's unless set
    dataset = build_clip_dataset(cfg.data.train, frames, size, frame_rule, cfg.seed)
    batches = BatchStream(dataset, pretrain.batch_size, seed=cfg.seed, num_workers=cfg.data.train.num_workers)
    progress = (lambda step, loss: tick(loss)) if tick is not None else None
    losses = pretrain_vae(vae, cfg.model.backbone, batches, pretrain.steps, pretrain.lr, pretrain.warmup, progress)
    write_json(Path(run_dir) / "vae_pretrain.json", {"steps": pretrain.steps, "loss": losses})
    return losses


def he_init(vae: nn.Module, seed: int) -> nn.Module:
    """He-initialise every convolution of ``vae`` (zero biases), in place, seeded.

    PyTorch's default convolution init shrinks the signal at every layer, so in a deep, narrow VAE the latents
    barely depend on the input at first and AdamW spends hundreds of steps predicting the mean colour (measured in
    the small-scale quality benchmark); He init learns from the first steps.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fan_in = module.weight[0].numel()
                std = (2.0 / fan_in) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
    return vae


def unclamped_decode(adapter: BackboneAdapter, latents: torch.Tensor) -> torch.Tensor:
    """The backbone's plain decode without its final clamp, so that training gets gradients outside [-1, 1]."""
    from refdecoder.hooks import DecodeContext, IdentityHooks

    windows = adapter.plan_windows(latents.shape[2], adapter.default_window)
    return adapter.decode_windows(latents, IdentityHooks(), DecodeContext(), windows)


def pretrain_vae(
    vae: nn.Module,
    backbone: str,
    batches: Iterator[dict[str, Any]],
    steps: int,
    lr: float,
    warmup: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the whole VAE as a plain autoencoder: L1 of the unclamped decode against ``batch["video"]``.

    AdamW (no weight decay), linear warm-up over ``warmup`` steps then cosine to 1% of ``lr``. The VAE is trained
    in place and left in eval mode with its previous ``requires_grad`` flags.

    Args:
        vae: the VAE.
        backbone: adapter name, for encode/decode.
        batches: yields batches with ``video`` ``B, 3, T, H, W`` in [-1, 1].
        steps: optimizer steps.
        lr: peak learning rate.
        warmup: warm-up steps.
        progress: called as ``progress(step, loss)`` after each step.

    Returns:
        The loss of every step.
    """
    from refdecoder.training.schedule import warmup_cosine

    adapter = backbone_adapter(backbone)(vae)
    flags = {name: p.requires_grad for name, p in vae.named_parameters()}
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, steps, warmup)
    losses = []
    for step in range(steps):
        video = next(batches)["video"].float()
        loss = (unclamped_decode(adapter, adapter.encode(video)) - video).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    for name, param in vae.named_parameters():
        param.requires_grad_(flags[name])
    vae.eval()
    return losses
