"""``refdecoder convert``: turn a released RefDecoder checkpoint into the refdecoder format.

refdecoder convert wan2.1_ref.ckpt --out refdecoder-wan2.1
refdecoder convert videovaeplus_ref.ckpt --out refdecoder-vvp --base-out videovaeplus-base
refdecoder convert checkpoint_dir/ --out converted --backbone wan2.1 --allow-pickle

The output folder holds ``refdecoder_config.json`` + ``refdecoder.safetensors`` (the added modules and the
fine-tuned decoder, never the frozen encoder). Load it on top of a base VAE with ``refdecoder.load(vae, OUT)``.
``--base-out`` also writes that base VAE (taken from the checkpoint itself), so nothing else is needed: a
diffusers folder for Wan2.1, ``videovaeplus.safetensors`` + ``videovaeplus_config.json`` for VideoVAE+.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "save_base_vae"]


def register(subparsers: Any) -> None:
    """Add the ``convert`` command to the top-level parser."""
    from refdecoder.cli import add_command

    parser = add_command(
        subparsers,
        "convert",
        __doc__,
        "convert an official RefDecoder checkpoint (Wan2.1 or VideoVAE+) to the refdecoder format",
    )
    parser.add_argument("checkpoint", help="official checkpoint: .ckpt/.pt/.safetensors file or DeepSpeed folder")
    parser.add_argument("--out", required=True, help="output folder for refdecoder_config.json + weights")
    parser.add_argument("--backbone", default=None, help="wan2.1 or videovae+ (default: detected from the keys)")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="unpickle arbitrary objects (only for files you trust)"
    )
    parser.add_argument("--base-out", default=None, help="also write the base VAE here, for use with no other file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.checkpoint`` into ``args.out`` (and the base VAE into ``args.base_out``); returns 0."""
    from refdecoder.convert import load_official
    from refdecoder.inference.outfolder import ensure_writable

    ensure_writable(args.out)
    if args.base_out:
        ensure_writable(args.base_out, "--base-out")
    model = load_official(args.checkpoint, backbone=args.backbone, allow_pickle=args.allow_pickle)
    out = model.save_pretrained(args.out)
    added = sum(p.numel() for _, p in model.added_parameters())
    print(f"wrote {out} ({model.adapter.name}, {model.config.transformer.depth} blocks, {added:,} added parameters)")
    base = save_base_vae(model, args.base_out) if args.base_out else None
    if base is not None:
        print(f"wrote the base VAE to {base}")
    print(_load_instructions(model.adapter.name, out, base))
    return 0


def save_base_vae(model: Any, directory: str | Path) -> Path:
    """Write ``model.vae`` so that a converted RefDecoder can be used with no other file.

    Wan2.1: diffusers ``save_pretrained``. VideoVAE+: a safetensors state dict plus its config as JSON (see
    :func:`refdecoder.inference.loading.save_vae`; ``--vae DIR`` reads both). The decoder weights are those the VAE
    holds now, i.e. the checkpoint's fine-tuned decoder (a RefDecoder checkpoint does not contain the original base
    decoder).

    Args:
        model: a :class:`~refdecoder.RefDecoder` (e.g. from ``load_official``).
        directory: output folder (replaced).

    Returns:
        The folder written.
    """
    from refdecoder.inference.loading import save_vae

    return save_vae(model.vae, directory)


def _load_instructions(backbone: str, out: Path, base: Path | None) -> str:
    from refdecoder.inference.loading import VIDEOVAEPLUS_CONFIG, VIDEOVAEPLUS_WEIGHTS

    if backbone == "wan2.1":
        source = f'"{base}"' if base else '"Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", subfolder="vae"'
        lines = ["from diffusers import AutoencoderKLWan", f"vae = AutoencoderKLWan.from_pretrained({source})"]
    elif base is not None:
        lines = [
            "import json",
            "from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusConfig",
            f'config = VideoVAEPlusConfig(**json.load(open("{base / VIDEOVAEPLUS_CONFIG}")))',
            f'vae = VideoVAEPlus.from_checkpoint("{base / VIDEOVAEPLUS_WEIGHTS}", config)',
        ]
    else:
        lines = [
            "from refdecoder.backbones.videovaeplus import VideoVAEPlus",
            'vae = VideoVAEPlus.from_checkpoint("sota-4-16z.ckpt")  # the official base autoencoder',
        ]
    lines += ["import refdecoder", f'model = refdecoder.load(vae, "{out}")']
    return "load it with:\n" + "\n".join("    " + line for line in lines)
