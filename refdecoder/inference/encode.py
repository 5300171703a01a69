"""Encoding a video dataset into latent shards once (``refdecoder encode``), on one process or many.

Every video is cut into clips of a fixed length at a fixed stride (clip ``k`` starts at frame ``k * stride``; a
tail shorter than a clip is left out), each clip is encoded by the frozen encoder (posterior mode, or a sample
seeded by the clip's key) and written with its reference frame into latent shards
(:mod:`refdecoder.data.latent_shards`), which :class:`refdecoder.data.LatentDataset` and latent finetuning read.

Several processes (torchrun / accelerate launch) split the videos by frame count (:func:`share`); each writes its
own shards, and rank 0 rebuilds ``index.json`` from the finished shards after all are done. A clip is encoded
alone (batch 1) with a seed of its own, so its latents do not depend on the number of processes. A rerun into
the same folder skips the clips of finished shards; a rank that dies loses only its shard in progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refdecoder.data.latent_shards import LatentShardWriter, finished_shards, write_index
from refdecoder.data.sampling import derive_seed
from refdecoder.data.video import VideoReader, write_image
from refdecoder.errors import ConfigError, InputError
from refdecoder.inference.dataset_runs import one_line
from refdecoder.inference.distributed import (
    RankContext,
    barrier,
    exit_if_told,
    gather_objects,
    init_distributed,
    map_shared,
    rank_context,
    share,
)
from refdecoder.inference.encode_sources import VideoSource, collect_sources, probe_source
from refdecoder.inference.loading import Decoder
from refdecoder.inference.rank_progress import RankProgress
from refdecoder.validation import check_pixel_channels

__all__ = ["EncodeOptions", "EncodeReport", "POSTERIORS", "SETTINGS_FILE", "clip_starts", "encode_dataset"]

logger = logging.getLogger("refdecoder")

POSTERIORS = ("mode", "sample")
SETTINGS_FILE = "encode.json"


@dataclass
class EncodeOptions:
    """How clips are cut and encoded (the ``refdecoder encode`` flags).

    Attributes:
        frames: pixel frames per clip; must follow the VAE's frame rule (1 + 4k for Wan).
        stride: frames from one clip's start to the next (None: ``frames``, clips back to back).
        size: (H, W) the frames are scaled and centre-cropped to; None: the source size cropped to a multiple of
            the VAE's spatial factor.
        posterior: ``mode`` (the mean) or ``sample`` (a draw seeded by ``seed`` and the clip key).
        seed: base seed of the posterior samples.
        reference_index: frame of the clip stored as its reference image.
        normalize: store the latents in the diffusion model's normalised space (``normalized`` metadata true).
        maxcount: clips per shard; a killed rank redoes at most this many.
    """

    frames: int = 17
    stride: int | None = None
    size: tuple[int, int] | None = None
    posterior: str = "mode"
    seed: int = 0
    reference_index: int = 0
    normalize: bool = False
    maxcount: int = 100


@dataclass
class EncodeReport:
    """What one rank of an encode run did (``clips_total`` / ``shards`` count the whole folder on rank 0)."""

    encoded: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    clips_total: int = 0
    index: Path | None = None


def clip_starts(frames: int, length: int, stride: int) -> list[int]:
    """First frames of the clips of a ``frames``-long video: ``0, stride, 2 * stride, ...`` while a whole clip
    fits."""
    return list(range(0, frames - length + 1, stride)) if frames >= length else []


def encode_dataset(
    decoder: Decoder,
    source: str | os.PathLike,
    out: str | os.PathLike,
    options: EncodeOptions | None = None,
    ctx: RankContext | None = None,
    vae_name: str = "",
    quiet: bool | None = None,
) -> EncodeReport:
    """Encode the videos of ``source`` into latent shards in ``out`` (this rank's share of them).

    Args:
        decoder: the loaded VAE (from :func:`refdecoder.inference.load_decoder`); only its encoder is used.
        source: folder of videos, dataset CSV, or WebDataset shards (see :func:`collect_sources`).
        out: the shard folder; a rerun into it skips finished clips.
        options: clip length, stride, size, posterior.
        ctx: rank and world size; None reads them from the environment (a single process without a launcher).
            With several processes the process group is created here if it does not exist yet.
        vae_name: how the VAE was named, kept in the settings and each sample's metadata.
        quiet: no progress lines (default: quiet on every rank but 0).

    Returns:
        This rank's :class:`EncodeReport`.

    Raises:
        ConfigError: a clip length off the frame rule, a size off the spatial factor, settings that differ from
            the folder's earlier run, or posterior sampling with a VAE that has no distribution.
    """
    options, ctx = options or EncodeOptions(), ctx or rank_context()
    param = next(decoder.vae.parameters())
    init_distributed(ctx, param.device)
    settings = _settings(decoder, options, vae_name)
    out = Path(out)
    sources = collect_sources(source)
    probed = map_shared(ctx, sources, probe_source)
    _check_settings(ctx, out, settings)
    done = {r["key"] for records in finished_shards(out).values() for r in records}
    barrier(ctx)  # every rank has read the finished clips before any rank writes
    plans = _plans(sources, probed, options, done)
    mine = share([len(starts) * options.frames for _, starts, _ in plans], ctx.world_size, ctx.rank)
    report = EncodeReport(skipped=len(done))
    if ctx.is_main:
        for source, (_, _, why) in zip(sources, probed):
            if why:
                _failed(report, source, why)
        if report.skipped:
            logger.info("skipping %d clips of finished shards in %s", report.skipped, out)
    run_id = gather_objects(ctx, time.time())[0]
    total = sum(len(plans[i][1]) for i in mine)
    bar = RankProgress(ctx, total, out, run_id, "clips", quiet)
    writer = LatentShardWriter(out, ctx.rank, options.maxcount)
    for index in mine:
        _encode_video(decoder, *plans[index], options, settings, writer, bar, report, ctx)
    writer.close()
    report.shards = writer.written
    barrier(ctx)
    if ctx.is_main:
        report.index = write_index(out, settings)
        report.clips_total = json.loads(report.index.read_text())["samples"]
    return report


def _settings(decoder: Decoder, options: EncodeOptions, vae_name: str) -> dict[str, Any]:
    """The options that decide the latents, checked; a folder holds latents of one setting only."""
    adapter = decoder.adapter
    adapter.frame_rule.check(options.frames)
    stride = options.stride or options.frames
    if stride < 1 or options.maxcount < 1:
        raise ConfigError(f"stride and maxcount must be >= 1, got {stride} and {options.maxcount}")
    if options.posterior not in POSTERIORS:
        raise ConfigError(f"posterior must be one of {POSTERIORS}, got {options.posterior!r}")
    factor = adapter.spatial_factor
    if options.size is not None and (options.size[0] % factor or options.size[1] % factor):
        raise ConfigError(f"size {options.size} must be a multiple of the VAE's spatial factor {factor}")
    if not 0 <= options.reference_index < options.frames:
        raise ConfigError(f"reference_index {options.reference_index} is outside a clip of {options.frames} frames")
    if options.posterior == "sample" and not _has_distribution(decoder):
        raise ConfigError(f"the {adapter.name} VAE exposes no posterior distribution to sample; use posterior 'mode'")
    values = dataclasses.asdict(options)
    values.pop("maxcount")  # how the shards are cut does not change a single latent
    dtype = str(next(decoder.vae.parameters()).dtype).removeprefix("torch.")
    return {**values, "stride": stride, "backbone": adapter.name, "vae": vae_name, "dtype": dtype}


def _has_distribution(decoder: Decoder) -> bool:
    """diffusers VAEs return ``.latent_dist`` (a diagonal Gaussian with ``sample(generator)``) from ``encode``;
    the others here (VideoVAE+) return the posterior mode only."""
    return "diffusers" in type(decoder.vae).__module__


def _check_settings(ctx: RankContext, out: Path, settings: dict[str, Any]) -> None:
    """The folder's settings file: written by rank 0 on the first run, compared with on every later one."""
    path = out / SETTINGS_FILE
    compare = json.loads(json.dumps(settings))  # tuples become lists, as they come back from the file
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier != compare:
            changed = sorted(k for k in set(earlier) | set(compare) if earlier.get(k) != compare.get(k))
            raise ConfigError(
                f"{out} holds latents encoded with other settings ({', '.join(changed)} differ: "
                f"{[earlier.get(k) for k in changed]} there, {[compare.get(k) for k in changed]} now); "
                "choose another --out or the same settings"
            )
        return
    barrier(ctx)  # nobody has the file yet: rank 0 writes it, the others must not see it half-way
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SETTINGS_FILE}.tmp")
        tmp.write_text(json.dumps(compare, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


def _plans(
    sources: list[VideoSource], probed: list[tuple[int, float, str]], options: EncodeOptions, done: set[str]
) -> list[tuple[VideoSource, list[int], float]]:
    """Per video: the starts of the clips still to encode, and its frame rate."""
    stride = options.stride or options.frames
    plans = []
    for source, (frames, fps, _) in zip(sources, probed):
        starts = [s for s in clip_starts(frames, options.frames, stride) if clip_key(source.key, s) not in done]
        plans.append((source, starts, fps))
    return plans


def clip_key(video_key: str, start: int) -> str:
    """Sample key of the clip starting at frame ``start`` (no dots: WebDataset splits member names at the first)."""
    return f"{video_key}-f{start:06d}"


def _encode_video(
    decoder: Decoder,
    source: VideoSource,
    starts: list[int],
    fps: float,
    options: EncodeOptions,
    settings: dict[str, Any],
    writer: LatentShardWriter,
    bar: RankProgress,
    report: EncodeReport,
    ctx: RankContext,
) -> None:
    if not starts:
        return
    try:
        with VideoReader(source.open()) as reader:
            size = options.size or _cropped_size(reader.info.height, reader.info.width, decoder.adapter.spatial_factor)
            for start in starts:
                key = clip_key(source.key, start)
                video = reader.read(range(start, start + options.frames), size=size)
                latents, seed = _encode_clip(decoder, video, key, options)
                meta = _metadata(source, start, fps, size, seed, settings)
                writer.write(key, latents, _png(video[:, options.reference_index]), meta, source.caption)
                report.encoded += 1
                bar.update()
                exit_if_told(ctx, report.encoded)
    except Exception as err:  # one broken video must not stop the others; its clips stay missing, a rerun retries
        logger.debug("%s failed", source.locator, exc_info=True)
        _failed(report, source, one_line(err))


def _failed(report: EncodeReport, source: VideoSource, why: str) -> None:
    """Report a video that could not be encoded, on one line, as it happens."""
    print(f"error: {source.locator}: {why}", file=sys.stderr)
    report.failed.append(f"{source.locator}: {why}")


def _cropped_size(height: int, width: int, factor: int) -> tuple[int, int]:
    if height < factor or width < factor:
        raise InputError(f"a {height}x{width} video is smaller than {factor}x{factor}; pass --size")
    return height // factor * factor, width // factor * factor


@torch.no_grad()
def _encode_clip(decoder: Decoder, video: torch.Tensor, key: str, options: EncodeOptions) -> tuple[torch.Tensor, int]:
    """``3, T, H, W`` frames in [-1, 1] -> raw (or normalised) latents ``C, t, h, w`` in fp32, and the sample seed
    (-1 for the posterior mode)."""
    param = next(decoder.vae.parameters())
    batch = video[None].to(param.device, param.dtype)
    check_pixel_channels(batch, decoder.adapter.pixel_channels, decoder.adapter.name)
    seed = -1
    if options.posterior == "mode":
        latents = decoder.adapter.encode(batch)
    else:
        seed = derive_seed(options.seed, key)
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draw on every device
        latents = decoder.vae.encode(batch).latent_dist.sample(generator=generator)
    latents = latents.float()
    if options.normalize:
        latents = decoder.adapter.normalize(latents)
    return latents[0], seed


def _metadata(
    source: VideoSource, start: int, fps: float, size: tuple[int, int], seed: int, settings: dict[str, Any]
) -> dict[str, str]:
    """``save_latents``' metadata (height, width, normalized, prompt, seed) plus where the clip came from."""
    meta = {
        "height": size[0],
        "width": size[1],
        "normalized": str(bool(settings["normalize"])).lower(),
        "prompt": source.caption,
        "source": source.locator,
        "start": start,
        "frames": settings["frames"],
        "stride": settings["stride"],
        "fps": f"{fps:.6g}",
        "posterior": settings["posterior"],
        "reference_index": settings["reference_index"],
        "backbone": settings["backbone"],
        "vae": settings["vae"],
    }
    if seed >= 0:
        meta["seed"] = seed
    return {k: str(v) for k, v in meta.items()}


def _png(frame: torch.Tensor) -> bytes:
    """``3, H, W`` in [-1, 1] as PNG bytes (lossless: the frame came from uint8 and goes back exactly)."""
    with tempfile.TemporaryDirectory(prefix="refdecoder-png-") as folder:
        path = write_image(Path(folder) / "reference.png", frame)
        return path.read_bytes()
