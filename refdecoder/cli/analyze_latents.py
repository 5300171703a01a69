"""``refdecoder analyze-latents``: power spectrum and channel eigenspectrum of latents, clean and degraded.

refdecoder analyze-latents gen/*.safetensors --out report/
refdecoder analyze-latents gen/ --out report/ --degrade blur,noise,lmr --blur-sigma 1 --noise-std 0.3
refdecoder analyze-latents gen/ --out report/ --degrade proxy --proxy degrader.safetensors --t 0.1
refdecoder analyze-latents clip.mp4 --vae runs/tiny --out report/    # a video, encoded by a run's (or any) VAE

Inputs are ``.safetensors`` files with a ``latents`` tensor (as written by ``refdecoder.data.save_latents``) or
``.pt`` files holding a tensor or a dict with ``latents``; each ``C, T, H, W`` or ``B, C, T, H, W``; folders are
searched for both. With ``--vae`` (a VAE folder, checkpoint, training run folder or Hub id) video files are
accepted too: each is encoded whole (its first frames up to the backbone's frame rule) by the frozen encoder.
Writes ``report.json`` (every statistic of every variant) and, unless ``--no-plots``, ``spatial_spectrum.png``,
``temporal_spectrum.png`` and ``eigenspectrum.png`` comparing the variants. Degradations are applied in the files'
own latent space, with a zero mask token for LMR (the learned token is a training artefact) and the proxy at a fixed
timestep ``--t``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]

_DEGRADATIONS = ("blur", "noise", "lmr", "proxy")


def register(subparsers: Any) -> None:
    """Add the ``analyze-latents`` command to the top-level parser."""
    from refdecoder.cli import add_command

    p = add_command(
        subparsers, "analyze-latents", __doc__, "latent power spectrum and channel eigenspectrum, clean vs degraded"
    )
    p.add_argument(
        "latents", nargs="+", help="latent files (.safetensors / .pt) or folders of them; videos with --vae"
    )
    p.add_argument("--out", required=True, help="output folder for report.json and the PNG plots")
    p.add_argument("--vae", help="VAE (folder, checkpoint, training run folder, Hub id) that encodes video inputs")
    p.add_argument("--degrade", default="", help=f"comma-separated degradations to compare: {','.join(_DEGRADATIONS)}")
    p.add_argument("--blur-sigma", type=float, default=1.0, help="blur sigma in latent positions")
    p.add_argument("--noise-std", type=float, default=0.3, help="noise std relative to each channel's std")
    p.add_argument("--lmr-ratio", type=float, default=0.5, help="LMR mask ratio")
    p.add_argument("--lmr-block", default="1,1,1", help="LMR block t,h,w")
    p.add_argument("--proxy", help="trained degradation proxy file (for --degrade proxy)")
    p.add_argument("--t", type=float, default=0.1, help="proxy timestep")
    p.add_argument("--bins", type=int, default=8, help="radial spatial frequency bins")
    p.add_argument("--temporal-bins", type=int, default=4, help="temporal frequency bins")
    p.add_argument("--cutoff", type=float, default=0.25, help="low-frequency radius (cycles / latent position)")
    p.add_argument("--top-k", type=int, default=4, help="k of the top-k eigenvalue share")
    p.add_argument("--no-standardize", action="store_true", help="eigenspectrum of the covariance, not correlation")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and LMR draws")
    p.add_argument("--no-plots", action="store_true", help="only write report.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Analyse the latents and write the report; returns 0."""
    import torch

    from refdecoder.analysis import channel_eigenspectrum, power_spectrum
    from refdecoder.inference.outfolder import ensure_writable

    ensure_writable(args.out)
    files = _collect(args.latents, videos=args.vae is not None)
    encode = _encoder(args.vae) if args.vae is not None else None
    latents = [encode(path) if _is_video(path) else _load(path) for path in files]
    variants = {"clean": latents}
    generator = torch.Generator().manual_seed(args.seed)
    names = _parse_degradations(args.degrade)
    proxy = _load_proxy(args.proxy) if "proxy" in names else None
    for name in names:
        variants[name] = [_degrade(name, x, args, generator, proxy) for x in latents]
    report: dict[str, Any] = {"files": [str(p) for p in files], "settings": _settings(args), "variants": {}}
    for name, items in variants.items():
        report["variants"][name] = {
            "power_spectrum": power_spectrum(items, args.bins, args.temporal_bins, args.cutoff).to_dict(),
            "eigenspectrum": channel_eigenspectrum(items, not args.no_standardize, args.top_k).to_dict(),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plots:
        _plot(report["variants"], out)
    for name, stats in report["variants"].items():
        eig, psd = stats["eigenspectrum"], stats["power_spectrum"]
        print(
            f"{name:>6}: low-frequency energy {psd['low_energy']:.3f}, effective rank {eig['effective_rank']:.2f}, "
            f"top-{eig['top_k']} share {eig['top_k_share']:.3f}"
        )
    print(f"wrote {out / 'report.json'}")
    return 0


def _parse_degradations(spec: str) -> list[str]:
    from refdecoder.errors import InputError

    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(names) - set(_DEGRADATIONS))
    if unknown:
        raise InputError(f"unknown degradation(s) {unknown}; choose from {list(_DEGRADATIONS)}")
    return names


