"""Training data plumbing: datasets from the config, an exactly resumable batch stream, the sample shards.

Exact resume needs the data position to be part of the checkpoint. :class:`BatchStream` yields micro-batches
forever, epoch after epoch, and its position is ``(epoch, batches consumed in the epoch)``:

- map-style datasets (CSV, latents) use :class:`StepSampler`, which lays the samples of every optimizer step out
  so that the global batch is the same whatever the number of ranks and accumulation steps, and which starts
  mid-epoch without reading the skipped samples;
- iterable datasets (WebDataset shards) are deterministic given ``(seed, epoch)``, so resuming replays the epoch
  and drops the batches already consumed (they are decoded again, which costs time but not correctness).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from refdecoder.data import (
    ClipSampler,
    LatentDataset,
    ShardDataset,
    ShardItem,
    VideoCSVDataset,
    bundled_clips,
    collate,
    derive_seed,
    write_shards,
)
from refdecoder.errors import ConfigError, DataError
from refdecoder.frames import FrameRule
from refdecoder.training.config import DatasetConfig, LatentFinetuneConfig

__all__ = [
    "StepSampler",
    "StreamPosition",
    "BatchStream",
    "build_clip_dataset",
    "build_latent_dataset",
    "ensure_sample_shards",
    "check_data_source",
    "take_samples",
]

logger = logging.getLogger("refdecoder.training")


class StepSampler(Sampler[int]):
    """Sample indices of one epoch for one rank, laid out per optimizer step.

    The epoch is a permutation seeded by ``(seed, epoch)``, cut into global batches of
    ``world * accum * batch_size`` samples (a last partial one is dropped). Micro-batch ``m`` of rank ``r`` in a
    step takes slot ``r * accum + m`` of the step's global batch, so ``2 ranks x 1 micro-batch`` and
    ``1 rank x 2 micro-batches`` see the same samples in the same slots.

    Args:
        length: dataset size.
        batch_size: samples per micro-batch.
        accum: micro-batches per optimizer step.
        rank, world: this rank and the number of ranks.
        seed, epoch: select the permutation.
        start: micro-batches of this rank to skip (resume position).
        shuffle: permute (True) or keep the dataset order.
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        accum: int = 1,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.length, self.batch_size, self.accum, self.rank, self.world = length, batch_size, accum, rank, world
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle
        self.global_batch = world * accum * batch_size
        self.steps = length // self.global_batch
        if self.steps == 0:
            raise DataError(
                f"the dataset has {length} samples, fewer than one global batch of {self.global_batch} "
                f"({world} rank(s) x {accum} accumulation step(s) x batch size {batch_size}); add data or shrink "
                "the batch"
            )

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        for micro in range(self.start, self.steps * self.accum):
            step, m = divmod(micro, self.accum)
            first = step * self.global_batch + (self.rank * self.accum + m) * self.batch_size
            yield from order[first : first + self.batch_size]

    def __len__(self) -> int:
        return max(0, self.steps * self.accum - self.start) * self.batch_size


@dataclass
class StreamPosition:
    """Where a :class:`BatchStream` is: the epoch and the micro-batches of it already consumed."""

    epoch: int = 0
    consumed: int = 0


