"""``metrics.csv`` of ``reconstruct`` and of a run's comparison: one row per clip, written and read back.

Columns: identity (``name``, ``input``, ``output``, ``decoder``, ``frames``, ...), the metrics sorted by name with
the RefDecoder's unprefixed first, then ``base_*`` (the VAE as it was), ``baseline_*`` (an equal-budget plain
decoder), ``delta_*`` (RefDecoder minus base) and ``gain_*`` (RefDecoder minus baseline), then ``psnr_written``,
``seconds`` and ``error``. A metric that was not computed is an empty cell.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from refdecoder.errors import DataError

__all__ = ["METRICS_CSV", "write_metrics_csv", "read_metrics_csv", "read_clip_metrics", "merge_rows"]

METRICS_CSV = "metrics.csv"
_LEADING = (
    "name",
    "input",
    "output",
    "decoder",
    "frames",
    "frames_header",
    "truncated",
    "fps",
    "height",
    "width",
    "reference",
)
_TRAILING = ("psnr_written", "seconds", "error")
_PREFIXES = ("base_", "baseline_", "delta_", "gain_")
_TEXT = {"name", "input", "output", "decoder", "reference", "truncated", "error"}


def write_metrics_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write one row per clip (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = {k for row in rows for k in row}
    middle = sorted(keys - set(_LEADING) - set(_TRAILING), key=_metric_order)
    columns = [k for k in _LEADING if k in keys] + middle + [k for k in _TRAILING if k in keys or k == "error"]
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # one per process: concurrent writers never share it
    try:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.csv``; metric and size cells as floats, names and paths as text, empty cells left
    out.

    Raises:
        DataError: not a table: unreadable or not text, no header, or a row with more or fewer cells than the
            header.
    """
    try:
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path} as a metrics table: {err}") from None
    if not header:
        raise DataError(f"{path} is empty: a metrics table has a header line")
    for number, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise DataError(f"{path} line {number}: {len(header)} columns in the header but not in this row")
    return [{k: v if k in _TEXT else _parse(v) for k, v in row.items() if v} for row in rows]


def read_clip_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a per-clip ``metrics.csv`` (``reconstruct``, a run's comparison), checked as such.

    Raises:
        DataError: what :func:`read_metrics_csv` refuses, no ``name`` column, a name that is no plain file stem
            (names become file names: ``<name>.mp4`` beside the table), or a metric cell that is no number.
    """
    rows = read_metrics_csv(path)
    for number, row in enumerate(rows, start=2):
        name = row.get("name")
        if not isinstance(name, str) or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise DataError(f"{path} line {number}: clip name {name!r} is missing or not a plain file name")
        text = [k for k, v in row.items() if k not in _TEXT and not isinstance(v, float)]
        if text:
            raise DataError(f"{path} line {number} ({name}): {text[0]} = {row[text[0]]!r} is not a number")
    return rows


def merge_rows(existing: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``existing`` rows whose clip ``name`` is not in ``new``, in their order, then ``new``."""
    names = {row.get("name") for row in new}
    return [row for row in existing if row.get("name") not in names] + list(new)


def _metric_order(key: str) -> tuple[int, str]:
    prefix = next((i + 1 for i, p in enumerate(_PREFIXES) if key.startswith(p)), 0)
    return prefix, key


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _parse(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value
