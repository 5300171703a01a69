"""Video and image I/O on PyAV (extra ``video``): probe, read clips by frame index or time span, write mp4.

Reading seeks to the keyframe at or before the first wanted frame and stops after the last wanted one, so a short
clip from a long video decodes only a few GOPs; :class:`ReadStats` counts decoded frames so callers can check it.
Frames are converted and scaled by FFmpeg's scaler (``VideoFrame.reformat``), which is faster than converting at
full resolution and resizing in torch. Paths, ``bytes`` and binary file objects (e.g. WebDataset members) are all
accepted; images (jpg, png, bmp, tiff, webp) read as one-frame clips.

Frame indices are presentation indices at the stream's average frame rate: frame ``i`` is the frame shown at
``i / fps`` seconds after the stream start. Variable-frame-rate streams map each wanted index to the latest frame
shown at or before that time.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch

from refdecoder._deps import require
from refdecoder.data.transforms import (
    ResizeMode,
    ResizePlan,
    check_size,
    frames_to_tensor,
    plan_resize,
    tensor_to_frames,
)
from refdecoder.errors import DataError, InputError

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "Source",
    "VideoInfo",
    "ReadStats",
    "Clip",
    "VideoReader",
    "probe",
    "scaled_rgb",
    "stored_frames",
    "read_clip",
    "read_span",
    "read_image",
    "span_indices",
    "write_video",
    "write_image",
]

logger = logging.getLogger("refdecoder.data")

VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "m4v", "mov", "mkv", "webm", "avi", "gif", "mpg", "mpeg", "ts")
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp")
# Frames a stream may fall short of its header's count before a read counts as truncated: container frame counts
# and durations are often off by one or two at the end.
TAIL_TOLERANCE = 2
# Image encoders per extension for write_image: (codec, pixel format).
_IMAGE_CODECS = {
    "png": ("png", "rgb24"),
    "jpg": ("mjpeg", "yuvj444p"),
    "jpeg": ("mjpeg", "yuvj444p"),
    "bmp": ("bmp", "bgr24"),
    "tif": ("tiff", "rgb24"),
    "tiff": ("tiff", "rgb24"),
    "webp": ("libwebp", "yuv420p"),
}
_VIDEO_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}

Source = str | os.PathLike | bytes | IO[bytes]


@dataclass(frozen=True)
class VideoInfo:
    """What a video or image file holds.

    Attributes:
        fps: average frame rate (0.0 for images).
        frames: number of frames (1 for images).
        width: frame width in pixels.
        height: frame height in pixels.
        duration: seconds (0.0 for images).
        is_image: True for still images.
    """

    fps: float
    frames: int
    width: int
    height: int
    duration: float
    is_image: bool = False


@dataclass
class ReadStats:
    """Counters of decoding work, accumulated over reads that are given this object.

    Attributes:
        clips: reads performed.
        decoded_frames: frames the decoder produced (including those decoded only to reach a wanted frame).
        returned_frames: frames returned to the caller (with repeats).
        last_decoded: decoded frames of the most recent read.
    """

    clips: int = 0
    decoded_frames: int = 0
    returned_frames: int = 0
    last_decoded: int = 0

    def add(self, decoded: int, returned: int) -> None:
        """Record one read."""
        self.clips += 1
        self.decoded_frames += decoded
        self.returned_frames += returned
        self.last_decoded = decoded


class Clip(NamedTuple):
    """A clip read by time span: ``video`` is ``3, T, H, W`` in [-1, 1] at ``fps``; ``indices`` its source frames."""

    video: torch.Tensor
    fps: float
    indices: list[int]


class VideoReader:
    """An open video or image; read several clips from it without re-opening.

    Args:
        source: path, ``bytes`` or a binary file object.
        thread_type: PyAV decoder threading (``"AUTO"``, ``"FRAME"``, ``"SLICE"`` or ``"NONE"``).

    Raises:
        DataError: the source cannot be opened, has no video stream, or its frame count cannot be told.
    """

    def __init__(self, source: Source, thread_type: str = "AUTO") -> None:
        av = require("av", extra="video")
        self._name = _describe(source)
        try:
            self._container = av.open(io.BytesIO(source) if isinstance(source, bytes) else _as_path(source))
        except (av.FFmpegError, OSError, ValueError) as err:
            raise DataError(f"cannot open {self._name} as video or image: {err}") from err
        self._decode_errors = av.FFmpegError
        self._decoded = 0
        try:
            self._setup(thread_type)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file (idempotent)."""
        self._container.close()

    def read(
        self,
        indices: Sequence[int],
        size: tuple[int, int] | None = None,
        resize_mode: ResizeMode = "crop_center",
        generator: torch.Generator | None = None,
        stats: ReadStats | None = None,
    ) -> torch.Tensor:
        """Decode the frames at ``indices`` (repeats allowed, any order) into ``3, T, H, W`` in [-1, 1].

        Args:
            indices: source frame indices; ``T = len(indices)``.
            size: output (H, W), None keeps the source size; see :func:`refdecoder.data.transforms.plan_resize`.
            resize_mode: ``crop_center``, ``crop_random`` or ``resize``.
            generator: RNG for ``crop_random``.
            stats: counters to add this read's decoding work to.

        Raises:
            InputError: ``indices`` is empty or holds negative numbers.
            DataError: the stream ends (or breaks) before a wanted frame.
        """
        wanted = sorted(set(_check_indices(indices)))
        plan = plan_resize((self.info.height, self.info.width), check_size(size), resize_mode, generator)
        collector = _Collector(wanted, plan)
        self._decoded = 0
        self._decode_into(collector)
        frames = collector.finish(self._name)
        if stats is not None:
            stats.add(self._decoded, len(indices))
        return frames_to_tensor([frames[i] for i in indices])

    # --- internals ------------------------------------------------------------------------------------------
    def _setup(self, thread_type: str) -> None:
        if not self._container.streams.video:
            raise DataError(f"{self._name} has no video stream (is it an audio or data file?)")
        self._stream = self._container.streams.video[0]
        if thread_type != "NONE":
            self._stream.thread_type = thread_type
        self._is_image = self._container.format.name.endswith("_pipe") or self._container.format.name == "image2"
        self._rate = Fraction(0) if self._is_image else _frame_rate(self._stream, self._name)
        self._start = self._stream.start_time or 0
        self.info = self._probe()

    def _probe(self) -> VideoInfo:
        stream, width, height = self._stream, self._stream.width, self._stream.height
        if self._is_image:
            return VideoInfo(fps=0.0, frames=1, width=width, height=height, duration=0.0, is_image=True)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (self._container.duration or 0) / 1_000_000
        frames = stream.frames or round(duration * self._rate)
        if frames < 1:
            raise DataError(f"cannot tell how many frames {self._name} has (no frame count and no duration)")
        return VideoInfo(
            fps=float(self._rate),
            frames=int(frames),
            width=width,
            height=height,
            duration=duration or frames / float(self._rate),
        )

    def _decode_into(self, collector: _Collector) -> None:
        try:
            for index, frame in self._indexed_frames(collector.wanted[0]):
                if collector.offer(index, frame):
                    return
        except self._decode_errors as err:
            raise DataError(f"{self._name}: decoding failed after {self._decoded} frames: {err}") from err

    def _indexed_frames(self, start: int) -> Iterator[tuple[int, Any]]:
        if self._is_image or start == 0:
            yield from self._frames_after_seek(None)
            return
        frames = self._frames_after_seek(start)
        first = next(frames, None)
        if first is not None and first[0] <= start:
            yield first
            yield from frames
            return
        # The seek landed after the wanted frame (broken index or timestamps): decode from the start instead.
        logger.debug("seek in %s missed frame %d; decoding from the start", self._name, start)
        yield from self._frames_after_seek(0)

    def _frames_after_seek(self, index: int | None) -> Iterator[tuple[int, Any]]:
        if index is not None:
            target = self._start + math.floor(Fraction(index) / self._rate / self._stream.time_base)
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        previous = -1
        for frame in self._container.decode(self._stream):
            self._decoded += 1
            previous = self._index(frame, previous)
            yield previous, frame

    def _index(self, frame: Any, previous: int) -> int:
        if self._is_image or frame.pts is None:
            return previous + 1
        return math.floor((frame.pts - self._start) * self._stream.time_base * self._rate + Fraction(1, 2))


