"""A virtual camera: a smooth, time-varying affine crop (pan, zoom, small rotation) with sub-pixel resampling.

Training a reference-conditioned decoder on clips whose content stays where the reference has it teaches it to
copy detail at the same position. Moving a virtual camera across the frames makes content move relative to the
reference, as it does in real footage, so the decoder must find the detail where it went.

A :class:`CameraMotion` gives the ranges; :func:`camera_path` draws one camera move for a clip as a pose per
frame time, and :func:`render_camera` resamples the source frames along it (bilinear, ``F.grid_sample``). The
move is linear in time (constant velocity of pan, zoom and rotation), so a pose at a time outside the clip, e.g.
of a reference frame taken before it, continues the same move. Every pose keeps the whole crop inside the source
frame; draws that cannot are redrawn with smaller motion, never padded.

Frames are ``3, T, H, W`` float in [-1, 1] (or uint8); poses are in source pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refdecoder.errors import ConfigError, InputError

__all__ = ["CameraMotion", "CameraPath", "camera_path", "render_camera"]

_ATTEMPTS = 8  # draws before the motion is halved; after 4 halvings the crop stands still
_MIN_SCALE = 0.8  # the camera never magnifies the source more than 1 / 0.8: a move that would is slowed down


@dataclass(frozen=True)
class CameraMotion:
    """Ranges of a virtual camera move across a clip.

    Attributes:
        pan: largest translation from the first to the last clip frame, as a fraction of the output's longer side.
        zoom: largest change of scale across the clip: the last frame's scale is within ``[1/(1+zoom), 1+zoom]``
            of the first's.
        rotation: largest change of rotation across the clip, in degrees.
        probability: share of clips that move; the others keep one fixed crop.
        source_scale: the source window the camera moves in, as a multiple of the output size (a reader crops a
            window this much larger than the output, in pixels at the output's scale).
    """

    pan: float = 0.25
    zoom: float = 0.15
    rotation: float = 3.0
    probability: float = 1.0
    source_scale: float = 1.5

    def __post_init__(self) -> None:
        if min(self.pan, self.zoom, self.rotation) < 0 or not 0 <= self.probability <= 1:
            raise ConfigError(f"camera motion needs pan, zoom, rotation >= 0 and probability in [0, 1], got {self}")
        if self.source_scale < 1:
            raise ConfigError(f"camera source_scale must be >= 1 (a window at least the output size), got {self}")

    def window(self, size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the source window for an output of ``size``."""
        return tuple(max(s, math.ceil(s * self.source_scale)) for s in size)


@dataclass(frozen=True)
class CameraPath:
    """One camera move: the pose at each requested frame time.

    Attributes:
        centre: ``T, 2`` crop centre (x, y) in source pixels (continuous; pixel ``i`` spans ``[i, i+1)``).
        scale: ``(T,)`` source pixels per output pixel.
        angle: ``(T,)`` rotation in radians.
        source: (H, W) of the source frames.
        size: (H, W) of the output.
    """

    centre: torch.Tensor
    scale: torch.Tensor
    angle: torch.Tensor
    source: tuple[int, int]
    size: tuple[int, int]

    def affine(self) -> torch.Tensor:
        """``T, 2, 3`` matrices for ``F.affine_grid(align_corners=False)``: output -> source normalised coords."""
        (hs, ws), (h, w) = self.source, self.size
        cos, sin = self.angle.cos() * self.scale, self.angle.sin() * self.scale
        row_x = torch.stack([cos * w / ws, -sin * h / ws, 2 * self.centre[:, 0] / ws - 1], dim=1)
        row_y = torch.stack([sin * w / hs, cos * h / hs, 2 * self.centre[:, 1] / hs - 1], dim=1)
        return torch.stack([row_x, row_y], dim=1)

    def flow_to(self, frame: int = 0) -> torch.Tensor:
        """Where each output pixel's content lies in the output of pose ``frame``: the move's exact optical flow.

        Returns:
            ``2, T, H, W`` float32 ``(dy, dx)`` in output pixels: pixel ``(y, x)`` of posed frame ``t`` shows the
            source point that frame ``frame`` shows at ``(y + dy, x + dx)`` (possibly outside it). With ``frame``
            the reference, this is what ``RefDecoder.decode(displacements=...)`` takes for a rendered clip.
        """
        (h, w), a = self.size, self.affine().double()
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        # Pixel centres in the normalised coordinates of F.affine_grid(align_corners=False).
        pixels = torch.stack([(xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1], dim=-1).reshape(-1, 2).double()
        source = torch.einsum("tij,nj->tni", a[:, :, :2], pixels) + a[:, None, :, 2]  # T, N, (x, y)
        seen = torch.einsum("ij,tnj->tni", torch.linalg.inv(a[frame, :, :2]), source - a[frame, :, 2])
        moved = (seen - pixels) * torch.tensor([w / 2, h / 2], dtype=torch.float64)  # T, N, (dx, dy) in pixels
        return moved.flip(-1).permute(2, 0, 1).reshape(2, -1, h, w).float()

    def fits(self) -> bool:
        """Whether every pose keeps the whole output crop inside the source frame."""
        ext_x, ext_y = _half_extents(self.scale, self.angle, self.size)
        (hs, ws), eps = self.source, 1e-6
        x, y = self.centre[:, 0], self.centre[:, 1]
        return bool(
            ((x - ext_x >= -eps) & (x + ext_x <= ws + eps) & (y - ext_y >= -eps) & (y + ext_y <= hs + eps)).all()
        )


def _half_extents(scale: torch.Tensor, angle: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Half width and height, in source pixels, of the rotated output crop's bounding box."""
    h, w = size
    cos, sin = angle.cos().abs(), angle.sin().abs()
    return scale * (w * cos + h * sin) / 2, scale * (w * sin + h * cos) / 2


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def camera_path(
    motion: CameraMotion,
    source: tuple[int, int],
    size: tuple[int, int],
    times: Sequence[float],
    clip_frames: int,
    generator: torch.Generator | None = None,
) -> CameraPath:
    """Draw one camera move over a ``source`` (H, W) frame, with an output of ``size``, posed at ``times``.

    Args:
        motion: the ranges.
        source: (H, W) of the source frames; at least ``size``.
        size: (H, W) of the output crop.
        times: frame times to pose, in clip frames (``range(T)`` for a clip; a reference taken ``d`` frames before
            it adds ``-d``). The move's rates are set so that it spans the ranges over ``clip_frames - 1`` frames.
        clip_frames: T, the clip length the ranges refer to.
        generator: RNG for every draw (whether the clip moves, then pan direction and length, zoom, rotation and
            the start position).

    Returns:
        The :class:`CameraPath`; it always :meth:`~CameraPath.fits`.
    """
    if source[0] < size[0] or source[1] < size[1]:
        raise InputError(f"the camera's source frame {tuple(source)} is smaller than its output {tuple(size)}")
    t = torch.as_tensor(list(times), dtype=torch.float64)
    steps = max(1, clip_frames - 1)
    moving = _uniform(generator) < motion.probability
    strength = 1.0 if moving else 0.0
    for attempt in range(5 * _ATTEMPTS):
        if attempt and attempt % _ATTEMPTS == 0:
            strength /= 2  # no start fits these rates: slow the camera down
        if attempt == 4 * _ATTEMPTS:
            strength = 0.0
        path = _draw(motion, source, size, t, steps, strength, generator)
        if path is not None:
            return path
    raise AssertionError("a still camera always fits a source at least the output size")  # pragma: no cover


def _draw(
    motion: CameraMotion,
    source: tuple[int, int],
    size: tuple[int, int],
    t: torch.Tensor,
    steps: int,
    strength: float,
    generator: torch.Generator | None,
) -> CameraPath | None:
    """One draw of rates and a start pose that keeps every pose inside the source, or None."""
    (hs, ws), (h, w) = source, size
    direction = _uniform(generator, 0, 2 * math.pi)
    speed = strength * _uniform(generator) * motion.pan * max(h, w) / steps  # source pixels per frame
    zoom_rate = strength * _uniform(generator, -1, 1) * math.log1p(motion.zoom) / steps
    turn_rate = strength * _uniform(generator, -1, 1) * math.radians(motion.rotation) / steps
    angle = turn_rate * t + strength * _uniform(generator, -0.5, 0.5) * math.radians(motion.rotation)
    # At time 0 the camera sees the source at its own scale, unless the move's widest pose would not fit.
    relative = torch.exp(zoom_rate * t)
    ext_x, ext_y = _half_extents(relative, angle, size)
    scale = min(1.0, ws / (2 * float(ext_x.max())), hs / (2 * float(ext_y.max())))
    if scale * float(relative.min()) < _MIN_SCALE:
        return None
    ext_x, ext_y = ext_x * scale, ext_y * scale
    shift = torch.tensor([math.cos(direction), math.sin(direction)], dtype=torch.float64) * speed * t[:, None]
    extents = torch.stack([ext_x, ext_y], dim=1)
    low = (extents - shift).max(dim=0).values  # the start centre's feasible box, over every pose
    high = (torch.tensor([ws, hs], dtype=torch.float64) - extents - shift).min(dim=0).values
    if (low > high + 1e-9).any():
        return None
    start = torch.tensor([_uniform(generator, float(a), float(max(a, b))) for a, b in zip(low, high)])
    path = CameraPath(start[None, :] + shift, relative * scale, angle, (hs, ws), (h, w))
    return path if path.fits() else None


def render_camera(frames: torch.Tensor, path: CameraPath) -> torch.Tensor:
    """Resample ``frames`` along ``path``: ``3, T, Hs, Ws`` (float in [-1, 1] or uint8; a single frame ``3, 1, ...``
    is repeated, for a move over a still image) -> float ``3, T, H, W`` (bilinear)."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise InputError(f"frames must be 3, T, H, W, got shape {tuple(frames.shape)}")
    t = path.scale.numel()
    if tuple(frames.shape[-2:]) != tuple(path.source) or frames.shape[1] not in (1, t):
        raise InputError(
            f"the camera path is for {t} frame(s) of {tuple(path.source)}, got frames of shape {tuple(frames.shape)}"
        )
    x = frames.float()
    if frames.dtype == torch.uint8:
        x = x / 127.5 - 1
    x = x.transpose(0, 1).expand(t, -1, -1, -1)  # T, 3, Hs, Ws
    grid = F.affine_grid(path.affine().float(), [t, 3, *path.size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.transpose(0, 1)
