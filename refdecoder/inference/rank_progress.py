"""Progress of a run on several processes: this rank's count and the whole run's, with rates and time left.

Every rank writes a tiny ``<folder>/.progress/rank-<R>.json`` (done, total, start time) after each finished item,
atomically; the printing rank reads all of them for the total, so the counts need no collective call (ranks
finish items at different times; a collective in the loop would make them wait for each other). The files live
in the output folder, which every node of a multi-node run shares anyway.

A line looks like ``rank 0/2: 3/5 clips (60%), 0.51 clips/s, ~4 s left | all ranks: 7/10 clips, 1.02 clips/s,
~3 s left``. Only rank 0 prints by default (``quiet`` False prints on every rank).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO

from refdecoder.inference.distributed import RankContext

__all__ = ["RankProgress", "PROGRESS_DIR"]

PROGRESS_DIR = ".progress"


class RankProgress:
    """Counts the items this rank finished and prints progress lines.

    Args:
        ctx: the run's ranks.
        total: items in this rank's share.
        folder: the run's output folder (holds ``.progress/``).
        run_id: the same value on every rank of one run (e.g. rank 0's start time), so that files left by an
            earlier run are not counted.
        unit: what is counted, plural (``"clips"``).
        quiet: print nothing; default: quiet on every rank but 0.
        every_s: longest pause between two lines; a line is also printed at each tenth of this rank's share.
        stream: where lines go.
    """

    def __init__(
        self,
        ctx: RankContext,
        total: int,
        folder: str | os.PathLike,
        run_id: float,
        unit: str = "clips",
        quiet: bool | None = None,
        every_s: float = 30.0,
        stream: IO[str] | None = None,
    ) -> None:
        self.ctx, self.total, self.unit, self.run_id = ctx, total, unit, run_id
        self.quiet = (not ctx.is_main) if quiet is None else quiet
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.done, self.started = 0, time.time()
        self._dir = Path(folder) / PROGRESS_DIR
        self._last_print, self._step = self.started, max(1, total // 10)
        self._write()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished items; print at each tenth of the share, every ``every_s`` and at the end."""
        self.done += n
        self._write()
        now = time.time()
        crossed = self.done // self._step != (self.done - n) // self._step
        if crossed or now - self._last_print >= self.every_s or self.done == self.total:
            self.print_line(now)

    def print_line(self, now: float | None = None) -> None:
        """Print the current line (unless quiet)."""
        now = time.time() if now is None else now
        self._last_print = now
        if self.quiet:
            return
        mine = _describe(self.done, self.total, now - self.started, self.unit)
        if not self.ctx.distributed:
            print(f"done: {mine}", file=self.stream, flush=True)
            return
        done, total, started = self._totals()
        every = _describe(done, total, now - started, self.unit)
        print(f"{self.ctx.label}: {mine} | all ranks: {every}", file=self.stream, flush=True)

    def _write(self) -> None:
        if not self.ctx.distributed:
            return  # one process: its own count is the total
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"rank-{self.ctx.rank}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        record = {"run": self.run_id, "done": self.done, "total": self.total, "started": self.started}
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def _totals(self) -> tuple[int, int, float]:
        """Done and total over the ranks whose file belongs to this run, and the earliest start."""
        done, total, started = 0, 0, self.started
        for rank in range(self.ctx.world_size):
            try:
                record = json.loads((self._dir / f"rank-{rank}.json").read_text())
            except (OSError, ValueError):
                continue  # that rank has not started yet
            if record.get("run") == self.run_id:
                done, total = done + int(record["done"]), total + int(record["total"])
                started = min(started, float(record["started"]))
        return done, total, started


def _describe(done: int, total: int, elapsed: float, unit: str) -> str:
    """``3/5 clips (60%), 0.51 clips/s, ~4 s left`` (rate and time left once a second has passed)."""
    parts = [f"{done}/{total} {unit}" + (f" ({100 * done / total:.0f}%)" if total else "")]
    if elapsed >= 1.0 and done:
        rate = done / elapsed
        parts.append(f"{rate:.2f} {unit}/s")
        if done < total:
            parts.append(f"~{(total - done) / rate:.0f} s left")
    return ", ".join(parts)
