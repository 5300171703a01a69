"""An output folder that several writers share: per-clip claims, clips committed whole, ``metrics.csv`` merged.

Two ``reconstruct`` runs (or the ranks of one distributed run) may write into one ``--out``. Each clip is written
once and whole; ``metrics.csv`` is rebuilt from per-clip result files under a lock, so no run's rows are lost:

    <name>.mp4, <name>.base.mp4 ...   a clip's media, moved into place only when the whole clip succeeded
    .clips/<name>.json                the clip's metrics row (its result file), the commit mark of the clip
    .clips/<name>.lock                held (fcntl.flock) by the process writing the clip; the system releases it when
                                      that process ends, however it ends, so a killed run never blocks a rerun
    .clips/<name>.<pid>.partial/      a clip being written; removed when it fails
    .clips/metrics.lock               held while metrics.csv is rebuilt
    metrics.csv                       rows of an older metrics.csv that have no result file, then every result file

A failed clip leaves no media and an error row (unless an earlier successful result of it is kept); a rerun
retries it without ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refdecoder.errors import InputError
from refdecoder.inference.results import METRICS_CSV, merge_rows, read_clip_metrics, write_metrics_csv

__all__ = ["CLIPS_DIR", "OutputFolder", "ensure_writable"]

logger = logging.getLogger("refdecoder")

CLIPS_DIR = ".clips"


def ensure_writable(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Prove that ``folder`` can be created and take a file, before any work is done; folders created for the
    test are removed again, so a run refused later leaves nothing behind.

    Raises:
        InputError: ``folder`` is a file, or cannot be created or written (read-only file system, permissions).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder} is an existing file; give a folder (it is created if missing)")
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise InputError(
            f"{flag} {folder} is not writable ({err.strerror or err}); choose a writable folder"
        ) from None
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
    return folder


class OutputFolder:
    """``--out`` of a command that writes one result per clip (see the module docstring for the layout)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.clips = self.folder / CLIPS_DIR

    def result_path(self, name: str) -> Path:
        return self.clips / f"{name}.json"

    def read_result(self, name: str) -> dict[str, Any] | None:
        """The result row of clip ``name``, or None when there is none (or it cannot be read)."""
        try:
            return json.loads(self.result_path(name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            logger.warning("ignoring the unreadable result file %s: %s", self.result_path(name), err)
            return None

    def results(self) -> list[dict[str, Any]]:
        """Every result row, by clip name."""
        rows = [self.read_result(p.name[: -len(".json")]) for p in sorted(self.clips.glob("*.json"))]
        return [row for row in rows if isinstance(row, dict) and "name" in row]

    def finished(self) -> set[str]:
        """Names of clips with a successful result: a result file, or an older metrics.csv row without error."""
        table = self.folder / METRICS_CSV
        earlier = read_clip_metrics(table) if table.is_file() else []
        return {str(r["name"]) for r in merge_rows(earlier, self.results()) if "error" not in r}

    @contextlib.contextmanager
    def claim(self, name: str, overwrite: bool = False) -> Iterator[None]:
        """Hold clip ``name`` for this process while the block runs.

        Raises:
            InputError: another live process holds it (without ``overwrite``; with it, wait for that process and
                then replace its output), or it finished since this run checked the folder (without ``overwrite``).
        """
        self.clips.mkdir(parents=True, exist_ok=True)
        with (self.clips / f"{name}.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not overwrite:
                    raise InputError(
                        f"{name} is being written into {self.folder} by another run; refused (pass --overwrite to "
                        "wait for that run and replace its output, or choose another --out)"
                    ) from None
                fcntl.flock(handle, fcntl.LOCK_EX)
            done = self.read_result(name)
            if not overwrite and done is not None and "error" not in done:
                raise InputError(
                    f"{name} was written into {self.folder} by another run meanwhile; refused (pass --overwrite to "
                    "replace it)"
                )
            yield  # the lock goes with the handle's close, also when the process dies

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[_Stage]:
        """Write clip ``name`` into a private folder; on success its files (and ``stage.result``) move into place,
        on any failure (also Ctrl-C) the folder is removed and nothing of the clip is left behind."""
        stage = _Stage(self.clips / f"{name}.{os.getpid()}.partial", name)
        stage.folder.mkdir(parents=True, exist_ok=True)
        try:
            yield stage
            stage.commit(self.folder, self.result_path(name))
        except BaseException:
            shutil.rmtree(stage.folder, ignore_errors=True)
            raise

    def record_failure(self, row: dict[str, Any]) -> None:
        """Keep an error row for a clip, unless a successful result of it is already there (nothing is lost).

        Writing may itself fail (the disk that made the clip fail is still full): that is logged, not raised."""
        done = self.read_result(row["name"])
        if done is not None and "error" not in done:
            return
        try:
            self.clips.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.result_path(row["name"]), json.dumps(row))
        except OSError as err:
            logger.warning("could not record the failure of %s: %s", row["name"], err)

    def update_metrics(self) -> Path:
        """Rebuild ``metrics.csv`` from the result files (and an older table's rows without one), under a lock.

        Raises:
            DataError: the folder's ``metrics.csv`` is not a metrics table (it is left as it is).
        """
        self.clips.mkdir(parents=True, exist_ok=True)
        table = self.folder / METRICS_CSV
        with (self.clips / "metrics.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            earlier = read_clip_metrics(table) if table.is_file() else []
            return write_metrics_csv(merge_rows(earlier, self.results()), table)


class _Stage:
    """A clip being written: ``stem`` is where its files go (``<stem>.mp4`` ...), ``result`` its row, if any."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.stem = folder, folder / name
        self.result: dict[str, Any] | None = None

    def commit(self, destination: Path, result_path: Path) -> None:
        """Result file first into the stage (a full disk fails here, before any move), then the media, then it."""
        staged_result = self.folder / ".result.json"
        if self.result is not None:
            atomic_write_text(staged_result, json.dumps(self.result))
        for path in sorted(self.folder.iterdir()):
            if path != staged_result:
                os.replace(path, destination / path.name)
        if self.result is not None:
            os.replace(staged_result, result_path)
        self.folder.rmdir()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: readers see old or new."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
