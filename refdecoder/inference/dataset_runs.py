"""Reconstructing and decoding whole datasets, on one process or on the ranks of a torchrun / accelerate run.

    from refdecoder.inference.dataset_runs import reconstruct_dataset
    rows = reconstruct_dataset(decoder, ["clips/a.mp4", "clips/b.mp4"], "out/")    # ranks from the environment

Each rank takes a deterministic share of the items, balanced by frame count (:func:`share`); each clip is claimed,
written whole and recorded as ``.clips/<name>.json`` through :class:`OutputFolder`, so every clip is written
once and a rank that dies loses only its clip in progress. ``metrics.csv`` is rebuilt from those per-clip files:
after every clip by a single process, once at the end by rank 0 (after a barrier) in a distributed run. With
``resume`` a rerun skips the clips that already have a successful result; a killed run's other clips are done.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from refdecoder.errors import InputError
from refdecoder.inference.distributed import (
    RankContext,
    barrier,
    exit_if_told,
    gather_objects,
    init_distributed,
    map_shared,
    rank_context,
    share,
)
from refdecoder.inference.loading import Decoder
from refdecoder.inference.outfolder import OutputFolder
from refdecoder.inference.rank_progress import RankProgress
from refdecoder.inference.reconstruct import DecodeOptions, Progress, ReconstructOptions, reconstruct_video

__all__ = ["RowCallback", "reconstruct_dataset", "decode_latents_dataset", "run_shared", "one_line"]

# Called with every row this rank produces, and the exception when the row is a failure (None otherwise).
RowCallback = Callable[[dict[str, Any], "BaseException | None"], None]
Video = tuple[str, Path, "Path | None"]  # (output name, video file, reference image or None)


def run_shared(
    names: Sequence[str],
    weight: Callable[[int], float],
    work: Callable[[int], dict[str, Any]],
    out: str | os.PathLike,
    ctx: RankContext | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_row: RowCallback | None = None,
    unit: str = "clips",
    quiet: bool | None = None,
    device: torch.device | None = None,
    table: bool = True,
    inputs: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``work(i)`` for this rank's share of the items ``names`` (output names) not finished yet.

    Args:
        names: unique output names of the items.
        weight: ``weight(i)``, the cost of item ``i`` (frame count); called for every item, spread over the ranks.
        work: writes item ``i`` through the folder's stage (returns its row); raising fails that item alone.
        out: the output folder.
        ctx: ranks (None: from the environment); the process group is created if needed (CPU: gloo).
        resume: leave out items with a successful result in ``out`` (a rerun); otherwise they are refused by
            their claim unless ``overwrite``.
        overwrite: replace finished items.
        on_row: told about every row of this rank as it is made (printing, Ctrl-C accounting).
        unit: what an item is, for progress lines.
        quiet: no progress lines (default: on every rank but 0).
        device: the device the work runs on (picks the process group's backend: nccl for CUDA, else gloo).
        table: keep ``metrics.csv`` rebuilt from the per-item results (items without ground truth have none).
        inputs: what each item was read from, the ``input`` cell of its error row.

    Returns:
        This rank's rows (an ``error`` cell for the failed and refused items).
    """
    ctx = ctx or rank_context()
    init_distributed(ctx, device)
    outputs = OutputFolder(out)
    done = outputs.finished() if resume and not overwrite else set()
    weights = map_shared(ctx, list(range(len(names))), weight)
    barrier(ctx)  # every rank has read the finished items before any rank writes one
    todo = [i for i in range(len(names)) if names[i] not in done]
    mine = [todo[j] for j in share([weights[i] for i in todo], ctx.world_size, ctx.rank)]
    bar = RankProgress(ctx, len(mine), out, gather_objects(ctx, time.time())[0], unit, quiet)
    rows: list[dict[str, Any]] = []
    for count, index in enumerate(mine, start=1):
        failed = {"name": names[index], **({"input": str(inputs[index])} if inputs is not None else {})}
        row, error = _claimed(outputs, failed, overwrite, work, index)
        rows.append(row)
        if on_row is not None:
            on_row(row, error)
        if table and not ctx.distributed:
            _update_table(outputs)  # one writer: the table stays current after every clip
        bar.update()
        exit_if_told(ctx, count)
    barrier(ctx)
    if table and ctx.distributed and ctx.is_main:
        _update_table(outputs)  # once, from every rank's per-clip results
    return rows


