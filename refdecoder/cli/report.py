"""``refdecoder report``: a self-contained HTML page of decoded videos, their metrics and a run's loss curves.

refdecoder report out/                      # a reconstruct / decode-latents --compare-base folder -> out/index.html
refdecoder report runs/tiny                 # a training run: its comparison folder, with the loss curves
refdecoder report out/ --run runs/tiny --frame 12 --out report.html

The page shows, per clip, the videos side by side (source, base, baseline, RefDecoder; one play button and one
time slider keep them in sync), a before/after slider over one frame (default: where base and RefDecoder differ
most), the metrics table of metrics.csv with the RefDecoder's deltas per clip and overall, and with --run (or for
a run folder) the training loss and held-out PSNR curves. Videos, frames and curves are embedded in the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``report`` command."""
    from refdecoder.cli import add_command

    parser = add_command(subparsers, "report", __doc__, "write a self-contained HTML report of decoded videos")
    parser.add_argument("folder", metavar="DIR", help="a folder of decoded videos + metrics.csv, or a training run")
    parser.add_argument("--run", action="append", default=[], help="training run folder whose loss curves to draw")
    parser.add_argument("--frame", type=int, help="frame under the before/after slider")
    parser.add_argument("--out", help="HTML file to write (default: DIR/index.html)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report; returns 0."""
    from refdecoder.errors import InputError
    from refdecoder.inference.loading import is_run_folder
    from refdecoder.inference.outfolder import ensure_writable
    from refdecoder.report import REPORT_NAME, write_report
    from refdecoder.training.compare import BASELINE_DIR, COMPARISON_DIR

    folder = Path(args.folder)
    if not folder.is_dir():
        raise InputError(f"report folder {folder} does not exist or is not a folder")
    missing = [r for r in args.run if not Path(r).is_dir()]
    if missing:
        raise InputError(f"--run {missing[0]} does not exist or is not a folder; give a training run folder")
    runs = {Path(r).name: Path(r) for r in args.run}
    if is_run_folder(folder):  # a training run folder: report on its comparison
        runs = {"RefDecoder": folder, **runs}
        if (folder / BASELINE_DIR).is_dir():
            runs["baseline"] = folder / BASELINE_DIR
        folder = folder / COMPARISON_DIR
    out = Path(args.out) if args.out else folder / REPORT_NAME
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the HTML file to write (e.g. {out / REPORT_NAME})")
    ensure_writable(out.parent, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_report(folder, runs=runs or None, frame=args.frame, out=out)}")
    return 0
