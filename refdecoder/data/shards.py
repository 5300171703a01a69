"""Stream clips from WebDataset shards (ours or SSVAE's): a ``wds.DataPipeline`` that decodes only the sampled span.

Stages, in order (each a plain webdataset stage unless noted):

1. shard list: the expanded shard URLs, shuffled per epoch with a seed shared by all workers and nodes (or, with
   ``resample=True``, an endless draw with replacement seeded per worker);
2. ``wds.split_by_node`` and ``wds.split_by_worker`` (skipped when resampling: every worker draws on its own);
3. ``wds.tarfile_to_samples`` with a handler that logs and counts unreadable shards/members;
4. ``wds.shuffle`` over the raw (still encoded) samples, seeded by (seed, epoch, rank, worker);
5. decode (ours): joins the ``.meta.jsonl`` record of the sample's shard by key, plans the clip with the
   :class:`~refdecoder.data.sampling.ClipSampler` (random draws seeded by (seed, epoch, shard folder and file
   name, key), so they do not depend on the worker count or on where the dataset is mounted) and decodes
   only that span from the in-memory member, skipping broken samples.

Batching is left to ``torch.utils.data.DataLoader`` (see :func:`refdecoder.data.loader.make_loader`), so the
dataset works unchanged with any batch size and with ``num_workers=0``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from refdecoder._deps import require
from refdecoder.data.base import clip_sample
from refdecoder.data.faults import FailureBudget, SkipCounter, is_sample_error
from refdecoder.data.sampling import ClipSampler, derive_seed, sample_generator
from refdecoder.data.shard_writer import meta_path
from refdecoder.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ReadStats, VideoReader, read_image
from refdecoder.errors import ConfigError, DataError

__all__ = ["ShardDataset", "expand_shards", "read_meta"]

logger = logging.getLogger("refdecoder.data")

_MEDIA = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
_META_CACHE = 16


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard patterns into a list of shard URLs.

    ``spec`` is one pattern or a list; a string may hold several patterns separated by commas outside braces
    (``"dir1,dir2"``) or by ``::`` (webdataset's separator). Each pattern is brace-expanded
    (``shards/{000000..000009}.tar``), then a folder becomes its ``*.tar`` files (recursively, sorted), a glob
    (``*``, ``?``, ``[``) its sorted matches, and anything else stays as given (a missing file is reported when
    read, as a skipped shard). A folder listed twice is read twice (weighting).

    Raises:
        DataError: nothing is left after expansion.
    """
    braceexpand = require("braceexpand", extra="train").braceexpand
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        for pattern in _split_top_level(os.fspath(item)):
            for url in braceexpand(pattern):
                urls.extend(_expand_one(url))
    if not urls:
        raise DataError(f"no shards found for {spec!r} (empty folders or patterns that match nothing)")
    return urls


def read_meta(shard: str) -> dict[str, dict[str, Any]]:
    """Records of a shard's sibling ``.meta.jsonl`` by key; empty when there is none (bad lines: warning, ignored)."""
    path = meta_path(shard)
    if not os.path.exists(path):
        logger.debug("no meta file %s; clip geometry comes from the container headers", path)
        return {}
    records = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[str(record["key"])] = record
            except (ValueError, KeyError, TypeError) as err:
                logger.warning("ignoring line %d of %s: %s", number, path, err)
    return records


