"""``refdecoder reconstruct``: encode and decode videos, with the reference through RefDecoder, and score them.

refdecoder reconstruct clips/ --out out/ --vae Wan2.1-I2V-14B-480P-Diffusers/vae --weights my-refdecoder
refdecoder reconstruct a.mp4 b.mp4 list.txt data.csv --out out/ --vae vae/ --weights w/ --compare-base --size 480x832
refdecoder reconstruct clips/ --out out/ --vae vae/          # no --weights: the plain base decoder
refdecoder reconstruct clip.mp4 --out out/ --vae runs/tiny --weights runs/tiny --compare-base   # a training run

Inputs are video files, folders (searched recursively), CSV files with a ``path`` column (and an optional
``reference`` image column) or ``.txt`` lists with one path per line. Every video is encoded with the frozen
encoder and decoded window by window with the caches carried over (any length, no seams), padded to the
backbone's frame rule and trimmed back; ``<name>.mp4`` is written at the source frame rate, ``metrics.csv`` gets
one row per video (rows of clips reconstructed into the same ``--out`` before are kept; a clip that is already
there is refused unless ``--overwrite``). ``--compare-base`` adds the base decoder's videos, the deltas and the
HTML report ``index.html``. A file that fails is reported on one line and makes the exit code 1 at the end; the
others are still processed. A file that decodes to fewer frames than its container promises is reconstructed
from what decodes, with a warning, and counted as truncated.

--vae and --weights also take a training run folder (recipes/train.py's run_dir) or a Hugging Face repo id
(org/name, org/name@revision, org/name/subfolder).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from refdecoder.cli._ranks import add_rank_arguments

__all__ = [
    "register",
    "run",
    "collect_videos",
    "parse_size",
    "positive_int",
    "add_model_arguments",
    "load_from_args",
    "check_out",
    "print_summary",
    "one_line",
    "failure_row",
    "interruptible",
    "progress_bar",
]

logger = logging.getLogger("refdecoder")

_LIST_SUFFIX = ".txt"


def parse_size(text: str) -> tuple[int, int]:
    """``"480x832"`` -> ``(480, 832)``; a single number means a square."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers (e.g. 480x832), got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An ``int >= 1`` for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``decode-latents``: which VAE / weights, precision, device, window, tiling, output."""
    parser.add_argument("--out", required=True, help="output folder (a file there is refused before any work)")
    parser.add_argument(
        "--vae",
        required=True,
        help="diffusers VAE folder, VideoVAE+ checkpoint, training run folder, or Hub id org/name[@rev][/subfolder]",
    )
    parser.add_argument(
        "--weights",
        help="RefDecoder folder from save_pretrained, a training run folder or a Hub id; omit for the base",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of clips already in --out")
    parser.add_argument("--backbone", help="force a backbone adapter (default: detected from the VAE)")
    parser.add_argument("--window", type=positive_int, help="latent frames per decoder pass (default: the model's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="VAE precision")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--resize-reference", action="store_true", help="resize references of another size")
    parser.add_argument("--compare-base", action="store_true", help="also decode with the base decoder and compare")
    parser.add_argument("--tile", type=parse_size, help="decode in spatial tiles of HxW pixels (e.g. 256x256)")
    parser.add_argument("--tile-overlap", type=parse_size, default=(64, 64), help="pixels tiles share")
    parser.add_argument("--crf", type=int, default=15, help="x264 quality of written videos (0 = lossless luma)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_rank_arguments(parser)


def register(subparsers: Any) -> None:
    """Add the ``reconstruct`` command."""
    from refdecoder.cli import add_command

    parser = add_command(
        subparsers, "reconstruct", __doc__, "encode + decode videos (RefDecoder or base), write mp4s and metrics.csv"
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders, CSV files or .txt lists")
    add_model_arguments(parser)
    parser.add_argument("--frames", type=positive_int, help="reconstruct only the first N frames")
    parser.add_argument("--size", type=parse_size, help="output HxW (scaled, centre-cropped); default: source size")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--reference-index", type=int, default=0, help="frame of the video used as reference")
    group.add_argument("--reference", help="an external reference image for every video")
    parser.add_argument("--lpips", choices=("auto", "off", "alex", "vgg"), default="auto", help="LPIPS network")
    parser.add_argument("--lpips-weights", help="torchvision ImageNet checkpoint of the LPIPS trunk")
    parser.set_defaults(func=run)


def collect_videos(inputs: list[str]) -> list[tuple[str, Path, Path | None]]:
    """Expand INPUT arguments into ``(name, video path, reference image or None)``, names unique.

    Folders give their video files (recursively, sorted); CSV files their ``path`` rows (and ``reference``);
    ``.txt`` files one path per line (``#`` comments, relative to the list). Anything else is taken as a video
    path as is, so a missing file fails later, on its own.
    """
    from refdecoder.data import VIDEO_EXTENSIONS, read_csv_rows

    found: list[tuple[str, Path, Path | None]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS
            )
            found += [(p.relative_to(item).with_suffix("").as_posix(), p, None) for p in files]
        elif item.suffix.lower() == ".csv" and item.is_file():
            found += [
                (Path(row.key).with_suffix("").as_posix(), row.path, row.reference) for row in read_csv_rows(item)
            ]
        elif item.suffix.lower() == _LIST_SUFFIX and item.is_file():
            lines = [line.strip() for line in item.read_text().splitlines()]
            paths = [item.parent / line for line in lines if line and not line.startswith("#")]
            found += [(p.with_suffix("").name, p, None) for p in paths]
        else:
            found.append((item.with_suffix("").name, item, None))
    return _unique(found)


def _unique(items: list[tuple[str, Path, Path | None]]) -> list[tuple[str, Path, Path | None]]:
    seen: dict[str, int] = {}
    out = []
    for name, path, reference in items:
        safe = name.replace("/", "__")
        seen[safe] = seen.get(safe, 0) + 1
        out.append((safe if seen[safe] == 1 else f"{safe}_{seen[safe]}", path, reference))
    return out


def load_from_args(args: argparse.Namespace, device: Any = None) -> Any:
    """The :class:`refdecoder.inference.Decoder` the shared flags describe (tile geometry checked), on ``device``
    (default: ``--device``)."""
    from refdecoder.inference import DTYPES, load_decoder
    from refdecoder.inference.loading import resolve_device

    device = device or resolve_device(args.device)
    decoder = load_decoder(args.vae, args.weights, args.backbone, device, DTYPES[args.dtype], args.compare_base)
    if decoder.model is None:
        logger.info("no --weights: decoding with the plain %s decoder (references are not used)", decoder.adapter.name)
    if args.tile is not None:  # a bad tile geometry fails here, once, rather than for every file
        from refdecoder.tiling import plan_tiles, token_alignment

        align = token_alignment(decoder.model) if decoder.model is not None else 1
        plan_tiles((1, 1), decoder.adapter.spatial_factor, args.tile, args.tile_overlap, align)
    return decoder


def check_out(out: str, names: list[str], overwrite: bool, suffix: str = ".mp4") -> list[dict[str, Any]]:
    """Check ``--out`` before any work (writable, clips not done yet) and return its ``metrics.csv`` rows
    (``[]`` when it has none).

    Raises:
        InputError: ``out`` is an existing file or not writable, or it already holds results of clips in ``names``
            and ``overwrite`` is not set (a failed clip's error row does not count: a rerun retries it).
        DataError: its ``metrics.csv`` is not a metrics table.
    """
    from refdecoder.errors import InputError
    from refdecoder.inference.outfolder import OutputFolder, ensure_writable
    from refdecoder.inference.results import METRICS_CSV, merge_rows, read_clip_metrics

    folder = ensure_writable(out)
    outputs = OutputFolder(folder)
    rows = read_clip_metrics(folder / METRICS_CSV) if (folder / METRICS_CSV).is_file() else []
    failed = {str(row["name"]) for row in merge_rows(rows, outputs.results()) if "error" in row}
    written = {n for n in names if (folder / f"{n}{suffix}").exists() and n not in failed}
    clash = sorted((outputs.finished() | written) & set(names))
    if clash and not overwrite:
        shown = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise InputError(
            f"--out {out} already holds results of {shown}; pass --overwrite to replace them, or choose another --out"
        )
    return rows


def run(args: argparse.Namespace) -> int:
    """Reconstruct every input; returns 1 if any failed, else 0.

    Each clip is claimed, written whole, and recorded as ``.clips/<name>.json``; ``metrics.csv`` is rebuilt from
    those files after every clip (by rank 0 at the end under torchrun), so an interrupted run loses nothing already
    done and concurrent runs into one ``--out`` keep each other's rows (:mod:`refdecoder.inference.outfolder`).
    Under torchrun each rank reconstructs its share (:mod:`refdecoder.inference.dataset_runs`).
    """
    from refdecoder.cli._ranks import main_first, start_ranks, unfinished
    from refdecoder.inference import build_lpips
    from refdecoder.inference.dataset_runs import reconstruct_dataset
    from refdecoder.inference.distributed import close_distributed
    from refdecoder.inference.outfolder import OutputFolder
    from refdecoder.inference.reconstruct import refuse_upscale_head

    ctx, device = start_ranks(args)
    videos = collect_videos(args.inputs)
    if not videos:
        from refdecoder.errors import DataError

        raise DataError(f"no video files in {' '.join(args.inputs)}")
    names = [name for name, _, _ in videos]
    earlier = main_first(ctx, lambda: check_out(args.out, unfinished(args.out, names, args.resume), args.overwrite))
    decoder = load_from_args(args, device)
    refuse_upscale_head(decoder, "reconstruct")  # once, rather than for every file
    lpips = build_lpips(args.lpips, args.lpips_weights)
    outputs = OutputFolder(args.out)
    rows: list[dict[str, Any]] = []
    loud = ctx.is_main or args.all_ranks
    on_row = collect_rows(rows)
    with interruptible(videos, rows, "videos"):
        reconstruct_dataset(
            decoder,
            videos,
            outputs.folder,
            lambda video: _options(args, video[2]),
            lpips,
            ctx,
            args.resume,
            args.overwrite,
            on_row,
            lambda name: _bar(name, args.no_progress or not loud),
            args.no_progress or None,
        )
    close_distributed()
    if ctx.distributed:  # rank 0 tells about every clip of the run, from the per-clip results
        if not ctx.is_main:
            return 1 if any("error" in row for row in rows) else 0
        rows = [outputs.read_result(name) or {"name": name, "error": "not done"} for name in names]
    failures = sum("error" in row for row in rows)
    print_summary(rows)
    truncated = sum(bool(row.get("truncated")) for row in rows)
    kept = f", {len(earlier)} earlier rows kept" if earlier else ""
    print(
        f"wrote {outputs.folder / 'metrics.csv'} ({len(rows) - failures} ok, {failures} failed, {truncated} "
        f"truncated{kept})"
    )
    if args.compare_base and decoder.conditioned and len(rows) > failures:
        from refdecoder.report import write_report

        print(f"report: {write_report(args.out)}")
    return 1 if failures else 0


def collect_rows(rows: list[dict[str, Any]], say: Callable[[dict[str, Any]], None] | None = None) -> Callable:
    """A row callback for :mod:`refdecoder.inference.dataset_runs`: keeps every row in ``rows`` (for the summary
    and the Ctrl-C line), reports a failure on one line, and hands a successful row to ``say``."""

    def on_row(row: dict[str, Any], error: BaseException | None) -> None:
        rows.append(row)
        if error is not None:
            failure_row(row["name"], row["input"], error)
        elif say is not None:
            say(row)

    return on_row


def failure_row(name: str, path: Path, err: BaseException) -> dict[str, Any]:
    """Report a failed file on one line (its traceback with ``--debug``) and return its error row."""
    from refdecoder.cli import debug_enabled

    if debug_enabled():
        import traceback

        traceback.print_exception(err)
    print(f"error: {path}: {one_line(err)}", file=sys.stderr)
    return {"name": name, "input": str(path), "error": one_line(err)}


@contextlib.contextmanager
def interruptible(items: list, rows: list[dict[str, Any]], unit: str) -> Iterator[None]:
    """Turn Ctrl-C into one line saying which items finished, failed and were not done (the CLI exits 130)."""
    from refdecoder.cli import Interrupted

    try:
        yield
    except KeyboardInterrupt:
        ok = [row["name"] for row in rows if "error" not in row]
        left = len(items) - len(rows)
        raise Interrupted(
            f"{len(ok)} of {len(items)} {unit} finished, {len(rows) - len(ok)} failed, {left} not done (the one in "
            "progress left nothing behind); rerun the same command to do the rest"
        ) from None


def _options(args: argparse.Namespace, csv_reference: Path | None) -> Any:
    from refdecoder.inference import ReconstructOptions

    return ReconstructOptions(
        size=args.size,
        max_frames=args.frames,
        reference_index=args.reference_index,
        reference_image=args.reference or csv_reference,
        resize_reference=args.resize_reference,
        window=args.window,
        compare_base=args.compare_base,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        crf=args.crf,
    )


def one_line(err: BaseException) -> str:
    """An exception as one line of text (its message with whitespace collapsed, or its type name)."""
    text = " ".join(str(err).split())
    return text if text else type(err).__name__


def print_summary(rows: list[dict[str, Any]]) -> None:
    """Print a fixed-width table of the main metrics (and deltas to the base decoder when present)."""
    columns = ["psnr", "psnr_reference", "psnr_others", "ssim", "lpips", "psnr_written"]
    columns += [c for c in ("delta_psnr", "delta_ssim", "delta_lpips") if any(c in r for r in rows)]
    width = max([len(r.get("name", "")) for r in rows] + [5])
    print(f"{'video':<{width}}  {'frames':>6}  " + "  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        cells = "  ".join(f"{_fmt(row.get(c)):>14}" for c in columns)
        print(
            f"{row.get('name', ''):<{width}}  {row.get('frames', '-')!s:>6}  {cells}"
            + ("  FAILED" if "error" in row else "")
        )
    ok = [r for r in rows if "error" not in r]
    if len(ok) > 1:
        means = {c: sum(r[c] for r in ok) / len(ok) for c in columns if all(_finite(r.get(c)) for r in ok)}
        print(f"{'mean':<{width}}  {'':>6}  " + "  ".join(f"{_fmt(means.get(c)):>14}" for c in columns))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else "-"


def progress_bar(items: list, disabled: bool, unit: str) -> Any:
    """Iterate ``items`` with a progress display (hidden for a single item or when ``disabled``)."""
    from refdecoder.cli._progress import track

    return track(items, len(items), unit, unit=unit.rstrip("s"), disable=disabled or len(items) < 2)


def _bar(name: str, disabled: bool) -> Any:
    """A progress callback ``(phase, done, total)`` that keeps one progress display per phase."""
    if disabled:
        return None
    from refdecoder.cli._progress import progress

    state: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if state.get("phase") != phase:
            if "bar" in state:
                state["bar"].close()
            state.update(phase=phase, bar=progress(total, f"{name} {phase}", unit="frame", leave=False), done=0)
        state["bar"].total = max(total, done)
        state["bar"].update(done - state["done"])
        state["done"] = done
        if phase == "decode" and done >= total:
            state["bar"].close()

    return update