class BatchStream:
    """Endless micro-batches over epochs, resumable from a :class:`StreamPosition`.

    Args:
        dataset: map-style (read through a :class:`StepSampler`) or iterable (shards).
        batch_size: samples per micro-batch.
        accum: micro-batches per optimizer step (map-style layout).
        rank, world: this rank and the number of ranks (map-style layout; shards split themselves).
        seed: seed of the sampling order.
        num_workers: DataLoader workers.
        position: where to start.
        shuffle: shuffle map-style datasets.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        accum: int = 1,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        position: StreamPosition | None = None,
        shuffle: bool = True,
    ) -> None:
        self.dataset, self.batch_size, self.accum, self.rank, self.world = dataset, batch_size, accum, rank, world
        self.seed, self.num_workers, self.shuffle = seed, num_workers, shuffle
        self.position = position or StreamPosition()
        self._iterator: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = self._open_epoch()
            batch = next(self._iterator, None)
            if batch is not None:
                self.position.consumed += 1
                return batch
            if self.position.consumed == 0:
                raise DataError(
                    f"epoch {self.position.epoch} of {type(self.dataset).__name__} produced no batch of "
                    f"{self.batch_size}; the data holds fewer samples than one batch per rank"
                )
            self.position = StreamPosition(self.position.epoch + 1, 0)
            self._iterator = None
        raise DataError("the data stream produced no batch in a fresh epoch")

    def _open_epoch(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.position.epoch, self.position.consumed
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if isinstance(self.dataset, IterableDataset):
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                collate_fn=collate,
                drop_last=True,
                num_workers=self.num_workers,
            )
            return itertools.islice(iter(loader), start, None)
        sampler = StepSampler(
            len(self.dataset),
            self.batch_size,
            self.accum,
            self.rank,
            self.world,
            self.seed,
            epoch,
            start,
            self.shuffle,
        )
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            drop_last=True,
            num_workers=self.num_workers,
        )
        return iter(loader)

    def state(self) -> dict[str, int]:
        """The position as plain values, for checkpoints: ``{"epoch", "consumed"}``."""
        return {"epoch": self.position.epoch, "consumed": self.position.consumed}


def build_clip_dataset(
    cfg: DatasetConfig, frames: int, size: tuple[int, int], frame_rule: FrameRule, seed: int
) -> Dataset:
    """The clip dataset a :class:`~refdecoder.training.config.DatasetConfig` describes.

    Returns a dataset of ``{"video": (3, frames, H, W) in [-1, 1], "reference_index": int, ...}`` samples (plus
    ``"reference"`` ``(3, 1, H, W)`` with ``reference: far``).
    """
    sampler = ClipSampler(
        frames=frames,
        frame_rule=frame_rule,
        fps=cfg.fps,
        short=cfg.short,
        reference=cfg.reference,
        size=tuple(size),
        resize_mode=cfg.resize_mode,
        reference_distance=cfg.reference_distance,
        motion=cfg.motion,
    )
    if cfg.kind == "csv":
        return VideoCSVDataset(cfg.path, sampler, seed=seed, max_failures=cfg.max_failures)
    return ShardDataset(
        cfg.path, sampler, seed=seed, shuffle=cfg.shuffle, resample=cfg.resample, max_failures=cfg.max_failures
    )


def build_latent_dataset(cfg: LatentFinetuneConfig, seed: int) -> LatentDataset:
    """Saved diffusion latents with their reference images (paper App. G)."""
    return LatentDataset(cfg.path, reference_dir=cfg.reference_dir, seed=seed)


def ensure_sample_shards(cfg: DatasetConfig) -> Path | None:
    """Build shards of the bundled sample clips named in ``cfg.samples`` at ``cfg.path`` when it does not exist.

    One clip per shard, so that several ranks or workers each get shards. The folder is written under a temporary
    name and renamed when complete. Returns the folder when it was built, else None.

    Raises:
        ConfigError: a requested clip is not bundled, or ``samples`` is set on a CSV dataset.
    """
    if not cfg.samples:
        return None
    if cfg.kind != "shards":
        raise ConfigError("config key 'samples' builds WebDataset shards; it needs kind: shards")
    out = Path(cfg.path)
    if out.exists():
        return None
    clips = {path.stem: path for path in bundled_clips()}
    missing = sorted(set(cfg.samples) - set(clips))
    if missing:
        raise ConfigError(f"unknown sample clips {missing} in 'samples'; bundled clips: {sorted(clips)}")
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shards([ShardItem(clips[name], name) for name in cfg.samples], tmp, maxcount=1)
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built sample shards of %s in %s", list(cfg.samples), out)
    return out


def check_data_source(cfg: DatasetConfig, key: str) -> None:
    """Fail early, before any model is loaded, when a local dataset path does not exist.

    Remote URLs, ``pipe:`` commands and patterns (braces, globs) are left to the dataset, which reports them.
    """
    path = cfg.path
    if "://" in path or path.startswith("pipe:") or any(c in path for c in "{*?[,") or "::" in path:
        return
    if not Path(path).exists():
        what = "CSV file" if cfg.kind == "csv" else "shard folder or file"
        raise DataError(f"{key}.path: the {what} {path} does not exist")


def take_samples(dataset: Dataset, count: int, collate_fn: Callable = collate) -> dict[str, Any]:
    """The first ``count`` samples of ``dataset`` (epoch 0), collated: a fixed held-out batch for validation."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    if isinstance(dataset, IterableDataset):
        samples = list(itertools.islice(iter(dataset), count))
    else:
        samples = [dataset[i] for i in range(min(count, len(dataset)))]
    if not samples:
        raise DataError(f"the validation data {type(dataset).__name__} holds no sample")
    return collate_fn(samples)
