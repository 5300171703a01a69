"""Measuring tools shared by the benchmarks and the tests."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LiveTensorMeter"]


class LiveTensorMeter(TorchDispatchMode):
    """Tracks the peak of live tensor bytes created inside the mode (works on CPU and on the meta device).

    Every op output that owns its storage (not a view) is counted until its tensor is freed, so the peak is the
    algorithm's own activation memory, independent of allocator caching and of what existed before the mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None and not t._is_view():
                size = t.numel() * t.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size
