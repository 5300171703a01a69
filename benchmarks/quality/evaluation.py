"""Held-out evaluation of ``benchmarks/quality_small.py``: per-frame metrics by distance from the reference frame.

Every held-out clip is decoded with its frame 0 as the reference (plain decoders ignore it). PSNR and SSIM (and
AlexNet LPIPS when its trunk weights are available locally) are computed per frame and summarised per clip group
(``static``, ``motion``, ``photos``), per part of a group (natural clips, camera moves) and per source, overall
and by distance from the reference frame: ``0`` (the reference frame itself), ``1-3`` and ``4+``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import refdecoder
from benchmarks.quality.data import HeldOut
from benchmarks.quality.settings import Settings
from benchmarks.quality.shift_probe import follow_ratios
from benchmarks.quality.variants import Variant
from refdecoder._deps import require
from refdecoder.errors import CheckpointError, MissingDependencyError
from refdecoder.losses import LPIPS
from refdecoder.metrics import lpips_distance, psnr, ssim

DISTANCES = {"0": (0, 1), "1-3": (1, 4), "4+": (4, None)}  # frame ranges [start, stop) by distance from frame 0


def lpips_metric() -> tuple[LPIPS | None, str]:
    """AlexNet LPIPS when its real trunk weights are available locally; otherwise None and why."""
    try:
        return LPIPS(net="alex"), "alex"
    except CheckpointError:
        return None, "n/a (no trunk weights)"
    except MissingDependencyError:
        return None, "n/a (lpips not installed)"


@torch.no_grad()
def reconstruct(model: nn.Module, latents: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Clamped reconstruction: RefDecoders get frame 0 as the reference, plain VAEs decode as stock diffusers."""
    if isinstance(model, refdecoder.RefDecoder):
        return model.decode(latents, reference=video[:, :, :1])
    return model.decode(latents).sample


def by_distance(per_frame: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, float]:
    """Means of ``(N, T)`` per-frame metrics over the clips ``rows`` (bool ``(N,)``): all frames and each bin."""
    out = {}
    for metric, values in per_frame.items():
        chosen = values[rows]
        out[metric] = chosen.mean().item()
        for name, (start, stop) in DISTANCES.items():
            out[f"{metric}_{name}"] = chosen[:, start:stop].mean().item()
    return out


def summarise(per_frame: dict[str, torch.Tensor], clips: list[HeldOut]) -> dict[str, Any]:
    """Per group: the means by distance, ``per_frame_psnr``, and the same means per part and per source."""
    out: dict[str, Any] = {}
    for group in dict.fromkeys(c.group for c in clips):
        rows = torch.tensor([c.group == group for c in clips])
        entry = by_distance(per_frame, rows) | {"clips": int(rows.sum())}
        entry["per_frame_psnr"] = [round(v, 4) for v in per_frame["psnr"][rows].mean(dim=0).tolist()]
        for key, field in (("by_part", "part"), ("by_source", "source")):
            names = dict.fromkeys(getattr(c, field) for c in clips if c.group == group)
            entry[key] = {
                n: by_distance(per_frame, rows & torch.tensor([getattr(c, field) == n for c in clips])) for n in names
            }
        out[group] = entry
    out["per_clip_psnr"] = [round(v, 4) for v in per_frame["psnr"].mean(dim=1).tolist()]
    return out


def evaluate(
    model: nn.Module, latents: list[torch.Tensor], batches: list[torch.Tensor], clips: list[HeldOut]
) -> tuple[dict[str, Any], torch.Tensor, str]:
    """One model's metrics on the held-out clips; also its reconstructions and which LPIPS was used."""
    lpips, lpips_note = lpips_metric()
    target = torch.cat(batches)
    preds = torch.cat([reconstruct(model, z, video) for z, video in zip(latents, batches)])
    per_frame = {"psnr": psnr(preds, target), "ssim": ssim(preds, target)}
    if lpips is not None:
        per_frame["lpips"] = torch.cat([lpips_distance(p[None], t[None], lpips) for p, t in zip(preds, target)])
    return summarise(per_frame, clips), preds, lpips_note


