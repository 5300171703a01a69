"""Loggers of a training run (CSV, TensorBoard, optional Weights & Biases) and the reconstruction image grid.

Named ``loggers`` rather than ``logging`` so it never shadows the standard library module.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from refdecoder._deps import require
from refdecoder.errors import InputError, MissingDependencyError

__all__ = [
    "build_loggers",
    "CSVMetricsLogger",
    "image_grid",
    "log_image",
    "write_json",
    "summarize",
    "print_summary",
]


def build_loggers(kinds: list[str], run_dir: str | os.PathLike, wandb_project: str | None = None) -> list[Any]:
    """Fabric loggers writing under ``<run_dir>/logs``: ``csv`` -> ``logs/csv/metrics.csv``,
    ``tensorboard`` -> ``logs/tensorboard``, ``wandb`` -> a W&B run (needs ``pip install wandb``).

    Fixed folders (no ``version_N``), so a resumed run continues the same files.
    """
    loggers_mod = require("lightning_fabric.loggers", extra="train", package="lightning-fabric")
    root = str(Path(run_dir) / "logs")
    out: list[Any] = []
    for kind in kinds:
        if kind == "csv":
            out.append(CSVMetricsLogger(Path(root) / "csv"))
        elif kind == "tensorboard":
            out.append(loggers_mod.TensorBoardLogger(root, name="", version="tensorboard"))
        elif kind == "wandb":
            out.append(_wandb_logger(run_dir, wandb_project))
        else:
            raise InputError(f"unknown logger {kind!r}; choose from csv, tensorboard, wandb")
    return out


class CSVMetricsLogger:
    """A Fabric logger appending one row per ``log_metrics`` call to ``<log_dir>/metrics.csv``.

    Fabric's own ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, which would lose the history of a
    resumed run; this one keeps the rows, writes each at once (nothing is lost if the process is killed), and widens
    the header when new metric names appear. Only global rank 0 writes.
    """

    name = "csv"
    version = ""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = Path(log_dir)
        self.path = self.log_dir / "metrics.csv"
        self._header: list[str] | None = None

    @property
    def root_dir(self) -> str:
        """The folder holding ``metrics.csv``."""
        return str(self.log_dir)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Append one row (``step`` plus the metrics; tensors become numbers)."""
        if not _is_global_zero():
            return
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        row["step"] = step
        header = self._read_header()
        if not set(row) <= set(header):
            self._rewrite(["step", *sorted((set(header) | set(row)) - {"step"})])
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._header).writerow(row)

    def _read_header(self) -> list[str]:
        if self._header is None:
            self._header = []
            if self.path.is_file():
                with self.path.open(newline="") as handle:
                    self._header = next(csv.reader(handle), [])
        return self._header

    def _rewrite(self, header: list[str]) -> None:
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".tmp-metrics.csv")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)
        self._header = header

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Not recorded: the run's ``config.json`` holds the configuration."""

    def save(self) -> None:
        """Rows are written as they come; nothing is buffered."""

    def finalize(self, status: str) -> None:
        """Nothing to close."""


def _is_global_zero() -> bool:
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _wandb_logger(run_dir: str | os.PathLike, project: str | None) -> Any:
    try:
        from wandb.integration.lightning.fabric import WandbLogger
    except ImportError as err:
        raise MissingDependencyError(
            f"the wandb logger needs the wandb package ({err}); install it with: pip install wandb"
        ) from err
    return WandbLogger(project=project or "refdecoder", save_dir=str(run_dir), name=Path(run_dir).name)


def image_grid(
    reference: torch.Tensor,
    target: torch.Tensor,
    reconstruction: torch.Tensor,
    frames: int = 4,
    title: str | None = None,
    min_width: int = 160,
) -> torch.Tensor:
    """One sample as a labelled picture: rows are evenly spaced frames; columns reference | target | reconstruction.

    Columns narrower than ``min_width`` pixels are enlarged (nearest neighbour, no blur) so that the labels are
    legible; the column labels, and ``title`` above them (e.g. the step and the PSNR), need OpenCV.

    Args:
        reference: ``3, H, W`` (or ``3, 1, H, W``) reference frame in [-1, 1].
        target: ``3, T, H, W`` ground-truth clip in [-1, 1].
        reconstruction: ``3, T, H, W`` decoded clip (clamped to [-1, 1] here).
        frames: rows (frames shown), at most ``T``.
        title: a line above the column labels, or None.
        min_width: enlarge columns to at least this width.

    Returns:
        ``3, H_grid, 3 * W * s`` image in [-1, 1]: title and label strips, then ``rows`` frames ``s`` times enlarged.
    """
    from refdecoder.media import label_strip

    if reference.ndim == 4:
        reference = reference[:, 0]
    if target.ndim != 4 or reconstruction.shape != target.shape or reference.shape != target[:, 0].shape:
        raise InputError(
            f"image_grid needs reference (3, H, W) and clips (3, T, H, W) of the same size, got "
            f"{tuple(reference.shape)}, {tuple(target.shape)}, {tuple(reconstruction.shape)}"
        )
    t, width = target.shape[1], target.shape[-1]
    rows = [round(i * (t - 1) / max(1, frames - 1)) for i in range(min(frames, t))] if t > 1 else [0]
    lines = [torch.cat([reference, target[:, i], reconstruction[:, i].clamp(-1, 1)], dim=2) for i in rows]
    body = torch.cat(lines, dim=1).float().cpu()
    scale = max(1, math.ceil(min_width / width))
    body = body.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    strips = [label_strip(["reference", "target", "reconstruction"], [width * scale] * 3)]
    if title:
        strips.insert(0, label_strip([title], [3 * width * scale]))
    return torch.cat([*strips, body], dim=1)


