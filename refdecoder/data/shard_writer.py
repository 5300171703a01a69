"""Write WebDataset shards in SSVAE's layout: ``NNNNNN.tar`` plus a sibling ``NNNNNN.meta.jsonl``.

Each sample in a tar holds ``<key>.<ext>`` (the original video or image bytes, not re-encoded), ``<key>.id`` (the
key; SSVAE's reader uses this member as the trigger to join the meta record), ``<key>.txt`` (caption, when given)
and ``<key>.reference.<ext>`` (reference image, when given). Each line of the jsonl is
``{"key", "duration", "fps", "width", "height", "frames"}`` for one sample of the tar, in tar order.

Keys are the input's relative path without its extension, with every character other than letters, digits, ``_``
and ``-`` replaced by ``_`` (WebDataset splits a member name at its first dot, so keys cannot contain dots); a
clash gets a ``_2``, ``_3``, ... suffix.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from refdecoder._deps import require
from refdecoder.data.csv_dataset import drop_missing, read_csv_rows
from refdecoder.data.faults import SkipCounter, is_sample_error
from refdecoder.data.video import IMAGE_EXTENSIONS, TAIL_TOLERANCE, VIDEO_EXTENSIONS, probe, stored_frames
from refdecoder.errors import DataError

__all__ = ["ShardItem", "ShardReport", "collect_inputs", "write_shards", "meta_path"]

logger = logging.getLogger("refdecoder.data")


@dataclass(frozen=True)
class ShardItem:
    """One input of a shard build: the media file, its key, optional caption and reference image."""

    path: Path
    key: str
    caption: str | None = None
    reference: Path | None = None


@dataclass
class ShardReport:
    """What a shard build wrote.

    Attributes:
        shards: the tar files, in order.
        written: samples written.
        skips: inputs that could not be read (counted and logged).
    """

    shards: list[Path] = field(default_factory=list)
    written: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)


def meta_path(shard: str | os.PathLike) -> str:
    """The ``.meta.jsonl`` file beside a ``.tar`` shard (``000003.tar`` -> ``000003.meta.jsonl``)."""
    text = os.fspath(shard)
    return (text[:-4] if text.endswith(".tar") else text) + ".meta.jsonl"


def collect_inputs(source: str | os.PathLike, recursive: bool = True) -> list[ShardItem]:
    """List the media files of a folder (sorted, videos and images by extension) or the rows of a dataset CSV.

    Raises:
        DataError: ``source`` does not exist or holds no video/image.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        rows = drop_missing(read_csv_rows(source), source)
        items = [(row.path, row.key, row.caption, row.reference) for row in rows]
    elif source.is_dir():
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in source.glob(pattern) if p.is_file() and _extension(p) in _MEDIA)
        items = [(p, p.relative_to(source).as_posix(), None, None) for p in files]
    else:
        raise DataError(f"shard input {source} is neither a folder nor a .csv file")
    if not items:
        raise DataError(f"no video or image files ({', '.join(_MEDIA)}) found in {source}")
    keys = _unique_keys([name for _, name, _, _ in items])
    return [ShardItem(path, key, caption, ref) for (path, _, caption, ref), key in zip(items, keys)]


def write_shards(
    items: Iterable[ShardItem],
    out_dir: str | os.PathLike,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    start_shard: int = 0,
) -> ShardReport:
    """Write ``items`` into shards ``out_dir/NNNNNN.tar`` with ``NNNNNN.meta.jsonl`` beside each.

    A shard is closed once it holds ``maxcount`` samples or ``maxsize`` bytes (the sample that crosses
    ``maxsize`` stays in it). Inputs that cannot be probed, and videos that hold fewer frames than their container
    promises (truncated files), are skipped with a warning and counted in the report.

    Args:
        items: inputs, e.g. from :func:`collect_inputs`.
        out_dir: output folder (created).
        maxcount: samples per shard at most.
        maxsize: bytes per shard, approximately.
        start_shard: number of the first shard.

    Returns:
        A :class:`ShardReport`.

    Raises:
        DataError: no input could be written.
    """
    wds = require("webdataset", extra="train")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, pending = ShardReport(), {}

    def flush_meta(fname: str) -> None:
        lines = pending.pop(fname, [])
        Path(meta_path(fname)).write_text("".join(json.dumps(line) + "\n" for line in lines))
        report.shards.append(Path(fname))

    pattern = str(out / "%06d.tar")
    with wds.ShardWriter(
        pattern, maxcount=maxcount, maxsize=maxsize, post=flush_meta, start_shard=start_shard, verbose=0
    ) as writer:
        for item in items:
            record = _encode(item, report.skips)
            if record is not None:
                sample, meta = record
                writer.write(sample)
                pending.setdefault(writer.fname, []).append(meta)
                report.written += 1
    if report.written == 0:
        for shard in report.shards:
            shard.unlink(missing_ok=True)
            Path(meta_path(shard)).unlink(missing_ok=True)
        raise DataError(f"no input could be written to shards ({report.skips.count} unreadable)")
    logger.info("wrote %d samples into %d shard(s) in %s", report.written, len(report.shards), out)
    return report


def _encode(item: ShardItem, skips: SkipCounter) -> tuple[dict, dict] | None:
    try:
        info = probe(item.path)
        if not info.is_image and (held := stored_frames(item.path)) < info.frames - TAIL_TOLERANCE:
            raise DataError(f"truncated: its container promises {info.frames} frames, the file holds {held}")
        sample = {"__key__": item.key, _extension(item.path): item.path.read_bytes(), "id": item.key}
        if item.caption:
            sample["txt"] = item.caption
        if item.reference is not None:
            sample[f"reference.{_extension(item.reference)}"] = item.reference.read_bytes()
    except Exception as err:
        if not is_sample_error(err):
            raise
        skips.record(str(item.path), err)
        return None
    meta = {
        "key": item.key,
        "duration": info.duration,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "frames": info.frames,
    }
    return sample, meta


_MEDIA = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


def _extension(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def _unique_keys(names: list[str]) -> list[str]:
    used: set[str] = set()
    keys = []
    for name in names:
        stem = name.rsplit(".", 1)[0] if "." in Path(name).name else name
        base = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "sample"
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys
