"""Skipping broken samples: a warning per skip, a counter, and a bound on how many failures in a row are tolerated.

A sample that cannot be read (missing, empty, corrupt or truncated file, not a video, too short with
``short="skip"``) is skipped with a warning. Two channels carry the count:

- every returned sample has ``"skipped"``: how many failures were skipped to produce it. After collation the
  training loop sums ``batch["skipped"]``; this is the channel that crosses DataLoader worker processes.
- :class:`SkipCounter` (``dataset.skips``) counts in the process that reads; with ``num_workers=0`` that is the
  training process.

Programming errors (``TypeError``, ``AttributeError``, ``NameError``, ``ImportError``, ``ConfigError``) are never
swallowed: they say the code or the configuration is wrong, not the sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from refdecoder.errors import ConfigError, DataError

__all__ = ["SkipCounter", "is_sample_error", "FailureBudget"]

logger = logging.getLogger("refdecoder.data")

_BUG_TYPES = (TypeError, AttributeError, NameError, ImportError, ConfigError, NotImplementedError, MemoryError)


def is_sample_error(error: BaseException) -> bool:
    """True when ``error`` means "this sample is unusable" (skip it) rather than a bug (re-raise it)."""
    return isinstance(error, Exception) and not isinstance(error, _BUG_TYPES)


@dataclass
class SkipCounter:
    """Process-local count of skipped samples, by error type.

    Attributes:
        count: samples skipped so far in this process.
        by_reason: skips per exception class name.
    """

    count: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)

    def record(self, what: str, error: BaseException) -> None:
        """Log a warning naming the sample and the error, and count it."""
        self.count += 1
        self.by_reason[type(error).__name__] += 1
        logger.warning("skipping %s: %s: %s", what, type(error).__name__, error)

    def reset(self) -> None:
        """Forget every count."""
        self.count = 0
        self.by_reason.clear()


class FailureBudget:
    """Raises :class:`DataError` once ``limit`` samples in a row have failed (the paper's loader retried forever).

    Args:
        limit: consecutive failures tolerated.
        source: what is being read, for the error message.
    """

    def __init__(self, limit: int, source: str) -> None:
        if limit < 1:
            raise ConfigError(f"max_failures must be >= 1, got {limit}")
        self.limit, self.source = limit, source
        self.in_a_row = 0
        self._recent: list[str] = []

    def failed(self, what: str, error: BaseException) -> None:
        """Note one failure; raise :class:`DataError` when the budget is spent."""
        self.in_a_row += 1
        self._recent = (self._recent + [f"{what}: {type(error).__name__}: {error}"])[-3:]
        if self.in_a_row >= self.limit:
            raise DataError(self.exhausted_message())

    def succeeded(self) -> None:
        """Reset the run of failures."""
        self.in_a_row = 0

    def exhausted_message(self) -> str:
        """Error text listing the last failures."""
        recent = "\n  ".join(self._recent)
        return (
            f"{self.in_a_row} samples in a row failed while reading {self.source}; the data is unusable as "
            f"configured. Last errors:\n  {recent}\nCheck the paths, the files, and the clip length/short "
            f"settings (a dataset of videos all shorter than the clip with short='skip' fails like this)."
        )
