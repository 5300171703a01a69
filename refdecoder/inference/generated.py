"""Decoding latents saved from a diffusion pipeline (``refdecoder decode-latents``), with their reference images.

A latents file is what :func:`refdecoder.data.save_latents` writes: ``latents`` (``C, t, h, w``) plus metadata,
among which ``normalized`` says whether they are in the pipeline's normalised space (Wan I2V with
``output_type="latent"``: yes) or raw encoder latents. The reference is the conditioning image of the generation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from refdecoder.data.latents import load_latents, metadata_reference
from refdecoder.data.video import IMAGE_EXTENSIONS, read_image
from refdecoder.errors import DataError, InputError
from refdecoder.inference.loading import Decoder
from refdecoder.inference.outfolder import OutputFolder
from refdecoder.inference.reconstruct import DecodeOptions, decode_to_files
from refdecoder.validation import check_latents

__all__ = ["LATENT_SPACES", "find_reference", "load_generated", "decode_latents_file"]

LATENT_SPACES = ("auto", "normalized", "raw")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def find_reference(
    latents_path: str | os.PathLike, meta: dict[str, str], reference_dir: str | os.PathLike | None
) -> Path:
    """The reference image of a latents file: ``<stem>.<image ext>`` in ``reference_dir``, else the file's
    ``reference`` metadata entry, else ``<stem>.<ext>`` beside it.

    The metadata entry is checked by :func:`refdecoder.data.latents.metadata_reference`: it must stay inside the
    latents file's folder or ``reference_dir``, so a latents file cannot make the command read an arbitrary image.

    Raises:
        DataError: none of them exists, or the metadata names a path outside the allowed folders.
    """
    path = Path(latents_path)
    folders = [Path(reference_dir)] if reference_dir is not None else []
    candidates = [folder / f"{path.stem}.{ext}" for folder in folders for ext in IMAGE_EXTENSIONS]
    if "reference" in meta:
        candidates.append(metadata_reference(path, meta["reference"], folders))
    candidates += [path.parent / f"{path.stem}.{ext}" for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f"{reference_dir} or " if reference_dir is not None else ""
    raise DataError(
        f"no reference image for {path.name}: looked for {path.stem}.<{'|'.join(IMAGE_EXTENSIONS)}> in {where}"
        f"{path.parent}" + (f" and for {meta['reference']!r}" if "reference" in meta else "")
    )


def load_generated(
    path: str | os.PathLike, decoder: Decoder, space: str = "auto"
) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a latents file as raw latents ``1, C, t, h, w`` on the VAE's device and dtype, and its metadata.

    Args:
        path: ``.safetensors`` file from :func:`refdecoder.data.save_latents`.
        decoder: gives the latent channels and the de-normalisation.
        space: ``normalized`` / ``raw`` declare the latents' space; ``auto`` reads the ``normalized`` metadata.

    Raises:
        DataError: unreadable file or undeclared space; InputError: latents that do not fit this VAE.
    """
    if space not in LATENT_SPACES:
        raise InputError(f"latent space must be one of {LATENT_SPACES}, got {space!r}")
    latents, meta = load_latents(path)
    normalized = _is_normalized(meta, space, path)
    param = next(decoder.vae.parameters())
    latents = latents[None].to(param.device, torch.float32)
    check_latents(latents, decoder.adapter.latent_channels)
    size = [s * decoder.adapter.spatial_factor for s in latents.shape[-2:]]
    if [int(meta["height"]), int(meta["width"])] != size:
        raise InputError(
            f"{path}: latents of {tuple(latents.shape[-2:])} decode to {size[0]}x{size[1]}, but the metadata says "
            f"{meta['height']}x{meta['width']}; were they made with another VAE?"
        )
    # De-normalise in fp32 (the statistics are fp32), then cast to the VAE's dtype.
    latents = decoder.adapter.denormalize(latents) if normalized else latents
    return latents.to(param.dtype), {**meta, "normalized": str(normalized).lower()}


def _is_normalized(meta: dict[str, str], space: str, path: str | os.PathLike) -> bool:
    if space != "auto":
        return space == "normalized"
    value = meta.get("normalized", "").lower()
    if value not in _TRUE | _FALSE:
        raise DataError(f"{path} does not declare whether its latents are normalised; pass --latents normalized|raw")
    return value in _TRUE


def decode_latents_file(
    decoder: Decoder,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: DecodeOptions | None = None,
    reference_dir: str | os.PathLike | None = None,
    space: str = "auto",
    fps: float = 16.0,
) -> dict[str, Any]:
    """Decode one latents file into ``<out_dir>/<stem>.mp4`` (plus comparison media with ``compare_base``).

    Args:
        decoder: from :func:`refdecoder.inference.load_decoder`.
        path: latents file.
        out_dir: output folder.
        options: decode settings.
        reference_dir: folder with ``<stem>.<ext>`` reference images (see :func:`find_reference`).
        space: ``auto`` / ``normalized`` / ``raw``.
        fps: frame rate of the written videos unless the file's metadata has ``fps``.

    Returns:
        A summary row (name, frames, size, space, reference, output, seconds).

    Raises:
        DataError / InputError: bad file, missing reference, wrong latent shape, reference of the wrong size.
    """
    started, options, path = time.perf_counter(), options or DecodeOptions(), Path(path)
    latents, meta = load_generated(path, decoder, space)
    size = tuple(s * decoder.adapter.spatial_factor for s in latents.shape[-2:])
    reference, reference_path = None, None
    if decoder.conditioned:
        reference_path = find_reference(path, meta, reference_dir)
        reference = read_image(reference_path)[None].to(latents.device, latents.dtype)
        if tuple(reference.shape[-2:]) != size and not options.resize_reference:
            raise InputError(
                f"reference {reference_path} is {reference.shape[-2]}x{reference.shape[-1]} but the latents decode to "
                f"{size[0]}x{size[1]}; pass --resize-reference or resize the image"
            )
    rate = float(meta.get("fps", fps))
    with OutputFolder(out_dir).stage(path.stem) as stage:  # the file's outputs appear whole, or not at all
        decode_to_files(decoder, latents, reference, stage.stem, rate, options)
        stage.result = {
            "name": path.stem,
            "frames": decoder.adapter.frame_rule.pixel_frames(latents.shape[2]),
            "height": size[0],
            "width": size[1],
            "normalized": meta["normalized"],
            "reference": "" if reference_path is None else str(reference_path),
            "output": str(Path(out_dir) / f"{path.stem}.mp4"),
            "seconds": time.perf_counter() - started,
        }
    return stage.result