def _update_table(outputs: OutputFolder) -> None:
    """Rebuild metrics.csv; a full disk leaves the per-clip results in place for the next run to merge."""
    try:
        outputs.update_metrics()
    except OSError as err:
        print(
            f"warning: {outputs.folder / 'metrics.csv'} not updated ({err.strerror or err}); the per-clip "
            "results are in .clips/ and the next run rebuilds it",
            file=sys.stderr,
        )


def _claimed(
    outputs: OutputFolder,
    failed: dict[str, Any],
    overwrite: bool,
    work: Callable[[int], dict[str, Any]],
    index: int,
) -> tuple[dict[str, Any], BaseException | None]:
    """One item under its claim: ``(row, None)``, or ``failed`` with the error and the exception."""
    try:
        with outputs.claim(failed["name"], overwrite):
            try:
                with torch.inference_mode():
                    return work(index), None
            except Exception as err:  # one broken file must not stop the others
                row = {**failed, "error": one_line(err)}
                outputs.record_failure(row)
                return row, err
    except InputError as err:  # held or finished by another run: its outputs are not ours to touch
        return {**failed, "error": one_line(err)}, err


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with whitespace collapsed, or its type name."""
    return " ".join(str(err).split()) or type(err).__name__


def reconstruct_dataset(
    decoder: Decoder,
    videos: Sequence[Video | str | os.PathLike],
    out: str | os.PathLike,
    options: ReconstructOptions | Callable[[Video], ReconstructOptions] | None = None,
    lpips: torch.nn.Module | None = None,
    ctx: RankContext | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_row: RowCallback | None = None,
    clip_progress: Callable[[str], Progress | None] | None = None,
    quiet: bool | None = None,
) -> list[dict[str, Any]]:
    """:func:`reconstruct_video` over many videos, shared by the ranks; returns this rank's metrics rows.

    Args:
        videos: paths (named by their stem) or ``(name, path, reference image or None)``.
        options: one :class:`ReconstructOptions` for all, or a function of the video giving its options.
        ctx, resume, overwrite, on_row, quiet: see :func:`run_shared`.
        clip_progress: ``clip_progress(name)`` gives the per-frame progress callback of one clip.
    """
    items = [v if isinstance(v, tuple) else (Path(v).stem, Path(v), None) for v in videos]
    fixed = options if isinstance(options, ReconstructOptions) else ReconstructOptions()
    choose = options if callable(options) else (lambda _: fixed)

    def work(i: int) -> dict[str, Any]:
        name, path, reference = items[i]
        chosen = choose(items[i])
        if reference is not None and chosen.reference_image is None:
            chosen = dataclasses.replace(chosen, reference_image=reference)
        progress = clip_progress(name) if clip_progress is not None else None
        return reconstruct_video(decoder, path, out, name, chosen, lpips, progress)

    def frames(i: int) -> float:
        return float(_frames(items[i][1], choose(items[i]).max_frames))

    names, paths, device = [n for n, _, _ in items], [p for _, p, _ in items], next(decoder.vae.parameters()).device
    return run_shared(
        names, frames, work, out, ctx, resume, overwrite, on_row, "clips", quiet, device, inputs=list(map(str, paths))
    )


def _frames(path: Path, limit: int | None) -> int:
    from refdecoder.data.video import probe

    try:
        count = probe(path).frames
    except Exception:  # unreadable: it fails on its own when its turn comes
        return 1
    return min(count, limit or count)


def decode_latents_dataset(
    decoder: Decoder,
    files: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    options: DecodeOptions | None = None,
    reference_dir: str | os.PathLike | None = None,
    space: str = "auto",
    fps: float = 16.0,
    ctx: RankContext | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_row: RowCallback | None = None,
    quiet: bool | None = None,
) -> list[dict[str, Any]]:
    """:func:`refdecoder.inference.generated.decode_latents_file` over many latents files, shared by the ranks
    (balanced by latent frame count); returns this rank's rows. Arguments as there and in :func:`run_shared`."""
    from refdecoder.inference.generated import decode_latents_file

    paths = [Path(f) for f in files]

    def work(i: int) -> dict[str, Any]:
        return decode_latents_file(decoder, paths[i], out, options, reference_dir, space, fps)

    names, device = [p.stem for p in paths], next(decoder.vae.parameters()).device
    weights = [_latent_frames(p) for p in paths]  # a file header each: cheap
    return run_shared(
        names,
        weights.__getitem__,
        work,
        out,
        ctx,
        resume,
        overwrite,
        on_row,
        "files",
        quiet,
        device,
        False,
        inputs=[str(p) for p in paths],
    )


def _latent_frames(path: Path) -> float:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return float(handle.get_slice("latents").get_shape()[-3])
    except Exception:  # unreadable: it fails on its own when its turn comes
        return 1.0
