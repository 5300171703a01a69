"""``refdecoder decode-latents``: decode latents saved from a diffusion pipeline, with their reference images.

refdecoder decode-latents gen/latents --reference-dir gen/images --out gen/videos --vae vae/ --weights w/
refdecoder decode-latents gen/latents --out gen/videos --vae vae/ --weights w/ --compare-base --latents normalized

LATENT_DIR holds ``*.safetensors`` files written by ``refdecoder.data.save_latents`` (``latents`` ``C, t, h, w`` +
metadata). ``--latents auto`` reads each file's ``normalized`` metadata: normalised latents (a pipeline's
``output_type="latent"``) are de-normalised with the VAE's statistics (``z * std + mean``) before decoding. The
reference of ``<stem>.safetensors`` is ``<stem>.<png|jpg|...>`` in ``--reference-dir``, else the file's
``reference`` metadata, else an image with the same stem beside it; it must have the decoded size unless
``--resize-reference``. ``--compare-base`` also decodes with the base decoder (the paper's paired protocol) and
writes ``<stem>.base.mp4``, ``<stem>.compare.mp4``, ``<stem>.grid.png`` and the HTML report ``index.html``. A file
that fails is reported on one line and makes the exit code 1 at the end; the others are still decoded. Outputs
already in ``--out`` are refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from refdecoder.cli import add_command
from refdecoder.cli.reconstruct import add_model_arguments

__all__ = ["register", "run"]

logger = logging.getLogger("refdecoder")


def register(subparsers: Any) -> None:
    """Add the ``decode-latents`` command."""
    parser = add_command(
        subparsers, "decode-latents", __doc__, "decode saved diffusion latents with their reference images"
    )
    parser.add_argument("latent_dir", metavar="LATENT_DIR", help="folder of .safetensors latents files")
    parser.add_argument("--reference-dir", help="folder of reference images named like the latents files")
    add_model_arguments(parser)
    parser.add_argument(
        "--latents",
        choices=("auto", "normalized", "raw"),
        default="auto",
        help="space of the saved latents (auto: each file's 'normalized' metadata)",
    )
    parser.add_argument("--fps", type=float, default=16.0, help="frame rate when a file has no 'fps' metadata")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Decode every latents file of LATENT_DIR (this rank's share under torchrun); returns 1 if any failed."""
    from refdecoder.cli._ranks import main_first, start_ranks, unfinished
    from refdecoder.cli.reconstruct import check_out, collect_rows, interruptible, load_from_args
    from refdecoder.errors import DataError
    from refdecoder.inference.dataset_runs import decode_latents_dataset
    from refdecoder.inference.distributed import close_distributed
    from refdecoder.inference.reconstruct import DecodeOptions

    ctx, device = start_ranks(args)
    folder = Path(args.latent_dir)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise DataError(f"no .safetensors latents files in {folder}")
    names = [path.stem for path in files]
    main_first(ctx, lambda: check_out(args.out, unfinished(args.out, names, args.resume), args.overwrite))
    decoder = load_from_args(args, device)
    options = DecodeOptions(
        window=args.window,
        resize_reference=args.resize_reference,
        compare_base=args.compare_base,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        crf=args.crf,
    )
    rows: list[dict[str, Any]] = []

    def say(row: dict[str, Any]) -> None:
        if ctx.is_main or args.all_ranks:
            print(
                f"{row['name']}: {row['frames']} frames {row['height']}x{row['width']} "
                f"(normalized={row['normalized']}) -> {row['output']}"
            )

    with interruptible(files, rows, "files"):
        decode_latents_dataset(
            decoder,
            files,
            args.out,
            options,
            args.reference_dir,
            args.latents,
            args.fps,
            ctx,
            args.resume,
            args.overwrite,
            collect_rows(rows, say),
            args.no_progress or None,
        )
    close_distributed()
    failures = sum("error" in row for row in rows)
    if not ctx.is_main:
        return 1 if failures else 0
    if ctx.distributed:
        from refdecoder.inference.outfolder import OutputFolder

        results = [OutputFolder(args.out).read_result(path.stem) or {"error": "not done"} for path in files]
        failures = sum("error" in row for row in results)
    print(f"decoded {len(files) - failures} of {len(files)} files into {args.out}")
    if args.compare_base and decoder.conditioned and failures < len(files):
        from refdecoder.report import write_report

        print(f"report: {write_report(args.out)}")
    return 1 if failures else 0