class _Collector:
    """Assigns decoded frames to wanted indices; a wanted index takes the latest frame shown at or before it."""

    def __init__(self, wanted: list[int], plan: ResizePlan) -> None:
        self.wanted, self.plan = wanted, plan
        self.frames: dict[int, np.ndarray] = {}
        self._cursor = 0
        self._last: Any = None
        self._last_index = -1

    def offer(self, index: int, frame: Any) -> bool:
        """Take one decoded frame; True once every wanted index is filled."""
        while self._cursor < len(self.wanted) and self.wanted[self._cursor] <= index:
            use = frame if self.wanted[self._cursor] == index or self._last is None else self._last
            self.frames[self.wanted[self._cursor]] = self._convert(use)
            self._cursor += 1
        self._last, self._last_index = frame, index
        return self._cursor == len(self.wanted)

    def finish(self, name: str) -> dict[int, np.ndarray]:
        """Fill wanted indices past the end of the stream (within the tolerance) with the last frame."""
        missing = self.wanted[self._cursor :]
        if missing and (self._last is None or missing[-1] - self._last_index > TAIL_TOLERANCE):
            got = "no frame" if self._last is None else f"only up to frame {self._last_index}"
            raise DataError(
                f"{name}: decoding gave {got}, but frame {missing[-1]} was requested "
                f"(truncated or corrupt file, or a wrong frame count in its metadata)"
            )
        for index in missing:
            self.frames[index] = self._convert(self._last)
        return self.frames

    def _convert(self, frame: Any) -> np.ndarray:
        height, width = self.plan.scaled
        return self.plan.crop(scaled_rgb(frame, width, height))


