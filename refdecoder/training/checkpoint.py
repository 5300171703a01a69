"""Training checkpoints: atomic writes, keep-last-k, resume lookup, and a stop request on SIGTERM/SIGINT.

A checkpoint is written under a temporary name (``step-000000100.tmp``) and renamed to ``step-000000100.ckpt``
only once it is complete and flushed to disk; a process killed mid-write leaves a temporary entry that is ignored
(and removed by the next save), so the previous checkpoint stays the latest loadable one. A checkpoint file damaged
after its rename (a truncated copy, a full disk during a sync) is skipped by ``--resume auto`` with a warning, which
falls back to the one before, and is rewritten when its step comes again. The write itself is a callable (in the
recipe: ``fabric.save``), so sharded checkpoints (folders, FSDP/DeepSpeed) work the same way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from refdecoder.errors import CheckpointError

__all__ = ["CheckpointManager", "StopSignal"]

logger = logging.getLogger("refdecoder.training")

_NAME = re.compile(r"^step-(\d{9})\.ckpt$")
_TMP_SUFFIX = ".tmp"


class CheckpointManager:
    """Numbered checkpoints in one folder, newest ``keep_last`` kept.

    Args:
        directory: the checkpoint folder (created on first save).
        keep_last: complete checkpoints kept after each save (older ones are deleted).
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        """Final path of the checkpoint of optimizer step ``step``."""
        return self.directory / f"step-{step:09d}.ckpt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, path)``, oldest first (temporary entries are not listed)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def latest_readable(self) -> Path | None:
        """The newest checkpoint that is not visibly damaged (see :func:`damage`), or None; damaged newer ones are
        skipped with a warning."""
        for _, path in reversed(self.checkpoints()):
            problem = damage(path)
            if problem is None:
                return path
            logger.warning("skipping the damaged checkpoint %s (%s); trying the one before", path, problem)
        return None

    def resolve(self, resume: str | None) -> Path | None:
        """What ``--resume`` means: ``"auto"`` (newest here, or None), ``"none"``/None (fresh start), or a path.

        Raises:
            CheckpointError: an explicit path that does not exist.
        """
        if resume in (None, "none", ""):
            return None
        if resume == "auto":
            return self.latest_readable()
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint (use --resume auto to take the newest one)")
        return path

    def save(
        self,
        step: int,
        write: Callable[[Path], None],
        is_global_zero: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> Path:
        """Write the checkpoint of ``step`` atomically and prune old ones.

        Args:
            step: optimizer step the state belongs to.
            write: writes the checkpoint to the path it is given (called on every rank, e.g. ``fabric.save``).
            is_global_zero: this process renames and prunes (the others only write and wait).
            barrier: synchronises the ranks (``fabric.barrier``) around the rename.

        Returns:
            The final path.
        """
        final = self.path_for(step)
        if final.exists() and damage(final) is None:  # this step was saved before a restart: its state is the same
            return final
        tmp = self.directory / f"{final.stem}{_TMP_SUFFIX}"
        if is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
            _remove(final)  # a damaged copy of this step, skipped by the resume
        barrier()
        write(tmp)
        barrier()
        if is_global_zero:
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self.prune()
        barrier()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, and leftovers of interrupted writes."""
        for _, path in self.checkpoints()[: -self.keep_last]:
            _remove(path)
        for path in self.directory.glob(f"*{_TMP_SUFFIX}"):
            logger.info("removing the incomplete checkpoint %s (a write was interrupted)", path)
            _remove(path)


def damage(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded, or None: ``torch.save`` writes a zip archive whose directory is at
    its end, so a truncated file has none. Reading the directory is cheap (no tensor is read); a folder (sharded
    checkpoint) is not checked."""
    if path.is_dir():
        return None
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as err:
        return f"{type(err).__name__}: {err}"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file of a folder, to disk before it is published by the rename."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StopSignal:
    """Turns SIGTERM/SIGINT into a stop request the training loop polls at step boundaries.

    The first signal only sets :attr:`requested` (the loop then checkpoints and exits); a second SIGINT raises
    ``KeyboardInterrupt`` at once, for a user who does not want to wait. Use as a context manager, in the main
    thread; previous handlers are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """True once a signal arrived."""
        return self.received is not None

    @property
    def name(self) -> str:
        """Name of the signal received (``"SIGTERM"``), or ``""``."""
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: saving a checkpoint at the end of this step, then stopping", self.name)

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