class ShardDataset(IterableDataset):
    """Clips streamed from WebDataset shards; each item is the same dict as the CSV dataset's.

    Items: ``{"video": (3, T, H, W) in [-1, 1], "reference_index": int, "key": str, "fps": float, "skipped": int,
    "decoded_frames": int}``, plus ``"caption"`` (from ``<key>.txt``) and ``"reference"`` ``(3, 1, H, W)`` (from a
    ``<key>.reference.<ext>`` member) when present.

    Skips: broken samples and unreadable shards are logged, counted in :attr:`skips` (this process) and carried in
    the next returned sample's ``"skipped"`` (a stream holds back one sample so that skips after the last good
    sample still reach the training loop). :class:`DataError` is raised after ``max_failures`` failures in a row,
    and when a worker's whole share of the data failed.

    Args:
        shards: shard patterns, see :func:`expand_shards`.
        sampler: how clips are cut.
        seed: base seed of shard order, shuffle buffer and per-sample draws.
        shuffle: shuffle buffer size in samples (0: keep shard order).
        shuffle_shards: shuffle the shard list each epoch.
        resample: draw shards with replacement forever (``wds.ResampledShards`` behaviour) instead of one pass.
        max_failures: failures in a row tolerated.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        sampler: ClipSampler,
        seed: int = 0,
        shuffle: int = 100,
        shuffle_shards: bool = True,
        resample: bool = False,
        max_failures: int = 50,
    ) -> None:
        super().__init__()
        if shuffle < 0:
            raise ConfigError(f"shuffle (buffer size) must be >= 0, got {shuffle}")
        self.urls = expand_shards(shards)
        self.sampler, self.seed, self.shuffle = sampler, int(seed), int(shuffle)
        self.shuffle_shards, self.resample, self.max_failures = shuffle_shards, resample, int(max_failures)
        FailureBudget(self.max_failures, "shards")  # validates max_failures now rather than at the first failure
        self.epoch = 0
        self.skips = SkipCounter()
        self.read_stats = ReadStats()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and draws; call before creating the epoch's iterator."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.pipeline())

    def pipeline(self) -> Any:
        """The ``wds.DataPipeline`` of one epoch for the calling worker (call it inside the worker)."""
        wds = require("webdataset", extra="train")
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        stream = _Stream(self, rank, worker)
        split = [] if self.resample else [wds.split_by_node, wds.split_by_worker]
        shuffle = (
            [wds.shuffle(self.shuffle, self.shuffle, rng=random.Random(stream.stream_seed))] if self.shuffle else []
        )
        return wds.DataPipeline(
            stream.shard_urls, *split, wds.tarfile_to_samples(handler=stream.handle), *shuffle, stream.decode
        )


class _Stream:
    """Per-iteration state of one worker: shard order, meta cache, skip bookkeeping."""

    def __init__(self, dataset: ShardDataset, rank: int, worker: int) -> None:
        self.ds, self.rank, self.worker = dataset, rank, worker
        self.stream_seed = derive_seed(dataset.seed, dataset.epoch, rank, worker)
        more = "..." if len(dataset.urls) > 3 else ""
        self.budget = FailureBudget(dataset.max_failures, f"shards {dataset.urls[:3]}{more}")
        self.pending = self.failures = self.position = 0
        self._meta: dict[str, dict[str, dict[str, Any]]] = {}

    def shard_urls(self) -> Iterator[dict[str, str]]:
        urls = list(self.ds.urls)
        if self.ds.resample:
            rng = random.Random(self.stream_seed)
            while True:
                yield {"url": rng.choice(urls)}
        if self.ds.shuffle_shards:
            random.Random(derive_seed(self.ds.seed, self.ds.epoch, "shards")).shuffle(urls)
        yield from ({"url": url} for url in urls)

    def handle(self, error: Exception) -> bool:
        """webdataset handler: an unreadable shard or member is a skip, not a crash."""
        if not is_sample_error(error):
            return False
        self._failed("shard data", error)
        return True

    def decode(self, raws: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        held = None
        for raw in raws:
            self.position += 1
            what = f"{raw.get('__key__')!r} in {raw.get('__url__')}"
            try:
                sample = self._load(raw)
            except Exception as err:
                if not is_sample_error(err):
                    raise
                self._failed(what, err)
                continue
            self.budget.succeeded()
            sample["skipped"], self.pending = self.pending, 0
            if held is not None:
                yield held
            held = sample
        if held is not None:
            held["skipped"] += self.pending
            yield held
        elif self.failures:
            raise DataError(
                f"every sample of this worker's share failed ({self.failures} failures). "
                + self.budget.exhausted_message()
            )

    def _failed(self, what: str, error: Exception) -> None:
        self.ds.skips.record(what, error)
        self.pending += 1
        self.failures += 1
        self.budget.failed(what, error)

    def _load(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, url = raw["__key__"], raw["__url__"]
        media = next((ext for ext in _MEDIA if ext in raw), None)
        if media is None:
            members = sorted(k for k in raw if not k.startswith("__"))
            raise DataError(f"no video or image member (members: {members}; expected one of {list(_MEDIA)})")
        meta = self._meta_record(url, key)
        self._check_meta(meta, media in IMAGE_EXTENSIONS)
        ids = (
            (self.ds.seed, self.ds.epoch, self.rank, self.worker, self.position)
            if self.ds.resample
            else (self.ds.seed, self.ds.epoch, _shard_name(url), key)
        )
        generator = sample_generator(*ids)
        with VideoReader(raw[media]) as reader:
            plan = self.ds.sampler.plan(reader.info, generator)
            video, outside = self.ds.sampler.decode(reader, plan, generator, self.ds.read_stats)
        sample = clip_sample(video, plan, key, self.ds.read_stats.last_decoded, outside)
        self._extras(sample, raw, meta)
        return sample

    def _meta_record(self, url: str, key: str) -> dict[str, Any]:
        if url not in self._meta:
            # The shuffle buffer mixes the last few shards read; keep that many meta files, not every one seen.
            if len(self._meta) >= _META_CACHE:
                self._meta.pop(next(iter(self._meta)))
            self._meta[url] = read_meta(url)
        return self._meta[url].get(key, {})

    def _check_meta(self, meta: dict[str, Any], is_image: bool) -> None:
        """SSVAE's filter: skip a video whose record has no frame rate, or is too short under short='skip'."""
        fps = meta.get("fps")
        if fps is None or is_image:
            return
        if not fps > 0:
            raise DataError(f"meta record has fps={fps!r}; a video needs a positive frame rate")
        sampler = self.ds.sampler
        frames = meta.get("frames") or math.floor(meta.get("duration", 0) * fps + 0.5)
        if not frames:
            return  # no length recorded: the container headers decide
        needed = math.floor((sampler.frames - 1) * fps / min(sampler.fps or fps, fps) + 0.5) + 1
        if sampler.short == "skip" and frames < needed:
            raise DataError(f"too short per meta record: {frames} frames, a clip needs {needed} (short='skip')")

    def _extras(self, sample: dict[str, Any], raw: dict[str, Any], meta: dict[str, Any]) -> None:
        caption = raw.get("txt")
        if caption is not None or "caption" in meta:
            sample["caption"] = caption.decode("utf-8") if caption is not None else str(meta["caption"])
        reference = next((k for k in raw if k.startswith("reference.")), None)
        if reference is not None:
            sampler = self.ds.sampler
            mode = "crop_center" if sampler.resize_mode == "crop_random" else sampler.resize_mode
            sample["reference"] = read_image(io.BytesIO(raw[reference]), sampler.size, mode)


def _shard_name(url: str) -> str:
    """The shard's folder and file name: names a shard in seeds independently of where the dataset is mounted."""
    return "/".join(url.replace("\\", "/").rstrip("/").split("/")[-2:])


def _split_top_level(text: str) -> list[str]:
    """Split on ``::`` and on commas that are not inside braces."""
    parts, depth, current = [], 0, ""
    for char in text.replace("::", "\0"):
        depth += (char == "{") - (char == "}")
        if char == "\0" or (char == "," and depth == 0):
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def _expand_one(url: str) -> list[str]:
    if "://" in url or url.startswith("pipe:"):
        return [url]
    if os.path.isdir(url):
        return sorted(str(p) for p in Path(url).rglob("*.tar"))
    if any(c in url for c in "*?["):
        return sorted(glob.glob(url, recursive=True))
    return [url]
