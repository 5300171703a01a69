"""Quality tables (benchmarks/README.md, the README) from the JSON that ``benchmarks/quality_small.py`` writes.

    python benchmarks/quality_small_table.py benchmarks/results/quality_small.json [--group motion] [--variants a,b]

One markdown row per model: PSNR overall and by distance from the reference frame (0, 1-3, 4+), each RefDecoder
with its difference to the plain decoder trained on the same clips (the ``gains`` of the JSON), and SSIM. Nothing
is computed here beyond those differences: the rows are the evaluation's own numbers, rounded. Variants are shown
under their current names (``benchmarks/quality/names.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.quality.names import current_name, with_current_names

COLUMNS = ("psnr", "psnr_0", "psnr_1-3", "psnr_4+")


def _stats(models: dict[str, Any], name: str, group: str, part: str) -> dict[str, Any]:
    """A model's metrics in ``group``, or in one ``part`` of it (``camera``, ``natural``)."""
    stats = models[name][group]
    return stats["by_part"][part] if part else stats


def rows(doc: dict[str, Any], group: str, names: list[str] | None = None) -> list[str]:
    """Markdown rows of ``group`` (``static``, ``motion``, ``photos``, or ``motion/camera`` for one part)."""
    group, _, part = group.partition("/")
    models = doc["eval"]["models"]
    base_of = dict(key.split(" - ") for key in doc.get("gains", {}))
    out = []
    for name in names or list(models):
        stats = _stats(models, name, group, part)
        base = _stats(models, base_of[name], group, part) if name in base_of else None
        cells = [
            f"{stats[key]:.2f}" + (f" ({stats[key] - base[key]:+.2f})" if base is not None else "") for key in COLUMNS
        ]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {stats['ssim']:.3f} |")
    return out


def table(doc: dict[str, Any], group: str, names: list[str] | None = None) -> str:
    head = f"| model ({group}) | PSNR all | frame 0 (reference) | frames 1-3 | frames 4+ | SSIM |"
    return "\n".join([head, "|---|---|---|---|---|---|", *rows(doc, group, names)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a quality_small.json")
    parser.add_argument("--group", action="append", help="static, motion, photos, motion/camera, ... (repeatable)")
    parser.add_argument("--variants", help="comma-separated models, in order (default: all)")
    args = parser.parse_args(argv)
    doc = with_current_names(json.loads(args.results.read_text()))  # results keep the names they were run with
    names = [current_name(n) for n in args.variants.split(",")] if args.variants else None
    for group in args.group or ["static", "motion"]:
        print(table(doc, group, names), end="\n\n")


if __name__ == "__main__":
    main()
