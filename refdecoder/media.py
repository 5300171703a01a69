"""Media helpers for inference and reports: streamed frame reading and mp4 writing, side-by-side videos, PNG grids.

Reading and writing stream chunk by chunk, so a video of any length passes through in bounded memory. Frames are
converted exactly as :mod:`refdecoder.data.video` converts them (FFmpeg's bilinear scaler to RGB24, then the same
crop), so a clip read here equals the one :func:`refdecoder.data.read_clip` returns for a constant-frame-rate file.
PyAV comes from the extra ``video``; labels are drawn with OpenCV (extra ``eval``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from refdecoder._deps import require
from refdecoder.data.transforms import ResizeMode, ResizePlan, frames_to_tensor, plan_resize, tensor_to_frames
from refdecoder.data.video import probe, scaled_rgb, write_image
from refdecoder.errors import DataError, InputError

__all__ = ["iter_frames", "VideoWriter", "label_strip", "side_by_side", "zoom_box", "comparison_grid", "write_grid"]

logger = logging.getLogger("refdecoder")

_VIDEO_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
_LABEL_HEIGHT_FRACTION = 0.12  # label strip height relative to the frame height (at least _MIN_LABEL_HEIGHT)
_MIN_LABEL_HEIGHT = 12


def iter_frames(
    source: str | os.PathLike,
    size: tuple[int, int] | None = None,
    chunk: int = 16,
    max_frames: int | None = None,
    resize_mode: ResizeMode = "crop_center",
    plan: ResizePlan | None = None,
) -> Iterator[torch.Tensor]:
    """Decode a video front to back and yield its frames in chunks of ``3, t, H, W`` in [-1, 1].

    Args:
        source: video (or image) file.
        size: output (H, W), None keeps the source size.
        chunk: frames per yielded chunk (the last one may be shorter).
        max_frames: stop after this many frames.
        resize_mode: how ``size`` is reached (see :func:`refdecoder.data.transforms.plan_resize`).
        plan: an explicit resize/crop plan, overriding ``size`` and ``resize_mode``.

    Raises:
        DataError: the file cannot be opened or breaks while decoding.
    """
    av = require("av", extra="video")
    info = probe(source)  # raises DataError for missing or unreadable files
    plan = plan or plan_resize((info.height, info.width), size, resize_mode)
    if chunk < 1 or (max_frames is not None and max_frames < 1):
        raise InputError(f"chunk and max_frames must be >= 1 frame, got chunk={chunk}, max_frames={max_frames}")
    buffer: list[np.ndarray] = []
    emitted = 0
    try:
        with av.open(os.fspath(source)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                buffer.append(plan.crop(scaled_rgb(frame, plan.scaled[1], plan.scaled[0])))
                if max_frames is not None and emitted + len(buffer) >= max_frames:
                    break
                if len(buffer) == chunk:
                    emitted += len(buffer)
                    yield frames_to_tensor(buffer)
                    buffer = []
    except av.FFmpegError as err:
        raise DataError(f"cannot decode {os.fspath(source)!r}: {err}") from err
    if buffer:
        yield frames_to_tensor(buffer)


class VideoWriter:
    """Append-only H.264 (yuv420p) writer: frames arrive in chunks, the file appears atomically on close.

    Same encoding as :func:`refdecoder.data.write_video`. Odd sizes are padded by one edge row/column (yuv420p).
    On an exception inside the ``with`` block the partial file is deleted.

    Args:
        path: ``.mp4`` / ``.mov`` / ``.mkv`` output.
        fps: frame rate.
        crf: x264 constant rate factor (0 lossless luma, 15 near transparent).
        preset: x264 speed preset.
    """

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 15, preset: str = "medium") -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in _VIDEO_FORMATS:
            raise InputError(f"VideoWriter writes {sorted(_VIDEO_FORMATS)} files, got {self.path.name!r}")
        if fps <= 0:
            raise InputError(f"fps must be positive, got {fps}")
        self.fps, self.crf, self.preset = fps, crf, preset
        self.frames = 0
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._container = None
        self._stream = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, video: torch.Tensor) -> None:
        """Append ``3, t, H, W`` (or ``1, 3, t, H, W``) frames in [-1, 1] (values outside are clamped)."""
        frames = _even(tensor_to_frames(video[0] if video.ndim == 5 and video.shape[0] == 1 else video))
        av = require("av", extra="video")
        if self._container is None:
            self._open(av, frames.shape[1:3])
        elif (self._stream.height, self._stream.width) != frames.shape[1:3]:
            raise InputError(
                f"frames of {frames.shape[1:3]} appended to a {self._stream.height}x{self._stream.width} video"
            )
        for array in frames:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        self.frames += len(frames)

    def close(self) -> Path:
        """Flush the encoder and move the file into place; returns its path."""
        if self._container is None:
            raise InputError(f"no frames were written to {self.path}")
        self._container.mux(self._stream.encode())
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        if self._container is not None:
            self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def _open(self, av: object, size: tuple[int, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), "w", format=_VIDEO_FORMATS[self.path.suffix.lower()])
        self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001 * 1000))
        self._stream.height, self._stream.width = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf), "preset": self.preset}


def _even(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


# --- labels -------------------------------------------------------------------------------------------------------
def label_strip(labels: Sequence[str], widths: Sequence[int], gap: int = 0, height: int | None = None) -> torch.Tensor:
    """A ``3, height, sum(widths) + gaps`` dark strip with each label centred over its column, in [-1, 1].

    Needs OpenCV (extra ``eval``). ``height`` defaults to a fraction of the narrowest column; a label wider than
    its column is drawn smaller until it fits.
    """
    cv2 = require("cv2", extra="eval", package="opencv-python-headless")
    height = height or _label_height(min(widths))
    strip = np.full((height, sum(widths) + gap * (len(widths) - 1), 3), 24, dtype=np.uint8)
    x = 0
    for label, width in zip(labels, widths):
        (full, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
        scale = min(height / 30, 0.95 * width / max(1, full))
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        org = (x + max(0, (width - tw) // 2), (height + th) // 2)
        cv2.putText(strip, label, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)
        x += width + gap
    return frames_to_tensor([strip])[:, 0]


def _label_height(frame_height: int) -> int:
    return max(_MIN_LABEL_HEIGHT, round(frame_height * _LABEL_HEIGHT_FRACTION))


# --- side by side -------------------------------------------------------------------------------------------------
def side_by_side(videos: Sequence[torch.Tensor], labels: Sequence[str] | None = None, gap: int = 2) -> torch.Tensor:
    """Put videos next to each other (with a label strip on top) for a comparison mp4.

    Args:
        videos: ``3, T, H, W`` (or ``1, 3, T, H, W``) in [-1, 1], same ``H``; a single-frame entry (``T = 1``, e.g.
            the reference image) is repeated over time.
        labels: one caption per video, drawn above it (needs OpenCV, extra ``eval``); None for no strip.
        gap: black pixels between videos.

    Returns:
        ``3, T, H (+ label strip), W_total`` in [-1, 1].
    """
    videos = [v[0] if v.ndim == 5 else v for v in videos]
    frames = max(v.shape[1] for v in videos)
    if any(v.ndim != 4 or v.shape[0] != 3 or v.shape[1] not in (1, frames) for v in videos):
        raise InputError(
            f"side_by_side needs (3, T, H, W) videos with T equal or 1, got {[tuple(v.shape) for v in videos]}"
        )
    if len({v.shape[2] for v in videos}) != 1:
        raise InputError(f"side_by_side needs equal heights, got {[v.shape[2] for v in videos]}")
    columns = []
    for i, video in enumerate(videos):
        columns.append(video.float().clamp(-1, 1).expand(3, frames, *video.shape[2:]))
        if gap and i < len(videos) - 1:
            columns.append(torch.full((3, frames, video.shape[2], gap), -1.0))
    row = torch.cat(columns, dim=3)
    if labels is None:
        return row
    strip = label_strip(labels, [v.shape[3] for v in videos], gap, _label_height(row.shape[2]))
    return torch.cat([strip[:, None].expand(3, frames, *strip.shape[1:]), row], dim=2)


# --- grids --------------------------------------------------------------------------------------------------------
def zoom_box(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.25) -> tuple[int, int, int, int]:
    """The ``(top, left, height, width)`` window where two ``3, H, W`` frames differ most (mean abs difference).

    Used to zoom where the base and the RefDecoder decodes disagree: that is where a reader must look, and the
    choice favours neither decoder.
    """
    h, w = a.shape[-2:]
    bh, bw = max(8, round(h * fraction)), max(8, round(w * fraction))
    bh, bw = min(bh, h), min(bw, w)
    diff = (a.float() - b.float()).abs().mean(dim=0, keepdim=True)[None]
    stride = (max(1, bh // 4), max(1, bw // 4))
    scores = F.avg_pool2d(diff, (bh, bw), stride=stride)[0, 0]
    row, col = divmod(int(scores.argmax()), scores.shape[1])
    return row * stride[0], col * stride[1], bh, bw


def _outline(frame: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, bh, bw = box
    out = frame.clone()
    color = torch.tensor([1.0, -1.0, -1.0]).view(3, 1)  # red, visible on most content
    out[:, top, left : left + bw] = color
    out[:, top + bh - 1, left : left + bw] = color
    out[:, top : top + bh, left] = color
    out[:, top : top + bh, left + bw - 1] = color
    return out


def _zoomed(frame: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, bh, bw = box
    crop = frame[None, :, top : top + bh, left : left + bw]
    # Nearest neighbour: a zoom meant for judging detail must not add its own blur.
    return F.interpolate(crop, size=frame.shape[-2:], mode="nearest")[0]


def comparison_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    labels: Sequence[str],
    box: tuple[int, int, int, int] | None = None,
    gap: int = 2,
) -> torch.Tensor:
    """A report grid: per row the full frames (zoom window outlined) and, below, the zoomed window of each.

    Args:
        rows: one sequence per shown time step of ``3, H, W`` frames in [-1, 1], one per column (e.g. reference,
            base, RefDecoder, ground truth), all the same size.
        labels: column captions (needs OpenCV, extra ``eval``).
        box: ``(top, left, height, width)`` zoom window; default: :func:`zoom_box` of the two middle columns of
            the first row (base vs RefDecoder in the usual layout).
        gap: black pixels between cells.

    Returns:
        ``3, H_grid, W_grid`` in [-1, 1].
    """
    if not rows or any(len(r) != len(labels) for r in rows):
        raise InputError(f"every grid row needs {len(labels)} frames (one per label), got {[len(r) for r in rows]}")
    if box is None:
        first = rows[0]
        box = zoom_box(first[1], first[2]) if len(first) >= 3 else zoom_box(first[0], first[-1])
    lines = []
    for row in rows:
        lines.append([_outline(f.float().clamp(-1, 1), box) for f in row])
        lines.append([_zoomed(f.float().clamp(-1, 1), box) for f in row])
    cells = [side_by_side([f[:, None] for f in line], gap=gap)[:, 0] for line in lines]
    height, width = cells[0].shape[-2:]
    separator = torch.full((3, gap, width), -1.0)
    body = torch.cat([c for cell in cells for c in (cell, separator)][:-1], dim=1)
    widths = [f.shape[-1] for f in rows[0]]
    return torch.cat([label_strip(labels, widths, gap, _label_height(height)), body], dim=1)


def write_grid(path: str | os.PathLike, grid: torch.Tensor) -> Path:
    """Write a ``3, H, W`` grid in [-1, 1] as a PNG (or any format :func:`refdecoder.data.write_image` knows)."""
    return write_image(path, grid)
