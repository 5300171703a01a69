"""Measuring tools shared by the benchmarks and the tests."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorMeter"]


class LiveTensorMeter(TorchDispatchMode):
    """Tracks the peak of live tensor bytes created inside the mode (works on CPU and on the meta device).

    Memory is counted per storage: an op output with a new storage adds its bytes until the last tensor using that
    storage is freed; views and in-place results share their input's storage and add nothing (at the dispatch
    level a view does not report itself as one, so storages are compared, not tensors). Storages that existed
    before the mode (the inputs, the weights) are never counted, so the peak is the algorithm's own activation
    memory, independent of allocator caching.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, tensors alive that use it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_id(t)
            entry = self._storages.get(key)
            if entry is None and key in inputs:
                continue  # a view or in-place result of a storage made before the mode
            if entry is None:
                entry = self._storages[key] = [t.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata
