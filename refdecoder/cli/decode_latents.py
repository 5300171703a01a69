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
    """Decode every latents file of LATENT_DIR; returns 1 if any failed, else 0."""
    from refdecoder.cli.reconstruct import check_out, interruptible, load_from_args, progress_bar
    from refdecoder.errors import DataError
    from refdecoder.inference.loading import resolve_device
    from refdecoder.inference.outfolder import OutputFolder
    from refdecoder.inference.reconstruct import DecodeOptions

    resolve_device(args.device)
    folder = Path(args.latent_dir)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise DataError(f"no .safetensors latents files in {folder}")
    check_out(args.out, [path.stem for path in files], args.overwrite)
    decoder = load_from_args(args)
    options = DecodeOptions(
        window=args.window,
        resize_reference=args.resize_reference,
        compare_base=args.compare_base,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        crf=args.crf,
    )
    outputs, rows = OutputFolder(args.out), []
    with interruptible(files, rows, "files"):
        for path in progress_bar(files, args.no_progress, "files"):
            rows.append(_decode_one(args, outputs, decoder, path, options))
    failures = sum("error" in row for row in rows)
    print(f"decoded {len(files) - failures} of {len(files)} files into {args.out}")
    if args.compare_base and decoder.conditioned and failures < len(files):
        from refdecoder.report import write_report

        print(f"report: {write_report(args.out)}")
    return 1 if failures else 0


def _decode_one(args: argparse.Namespace, outputs: Any, decoder: Any, path: Path, options: Any) -> dict[str, Any]:
    """One latents file under its claim: its row, with ``error`` when it failed or another run holds it."""
    import torch

    from refdecoder.cli.reconstruct import failure_row
    from refdecoder.errors import InputError
    from refdecoder.inference.generated import decode_latents_file

    try:
        with outputs.claim(path.stem, args.overwrite):
            try:
                with torch.inference_mode():
                    row = decode_latents_file(
                        decoder, path, args.out, options, args.reference_dir, args.latents, args.fps
                    )
            except Exception as err:  # one broken file must not stop the others; --debug shows the traceback
                row = failure_row(path.stem, path, err)
                outputs.record_failure(row)
                return row
    except InputError as err:  # claimed by another run: its outputs are not ours to touch
        return failure_row(path.stem, path, err)
    print(
        f"{row['name']}: {row['frames']} frames {row['height']}x{row['width']} "
        f"(normalized={row['normalized']}) -> {row['output']}"
    )
    return row
