"""Train a latent degradation proxy: a small conv net that turns clean latents into what a diffusion model makes.

Pairs: a clean latent ``x0`` (diffusion-normalised space) is noised to timestep ``t`` on the flow-matching path
``x_t = (1 - t) x0 + t eps`` and handed to a denoiser, whose one-step (or few-step Euler) prediction of ``x0`` is
the degraded latent. The proxy learns ``(x0, t) -> prediction``; ``t`` is drawn from ``--t-min..--t-max``
(spacepxl trains its VAE with 0-0.12). The trained proxy is frozen and saved as one ``.safetensors`` file, which
``LatentDegradationConfig(proxy=...)`` / ``LatentDegrader`` attach at the decoder's ``latents`` hook point.

The denoiser is any callable ``denoiser(x_t, t) -> velocity`` (``--prediction x0`` for an x0-predictor) with
``x_t`` ``B, C, T, H, W`` normalised latents and ``t`` ``(B,)`` in [0, 1], built by ``--denoiser module:factory``
(``factory(**json.loads(--denoiser-kwargs))``); in real use it wraps a diffusers transformer with fixed prompt
embeddings (see docs/degradation_and_spectral.md). ``--demo-blur S`` replaces it with a known degradation (a
Gaussian blur of sigma ``S * t``), for demos and tests.

With ``--vae DIR`` (a diffusers VAE folder), pairs are mapped into the space the decoder's ``latents`` hook sees
(for Wan: after ``post_quant_conv`` of the de-normalised latents), which is where the proxy will run.

    python recipes/train_degrader.py --latents gen/ --vae /models/wan/vae --denoiser mypkg.wan:denoiser \\
        --denoiser-kwargs '{"path": "/models/wan"}' --out degrader.safetensors --device cuda
    python recipes/train_degrader.py --synthetic 64 --demo-blur 1.0 --out /tmp/degrader.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from refdecoder.blocks.latent_degradation import DegradationProxy, freeze_as_constants, latent_blur
from refdecoder.errors import ConfigError, DataError
from refdecoder.hooks import DecodeContext, IdentityHooks

logger = logging.getLogger("refdecoder.recipes.train_degrader")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (clean latents B,C,T,H,W, t (B,), generator) -> degraded latents of the same shape
Degradation = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]
Space = Callable[[torch.Tensor], torch.Tensor]


# --- degradations ----------------------------------------------------------------------------------------------
def flow_matching_degradation(denoiser: Denoiser, prediction: str = "velocity", steps: int = 1) -> Degradation:
    """Degrade by noising to ``t`` and denoising back to 0 in ``steps`` Euler steps with ``denoiser``.

    ``prediction="velocity"``: the denoiser returns ``v = eps - x0`` (diffusers' flow-matching transformers);
    ``"x0"``: it returns its estimate of ``x0`` (converted to ``v = (x_t - x0) / t``).
    """
    if prediction not in ("velocity", "x0") or steps < 1:
        raise ConfigError(f"need prediction velocity|x0 and steps >= 1, got {prediction!r}, {steps}")

    def degrade(clean: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else clean.device
        noise = torch.randn(clean.shape, generator=generator, device=device).to(clean)
        shape = (-1, 1, 1, 1, 1)
        x = (1 - t.view(shape)) * clean + t.view(shape) * noise
        for i in range(steps):
            now, nxt = t * (1 - i / steps), t * (1 - (i + 1) / steps)
            out = denoiser(x, now)
            if prediction == "x0":
                out = torch.where(now.view(shape) > 0, (x - out) / now.clamp_min(1e-8).view(shape), 0.0)
            x = x + (nxt - now).view(shape) * out
        return x

    return degrade


def blur_degradation(sigma_per_t: float) -> Degradation:
    """A known stand-in degradation: spatial Gaussian blur of sigma ``sigma_per_t * t``."""
    return lambda clean, t, generator: latent_blur(clean, sigma_per_t * t)


class _Captured(Exception):
    """Carries the decoder-input latent out of an adapter's decode loop."""


class _CaptureHooks(IdentityHooks):
    """Stops the decode at the ``latents`` hook (no stage is ever reached)."""

    def latents(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        raise _Captured(x)


def hook_space(model: torch.nn.Module) -> Space:
    """Map normalised diffusion latents to what a RefDecoder's ``latents`` hook sees, through its own adapter.

    The adapter's decode loop is started and stopped at the hook, so no backbone detail is repeated here.
    """

    @torch.no_grad()
    def to_hook(normalized: torch.Tensor) -> torch.Tensor:
        raw = model.denormalize(normalized)
        windows = model.adapter.plan_windows(raw.shape[2], raw.shape[2])
        try:
            model.adapter.decode_windows(raw, _CaptureHooks(), DecodeContext(), windows)
        except _Captured as captured:
            return captured.args[0]
        raise ConfigError(f"backbone {model.adapter.name!r} never called the latents hook; cannot map latents")

    return to_hook


# --- data ------------------------------------------------------------------------------------------------------
def load_latent_file(path: Path) -> tuple[torch.Tensor, bool]:
    """``(latents C, T, H, W, normalized)`` from a ``.safetensors`` (tensor ``latents``) or ``.pt`` file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            if "latents" not in handle.keys():
                raise DataError(f"{path} has no 'latents' tensor (tensors: {list(handle.keys())})")
            latents, meta = handle.get_tensor("latents"), handle.metadata() or {}
        normalized = meta.get("normalized", "true").lower() in ("1", "true", "yes")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        latents, normalized = (data["latents"] if isinstance(data, dict) else data), True
    latents = latents[0] if latents.ndim == 5 and latents.shape[0] == 1 else latents
    if latents.ndim != 4:
        raise DataError(f"{path}: latents must be C, T, H, W (or 1, C, T, H, W), got {tuple(latents.shape)}")
    return latents.float(), normalized


def collect_files(inputs: Sequence[str]) -> list[Path]:
    """Latent files named directly or found (sorted) in the given folders."""
    files: list[Path] = []
    for item in map(Path, inputs):
        found = sorted(p for p in item.iterdir() if p.suffix in (".safetensors", ".pt")) if item.is_dir() else [item]
        files.extend(found)
    if not files:
        raise DataError(f"no .safetensors or .pt latent files in {list(inputs)}")
    return files


def synthetic_latents(count: int, channels: int, frames: int, size: int, seed: int) -> list[torch.Tensor]:
    """Spatially correlated random latents ``C, T, size, size`` (blurred noise), for demos and tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, channels, frames, size, size, generator=g)
    return list(latent_blur(x, 0.7) * 2)


class LatentPool:
    """Random crops ``B, C, F, crop, crop`` (frames from the start, so a causal 1+4k layout is kept)."""

    def __init__(self, latents: Sequence[torch.Tensor], crop: int, frames: int | None = None) -> None:
        if not latents:
            raise DataError("the latent pool is empty")
        self.latents = list(latents)
        self.frames = frames or min(x.shape[1] for x in self.latents)
        small = [tuple(x.shape) for x in self.latents if min(x.shape[2:]) < crop or x.shape[1] < self.frames]
        if small:
            raise DataError(f"latents smaller than the crop {crop} x {crop} x {self.frames} frames: {small[:3]}")
        self.crop = crop

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        picks = torch.randint(0, len(self.latents), (batch,), generator=generator).tolist()
        crops = []
        for i in picks:
            x = self.latents[i]
            top, left = (int(torch.randint(0, s - self.crop + 1, (1,), generator=generator)) for s in x.shape[2:])
            crops.append(x[:, : self.frames, top : top + self.crop, left : left + self.crop])
        return torch.stack(crops)


# --- training --------------------------------------------------------------------------------------------------
def _pair(
    clean: torch.Tensor, t: torch.Tensor, degrade: Degradation, space: Space | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        degraded = degrade(clean, t, generator)
        return (clean, degraded) if space is None else (space(clean), space(degraded))


def _timesteps(batch: int, t_range: tuple[float, float], generator: torch.Generator | None, device) -> torch.Tensor:
    lo, hi = t_range
    return (lo + (hi - lo) * torch.rand(batch, generator=generator)).to(device)


def train_proxy(
    proxy: DegradationProxy,
    sample: Callable[[int], torch.Tensor],
    degrade: Degradation,
    t_range: tuple[float, float],
    steps: int,
    batch: int = 8,
    lr: float = 1e-2,
    generator: torch.Generator | None = None,
    space: Space | None = None,
    progress: Callable | None = None,
) -> list[float]:
    """Fit ``proxy(clean, t)`` to ``degrade(clean, t)`` by MSE with AdamW and a one-cycle schedule.

    Args:
        sample: ``batch -> B, C, T, H, W`` clean latents on the proxy's device.
        space: maps both sides of a pair into the proxy's space (e.g. :func:`hook_space`); None = identity.
        progress: optional wrapper of the step range (e.g. tqdm).

    Returns:
        The training loss of every step.
    """
    optimizer = torch.optim.AdamW(proxy.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    proxy.train()
    for _ in (progress or iter)(range(steps)):
        clean = sample(batch)
        t = _timesteps(batch, t_range, generator, clean.device)
        source, target = _pair(clean, t, degrade, space, generator)
        loss = torch.nn.functional.mse_loss(proxy(source, t), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate_proxy(
    proxy: DegradationProxy,
    batches: Sequence[torch.Tensor],
    degrade: Degradation,
    t_range: tuple[float, float],
    generator: torch.Generator | None = None,
    space: Space | None = None,
) -> dict[str, float]:
    """L2 error of the proxy and of the identity map against the true degradation, and their ratio."""
    proxy_sq = identity_sq = 0.0
    for clean in batches:
        t = _timesteps(clean.shape[0], t_range, generator, clean.device)
        source, target = _pair(clean, t, degrade, space, generator)
        proxy_sq += float((proxy(source, t) - target).pow(2).sum())
        identity_sq += float((source - target).pow(2).sum())
    proxy_err, identity_err = math.sqrt(proxy_sq), math.sqrt(identity_sq)
    return {"proxy_error": proxy_err, "identity_error": identity_err, "ratio": proxy_err / max(identity_err, 1e-12)}


# --- command line ----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The recipe's command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--latents", nargs="+", help="latent files (.safetensors with 'latents', .pt) or folders")
    src.add_argument("--synthetic", type=int, help="train on this many synthetic latents instead (demo)")
    deg = p.add_mutually_exclusive_group(required=True)
    deg.add_argument("--denoiser", help="module:factory returning denoiser(x_t, t)")
    deg.add_argument("--demo-blur", type=float, help="known stand-in degradation: blur sigma = VALUE * t")
    p.add_argument("--denoiser-kwargs", default="{}", help="JSON keyword arguments of the denoiser factory")
    p.add_argument("--prediction", choices=("velocity", "x0"), default="velocity")
    p.add_argument("--denoise-steps", type=int, default=1, help="Euler steps from t back to 0")
    p.add_argument("--vae", help="diffusers VAE folder: train in the space of the decoder's latents hook")
    p.add_argument("--backbone", default=None, help="force a backbone adapter for --vae")
    p.add_argument("--out", required=True, help="output .safetensors file of the frozen proxy")
    p.add_argument("--t-min", type=float, default=0.0)
    p.add_argument("--t-max", type=float, default=0.12)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--crop", type=int, default=32, help="spatial crop in latent positions")
    p.add_argument("--frames", type=int, default=None, help="latent frames per crop (default: the shortest file)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of files kept for evaluation")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--channels", type=int, default=16, help="channels of --synthetic latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def build_degradation(args: argparse.Namespace) -> Degradation:
    """The known blur stand-in, or noising + the user's denoiser."""
    if args.demo_blur is not None:
        return blur_degradation(args.demo_blur)
    module, _, name = args.denoiser.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return flow_matching_degradation(factory(**json.loads(args.denoiser_kwargs)), args.prediction, args.denoise_steps)


def load_data(args: argparse.Namespace, model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Train and held-out latents, in the diffusion-normalised space when a VAE is given."""
    if args.synthetic:
        data = synthetic_latents(args.synthetic, args.channels, args.frames or 1, args.crop + 8, args.seed)
    else:
        data = []
        for path in collect_files(args.latents):
            latents, normalized = load_latent_file(path)
            if model is not None and not normalized:
                latents = model.normalize(latents[None])[0]
            elif not normalized:
                logger.warning("%s holds raw latents; without --vae they are fed to the denoiser as they are", path)
            data.append(latents)
    held = max(1, round(len(data) * args.holdout)) if len(data) > 1 and args.holdout > 0 else 0
    return data[: len(data) - held], data[len(data) - held :]


def main(argv: Sequence[str] | None = None) -> int:
    """Train, freeze, evaluate and save a proxy; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = None
    if args.vae:
        from diffusers import AutoencoderKLWan

        import refdecoder

        model = refdecoder.wrap(AutoencoderKLWan.from_pretrained(args.vae), backbone=args.backbone).to(args.device)
    space = hook_space(model) if model is not None else None
    degrade = build_degradation(args)
    train, held = load_data(args, model)
    pool = LatentPool(train, args.crop, args.frames)
    channels = pool.latents[0].shape[0] if model is None else model.adapter.latent_channels
    proxy = DegradationProxy(channels, args.width, args.depth).to(args.device)
    t_range = (args.t_min, args.t_max)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    sample = lambda batch: pool.sample(batch, generator).to(args.device)  # noqa: E731
    losses = train_proxy(proxy, sample, degrade, t_range, args.steps, args.batch, args.lr, generator, space, tqdm)
    freeze_as_constants(proxy)
    eval_pool = LatentPool(held, args.crop, pool.frames) if held else pool
    batches = [eval_pool.sample(args.batch, generator).to(args.device) for _ in range(args.eval_batches)]
    metrics = evaluate_proxy(proxy, batches, degrade, t_range, generator, space)
    out = proxy.save(args.out)
    report = {"final_loss": losses[-1], "steps": args.steps, "t_range": t_range, "heldout": bool(held), **metrics}
    Path(f"{out}.metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}: error vs identity {metrics['ratio']:.3f} ({'held-out' if held else 'training'} latents)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
