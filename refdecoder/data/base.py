"""Map-style dataset base: deterministic per-sample randomness, bounded skipping of broken samples, epochs."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch.utils.data import Dataset

from refdecoder.data.faults import FailureBudget, SkipCounter, is_sample_error
from refdecoder.data.sampling import ClipPlan, sample_generator
from refdecoder.data.video import ReadStats

__all__ = ["RetryingDataset", "clip_sample"]


def clip_sample(
    video: torch.Tensor,
    plan: ClipPlan,
    key: str,
    decoded_frames: int,
    reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The sample dict every clip dataset returns (``"skipped"`` is added by the dataset).

    Keys: ``video`` ``3, T, H, W`` in [-1, 1]; ``reference_index`` (int into T, -1 for a reference outside the
    clip); ``key``; ``fps`` of the clip; ``decoded_frames`` (frames decoded to produce it, for throughput
    accounting); and ``reference`` ``3, 1, H, W`` when the reference is a frame outside the clip.
    """
    sample = {
        "video": video,
        "reference_index": plan.reference_index,
        "key": key,
        "fps": plan.fps,
        "decoded_frames": decoded_frames,
    }
    if reference is not None:
        sample["reference"] = reference
    return sample


class RetryingDataset(Dataset, abc.ABC):
    """A map-style dataset whose ``__getitem__`` skips broken samples, drawing a replacement index.

    Every draw for the request ``index`` comes from generators seeded by ``(seed, epoch, index, attempt)``, so the
    sample for an index does not depend on the worker that loads it. Replacements are drawn at random (not
    ``index + 1``, which would over-sample the neighbours of broken files). After ``max_failures`` failures in a
    row a :class:`~refdecoder.errors.DataError` is raised.

    Args:
        seed: base seed of every per-sample draw.
        max_failures: failures in a row tolerated for one request.
        name: what the dataset reads, for messages.
    """

    def __init__(self, seed: int, max_failures: int, name: str) -> None:
        self.seed, self.max_failures, self.name = int(seed), int(max_failures), name
        self.epoch = 0
        self.skips = SkipCounter()
        self.read_stats = ReadStats()
        FailureBudget(self.max_failures, name)  # validates max_failures at construction, not at first failure

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draws; call before creating the epoch's iterator (workers copy the dataset)."""
        self.epoch = int(epoch)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        """Load sample ``index`` using ``generator`` for every random draw; raise on a broken sample."""

    def describe(self, index: int) -> str:
        """How a sample is named in warnings."""
        return f"sample {index} of {self.name}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        budget = FailureBudget(self.max_failures, self.name)
        current, attempt = int(index), 0
        while True:
            generator = sample_generator(self.seed, self.epoch, int(index), attempt)
            try:
                sample = self.load(current, generator)
            except Exception as err:
                if not is_sample_error(err):
                    raise
                self.skips.record(self.describe(current), err)
                budget.failed(self.describe(current), err)
                current = int(torch.randint(0, len(self), (1,), generator=generator))
                attempt += 1
                continue
            sample["skipped"] = attempt
            return sample