def log_image(loggers: list[Any], tag: str, image: torch.Tensor, step: int, path: str | os.PathLike) -> Path:
    """Write ``image`` (``3, H, W`` in [-1, 1]) as a PNG at ``path`` and add it to TensorBoard/W&B loggers."""
    from refdecoder.data import write_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    path = write_image(path, image)
    unit = (image.clamp(-1, 1) + 1) / 2
    for logger in loggers:
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            logger.experiment.add_image(tag, unit, global_step=step)
        elif name == "WandbLogger":
            logger.log_image(key=tag, images=[unit.permute(1, 2, 0).numpy()], step=step)
    return path


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON atomically (NaN/inf become null, which JSON lacks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def summarize(
    history: dict[str, list], stage_ends: list[int], final: dict[str, float], nonfinite: int, seconds: float
) -> dict[str, Any]:
    """What ``metrics.json`` holds: the run's loss history, per-stage loss drop, validation at start and end.

    Args:
        history: ``{"train": [[step, loss], ...], "val": [{"step", "tag", <metrics>}, ...]}``.
        stage_ends: cumulative last step of each curriculum stage (stages differ in clip length, so a loss drop is
            only meaningful within a stage).
        final: validation metrics at the end (empty without validation data).
        nonfinite: skipped non-finite steps.
        seconds: wall time of this process.
    """
    summary: dict[str, Any] = {"seconds": seconds, "nonfinite_steps": nonfinite, "final": final, "stages": []}
    start = 0
    for end in stage_ends:
        losses = [loss for step, loss in history["train"] if start < step <= end and math.isfinite(loss)]
        if losses:
            k = max(1, len(losses) // 5)
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            summary["stages"].append(
                {"steps": [start, end], "loss_first": first, "loss_last": last, "loss_drop": 1 - last / first}
            )
        start = end
    baseline = next((v for v in history["val"] if v["tag"] == "start"), None)
    if baseline is not None and final:
        summary["val_start"] = {k: v for k, v in baseline.items() if k not in ("step", "tag")}
        summary["val_l1_drop"] = 1 - final["l1"] / baseline["l1"]
    summary["history"] = history
    return summary


def print_summary(summary: dict[str, Any], paths: dict[str, Any], kind: str = "refdecoder") -> str:
    """The closing report of a run: loss drop per stage, validation change, and where every output went.

    ``paths["weights"]`` is the export: RefDecoder weights, or for ``kind="plain"`` the fine-tuned VAE folder.
    """
    lines = [f"done in {summary['seconds']:.0f}s"]
    for i, stage in enumerate(summary["stages"]):
        lines.append(
            f"stage {i} train loss {stage['loss_first']:.4f} -> {stage['loss_last']:.4f} "
            f"({100 * stage['loss_drop']:.1f}% lower)"
        )
    if "val_start" in summary:
        start, final = summary["val_start"], summary["final"]
        lines.append(
            f"held-out clips: PSNR {start['psnr']:.2f} -> {final['psnr']:.2f} dB "
            f"(reference frame {start['psnr_reference']:.2f} -> {final['psnr_reference']:.2f}), "
            f"L1 {start['l1']:.4f} -> {final['l1']:.4f}"
        )
    weights = paths["weights"]
    lines += [
        f"checkpoint:  {paths['checkpoint']}",
        f"weights:     {weights}  (refdecoder.load(vae, '{weights}'))"
        if kind != "plain"
        else f"VAE:         {weights}  (the fine-tuned VAE, a diffusers folder)",
        f"image grid:  {paths.get('image', 'none')}  (rows: frames; reference | target | reconstruction)",
        f"metrics:     {paths['metrics']}",
        f"logs:        {paths['logs']}  (csv/metrics.csv, tensorboard/)",
    ]
    return "\n".join(lines)
