"""Latent shards: encoded clips as WebDataset tars, written by ``refdecoder encode``, read by :class:`LatentDataset`.

A folder of latent shards holds, per writing rank, ``latents-r<RANK>-<INDEX>.tar`` files; each sample is

- ``<key>.latents.safetensors``: tensor ``latents`` (``C, t, h, w``) with the metadata of
  :func:`refdecoder.data.save_latents` (``height``, ``width``, ``normalized``, ``prompt``) plus the clip's
  origin (``source``, ``start``, ``frames``, ``stride``, ``fps``, ``posterior``, ``reference_index``, ...);
- ``<key>.reference.png``: the clip frame used as the reference (lossless, the exact frame that was encoded);
- ``<key>.json``: the same metadata as JSON, for WebDataset pipelines; ``<key>.txt``: a caption, when known.

A shard is written as a hidden ``.partial`` file and renamed into place when complete; then its
``<name>.meta.jsonl`` (one record per sample: key, source, start, frames) is written atomically. That record file is
the shard's *finished* marker: a tar without one is an interrupted write and is ignored and cleaned up. The
folder's ``index.json`` (settings and the list of finished shards) is rebuilt from the markers, so it is always
consistent with what is there, whichever rank wrote what.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from refdecoder._deps import require
from refdecoder.data.shard_writer import meta_path
from refdecoder.errors import DataError

__all__ = [
    "INDEX_FILE",
    "LATENTS_MEMBER",
    "REFERENCE_MEMBER",
    "LatentShardWriter",
    "LatentMember",
    "finished_shards",
    "write_index",
    "is_latent_shard_folder",
    "index_latent_shards",
    "read_latent_sample",
]

INDEX_FILE = "index.json"
LATENTS_MEMBER = "latents.safetensors"
REFERENCE_MEMBER = "reference.png"
FORMAT = "refdecoder-latent-shards/1"
_SHARD = re.compile(r"latents-r(\d+)-(\d+)\.tar$")


def shard_name(rank: int, index: int) -> str:
    """``latents-r<rank, 3 digits>-<index, 6 digits>.tar``."""
    return f"latents-r{rank:03d}-{index:06d}.tar"


class LatentShardWriter:
    """Writes one rank's samples into its own shards, each closed after ``maxcount`` samples.

    Args:
        folder: the shard folder (shared by all ranks).
        rank: the writing rank: its shard names carry it, so ranks never write the same file.
        maxcount: samples per shard; a killed rank loses at most its shard in progress.
    """

    def __init__(self, folder: str | os.PathLike, rank: int, maxcount: int) -> None:
        self.folder, self.rank, self.maxcount = Path(folder), rank, maxcount
        self.folder.mkdir(parents=True, exist_ok=True)
        matches = [_SHARD.match(p.name) for p in self.folder.glob("*.tar")]
        used = [int(m[2]) for m in matches if m and int(m[1]) == rank]
        self._next = max(used, default=-1) + 1
        self._tar: Any = None
        self._records: list[dict[str, Any]] = []
        self.written: list[Path] = []

    def write(
        self, key: str, latents: torch.Tensor, reference_png: bytes, meta: dict[str, str], caption: str = ""
    ) -> None:
        """Add one sample (``latents`` ``C, t, h, w``; ``meta`` string values) to the shard in progress."""
        if self._tar is None:
            self._open()
        tensor = latents.detach().to("cpu").contiguous()
        sample = {
            "__key__": key,
            LATENTS_MEMBER: save_safetensors({"latents": tensor}, metadata=meta),
            REFERENCE_MEMBER: reference_png,
            "json": json.dumps(meta, sort_keys=True).encode(),
        }
        if caption:
            sample["txt"] = caption.encode()
        self._tar.write(sample)
        self._records.append({"key": key, **{k: meta[k] for k in ("source", "start", "frames") if k in meta}})
        if len(self._records) >= self.maxcount:
            self.close()

    def close(self) -> None:
        """Finish the shard in progress: rename it into place, then write its marker (idempotent)."""
        if self._tar is None:
            return
        self._tar.close()
        self._handle.close()
        final = self.folder / shard_name(self.rank, self._next)
        os.replace(self._partial, final)
        marker = Path(meta_path(final))
        tmp = marker.with_name(f".{marker.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self._records))
        tmp.replace(marker)
        self.written.append(final)
        self._tar, self._records, self._next = None, [], self._next + 1

    def _open(self) -> None:
        wds = require("webdataset", extra="train")
        self._partial = self.folder / f".{shard_name(self.rank, self._next)}.partial"
        self._handle = self._partial.open("wb")
        # mtime 0 and fixed owner: the same samples give the same bytes on every run
        self._tar = wds.TarWriter(self._handle, encoder=False, mtime=0.0, user="refdecoder", group="refdecoder")


def finished_shards(folder: str | os.PathLike) -> dict[Path, list[dict[str, Any]]]:
    """The finished shards of a folder (tar and marker both present) and their sample records, by name."""
    folder = Path(folder)
    out = {}
    for tar in sorted(folder.glob("latents-r*.tar")):
        marker = Path(meta_path(tar))
        if _SHARD.match(tar.name) and marker.is_file():
            out[tar] = [json.loads(line) for line in marker.read_text().splitlines() if line.strip()]
    return out


def write_index(folder: str | os.PathLike, settings: dict[str, Any]) -> Path:
    """Rebuild ``index.json`` from the finished shards (atomically) and remove interrupted ``.partial`` files."""
    folder = Path(folder)
    for partial in folder.glob(".latents-r*.tar.partial"):
        partial.unlink(missing_ok=True)
    shards = finished_shards(folder)
    index = {
        "format": FORMAT,
        "settings": settings,
        "samples": sum(len(records) for records in shards.values()),
        "shards": [{"name": tar.name, "samples": len(records)} for tar, records in shards.items()],
    }
    path = folder / INDEX_FILE
    tmp = path.with_name(f".{INDEX_FILE}.tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def is_latent_shard_folder(path: str | os.PathLike) -> bool:
    """True for a folder that ``refdecoder encode`` wrote (it has an ``index.json`` of latent shards)."""
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class LatentMember:
    """Where one sample lies in a shard: byte ranges of its latents file and its reference image."""

    shard: Path
    key: str
    latents: tuple[int, int]  # (offset, size) in the tar
    reference: tuple[int, int]


def index_latent_shards(folder: str | os.PathLike) -> list[LatentMember]:
    """Every sample of the shards listed in a folder's ``index.json``, sorted by key (the order does not depend on
    how many ranks wrote them).

    Raises:
        DataError: an unreadable index or shard, or a sample without its latents or reference member.
    """
    folder = Path(folder)
    try:
        names = [entry["name"] for entry in json.loads((folder / INDEX_FILE).read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read {folder / INDEX_FILE}: {err}; rerun refdecoder encode to rebuild it") from err
    members = [member for name in names for member in _members(folder / name)]
    return sorted(members, key=lambda m: m.key)


def _members(shard: Path) -> Iterator[LatentMember]:
    found: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                found.setdefault(key, {})[ext] = (info.offset_data, info.size)
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot read latent shard {shard}: {err}") from err
    for key, parts in found.items():
        if LATENTS_MEMBER not in parts or REFERENCE_MEMBER not in parts:
            raise DataError(f"{shard}: sample {key!r} lacks {LATENTS_MEMBER} or {REFERENCE_MEMBER}")
        yield LatentMember(shard, key, parts[LATENTS_MEMBER], parts[REFERENCE_MEMBER])


def read_latent_sample(member: LatentMember) -> tuple[torch.Tensor, dict[str, str], bytes]:
    """``(latents C, t, h, w, metadata, reference image bytes)`` of one sample."""
    with member.shard.open("rb") as handle:
        raw, reference = (_read(handle, *span) for span in (member.latents, member.reference))
    try:
        latents = load_safetensors(raw)["latents"]
        header = int.from_bytes(raw[:8], "little")  # safetensors: 8-byte header length, then the JSON header
        meta = json.loads(raw[8 : 8 + header]).get("__metadata__", {})
    except Exception as err:
        raise DataError(f"{member.shard}: unreadable latents of {member.key!r}: {err}") from err
    return latents, meta, reference


def _read(handle: io.BufferedReader, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)
