"""Reconstruction of one video file: streamed encode, streamed (reference-conditioned) decode, metrics, mp4s.

Two passes over the source keep memory bounded by one decode window for any length: the first reads and encodes
(the latents of a whole video are ~50x smaller than its pixels), the second decodes window by window while reading
the ground truth again in step, so metrics and the written files never need the whole video in memory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refdecoder.backbones.base import BackboneAdapter
from refdecoder.data.transforms import ResizePlan, plan_resize
from refdecoder.data.video import TAIL_TOLERANCE, probe, read_image
from refdecoder.errors import CheckpointError, ConfigError, DataError, InputError, MissingDependencyError
from refdecoder.inference.loading import Decoder
from refdecoder.inference.outfolder import OutputFolder
from refdecoder.inference.streaming import RuleChunks, encode_chunks, iter_decode
from refdecoder.media import VideoWriter, comparison_grid, iter_frames, side_by_side, write_grid
from refdecoder.metrics import lpips_distance, psnr, split_reference, ssim
from refdecoder.tiling import TilePlan, plan_tiles, token_alignment
from refdecoder.validation import check_reference

__all__ = [
    "DecodeOptions",
    "ReconstructOptions",
    "decode_to_files",
    "FrameMetrics",
    "build_lpips",
    "frame_plan",
    "reconstruct_video",
]

logger = logging.getLogger("refdecoder")

Progress = Callable[[str, int, int], None]  # (phase, frames done, frames expected)
_METRICS = ("psnr", "ssim", "lpips")


@dataclass
class DecodeOptions:
    """How latents are decoded and written (the flags ``reconstruct`` and ``decode-latents`` share).

    Attributes:
        window: latent frames per decoder pass; None for the model's default.
        resize_reference: resize a reference image of another size instead of failing.
        compare_base: also decode with the base decoder; writes side-by-side mp4, a PNG grid and metric deltas.
        tile: decode in spatial tiles of this (H, W) in pixels; None decodes whole frames.
        tile_overlap: (H, W) pixels shared by neighbouring tiles.
        crf: x264 quality of the written mp4s.
    """

    window: int | None = None
    resize_reference: bool = False
    compare_base: bool = False
    tile: tuple[int, int] | None = None
    tile_overlap: tuple[int, int] = (64, 64)
    crf: int = 15


@dataclass
class ReconstructOptions(DecodeOptions):
    """:class:`DecodeOptions` plus what a reconstruction reads (the ``refdecoder reconstruct`` flags).

    Attributes:
        size: output (H, W), reached by scaling and centre-cropping; None keeps the source size (cropped to a
            multiple of the VAE's spatial factor if needed).
        max_frames: reconstruct at most this many frames from the start; None for all.
        reference_index: frame of the video used as the reference (when ``reference_image`` is None).
        reference_image: an external reference image instead.
        chunk_latents: latent frames per encoded piece (4 -> 16 pixel frames for Wan).
    """

    size: tuple[int, int] | None = None
    max_frames: int | None = None
    reference_index: int = 0
    reference_image: str | os.PathLike | None = None
    chunk_latents: int = 4


def build_lpips(mode: str = "auto", weights: str | os.PathLike | None = None) -> torch.nn.Module | None:
    """The LPIPS metric network for ``--lpips`` (``auto``, ``off``, ``alex``, ``vgg``), or None to skip LPIPS.

    ``auto`` uses AlexNet when its ImageNet trunk weights (or the ``lpips`` package) are available and otherwise
    logs why LPIPS is skipped; naming a network makes missing weights an error. Never a random trunk.
    """
    if mode not in ("auto", "off", "alex", "vgg"):
        raise ConfigError(f"--lpips must be auto, off, alex or vgg, got {mode!r}")
    if mode == "off":
        return None
    from refdecoder.losses.lpips import LPIPS

    try:
        return LPIPS(net="alex" if mode == "auto" else mode, trunk_weights=weights).eval()
    except (CheckpointError, MissingDependencyError) as err:
        if mode != "auto":
            raise
        logger.warning(
            "LPIPS skipped, its columns stay empty (--lpips-weights PATH to compute it): %s", str(err).split(". ")[0]
        )
        return None


class FrameMetrics:
    """Per-frame PSNR / SSIM (/ LPIPS) accumulated chunk by chunk, reduced with a reference-frame split."""

    def __init__(self, lpips: torch.nn.Module | None = None) -> None:
        self.lpips = lpips
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in _METRICS}

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add ``B, 3, t, H, W`` frames in [-1, 1] and their ground truth."""
        pred, target = pred.float(), target.float()
        self.values["psnr"].append(psnr(pred, target).cpu())
        self.values["ssim"].append(ssim(pred, target).cpu())
        if self.lpips is not None:
            self.values["lpips"].append(lpips_distance(pred, target, self.lpips).cpu())

    def summary(self, reference_index: int | None, prefix: str = "") -> dict[str, float]:
        """Means over all frames, and over the reference frame vs the others when ``reference_index`` is given.

        A metric that was not computed (LPIPS without its weights) is NaN, i.e. an empty CSV cell, never a value.
        """
        out: dict[str, float] = {}
        for name, parts in self.values.items():
            keys = [name] + ([f"{name}_reference", f"{name}_others"] if reference_index is not None else [])
            if not parts:
                out.update({f"{prefix}{key}": math.nan for key in keys})
                continue
            per_frame = torch.cat(parts, dim=1)
            values = [per_frame.mean()]
            if reference_index is not None:
                split = split_reference(per_frame, reference_index)
                values += [split["reference"].mean(), split["others"].mean()]
            out.update({f"{prefix}{key}": value.item() for key, value in zip(keys, values)})
        return out


class _Frames:
    """Hands out exactly ``n`` frames at a time from a stream of differently sized chunks."""

    def __init__(self, chunks: Iterable[torch.Tensor]) -> None:
        self._chunks: Iterator[torch.Tensor] = iter(chunks)
        self._pending: list[torch.Tensor] = []
        self._held = 0

    def take(self, n: int) -> torch.Tensor:
        while self._held < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise DataError(f"stream ended {n - self._held} frames early (did the file change while reading?)")
            chunk = chunk if chunk.ndim == 5 else chunk[None]
            self._pending.append(chunk)
            self._held += chunk.shape[2]
        joined = torch.cat(self._pending, dim=2)
        self._pending, self._held = [joined[:, :, n:]], joined.shape[2] - n
        return joined[:, :, :n]


def frame_plan(src: tuple[int, int], size: tuple[int, int] | None, factor: int) -> ResizePlan:
    """How source frames become the encoded size: ``size`` (scaled and centre-cropped) or the source size cropped
    to multiples of ``factor``.

    Raises:
        InputError: ``size`` is not a multiple of ``factor``, or the source is smaller than one latent position.
    """
    if size is not None:
        if size[0] % factor or size[1] % factor:
            raise InputError(f"--size {size[0]}x{size[1]} must be a multiple of {factor} (the VAE's spatial factor)")
        return plan_resize(src, size, "crop_center")
    h, w = (s // factor * factor for s in src)
    if not h or not w:
        raise InputError(f"a {src[0]}x{src[1]} video is smaller than {factor}x{factor}; pass --size")
    if (h, w) != tuple(src):
        logger.info("cropping %dx%d frames to %dx%d (multiples of %d)", src[0], src[1], h, w, factor)
    return ResizePlan(scaled=tuple(src), top=(src[0] - h) // 2, left=(src[1] - w) // 2, size=(h, w))


class _ReferenceGrab:
    """Passes frame chunks through and keeps a copy of the frame at ``index`` on the way."""

    def __init__(self, chunks: Iterable[torch.Tensor], index: int | None) -> None:
        self._chunks, self.index, self.frame = chunks, index, None

    def __iter__(self) -> Iterator[torch.Tensor]:
        seen = 0
        for chunk in self._chunks:
            if self.index is not None and seen <= self.index < seen + chunk.shape[1]:
                self.frame = chunk[:, self.index - seen].clone()
            seen += chunk.shape[1]
            yield chunk


def _external_reference(path: str | os.PathLike, size: tuple[int, int], resize: bool) -> torch.Tensor:
    image = read_image(path)[None]  # 1, 3, 1, h, w
    if tuple(image.shape[-2:]) != tuple(size) and not resize:
        raise InputError(
            f"reference image {os.fspath(path)!r} is {image.shape[-2]}x{image.shape[-1]} but the video is decoded at "
            f"{size[0]}x{size[1]}; pass --resize-reference or resize the image"
        )
    return image


def _tile_plan(decoder: Decoder, latent_size: tuple[int, int], options: DecodeOptions) -> TilePlan | None:
    if options.tile is None:
        return None
    align = token_alignment(decoder.model) if decoder.model is not None else 1
    factor, patch = decoder.adapter.spatial_factor, decoder.adapter.output_patch
    return plan_tiles(latent_size, factor, options.tile, options.tile_overlap, align, patch)


def reconstruct_video(
    decoder: Decoder,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    options: ReconstructOptions | None = None,
    lpips: torch.nn.Module | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Encode, decode (with the reference when the decoder is a RefDecoder) and score one video; write its mp4s.

    Writes ``<name>.mp4`` at the source frame rate and, with ``compare_base``, ``<name>.base.mp4``,
    ``<name>.compare.mp4`` (reference | base | RefDecoder | ground truth), ``<name>.grid.png`` and the row as
    ``.clips/<name>.json``, all at once when the clip succeeded, none when it failed (``OutputFolder.stage``).

    Args:
        decoder: from :func:`refdecoder.inference.load_decoder`.
        path: the video.
        out_dir: output folder (created).
        name: output file stem.
        options: see :class:`ReconstructOptions`.
        lpips: LPIPS network for the metric, or None to leave it out.
        progress: called as ``progress(phase, done, total)`` with phase ``"encode"`` or ``"decode"``.

    Returns:
        One metrics row: in-memory PSNR/SSIM/LPIPS (means over frames, and ``_reference`` / ``_others`` splits
        when the reference is a frame of the video), ``psnr_written`` (the mp4 as written, decoded back: the codec
        loss is its difference to ``psnr``), ``base_*`` and ``delta_*`` with ``compare_base``, sizes, timing, and
        ``frames_header`` / ``truncated``: a file that decodes to fewer frames than its container promises is
        reconstructed from the frames it has, with a warning.

    Raises:
        DataError: missing or unreadable file; InputError: bad reference index or reference size.
    """
    options, started = options or ReconstructOptions(), time.perf_counter()
    refuse_upscale_head(decoder, "reconstruct")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input not found: {path}")
    info = probe(path)
    if info.is_image:
        raise DataError(f"{path} is an image, not a video")
    plan = frame_plan((info.height, info.width), options.size, decoder.adapter.spatial_factor)
    latents, frames, reference = _encode(decoder, path, plan, options, progress, info.frames)
    promised = min(info.frames, options.max_frames or info.frames)
    truncated = frames < promised - TAIL_TOLERANCE
    if truncated:
        logger.warning(
            "%s: decoded %d frames, but its container promises %d (truncated or corrupt file?); reconstructing the "
            "%d that decode",
            path,
            frames,
            promised,
            frames,
        )
    with OutputFolder(out_dir).stage(name) as stage:  # the clip's files appear whole, or not at all
        stem, truth = stage.stem, iter_frames(path, chunk=16, max_frames=frames, plan=plan)
        scores = decode_to_files(
            decoder,
            latents,
            reference,
            stem,
            info.fps,
            options,
            frames=frames,
            truth=truth,
            reference_index=options.reference_index if options.reference_image is None else None,
            lpips=lpips,
            progress=progress,
        )
        device = next(decoder.vae.parameters()).device
        stage.result = {  # committed with the media
            "name": name,
            "input": str(path),
            "output": str(Path(out_dir) / f"{name}.mp4"),
            "decoder": "refdecoder" if decoder.conditioned else "base",
            "frames": frames,
            "frames_header": info.frames,
            "truncated": truncated,
            "fps": info.fps,
            "height": plan.size[0],
            "width": plan.size[1],
            "reference": options.reference_index if options.reference_image is None else str(options.reference_image),
            **scores,
            "psnr_written": _written_psnr(Path(f"{stem}.mp4"), path, plan, frames, device),
            "seconds": time.perf_counter() - started,
        }
    return stage.result


def _encode(
    decoder: Decoder,
    path: Path,
    plan: ResizePlan,
    options: ReconstructOptions,
    progress: Progress | None,
    expected: int,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """First pass: latents of the whole video, its real frame count, and the ``1, 3, 1, H, W`` reference."""
    param = next(decoder.vae.parameters())
    external = options.reference_image is not None
    if external:  # checked before the expensive encode
        reference = _external_reference(options.reference_image, plan.size, options.resize_reference)
    grab = _ReferenceGrab(
        iter_frames(path, chunk=16, max_frames=options.max_frames, plan=plan),
        None if external else options.reference_index,
    )
    pieces = RuleChunks(grab, decoder.adapter.frame_rule, options.chunk_latents)
    expected = min(expected, options.max_frames or expected)

    def moved() -> Iterator[torch.Tensor]:
        for piece in pieces:
            if progress is not None:
                progress("encode", min(pieces.frames, expected), expected)
            yield piece.to(param.device, param.dtype)

    latents = encode_chunks(decoder.adapter, moved())
    if not external:
        if grab.frame is None:
            raise InputError(
                f"--reference-index {options.reference_index} is outside the video's {pieces.frames} frames"
            )
        reference = grab.frame[None, :, None]
    return latents, pieces.frames, reference.to(param.device, param.dtype)


class _Sink:
    """Where decoded chunks go: the mp4 writers, the metrics against the ground truth, the grid's frames."""

    def __init__(
        self,
        stem: Path,
        fps: float,
        options: DecodeOptions,
        frames: int,
        base: Iterable[torch.Tensor] | None,
        truth: Iterable[torch.Tensor] | None,
        reference: torch.Tensor | None,
        lpips: torch.nn.Module | None,
    ) -> None:
        names = [f"{stem}.mp4"] + ([f"{stem}.base.mp4", f"{stem}.compare.mp4"] if base is not None else [])
        names += [f"{stem}.source.mp4"] if base is not None and truth is not None else []
        self.writers = [VideoWriter(name, fps, options.crf) for name in names]
        self.base = _Frames(base) if base is not None else None
        self.truth = _Frames(truth) if truth is not None else None
        self.reference, self.frames, self.done = reference, frames, 0
        self.labels = ["reference", "base", "RefDecoder"] + (["ground truth"] if truth is not None else [])
        self.scores = {"": FrameMetrics(lpips), "base_": FrameMetrics(lpips)}
        self.shown, self.grid_rows = sorted({frames // 2, frames - 1}), []

    def add(self, chunk: torch.Tensor) -> None:
        """Take the next ``1, 3, t, H, W`` decoded frames (frames past ``frames`` are frame-rule padding)."""
        n = min(chunk.shape[2], self.frames - self.done)
        if n <= 0:
            return
        out = chunk[:, :, :n].float()
        target = self.truth.take(n).to(out.device) if self.truth is not None else None
        self.writers[0].write(out[0])
        if target is not None:
            self.scores[""].add(out, target)
        if self.base is not None:
            base = self.base.take(n).float()
            if target is not None:
                self.scores["base_"].add(base, target)
            columns = [c[0] for c in (self.reference, base, out, target) if c is not None]
            self.writers[1].write(columns[1])
            self.writers[2].write(side_by_side(columns, self.labels))
            if target is not None:
                self.writers[3].write(target[0])
            start, stop = self.done, self.done + n
            self.grid_rows += [
                [c[:, min(i - start, c.shape[1] - 1)].cpu() for c in columns] for i in self.shown if start <= i < stop
            ]
        self.done += n

    def close(self, stem: Path) -> None:
        for writer in self.writers:
            writer.close()
        if self.base is not None:
            write_grid(f"{stem}.grid.png", comparison_grid(self.grid_rows, self.labels))

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()

    def summary(self, reference_index: int | None) -> dict[str, float]:
        row = self.scores[""].summary(reference_index)
        if self.base is not None:
            row.update(self.scores["base_"].summary(reference_index, prefix="base_"))
            row.update({f"delta_{k}": v - row[f"base_{k}"] for k, v in list(row.items()) if f"base_{k}" in row})
        return row


def decode_to_files(
    decoder: Decoder,
    latents: torch.Tensor,
    reference: torch.Tensor | None,
    stem: str | os.PathLike,
    fps: float,
    options: DecodeOptions | None = None,
    *,
    frames: int | None = None,
    truth: Iterable[torch.Tensor] | None = None,
    reference_index: int | None = None,
    lpips: torch.nn.Module | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Decode latents window by window into ``<stem>.mp4`` (and comparison media), scoring against ``truth``.

    With ``options.compare_base`` (and a RefDecoder) the base decoder (the VAE as it was before the weights, see
    :attr:`Decoder.base`) runs in step and ``<stem>.base.mp4``, ``<stem>.compare.mp4`` (reference | base |
    RefDecoder [| ground truth]), ``<stem>.grid.png`` and, with ``truth``, ``<stem>.source.mp4`` (the ground truth
    at the decoded size) are written.

    Args:
        decoder: from :func:`refdecoder.inference.load_decoder`.
        latents: raw latents ``1, C, t, h, w``.
        reference: ``1, 3, R, H, W`` in [-1, 1] (used by RefDecoder only), or None.
        stem: output path without suffix.
        fps: frame rate of the written videos.
        options: decode settings.
        frames: keep only the first ``frames`` decoded frames (the rest is frame-rule padding).
        truth: ground-truth ``3, t, H, W`` chunks in [-1, 1] (any chunking) for metrics, or None.
        reference_index: frame of ``truth`` that is the reference, for the reference/others split of the metrics.
        lpips: LPIPS network, or None.
        progress: ``progress("decode", done, total)``.

    Returns:
        Metric means (``psnr``, ``ssim``, ``lpips``, ``base_*``, ``delta_*``) when ``truth`` is given, else ``{}``.
    """
    options, stem = options or DecodeOptions(), Path(stem)
    frames = frames or decoder.adapter.frame_rule.pixel_frames(latents.shape[2])
    compare = options.compare_base and decoder.conditioned
    if compare:
        refuse_upscale_head(decoder, "compare_base")
    if options.compare_base and not compare:
        logger.warning("--compare-base needs --weights (without them the output already is the base decode)")
    settings = dict(window=options.window, tiles=_tile_plan(decoder, tuple(latents.shape[-2:]), options))
    use_reference = reference if decoder.conditioned else None
    main = iter_decode(decoder.main, latents, use_reference, resize_reference=options.resize_reference, **settings)
    base = iter_decode(decoder.base_adapter, latents, **settings) if compare else None
    display = _display_reference(reference, decoder.adapter, latents)[None] if compare else None
    sink = _Sink(stem, fps, options, frames, base, truth, display, lpips)
    try:
        for chunk in main:
            sink.add(chunk)
            del chunk  # not alive while the next window decodes: peak memory stays one window
            if progress is not None:
                progress("decode", sink.done, frames)
        sink.close(stem)
    except BaseException:
        sink.abort()
        raise
    return sink.summary(reference_index) if truth is not None else {}


def refuse_upscale_head(decoder: Decoder, what: str) -> None:
    """Raise :class:`ConfigError` for a decoder with an upscale head: ``what`` compares its output with frames at the
    encoded size (the source, or the base decode), which a 2x output does not match."""
    head = getattr(decoder.model, "upscale_head", None)
    if head is not None:
        raise ConfigError(
            f"{what} compares the decoded video with frames at the encoded size, but these weights add a "
            f"{head.factor}x upscale head; decode latents with `refdecoder decode-latents` or model.decode instead"
        )


def _display_reference(reference: torch.Tensor, adapter: BackboneAdapter, latents: torch.Tensor) -> torch.Tensor:
    """The (first) reference frame as ``3, 1, H, W`` at the output size, for side-by-side views."""
    size = tuple(s * adapter.spatial_factor for s in latents.shape[-2:])
    return check_reference(reference.float(), 1, size, resize=True, warn_range=False)[0, :, :1]


def _written_psnr(written: Path, source: Path, plan: ResizePlan, frames: int, device: torch.device) -> float:
    """Mean per-frame PSNR of the mp4 as written (decoded back) against the source frames."""
    truth = _Frames(iter_frames(source, chunk=16, max_frames=frames, plan=plan))
    values = [
        psnr(chunk[None].to(device), truth.take(chunk.shape[1]).to(device)) for chunk in iter_frames(written, chunk=16)
    ]
    per_frame = torch.cat(values, dim=1)
    if per_frame.shape[1] != frames:
        raise DataError(f"{written} holds {per_frame.shape[1]} frames, expected {frames}")
    return per_frame.mean().item()