def _is_video(path: Path) -> bool:
    from refdecoder.data import VIDEO_EXTENSIONS

    return path.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS


def _collect(inputs: list[str], videos: bool) -> list[Path]:
    from refdecoder.errors import InputError

    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(
                sorted(p for p in item.iterdir() if p.suffix in (".safetensors", ".pt") or (videos and _is_video(p)))
            )
        elif item.is_file():
            if _is_video(item) and not videos:
                raise InputError(f"{item} is a video; pass --vae VAE (or a training run folder) to encode it")
            files.append(item)
        else:
            raise InputError(f"{item} does not exist; pass latent files or folders of them")
    if not files:
        raise InputError(f"no .safetensors or .pt files in {inputs}")
    return files


def _encoder(vae_path: str) -> Any:
    """A function ``path -> latents 1, C, t, h, w`` encoding a whole video (cut to the frame rule) with ``vae``."""
    import torch

    from refdecoder.backbones.registry import find_backbone
    from refdecoder.data import probe, read_clip
    from refdecoder.inference.loading import load_vae

    vae = load_vae(vae_path)
    adapter = find_backbone(vae)(vae)

    def encode(path: Path) -> Any:
        info, factor = probe(path), adapter.spatial_factor
        size = (info.height // factor * factor, info.width // factor * factor)  # centre crop to whole latents
        video = read_clip(path, range(adapter.frame_rule.round(info.frames, "down")), size)[None]
        with torch.no_grad():
            return adapter.encode(video).float()

    return encode


def _load(path: Path) -> Any:
    """Latents ``B, C, T, H, W`` (float32) from one file."""
    import torch

    from refdecoder.errors import DataError

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                latents = handle.get_tensor("latents")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
            latents = data["latents"] if isinstance(data, dict) else data
    except Exception as err:
        raise DataError(f"cannot read latents from {path}: {type(err).__name__}: {err}") from err
    if not isinstance(latents, torch.Tensor) or latents.ndim not in (4, 5):
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise DataError(f"{path}: latents must be C, T, H, W or B, C, T, H, W, got {shape}")
    if not latents.is_floating_point() or 0 in latents.shape:
        raise DataError(f"{path}: latents must be non-empty floats, got {latents.dtype} {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise DataError(f"{path}: the latents hold NaN or inf values; check the sampler that made them")
    return (latents[None] if latents.ndim == 4 else latents).float()


def _load_proxy(path: str | None) -> Any:
    from refdecoder.blocks.latent_degradation import DegradationProxy
    from refdecoder.errors import InputError

    if not path:
        raise InputError("--degrade proxy needs --proxy PATH (a file written by recipes/train_degrader.py)")
    return DegradationProxy.load(path).eval()


def _degrade(name: str, x: Any, args: argparse.Namespace, generator: Any, proxy: Any) -> Any:
    import torch

    from refdecoder.blocks.latent_degradation import latent_blur, latent_masked_reconstruction, latent_noise

    if name == "blur":
        return latent_blur(x, args.blur_sigma)
    if name == "noise":
        return latent_noise(x, args.noise_std, generator)
    if name == "lmr":
        block = tuple(int(v) for v in args.lmr_block.split(","))
        token = torch.zeros(1, x.shape[1], 1, 1, 1)
        return latent_masked_reconstruction(x, token, args.lmr_ratio, block, generator)  # type: ignore[arg-type]
    with torch.no_grad():
        return proxy(x, args.t)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("degrade", "blur_sigma", "noise_std", "lmr_ratio", "lmr_block", "proxy", "t", "bins", "cutoff", "top_k")
    return {k: getattr(args, k) for k in keys} | {"standardize": not args.no_standardize, "seed": args.seed}


def _plot(variants: dict[str, Any], out: Path) -> None:
    from refdecoder._deps import require

    matplotlib = require("matplotlib", extra="eval")
    matplotlib.use("Agg")  # files only; never open a window
    plt = require("matplotlib.pyplot", extra="eval", package="matplotlib")
    panels = [
        ("spatial_spectrum.png", "spatial_freqs", "spatial_power", "spatial frequency (cycles / latent position)"),
        ("temporal_spectrum.png", "temporal_freqs", "temporal_power", "temporal frequency (cycles / latent frame)"),
    ]
    for filename, xkey, ykey, xlabel in panels:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, stats in variants.items():
            psd = stats["power_spectrum"]
            points = [(f, p) for f, p in zip(psd[xkey], psd[ykey]) if p is not None and p > 0]
            if points:
                ax.semilogy(*zip(*points), marker="o", label=name)
        ax.set(xlabel=xlabel, ylabel="mean power (white noise = 1)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, stats in variants.items():
        eig = stats["eigenspectrum"]
        modes = range(1, len(eig["eigenvalues"]) + 1)
        left.semilogy(modes, [max(v, 1e-12) for v in eig["eigenvalues"]], marker="o", label=name)
        right.plot(modes, eig["cumulative"], marker="o", label=name)
    left.set(xlabel="mode", ylabel="normalised eigenvalue")
    right.set(xlabel="modes", ylabel="cumulative share", ylim=(0, 1.02))
    left.legend()
    fig.tight_layout()
    fig.savefig(out / "eigenspectrum.png", dpi=100)
    plt.close(fig)