def gains(models: dict[str, dict], variants: list[Variant]) -> dict[str, dict]:
    """Per RefDecoder variant: its differences to the plain variant trained on the same clips, per group."""
    out = {}
    plains = {v.motion: v.name for v in variants if v.kind == "plain"}
    for v in variants:
        base = plains.get(v.motion)
        if v.kind != "refdecoder" or base is None:
            continue
        out[f"{v.name} - {base}"] = {
            group: {k: models[v.name][group][k] - models[base][group][k] for k in stats if _is_metric(k, stats)}
            for group, stats in models[base].items()
            if isinstance(stats, dict)
        }
    return out


def _is_metric(key: str, stats: dict) -> bool:
    return isinstance(stats[key], float) and key.split("_")[0] in ("psnr", "ssim", "lpips")


def targets(
    models: dict[str, dict], deltas: dict[str, dict], settings: Settings, probe: dict | None = None
) -> dict[str, Any] | None:
    """The issue's targets for the headline variant, each with its measured value and whether it is met.

    ``motion_*``: gains over the headline's baseline on the motion group; ``camera_psnr_4+``: the same on its rendered
    camera moves, frames 4 and later. ``probe``: the eval phase's shift probe
    (:func:`~benchmarks.quality.shift_probe.shift_probe`), for the ``shift_follow_*`` targets: the frame-0 gain at
    shifts 1-2 (near) and at the largest shift (far) as a fraction of the gain in place, the worse direction of each,
    over whole frames and (``*_shown``) over the columns whose content the displaced reference shows.
    """
    ft, goals = settings.finetune, settings.eval.targets
    name = ft.headline
    key = next((key for key in deltas if key.split(" - ")[0] == name), None)
    if key is None or "motion" not in deltas[key]:
        return None
    delta, base = deltas[key], key.split(" - ")[1]
    out: dict[str, Any] = {"headline": name}

    def record(goal: str, value: float, name: str | None = None) -> None:
        out[name or goal] = {"value": value, "target": goals[goal], "met": value >= goals[goal]}

    for metric in ("psnr", "psnr_0", "psnr_4+"):
        record(f"motion_{metric}", delta["motion"][metric], f"motion_{metric}_gain")
    camera = [models[m]["motion"].get("by_part", {}).get("camera") for m in (name, base)]
    if all(camera):
        record("camera_psnr_4+", camera[0]["psnr_4+"] - camera[1]["psnr_4+"])
    versus = goals["static_versus"]
    if versus in models and "static" in models[name]:
        value = models[name]["static"]["psnr"] - models[versus]["static"]["psnr"]
        margin = -goals["static_margin"]
        out[f"static_psnr_vs_{versus}"] = {"value": value, "target": margin, "met": value >= margin}
    if probe is not None and name in probe["models"]:
        for metric, suffix in (("gain_frame0", ""), ("gain_frame0_shared", "_shown")):
            ratios = follow_ratios(probe["models"][name], metric)
            near = [r for k, r in ratios.items() if 1 <= k <= 2]  # whole tokens: a fraction is reported only
            if near:
                record(f"shift_follow_near{suffix}", min(near))
            record(f"shift_follow_far{suffix}", ratios[max(ratios)])
    return out


def write_grid(path: Path, crops: dict[str, torch.Tensor], titles: list[str], frames: int) -> None:
    """Rows: ground truth and each model; columns: frames 0 (reference), T/2 and T-1 of each shown clip.

    The crops are tiled into one image (one ``imshow``; a subplot per crop took seconds), labels drawn beside it.
    """
    matplotlib = require("matplotlib", extra="eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [0, frames // 2, frames - 1]
    names = ["ground truth"] + [n for n in crops if n != "ground truth"]
    size = crops[names[0]].shape[-1]
    rows = [torch.cat([crops[n][k, :, f] for k in range(len(titles)) for f in shown], dim=2) for n in names]
    image = ((torch.cat(rows, dim=1).permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
    cols = len(titles) * 3
    fig, ax = plt.subplots(figsize=(0.9 * cols + 1.2, 0.9 * len(names) + 0.4))
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([size * (c + 0.5) for c in range(cols)])
    ax.set_xticklabels([f"{titles[c // 3]}\nf{shown[c % 3]}" + (" (ref)" if c % 3 == 0 else "") for c in range(cols)])
    ax.set_yticks([size * (r + 0.5) for r in range(len(names))])
    ax.set_yticklabels(names)
    ax.tick_params(labelsize=5, length=0)
    ax.xaxis.tick_top()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
