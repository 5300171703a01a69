"""Builders for the data-layer tests: broken files, CSVs, and an independent plain-PyAV frame decoder."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import av
import numpy as np

from refdecoder.data import bundled_clips


def copy_clips(folder: Path) -> list[Path]:
    """Copy the bundled sample clips into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(clip, folder / clip.name)) for clip in bundled_clips()]


def bad_files(folder: Path) -> dict[str, Path]:
    """One file per failure kind: corrupt bytes, empty, not a video (text), and a path that does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    text = folder / "notvideo.mp4"
    text.write_text("this is a caption file, not a video\n" * 20)
    return {"corrupt": corrupt, "empty": empty, "notvideo": text, "missing": folder / "missing.mp4"}


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write ``rows`` (dicts with the same keys) as a CSV file."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def decode_all(path: Path | str, limit: int | None = None) -> list[np.ndarray]:
    """Every frame of a video as uint8 ``H, W, 3``, decoded front to back with plain PyAV (no seeking)."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if limit is not None and len(frames) >= limit:
                break
    return frames


def keyframes(path: Path | str) -> list[int]:
    """Presentation indices of the keyframes, from the packets (nothing decoded)."""
    with av.open(str(path)) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
    order = sorted(pts for pts, _ in packets)
    return sorted(order.index(pts) for pts, key in packets if key)


def to_uint8(video) -> np.ndarray:
    """``3, T, H, W`` in [-1, 1] -> uint8 ``T, H, W, 3`` by the plain formula ``round((x + 1) * 127.5)``."""
    return ((video.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")
