"""Clip sampling shared by every video dataset: which source frames make a clip, and which frame is the reference.

:class:`ClipSampler` turns a :class:`~refdecoder.data.video.VideoInfo` and a ``torch.Generator`` into a
:class:`ClipPlan`; the dataset then decodes exactly those frames. Every random draw of a sample comes from a
generator seeded by :func:`sample_generator` with ids that name the sample (base seed, epoch, index or shard and
key), so draws do not depend on which DataLoader worker handles a sample or in which order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from refdecoder.data.camera import CameraMotion, camera_path, render_camera
from refdecoder.data.transforms import RESIZE_MODES, ResizeMode, check_size
from refdecoder.data.video import ReadStats, Source, VideoInfo, VideoReader
from refdecoder.errors import ConfigError, DataError
from refdecoder.frames import CAUSAL_1_PLUS_4K, FrameRule

__all__ = ["ClipSampler", "ClipPlan", "ShortPolicy", "derive_seed", "sample_generator"]

ShortPolicy = Literal["pad", "skip"]


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from ``parts`` (their ``repr``), equal across processes and Python runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(*parts: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed` of ``parts``, e.g. ``(seed, epoch, index)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class ClipPlan:
    """Which source frames make a clip.

    Attributes:
        indices: source frame index of each clip frame (``len == frames``); padding repeats the last real frame.
        reference_index: index into the clip's frames of the reference frame; -1 when the reference is a frame
            outside the clip (``reference_source``).
        fps: frame rate of the clip (0.0 for a clip made from an image).
        padded: how many clip frames are padding.
        reference_source: source frame index of a reference outside the clip (``reference="far"``), else None.
        reference_time: that reference's time in clip frames (``-d`` before the clip, ``T - 1 + d`` after it).
    """

    indices: tuple[int, ...]
    reference_index: int
    fps: float
    padded: int = 0
    reference_source: int | None = None
    reference_time: float | None = None


class ClipSampler:
    """Chooses clips of ``frames`` frames at ``fps`` from videos, plus a reference frame index per clip.

    Args:
        frames: frames per clip; must follow ``frame_rule``.
        frame_rule: the backbone's valid frame counts (Wan: ``CAUSAL_1_PLUS_4K``, VideoVAE+: ``GROUPS_OF_4``).
        fps: target frame rate, reached by choosing source frames (never above the source rate: a 24 fps video
            asked for 30 fps gives a 24 fps clip); None keeps the source rate.
        short: a video with fewer frames than the clip needs is padded with its last frame (``"pad"``) or skipped
            (``"skip"``, raises :class:`DataError`, which datasets count as a skip). Images are such videos.
        reference: ``"uniform"`` draws the reference index uniformly over the clip's real (unpadded) frames (the
            paper); an int fixes it (negative counts from the end; 0 = the image-to-video setting); ``"far"`` takes
            a frame outside the clip, ``reference_distance`` clip frames before its first frame or after its last
            (a coin flip), so no decoded frame is the reference itself.
        size: output (H, W) of every frame, or None for the source size.
        resize_mode: ``crop_center`` / ``crop_random`` (aspect kept, then cropped) or ``resize`` (stretched, as the
            paper's loader).
        reference_distance: with ``reference="far"``, clip frames between the reference and the nearest clip frame.
        motion: move a virtual camera across the clip (:class:`~refdecoder.data.camera.CameraMotion`): frames are
            read at ``motion.window(size)`` and resampled along a drawn pan / zoom / rotation down to ``size``; a far
            reference is posed where the same move puts it.
    """

    def __init__(
        self,
        frames: int = 17,
        frame_rule: FrameRule = CAUSAL_1_PLUS_4K,
        fps: float | None = None,
        short: ShortPolicy = "pad",
        reference: Literal["uniform", "far"] | int = "uniform",
        size: tuple[int, int] | None = (256, 256),
        resize_mode: ResizeMode = "crop_center",
        reference_distance: int = 8,
        motion: CameraMotion | None = None,
    ) -> None:
        if not frame_rule.is_valid(frames):
            raise ConfigError(
                f"frames={frames} does not follow the backbone's frame rule {frame_rule.describe()}; "
                f"use {frame_rule.round(frames, 'down')} or {frame_rule.round(frames, 'up')}"
            )
        if fps is not None and not fps > 0:
            raise ConfigError(f"fps must be a positive number or None (source rate), got {fps!r}")
        if short not in ("pad", "skip"):
            raise ConfigError(f"short must be 'pad' or 'skip', got {short!r}")
        if reference not in ("uniform", "far") and (
            isinstance(reference, bool) or not isinstance(reference, int) or not -frames <= reference < frames
        ):
            raise ConfigError(
                f"reference must be 'uniform', 'far' or a frame index in [{-frames}, {frames - 1}], got {reference!r}"
            )
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if isinstance(reference_distance, bool) or not isinstance(reference_distance, int) or reference_distance < 1:
            raise ConfigError(f"reference_distance must be an int >= 1, got {reference_distance!r}")
        if motion is not None and size is None:
            raise ConfigError("camera motion needs an output size (size=None keeps the source size)")
        self.frames, self.frame_rule, self.fps, self.short = frames, frame_rule, fps, short
        self.reference, self.size, self.resize_mode = reference, check_size(size), resize_mode
        self.reference_distance, self.motion = reference_distance, motion

    def __repr__(self) -> str:
        return (
            f"ClipSampler(frames={self.frames}, fps={self.fps}, short={self.short!r}, "
            f"reference={self.reference!r}, size={self.size}, resize_mode={self.resize_mode!r}, "
            f"reference_distance={self.reference_distance}, motion={self.motion})"
        )

    def plan(self, info: VideoInfo, generator: torch.Generator | None = None) -> ClipPlan:
        """Choose the source frames of one clip and its reference.

        Draws (in this order, from ``generator``): the start frame, then the reference index (``"uniform"``) or
        side (``"far"``).

        Raises:
            DataError: the video is too short and ``short="skip"``, or it has no usable frame rate.
        """
        far = self.reference_distance if self.reference == "far" else 0
        real, fps = self._source_frames(info, self.frames + far, generator)
        if not far:
            return self._finish(real, fps, generator)
        self._check_short(len(real), self.frames + far, fps)
        frames = real + real[-1:] * (self.frames + far - len(real))
        if bool(torch.rand((), generator=generator) < 0.5):  # the reference comes before the clip
            clip, source, time = frames[far:], frames[0], -float(far)
            padded = self.frames - max(0, len(real) - far)
        else:
            clip, source, time = frames[: self.frames], frames[-1], float(self.frames - 1 + far)
            padded = max(0, self.frames - len(real))
        if info.is_image:
            padded = self.frames - 1  # as for any clip made from an image
        return ClipPlan(tuple(clip), -1, fps, min(padded, self.frames), source, time)

    def read(
        self,
        source: Source,
        generator: torch.Generator | None = None,
        stats: ReadStats | None = None,
    ) -> tuple[torch.Tensor, ClipPlan, torch.Tensor | None]:
        """Plan and decode one clip of ``source``.

        Returns:
            ``(video, plan, reference)``: ``video`` is ``3, frames, H, W`` in [-1, 1]; ``reference`` is the
            ``3, 1, H, W`` frame outside the clip for ``reference="far"``, else None.
        """
        with VideoReader(source) as reader:
            plan = self.plan(reader.info, generator)
            video, reference = self.decode(reader, plan, generator, stats)
        return video, plan, reference

    def decode(
        self,
        reader: VideoReader,
        plan: ClipPlan,
        generator: torch.Generator | None = None,
        stats: ReadStats | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode a planned clip (and its outside reference) from an open reader, then move the camera over it.

        Draws after the plan: the crop window (``crop_random``), then the camera move (with ``motion``).

        Returns:
            ``(video, reference)``: ``3, frames, H, W`` and ``3, 1, H, W`` (or None) in [-1, 1].
        """
        outside = plan.reference_source is not None
        indices = plan.indices + ((plan.reference_source,) if outside else ())
        window = self.size if self.motion is None else self.motion.window(self.size)
        frames = reader.read(indices, window, self.resize_mode, generator, stats)
        if self.motion is not None:
            times = list(range(self.frames)) + ([plan.reference_time] if outside else [])
            path = camera_path(self.motion, tuple(frames.shape[-2:]), self.size, times, self.frames, generator)
            frames = render_camera(frames, path)
        if not outside:
            return frames, None
        return frames[:, : self.frames], frames[:, self.frames :]

    def _source_frames(
        self, info: VideoInfo, count: int, generator: torch.Generator | None
    ) -> tuple[list[int], float]:
        """Source indices of up to ``count`` consecutive frames at the clip rate (fewer if the video is short)."""
        if info.is_image:
            return [0], 0.0
        if info.fps <= 0 or info.frames < 1:
            raise DataError(f"video reports fps={info.fps} and frames={info.frames}; cannot sample a clip from it")
        clip_fps = min(self.fps or info.fps, info.fps)
        step = info.fps / clip_fps
        span = _offset(count - 1, step)
        if info.frames > span:
            start = int(torch.randint(0, info.frames - span, (1,), generator=generator))
            return [start + _offset(k, step) for k in range(count)], clip_fps
        available = math.floor((info.frames - 1) / step + 1e-9) + 1
        return [_offset(k, step) for k in range(available)], clip_fps

    def _check_short(self, real: int, needed: int, fps: float) -> None:
        if real < needed and self.short == "skip":
            raise DataError(
                f"too short: {real} frame(s) at {fps:g} fps available, a clip needs {needed} "
                f"(short='skip'; use short='pad' to repeat the last frame instead)"
            )

    def _finish(self, real: list[int], fps: float, generator: torch.Generator | None) -> ClipPlan:
        padded = self.frames - len(real)
        self._check_short(len(real), self.frames, fps)
        if self.reference == "uniform":
            reference = int(torch.randint(0, len(real), (1,), generator=generator))
        else:
            reference = self.reference % self.frames
        return ClipPlan(tuple(real + real[-1:] * padded), reference, fps, padded)


def _offset(k: int, step: float) -> int:
    """Source-frame offset of clip frame ``k`` at ``step`` source frames per clip frame (round half up)."""
    return math.floor(k * step + 0.5)
