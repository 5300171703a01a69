"""Progress display for the command line and the recipes: a tqdm bar on a terminal, plain lines elsewhere.

A carriage-return bar written to a log file or a CI console becomes one ever-growing line. When the stream is not
a terminal, :class:`LineProgress` prints a complete line every tenth of the work (and at least every
``every_s`` seconds), with the rate, the time left and the bar's postfix values.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["LineProgress", "progress"]


class LineProgress:
    """A tqdm-like counter that prints ``desc: 30/200 step (15%), 4.1 step/s, ~41 s left, loss=0.2`` lines.

    Args:
        total: expected count (None: unknown).
        desc: label at the start of each line.
        unit: what is counted.
        initial: count already done (a resumed run).
        stream: where lines go.
        every_s: longest pause between two lines, in seconds.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        stream: IO[str] | None = None,
        every_s: float = 30.0,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream, self.every_s = stream or sys.stderr, every_s
        self._start_n, self._started = initial, time.monotonic()
        self._last_time, self._last_n = self._started, initial
        self._step = max(1, (total or 0) // 10)
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; print a line at each tenth of the total, after ``every_s`` seconds, and at the end."""
        if n <= 0:
            return
        self.n += n
        now = time.monotonic()
        crossed = self.n // self._step != (self.n - n) // self._step
        if crossed or now - self._last_time >= self.every_s or self.n == self.total:
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        """Values appended to the next lines (``loss=0.1234``)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Print a last line unless the previous one already showed the final count."""
        if self.n != self._last_n:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        parts = [f"{self.n}/{self.total}" if self.total else str(self.n)]
        if self.total:
            parts[0] += f" {self.unit} ({100 * self.n / self.total:.0f}%)"
        if elapsed >= 1.0:  # a rate over the first instants (work done before the first update) means nothing
            parts.append(f"{rate:.2f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total and elapsed >= 1.0:
            parts.append(f"~{(self.total - self.n) / rate:.0f} s left")
        if self._postfix:
            parts.append(self._postfix)
        print(f"{self.desc}: " + ", ".join(parts), file=self.stream, flush=True)
        self._last_time, self._last_n = now, self.n


def progress(
    total: int | None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    stream: IO[str] | None = None,
) -> Any:
    """A progress counter (``update``, ``set_postfix``, ``close``): tqdm on a terminal, :class:`LineProgress`
    otherwise, a silent tqdm when ``disable``."""
    from refdecoder._deps import require

    stream = stream or sys.stderr
    tqdm = require("tqdm", extra="eval").tqdm
    if disable:
        return tqdm(total=total, disable=True)
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, unit, initial, stream)


def track(items: Iterable[Any], total: int, desc: str, unit: str = "it", disable: bool = False) -> Iterator[Any]:
    """Iterate ``items`` while counting them on :func:`progress`."""
    bar = progress(total, desc, unit, disable=disable)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
