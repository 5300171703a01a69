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
        reference_index: index into the clip's frames of the reference frame.
        fps: frame rate of the clip (0.0 for a clip made from an image).
        padded: how many trailing clip frames are padding.
    """

    indices: tuple[int, ...]
    reference_index: int
    fps: float
    padded: int = 0


class ClipSampler:
    """Chooses clips of ``frames`` frames at ``fps`` from videos, plus a reference frame index per clip.

    Args:
        frames: frames per clip; must follow ``frame_rule``.
        frame_rule: the backbone's valid frame counts (Wan: ``CAUSAL_1_PLUS_4K``, VideoVAE+: ``GROUPS_OF_4``).
        fps: target frame rate, reached by choosing source frames (never above the source rate: a 24 fps video
            asked for 30 fps gives a 24 fps clip); None keeps the source rate.
        short: a video with fewer frames than the clip needs is padded with its last frame (``"pad"``) or skipped
            (``"skip"``, raises :class:`DataError`, which datasets count as a skip). Images are such videos.
        reference: ``"uniform"`` draws the reference index uniformly over the clip's real (unpadded) frames; an
            int fixes it (negative counts from the end).
        size: output (H, W) of every frame, or None for the source size.
        resize_mode: ``crop_center`` / ``crop_random`` (aspect kept, then cropped) or ``resize`` (stretched, as the
            paper's loader).
    """

    def __init__(
        self,
        frames: int = 17,
        frame_rule: FrameRule = CAUSAL_1_PLUS_4K,
        fps: float | None = None,
        short: ShortPolicy = "pad",
        reference: Literal["uniform"] | int = "uniform",
        size: tuple[int, int] | None = (256, 256),
        resize_mode: ResizeMode = "crop_center",
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
        if reference != "uniform" and (
            isinstance(reference, bool) or not isinstance(reference, int) or not -frames <= reference < frames
        ):
            raise ConfigError(
                f"reference must be 'uniform' or a frame index in [{-frames}, {frames - 1}], got {reference!r}"
            )
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.frames, self.frame_rule, self.fps, self.short = frames, frame_rule, fps, short
        self.reference, self.size, self.resize_mode = reference, check_size(size), resize_mode

    def __repr__(self) -> str:
        return (
            f"ClipSampler(frames={self.frames}, fps={self.fps}, short={self.short!r}, "
            f"reference={self.reference!r}, size={self.size}, resize_mode={self.resize_mode!r})"
        )

    def plan(self, info: VideoInfo, generator: torch.Generator | None = None) -> ClipPlan:
        """Choose the source frames of one clip and its reference index.

        Draws (in this order, from ``generator``): the start frame, then the reference index.

        Raises:
            DataError: the video is too short and ``short="skip"``, or it has no usable frame rate.
        """
        if info.is_image:
            return self._finish([0], 0.0, generator)
        if info.fps <= 0 or info.frames < 1:
            raise DataError(f"video reports fps={info.fps} and frames={info.frames}; cannot sample a clip from it")
        clip_fps = min(self.fps or info.fps, info.fps)
        step = info.fps / clip_fps
        span = _offset(self.frames - 1, step)
        if info.frames > span:
            start = int(torch.randint(0, info.frames - span, (1,), generator=generator))
            return self._finish([start + _offset(k, step) for k in range(self.frames)], clip_fps, generator)
        available = math.floor((info.frames - 1) / step + 1e-9) + 1
        return self._finish([_offset(k, step) for k in range(available)], clip_fps, generator)

    def read(
        self,
        source: Source,
        generator: torch.Generator | None = None,
        stats: ReadStats | None = None,
    ) -> tuple[torch.Tensor, ClipPlan]:
        """Plan and decode one clip of ``source``.

        Returns:
            ``(video, plan)``: ``video`` is ``3, frames, H, W`` in [-1, 1].
        """
        with VideoReader(source) as reader:
            plan = self.plan(reader.info, generator)
            return reader.read(plan.indices, self.size, self.resize_mode, generator, stats), plan

    def _finish(self, real: list[int], fps: float, generator: torch.Generator | None) -> ClipPlan:
        padded = self.frames - len(real)
        if padded and self.short == "skip":
            raise DataError(
                f"too short: {len(real)} frame(s) at {fps:g} fps available, a clip needs {self.frames} "
                f"(short='skip'; use short='pad' to repeat the last frame instead)"
            )
        if self.reference == "uniform":
            reference = int(torch.randint(0, len(real), (1,), generator=generator))
        else:
            reference = self.reference % self.frames
        return ClipPlan(tuple(real + real[-1:] * padded), reference, fps, padded)


def _offset(k: int, step: float) -> int:
    """Source-frame offset of clip frame ``k`` at ``step`` source frames per clip frame (round half up)."""
    return math.floor(k * step + 0.5)
