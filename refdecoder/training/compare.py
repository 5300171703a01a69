"""The equal-budget comparison a run can end with (config section ``compare``; what the CPU demo shows).

With ``compare.baseline``, :func:`baseline_config` turns the run's config into the baseline's: the backbone's plain
decoder fine-tuned alone, with the same data, stages, schedule, seed and starting VAE, in ``<run_dir>/baseline``.
:func:`compare_run` then decodes held-out clips (from their first frame) with the VAE as it was, the baseline and
the RefDecoder, and writes under ``<run_dir>/comparison``: ``<clip>.source.mp4`` (ground truth), ``<clip>.base.mp4``
(the VAE), ``<clip>.baseline.mp4``, ``<clip>.mp4`` (RefDecoder), ``<clip>.compare.mp4`` / ``.grid.png``,
``metrics.csv`` (``base_*``, ``baseline_*``, ``delta_*`` = RefDecoder - VAE, ``gain_*`` = RefDecoder - baseline)
and the HTML report ``index.html``. Every decoder reads the run's outputs exactly as the CLI does (``--vae RUN
--weights RUN``).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

import torch

from refdecoder.config_builder import build_dataclass
from refdecoder.data import ClipPlan, ClipSampler
from refdecoder.inference.loading import Decoder, load_decoder
from refdecoder.inference.reconstruct import DecodeOptions, decode_to_files
from refdecoder.inference.results import METRICS_CSV, write_metrics_csv
from refdecoder.training.config import TrainConfig, config_to_dict
from refdecoder.training.vae import RUN_VAE_DIR, backbone_adapter

__all__ = ["BASELINE_DIR", "COMPARISON_DIR", "baseline_config", "compare_run", "comparison_table", "closing_lines"]

BASELINE_DIR = "baseline"
COMPARISON_DIR = "comparison"
_SHOWN = (("psnr", "PSNR all"), ("psnr_reference", "reference frame"), ("psnr_others", "other frames"))


def baseline_config(cfg: TrainConfig) -> TrainConfig:
    """The equal-budget baseline of ``cfg``: ``model.kind: plain`` in ``<run_dir>/baseline``, from the run's VAE."""
    data = config_to_dict(cfg)
    run_dir = Path(cfg.run_dir)
    data["run_dir"] = str(run_dir / BASELINE_DIR)
    model = data["model"]
    model.update(kind="plain", refdecoder={}, latent_components=[])
    if model["vae"]["source"] != "pretrained":  # start from exactly the VAE the RefDecoder run started from
        model["vae"].update(source="pretrained", path=str(run_dir / RUN_VAE_DIR), subfolder=None)
    data["latent_finetune"]["enabled"] = False
    data["compare"] = {}
    if data["checkpoint"]["dir"]:
        data["checkpoint"]["dir"] = str(Path(data["checkpoint"]["dir"]) / BASELINE_DIR)
    return build_dataclass(TrainConfig, data)


def _geometry(cfg: TrainConfig) -> tuple[int, tuple[int, int]]:
    last = cfg.stages[-1]
    frames = cfg.compare.frames or last.frames
    size = tuple(cfg.compare.size or last.size or cfg.data.size)
    return frames, size


def compare_run(
    cfg: TrainConfig, baseline_dir: Path | None, device: torch.device | str = "cpu"
) -> tuple[list[dict[str, Any]], Path]:
    """Decode the first ``compare.clips`` held-out clips with the VAE, the baseline and the RefDecoder.

    Returns:
        The ``metrics.csv`` rows (one per clip) and the path of the HTML report.
    """
    from refdecoder.report import write_report
    from refdecoder.training.data import build_clip_dataset, take_samples

    run_dir, out = Path(cfg.run_dir), Path(cfg.run_dir) / COMPARISON_DIR
    refdecoder = load_decoder(run_dir, run_dir, device=device, keep_base=True)
    baseline = load_decoder(baseline_dir, device=device) if baseline_dir is not None else None
    frames, size = _geometry(cfg)
    dataset = build_clip_dataset(cfg.data.val, frames, size, backbone_adapter(cfg.model.backbone).frame_rule, cfg.seed)
    dataset.sampler = _FromStart.like(dataset.sampler)
    clips = take_samples(dataset, cfg.compare.clips)
    rows = [_compare_clip(refdecoder, baseline, clips, i, out) for i in range(clips["video"].shape[0])]
    write_metrics_csv(rows, out / METRICS_CSV)
    runs = {"RefDecoder": run_dir, **({"baseline": baseline_dir} if baseline_dir is not None else {})}
    return rows, write_report(out, runs=runs)