def scaled_rgb(frame: Any, width: int, height: int) -> np.ndarray:
    """A decoded PyAV video frame as ``height, width, 3`` uint8 RGB, scaled bilinearly by FFmpeg's scaler.

    The scaler runs on the calling thread. From PyAV 17 ``reformat`` starts a pool of scaler threads per call by
    default; inside forked data-loader workers that pool deadlocked (a worker waited forever to join its scaler
    thread, seen in the data-shard tests), and loader workers already convert frames in parallel.
    """
    return frame.reformat(
        width=width, height=height, format="rgb24", interpolation="BILINEAR", **_one_scaler_thread()
    ).to_ndarray()


@functools.cache
def _one_scaler_thread() -> dict[str, int]:
    """``reformat``'s keyword for a single scaler thread, on the PyAV versions that take it (17 and later)."""
    av = require("av", extra="video")
    major = int(av.__version__.split(".")[0])
    return {"threads": 1} if major >= 17 else {}


def probe(source: Source) -> VideoInfo:
    """Frame rate, frame count, size and duration of a video or image, from its headers (nothing is decoded)."""
    with VideoReader(source) as reader:
        return reader.info


def stored_frames(source: Source) -> int:
    """How many video frames the file really holds: its packets, counted by demuxing (nothing is decoded).

    A file cut short after its header was written (an interrupted copy of an mp4 whose index comes first) still
    reports the full count in :func:`probe`; this count stops where the data stops. Images count as 1.
    """
    av = require("av", extra="video")
    name = _describe(source)
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else _as_path(source)) as container:
            if not container.streams.video:
                raise DataError(f"{name} has no video stream")
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as err:
        raise DataError(f"cannot read {name}: {err}") from err


def read_clip(
    source: Source,
    frame_indices: Sequence[int],
    size: tuple[int, int] | None = None,
    resize_mode: ResizeMode = "crop_center",
    generator: torch.Generator | None = None,
    stats: ReadStats | None = None,
) -> torch.Tensor:
    """Read the frames at ``frame_indices`` of a video (or frame 0 of an image, repeated) as ``3, T, H, W``.

    Args:
        source: path, ``bytes`` or binary file object.
        frame_indices: source frame indices, ``T = len(frame_indices)``; repeats allowed.
        size: output (H, W), or None for the source size.
        resize_mode: ``crop_center`` / ``crop_random`` (aspect kept, then cropped) or ``resize`` (stretched).
        generator: RNG for ``crop_random``.
        stats: counters that receive this read's decoded-frame count.

    Returns:
        Float tensor ``3, T, H, W`` in [-1, 1].
    """
    with VideoReader(source) as reader:
        return reader.read(frame_indices, size, resize_mode, generator, stats)


def span_indices(info: VideoInfo, start: float, end: float, fps: float | None = None) -> tuple[list[int], float]:
    """Source frames showing the times ``start + k / clip_fps < end`` (seconds), and ``clip_fps``.

    ``clip_fps`` is ``fps`` capped at the source rate (frames are never invented), or the source rate when None.
    """
    if info.is_image:
        return [0], 0.0
    if not 0 <= start < end:
        raise InputError(f"need a time span 0 <= start < end in seconds, got start={start}, end={end}")
    if fps is not None and fps <= 0:
        raise InputError(f"fps must be positive or None, got {fps}")
    clip_fps = min(fps or info.fps, info.fps)
    count = math.ceil((end - start) * clip_fps - 1e-9)
    times = [start + k / clip_fps for k in range(count)]
    return [min(math.floor(t * info.fps + 0.5), info.frames - 1) for t in times if t < info.duration + 1e-9], clip_fps


