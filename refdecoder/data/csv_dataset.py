"""Videos listed in a CSV file, in the paper's format: a ``path`` column, optional ``caption`` and ``reference``.

Relative paths (videos and references) are resolved against the CSV file's folder, or ``root`` when given, so a
dataset folder with its CSV can be moved as a whole. Other columns are ignored. A CSV none of whose files exists
is an error (one line); files that are missing from a partly present dataset are left out with one summary
warning (:func:`drop_missing`), not one warning per file.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refdecoder.data.base import RetryingDataset, clip_sample
from refdecoder.data.sampling import ClipSampler
from refdecoder.data.video import read_image
from refdecoder.errors import DataError

__all__ = ["CSVRow", "read_csv_rows", "drop_missing", "VideoCSVDataset"]

logger = logging.getLogger("refdecoder.data")


@dataclass(frozen=True)
class CSVRow:
    """One CSV entry: ``path`` resolved, ``key`` as written in the CSV, optional caption and reference path."""

    path: Path
    key: str
    caption: str | None = None
    reference: Path | None = None


def read_csv_rows(
    csv_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    path_column: str = "path",
    caption_column: str = "caption",
    reference_column: str = "reference",
) -> list[CSVRow]:
    """Read the rows of a dataset CSV, resolving relative paths against ``root`` (default: the CSV's folder).

    Raises:
        DataError: the file is missing, has no ``path_column``, lists no video, or none of its videos exists.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if path_column not in (reader.fieldnames or []):
                raise DataError(
                    f"{csv_path} has no {path_column!r} column (columns: {reader.fieldnames}); "
                    f"a dataset CSV needs one path per row in a column named {path_column!r}"
                )
            rows = [
                _row(entry, base, path_column, caption_column, reference_column)
                for entry in reader
                if (entry.get(path_column) or "").strip()
            ]
    except OSError as err:
        raise DataError(f"cannot read dataset CSV {csv_path}: {err}") from err
    if not rows:
        raise DataError(f"{csv_path} lists no video (every {path_column!r} cell is empty)")
    if not any(row.path.exists() for row in rows):
        raise DataError(
            f"none of the {len(rows)} files listed in {csv_path} exists (e.g. {rows[0].path}); relative paths are "
            f"resolved against {base}{'' if root is not None else ' (the CSV folder)'}"
        )
    return rows


def drop_missing(rows: list[CSVRow], csv_path: str | os.PathLike) -> list[CSVRow]:
    """``rows`` whose file exists; the others are left out with one warning that counts them."""
    present = [row for row in rows if row.path.exists()]
    missing = [row for row in rows if not row.path.exists()]
    if missing:
        shown = ", ".join(str(row.path) for row in missing[:3]) + (", ..." if len(missing) > 3 else "")
        logger.warning(
            "%d of %d files listed in %s do not exist and are left out: %s", len(missing), len(rows), csv_path, shown
        )
    return present


def _row(entry: dict[str, Any], base: Path, path_column: str, caption_column: str, reference_column: str) -> CSVRow:
    key = entry[path_column].strip()
    reference = (entry.get(reference_column) or "").strip()
    caption = entry.get(caption_column)
    return CSVRow(
        path=base / key,
        key=key,
        caption=caption.strip() if caption is not None else None,
        reference=base / reference if reference else None,
    )


class VideoCSVDataset(RetryingDataset):
    """Map-style dataset of clips from the videos (or images) listed in a CSV.

    Each item is ``{"video": (3, T, H, W) in [-1, 1], "reference_index": int, "key": str, "fps": float,
    "skipped": int, "decoded_frames": int}``, plus ``"caption": str`` when the CSV has a caption column and
    ``"reference": (3, 1, H, W) in [-1, 1]`` for rows with a reference image (resized like the clip; a random crop
    becomes a centre crop, as a separate image has no crop window to share). Broken rows are skipped, see
    :class:`~refdecoder.data.base.RetryingDataset`.

    Args:
        csv_path: the CSV file.
        sampler: how clips are cut (frames, fps, size, short videos, reference index).
        seed: base seed of all per-sample draws.
        max_failures: broken samples in a row tolerated before :class:`DataError`.
        root: folder relative paths are resolved against (default: the CSV's folder).
        path_column, caption_column, reference_column: column names.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        sampler: ClipSampler,
        seed: int = 0,
        max_failures: int = 20,
        root: str | os.PathLike | None = None,
        path_column: str = "path",
        caption_column: str = "caption",
        reference_column: str = "reference",
    ) -> None:
        super().__init__(seed, max_failures, name=str(csv_path))
        self.sampler = sampler
        self.rows = drop_missing(
            read_csv_rows(csv_path, root, path_column, caption_column, reference_column), csv_path
        )

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        return f"row {index} ({self.rows[index].key!r}) of {self.name}"

    def load(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        row = self.rows[index]
        if not row.path.is_file():
            raise DataError(f"file not found: {row.path}")
        video, plan, outside = self.sampler.read(row.path, generator, self.read_stats)
        sample = clip_sample(video, plan, row.key, self.read_stats.last_decoded, outside)
        if row.caption is not None:
            sample["caption"] = row.caption
        if row.reference is not None and outside is None:
            mode = "crop_center" if self.sampler.resize_mode == "crop_random" else self.sampler.resize_mode
            sample["reference"] = read_image(row.reference, self.sampler.size, mode)
        return sample