class _FromStart(ClipSampler):
    """The configured clips, moved to start at the video's first frame: the comparison then shows exactly what
    ``refdecoder reconstruct VIDEO --frames N`` of the same file gives (validation clips start anywhere)."""

    @classmethod
    def like(cls, sampler: ClipSampler) -> _FromStart:
        return cls(
            sampler.frames,
            sampler.frame_rule,
            sampler.fps,
            sampler.short,
            sampler.reference,
            sampler.size,
            sampler.resize_mode,
        )

    def plan(self, info: Any, generator: torch.Generator | None = None) -> ClipPlan:
        plan = super().plan(info, generator)
        shift = plan.indices[0]
        return dataclasses.replace(plan, indices=tuple(i - shift for i in plan.indices))


@torch.no_grad()
def _compare_clip(
    refdecoder: Decoder, baseline: Decoder | None, clips: dict[str, Any], i: int, out: Path
) -> dict[str, Any]:
    param = next(refdecoder.vae.parameters())
    video = clips["video"][i : i + 1].to(param.device, param.dtype)
    index, name, fps = int(clips["reference_index"][i]), str(clips["key"][i]), float(clips["fps"][i])
    frames = video.shape[2]
    latents = refdecoder.adapter.encode(video)  # the encoder is frozen: the same latents for every decoder
    common = dict(frames=frames, reference_index=index)
    row: dict[str, Any] = {"name": name, "decoder": "refdecoder", "frames": frames, "fps": fps}
    row.update(height=video.shape[-2], width=video.shape[-1], reference=index)
    row |= decode_to_files(
        refdecoder,
        latents,
        video[:, :, index : index + 1],
        out / name,
        fps,
        DecodeOptions(compare_base=True),
        truth=[video[0]],
        **common,
    )
    if baseline is not None:
        scores = decode_to_files(baseline, latents, None, out / f"{name}.baseline", fps, truth=[video[0]], **common)
        row |= {f"baseline_{k}": v for k, v in scores.items()}
        row |= {f"gain_{k}": row[k] - v for k, v in scores.items()}
    return row


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The printed comparison: PSNR overall / reference frame / other frames per decoder, means over the clips,
    and the RefDecoder's gain over the baseline (or over the VAE without one)."""

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    first = rows[0]
    clips = ", ".join(r["name"] for r in rows)
    lines = [
        f"held-out clips: {clips} ({first['frames']} frames, {first['height']}x{first['width']}, "
        f"reference = frame {first['reference']})",
        f"{'':<28}" + "".join(f"{label:>17}" for _, label in _SHOWN) + f"{'SSIM':>8}",
    ]
    models = [("base_", "VAE (no fine-tuning)"), ("baseline_", "baseline (plain decoder)"), ("", "RefDecoder")]
    for prefix, label in models:
        if f"{prefix}psnr" in first:
            cells = "".join(f"{mean(prefix + key):>14.2f} dB" for key, _ in _SHOWN)
            lines.append(f"{label:<28}{cells}{mean(prefix + 'ssim'):>8.3f}")
    versus, over = ("gain_", "baseline") if "gain_psnr" in first else ("delta_", "VAE")
    gains = ", ".join(f"{mean(versus + key):+.2f} dB {label}" for key, label in _SHOWN)
    lines.append(f"RefDecoder gain over the {over}: {gains}")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter to paste), quoted for a shell."""
    path = Path(path)
    try:
        path = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return shlex.quote(os.fspath(path))


def _example_clip(cfg: TrainConfig) -> str:
    from refdecoder.data import bundled_clips

    source = cfg.data.val or cfg.data.train
    bundled = {p.stem: p for p in bundled_clips()}
    named = [bundled[name] for name in source.samples or [] if name in bundled]
    return _shown(named[0]) if named else "VIDEO.mp4"


def closing_lines(cfg: TrainConfig) -> str:
    """What to do next, as commands that work when pasted: decode a clip with the trained model, open the logs."""
    run = _shown(Path(cfg.run_dir))
    flags = "" if cfg.model.kind == "plain" else f" --weights {run} --compare-base"
    flags += f" --frames {cfg.compare.frames}" if cfg.compare.enabled and cfg.compare.frames else ""
    out = _shown(Path(cfg.run_dir) / "reconstruct")
    lines = [
        "next:",
        f"  decode a clip:  refdecoder reconstruct {_example_clip(cfg)} --vae {run}{flags} --out {out} --overwrite",
    ]
    if "tensorboard" in cfg.logging.loggers:
        lines.append(f"  loss curves:    tensorboard --logdir {run}")
    return "\n".join(lines)
