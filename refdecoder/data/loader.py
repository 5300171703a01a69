"""DataLoader construction and collation for the clip datasets.

Reproducibility: the datasets draw every random choice from generators seeded by sample ids (see
:mod:`refdecoder.data.sampling`), never from global RNGs, so no ``worker_init_fn`` is needed; the only other
randomness is the DataLoader's sampling order for map-style datasets, which :func:`make_loader` seeds. Call
``dataset.set_epoch(epoch)`` before iterating each epoch (workers copy the dataset when the iterator is created,
so this needs ``persistent_workers=False``, the default here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data import default_collate as torch_collate

from refdecoder.errors import DataError

__all__ = ["collate", "make_loader"]


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts: tensors stacked (``video`` -> ``B, 3, T, H, W``), numbers to tensors, strings to lists.

    ``caption`` becomes ``""`` for samples without one; ``reference`` must be present in all samples or none.
    ``batch["skipped"].sum()`` is the number of broken samples skipped to build the batch.
    """
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    samples = [dict(s) for s in samples]
    if any("caption" in s for s in samples):
        for sample in samples:
            sample.setdefault("caption", "")
    with_reference = sum("reference" in s for s in samples)
    if 0 < with_reference < len(samples):
        raise DataError(
            f"{with_reference} of {len(samples)} samples have a 'reference' image and the others do "
            f"not; give every sample a reference (or none) within one dataset"
        )
    return torch_collate(samples)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader with a seeded sampling order and :func:`collate`.

    Args:
        dataset: a map-style dataset (shuffled by the loader when ``shuffle``) or an iterable one such as
            :class:`~refdecoder.data.shards.ShardDataset` (which shuffles itself; ``shuffle`` is ignored).
        batch_size: samples per batch.
        num_workers: worker processes.
        seed: seed of the sampling order (map-style datasets).
        shuffle: shuffle a map-style dataset.
        drop_last: drop a last, smaller batch (keeps batch shapes constant in training).
        pin_memory: pin batches for faster host-to-GPU copies.
        prefetch_factor: batches prefetched per worker (None: PyTorch's default).
    """
    iterable = isinstance(dataset, IterableDataset)
    generator = torch.Generator().manual_seed(seed)
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor is not None else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        **extra,
    )