def read_span(
    source: Source,
    start: float,
    end: float,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    resize_mode: ResizeMode = "crop_center",
    generator: torch.Generator | None = None,
    stats: ReadStats | None = None,
) -> Clip:
    """Read the time span ``[start, end)`` seconds at ``fps`` (None: source rate; capped at the source rate).

    Returns:
        :class:`Clip` with ``video`` ``3, T, H, W`` in [-1, 1], the clip's ``fps`` and the source ``indices``.
    """
    with VideoReader(source) as reader:
        indices, clip_fps = span_indices(reader.info, start, end, fps)
        if not indices:
            raise InputError(f"the span [{start}, {end}) s lies past the end of a {reader.info.duration:.3f} s video")
        return Clip(reader.read(indices, size, resize_mode, generator, stats), clip_fps, indices)


def read_image(
    source: Source,
    size: tuple[int, int] | None = None,
    resize_mode: ResizeMode = "crop_center",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Read an image (or a video's first frame) as ``3, 1, H, W`` in [-1, 1]."""
    return read_clip(source, [0], size, resize_mode, generator)


def write_video(
    path: str | os.PathLike,
    video: torch.Tensor,
    fps: float,
    crf: int = 15,
    keyint: int | None = None,
    preset: str = "medium",
) -> Path:
    """Encode ``video`` with libx264 (yuv420p) into an ``.mp4`` / ``.mov`` / ``.mkv`` file, atomically.

    yuv420p needs even sizes: an odd height or width is padded by one row/column that repeats the edge (the output
    is then one pixel larger; crop it when reading back if it matters).

    Args:
        path: output file; its suffix picks the container.
        video: ``3, T, H, W`` or ``1, 3, T, H, W`` in [-1, 1] (values outside are clamped).
        fps: frame rate.
        crf: x264 constant rate factor (0 = lossless luma, 15 = near transparent, 23 = x264 default).
        keyint: maximum frames between keyframes (None: x264's default, 250).
        preset: x264 speed preset.

    Returns:
        The written path.
    """
    av = require("av", extra="video")
    path = Path(path)
    if path.suffix.lower() not in _VIDEO_FORMATS:
        raise InputError(f"write_video writes {sorted(_VIDEO_FORMATS)} files, got {path.name!r}")
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    frames = _even(tensor_to_frames(video[0] if video.ndim == 5 and video.shape[0] == 1 else video))
    options = {"crf": str(crf), "preset": preset, **({"g": str(keyint)} if keyint else {})}
    tmp = path.with_name(f".{path.name}.partial")
    with av.open(str(tmp), "w", format=_VIDEO_FORMATS[path.suffix.lower()]) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001 * 1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", options
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return path


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write ``3, H, W`` or ``3, 1, H, W`` in [-1, 1] as png / jpg (quality ~95) / bmp / tiff / webp by suffix."""
    av = require("av", extra="video")
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in _IMAGE_CODECS:
        raise InputError(f"write_image writes {sorted(_IMAGE_CODECS)} files, got {path.name!r}")
    if image.ndim == 4 and image.shape[1] == 1:
        image = image[:, 0]
    if image.ndim != 3:
        raise InputError(f"expected an image of shape (3, H, W) or (3, 1, H, W), got {tuple(image.shape)}")
    array = tensor_to_frames(image.unsqueeze(1))[0]
    codec, pix_fmt = _IMAGE_CODECS[ext]
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec)
        stream.width, stream.height, stream.pix_fmt = array.shape[1], array.shape[0], pix_fmt
        if codec == "mjpeg":
            stream.codec_context.qscale = 2  # ~quality 95; mjpeg's default is visibly blocky
        container.mux(
            stream.encode(
                av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format=pix_fmt, **_one_scaler_thread())
            )
        )
        container.mux(stream.encode())
    return path


def _even(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    logger.debug("padding %dx%d frames to even size by repeating the last row/column", *frames.shape[1:3])
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _frame_rate(stream: Any, name: str) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise DataError(f"{name} has no usable frame rate")
    return Fraction(rate)


def _check_indices(indices: Sequence[int]) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise InputError(f"need one or more frame indices >= 0, got {indices[:8]}{'...' if len(indices) > 8 else ''}")
    return indices


def _as_path(source: str | os.PathLike | IO[bytes]) -> str | IO[bytes]:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else source


def _describe(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"
