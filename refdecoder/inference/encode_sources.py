"""The videos ``refdecoder encode`` reads: a folder, a dataset CSV or WebDataset shards, as one list of sources.

Each :class:`VideoSource` names its video by a key (letters, digits, ``_`` and ``-``: it becomes part of the
latent shard keys) and can hand out its bytes or path; frame counts and rates are probed separately (spread over
the ranks by the caller), so listing a large dataset stays cheap.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from refdecoder.data.shard_writer import collect_inputs
from refdecoder.data.shards import expand_shards, read_meta
from refdecoder.data.video import VIDEO_EXTENSIONS, probe
from refdecoder.errors import DataError

__all__ = ["VideoSource", "collect_sources", "probe_source"]


@dataclass(frozen=True)
class VideoSource:
    """One input video.

    Attributes:
        key: unique name of the video in this dataset.
        path: the file, or the shard holding it.
        member: the tar member of a shard sample; None for a plain file.
        caption: its caption (CSV ``caption`` column or shard ``<key>.txt``), if any.
    """

    key: str
    path: Path
    member: str | None = None
    caption: str = ""

    @property
    def locator(self) -> str:
        """``path`` or ``shard.tar:member``: where the video came from, as stored in the latents' metadata."""
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def open(self) -> bytes | Path:
        """What :class:`refdecoder.data.VideoReader` reads: the file's path, or the member's bytes."""
        if self.member is None:
            return self.path
        try:
            with tarfile.open(self.path) as tar:
                handle = tar.extractfile(self.member)
                if handle is None:
                    raise DataError(f"{self.locator} is not a file in the shard")
                return handle.read()
        except (OSError, tarfile.TarError, KeyError) as err:
            raise DataError(f"cannot read {self.locator}: {err}") from err


def collect_sources(source: str | os.PathLike) -> list[VideoSource]:
    """The videos of a folder (recursively), a CSV with a ``path`` (and ``caption``) column, or shards (a folder
    of ``.tar`` files, a ``.tar`` file or a brace pattern ``shards/{000000..000009}.tar``), in a fixed order.

    Raises:
        DataError: no video found.
    """
    text = os.fspath(source)
    path = Path(text)
    if path.is_file() and path.suffix.lower() == ".csv":
        items = collect_inputs(path)
    elif path.is_dir() and not _holds_videos(path) and any(path.rglob("*.tar")):
        return _shard_sources(text)
    elif path.is_dir():
        items = collect_inputs(path)
    elif not path.exists() and not any(c in text for c in "{*?[,:"):
        raise DataError(f"input {text} does not exist (a folder, a CSV, or shards: a .tar, a folder or a pattern)")
    else:
        return _shard_sources(text)
    videos = [VideoSource(i.key, i.path, None, i.caption or "") for i in items if _is_video(i.path.name)]
    if not videos:
        raise DataError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {source}")
    return videos


def _holds_videos(folder: Path) -> bool:
    return any(p.is_file() and _is_video(p.name) for p in folder.rglob("*"))


def _is_video(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS


def _shard_sources(spec: str) -> list[VideoSource]:
    sources: list[VideoSource] = []
    for url in expand_shards(spec):
        try:
            with tarfile.open(url) as tar:
                names = [info.name for info in tar if info.isfile()]
        except (OSError, tarfile.TarError) as err:
            raise DataError(f"cannot read shard {url}: {err}") from err
        captions = {n.split(".", 1)[0]: n for n in names if n.endswith(".txt")}
        for name in names:
            key, _, ext = name.partition(".")
            if ext.lower() in VIDEO_EXTENSIONS:
                sources.append(VideoSource(key.replace("/", "_"), Path(url), name, _caption(url, captions.get(key))))
    if not sources:
        raise DataError(f"no video members ({', '.join(VIDEO_EXTENSIONS)}) in the shards {spec}")
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):
        raise DataError(f"the shards {spec} hold several videos with one key; give them unique keys")
    return sources


def _caption(url: str, member: str | None) -> str:
    if member is None:
        return ""
    with tarfile.open(url) as tar:
        handle = tar.extractfile(member)
        return handle.read().decode("utf-8", "replace").strip() if handle else ""


def probe_source(source: VideoSource) -> tuple[int, float, str]:
    """``(frames, fps, "")`` of a video (a shard's ``.meta.jsonl`` record when it has one, else the container),
    or ``(0, 0.0, why)`` when it cannot be read."""
    if source.member is not None:
        record = read_meta(str(source.path)).get(source.member.split(".", 1)[0], {})
        if record.get("frames") and record.get("fps"):
            return int(record["frames"]), float(record["fps"]), ""
    try:
        info = probe(source.open())
    except DataError as err:
        return 0, 0.0, " ".join(str(err).split())
    return info.frames, info.fps, ""
