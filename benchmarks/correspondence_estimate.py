"""How good is the correspondence estimate? Its error in latent cells on the shift probe's clips, per setting.

    python benchmarks/correspondence_estimate.py [--vae DIR] [--run OUT [--model corr --baseline baseline
                                                 --untrained s2d]] [--set KEY=VALUE ...]

The quality benchmark's natural held-out probe clips (``eval.shift_probe`` of its recipe: 128x96 px, 8 px per
latent cell of its pretrained VAE, the shipped one by default) are encoded, and each clip's frame 0 cut ``k``
cells further right is the reference: video cell ``x`` shows reference cell ``x - k``, so the true displacement
of frame 0 is ``dx = -k``, ``dy = 0``. The estimate (:func:`refdecoder.blocks.correspondence.correspondence_field`,
the library's defaults unless varied) is measured on the columns the shifted reference shows:

- **frame 0** (the reference's own feature space): the share of cells whose rounded displacement is exact and the
  mean ``|dx error|``, without and with the confidence-weighted smoothing (``smooth_radius``) and the frame's
  global translation in it (``global_prior``);
- **latent frames 1+**: the mean ``|dx + k|`` with the reference's frame-0 latents matched across feature spaces
  (unmapped), mapped by ``frame_spaces: fitted``, and encoded as a still clip (``still_clip``). The clips' own
  motion since frame 0 counts as error here, alike for every setting: compare settings, not absolute values;
- **below a cell** (``subcell``): frame 0 with the reference shifted by 2, 4 and 6 px of an 8-px cell, the median
  estimate and the mean ``|dx error|`` in cells with the soft-argmax and with ``subcell``, each without and with the
  smoothing, and with ``half_cell`` (candidates half a cell apart).

``--run OUT`` (a ``quality_small.py`` output folder) also decodes the benchmark's held-out clips with a saved
correspondence variant (``--model``) under each ``frame_spaces``, with the global prior, with ``half_cell`` and with
``per_frame`` switched, its weights unchanged, and reports its PSNR gain
over the plain variant (``--baseline``) as ``quality_small.py`` groups them; and its rendered camera moves with the
estimate, with each move's exact flow as ``displacements`` (``CameraPath.flow_to``; also with ``per_frame``
switched) and with zero displacement:
how much of what is left at later frames the estimate costs. ``--untrained`` names a variant trained without
correspondence (``s2d``): it is decoded without and with the estimate, weights unchanged (``decode_only``).

Writes ``benchmarks/results/correspondence_estimate.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import refdecoder  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from benchmarks.quality.data import Media, eval_plan, heldout_camera_flows, load_media, render_heldout  # noqa: E402
from benchmarks.quality.evaluation import by_distance, reconstruct, summarise  # noqa: E402
from benchmarks.quality.settings import CONFIG, ROOT, Settings, load_settings  # noqa: E402
from benchmarks.quality_small import PRETRAINED, SHIPPED, load_vae, shift_probe_clips  # noqa: E402
from refdecoder.backbones.wan import WanAdapter  # noqa: E402
from refdecoder.blocks.correspondence import correspondence_field  # noqa: E402
from refdecoder.config import CorrespondenceConfig  # noqa: E402
from refdecoder.errors import ConfigError  # noqa: E402
from refdecoder.metrics import psnr  # noqa: E402

# Settings of the estimate compared at frame 0 (smoothing, the global prior) and at later latent frames (feature
# spaces); every other setting is the library's default.
FRAME0 = {
    "smooth_radius 0": {"smooth_radius": 0, "global_prior": 0.0},
    "smooth_radius 2": {"smooth_radius": 2, "global_prior": 0.0},
    "smooth_radius 2, global_prior 3": {"smooth_radius": 2, "global_prior": 3.0},
    "smooth_radius 2, subcell": {"smooth_radius": 2, "global_prior": 0.0, "subcell": True},
    "smooth_radius 2, subcell, half_cell": {
        "smooth_radius": 2,
        "global_prior": 0.0,
        "subcell": True,
        "half_cell": True,
    },
}
# Frame 0 displaced by a fraction of a cell (px of an 8-px cell): the soft-argmax against the sub-cell parabola
# (`subcell`), each unsmoothed and smoothed (the library's smooth_radius 2); the global prior off throughout.
SUBCELL_PIXELS = (2, 4, 6)
SUBCELL = {
    "soft-argmax, smooth_radius 0": {"smooth_radius": 0, "global_prior": 0.0},
    "subcell, smooth_radius 0": {"smooth_radius": 0, "global_prior": 0.0, "subcell": True},
    "soft-argmax, smooth_radius 2": {"smooth_radius": 2, "global_prior": 0.0},
    "subcell, smooth_radius 2": {"smooth_radius": 2, "global_prior": 0.0, "subcell": True},
    "half_cell, soft-argmax, smooth_radius 2": {"smooth_radius": 2, "global_prior": 0.0, "half_cell": True},
    "half_cell, subcell, smooth_radius 0": {
        "smooth_radius": 0,
        "global_prior": 0.0,
        "subcell": True,
        "half_cell": True,
    },
    "half_cell, subcell, smooth_radius 2": {
        "smooth_radius": 2,
        "global_prior": 0.0,
        "subcell": True,
        "half_cell": True,
    },
}
LATER = {
    "unmapped (still_frames 1)": {"frame_spaces": "still_clip", "still_frames": 1},
    "fitted": {"frame_spaces": "fitted"},
    "still_clip (still_frames 4)": {"frame_spaces": "still_clip", "still_frames": 4},
}
# The saved model decoded on the held-out clips with its own settings (first: the camera rows' "estimate") and with
# one changed; then with per_frame switched from what it was trained with (`switched`).
HELDOUT = {
    "as trained": {},
    "frame_spaces fitted": {"frame_spaces": "fitted"},
    "global_prior 3": {"global_prior": 3.0},
    "half_cell": {"half_cell": True},
}


def switched(trained: CorrespondenceConfig) -> tuple[str, CorrespondenceConfig]:
    """The trained settings with ``per_frame`` the other way, and a label saying which way."""
    return f"per_frame {'off' if trained.per_frame else 'on'}", dataclasses.replace(
        trained, per_frame=not trained.per_frame
    )


def estimate_cells(adapter: WanAdapter, latents: torch.Tensor, reference: torch.Tensor, **settings) -> torch.Tensor:
    """``B, 2, t, h, w`` displacement in latent cells of ``latents`` into the ``B, 3, 1, H, W`` ``reference``."""
    c = dataclasses.replace(CorrespondenceConfig(enabled=True), **settings)
    t, h, w = latents.shape[2:]
    size = (h * adapter.spatial_factor, w * adapter.spatial_factor)
    field = correspondence_field(
        adapter,
        latents,
        reference,
        [(0, t)],
        size,
        c.search,
        frame_spaces=c.frame_spaces,
        still_frames=c.still_frames,
        half_cell=c.half_cell,
    )
    return field.pixels[:, 0] / adapter.spatial_factor


def shown(cells: torch.Tensor, k: int) -> torch.Tensor:
    """The columns of ``..., w`` cells whose content a reference shifted by ``k`` cells shows."""
    return cells[..., max(0, k) : cells.shape[-1] + min(0, k)]


@torch.no_grad()
def estimate_errors(vae: torch.nn.Module, settings: Settings, shifts: list[int], media: Media | None = None) -> dict:
    """Frame-0 exactness and later-frame errors of the estimate per setting and shift (see the module doc)."""
    probe = shift_probe_clips(settings, media or load_media(settings.data))
    cell, adapter = settings.eval.shift_probe.token_pixels, WanAdapter(vae)
    if cell != adapter.spatial_factor:
        raise SystemExit(
            f"eval.shift_probe.token_pixels ({cell}) must equal the VAE's cell ({adapter.spatial_factor} px)"
        )
    latents = vae.encode(probe.clips).latent_dist.mode()
    rows: dict = {"frame0": {}, "later_frames": {}}
    for k in shifts:
        reference = probe.references[k * cell]
        for name, varied in FRAME0.items():
            cells = shown(estimate_cells(adapter, latents[:, :, :1], reference, **varied)[:, :, 0], k)
            exact = ((cells[:, 1].round() == -k) & (cells[:, 0].round() == 0)).float().mean().item()
            error = (cells[:, 1] + k).abs().mean().item()
            rows["frame0"].setdefault(name, {"exact": [], "mean_error": []})
            rows["frame0"][name]["exact"].append(exact)
            rows["frame0"][name]["mean_error"].append(error)
        for name, varied in LATER.items():
            cells = shown(estimate_cells(adapter, latents, reference, **varied)[:, 1, 1:], k)
            rows["later_frames"].setdefault(name, []).append((cells + k).abs().mean().item())
        print(
            f"k={k:+d} frame 0 exact "
            + " ".join(f"{n}: {r['exact'][-1]:.2f}" for n, r in rows["frame0"].items())
            + " | frames 1+ mean |error| "
            + " ".join(f"{n}: {r[-1]:.2f}" for n, r in rows["later_frames"].items()),
            flush=True,
        )
    rows["subcell"] = {"pixels": list(SUBCELL_PIXELS)}
    for px in SUBCELL_PIXELS:  # the reference px to the right: the true dx is -px / cell cells on every column shown
        truth, shown_columns = -px / cell, slice(-(-px // cell), None)
        for name, varied in SUBCELL.items():
            dx = estimate_cells(adapter, latents[:, :, :1], probe.references[px], **varied)[:, 1, 0, :, shown_columns]
            row = rows["subcell"].setdefault(name, {"median": [], "mean_error": []})
            row["median"].append(dx.median().item())
            row["mean_error"].append((dx - truth).abs().mean().item())
        print(
            f"{px} px ({truth:+.3f} cells) median dx / mean |error| "
            + " ".join(f"{n}: {r['median'][-1]:+.3f} / {r['mean_error'][-1]:.3f}" for n, r in rows["subcell"].items()
                       if n != "pixels"),
            flush=True,
        )  # fmt: skip
    return {"clips": probe.clips.shape[0], "crop": list(probe.clips.shape[-2:]), "cell_pixels": cell} | rows


@torch.no_grad()
def heldout_gains(
    settings: Settings,
    out: Path,
    model_name: str,
    baseline_name: str,
    media: Media | None = None,
    untrained_name: str | None = None,
) -> dict:
    """PSNR gains of the saved ``model_name`` over ``baseline_name`` per estimate setting (:data:`HELDOUT`, weights
    unchanged), and on the rendered camera moves with their exact flow and with zero displacement.

    ``untrained_name``: a variant trained without correspondence (otherwise the same), decoded without and with the
    model's estimate (``decode_only``): how much of the gain the estimate gives without training for it."""
    media = media or load_media(settings.data)
    clips, size = eval_plan(media, settings), settings.eval.batch
    encoder = load_vae(out / PRETRAINED).eval()
    batches = [render_heldout(media, settings, clips[i : i + size]) for i in range(0, len(clips), size)]
    latents = [encoder.encode(video).latent_dist.mode() for video in batches]
    target = torch.cat(batches)

    def decode_all(model: torch.nn.Module) -> torch.Tensor:  # N, 3, T, H, W
        return torch.cat([reconstruct(model, z, video) for z, video in zip(latents, batches)])

    def per_frame_psnr(model: torch.nn.Module) -> torch.Tensor:  # N, T
        return psnr(decode_all(model), target)

    base_frames = decode_all(load_vae(out / baseline_name).eval())
    base_summary = summarise({"psnr": psnr(base_frames, target)}, clips)
    model = refdecoder.load(load_vae(out / PRETRAINED), out / model_name).eval()
    trained = model.config.correspondence

    def gains_of(scores: torch.Tensor) -> dict:  # per group (and the motion group's camera moves) over the baseline
        ours = summarise({"psnr": scores}, clips)
        parts = {g: (ours[g], base_summary[g]) for g in ("static", "motion") if g in ours}
        if "camera" in ours.get("motion", {}).get("by_part", {}):
            parts["camera"] = (ours["motion"]["by_part"]["camera"], base_summary["motion"]["by_part"]["camera"])
        return {
            group: {key: a[key] - b[key] for key in ("psnr", "psnr_0", "psnr_4+")} for group, (a, b) in parts.items()
        }

    result = {}
    decodes = {name: dataclasses.replace(trained, **varied) for name, varied in HELDOUT.items()}
    decodes.update([switched(trained)])
    as_trained = next(iter(HELDOUT))  # the model's own settings: the camera rows' "estimate"
    for spaces, config in decodes.items():
        model.config.correspondence = config
        frames = decode_all(model)
        if spaces == as_trained:
            as_trained_frames = frames
        result[spaces] = gains_of(psnr(frames, target))
        print(f"{model_name} {spaces}: {result[spaces]}", flush=True)
    model.config.correspondence = trained
    decode_only = {}
    if untrained_name is not None:
        other = refdecoder.load(load_vae(out / PRETRAINED), out / untrained_name).eval()
        if other.config.correspondence.enabled:
            raise ConfigError(
                f"--untrained {untrained_name} was trained with correspondence; name one trained without"
            )
        rows = {}
        for label, enabled in (("without", False), ("with the estimate", True)):
            other.config.correspondence = dataclasses.replace(trained, enabled=enabled)
            rows[label] = gains_of(per_frame_psnr(other))
            print(f"{untrained_name} {label}: {rows[label]}", flush=True)
        decode_only = {"decode_only": {"model": untrained_name, "gains_db": rows}}
    camera = camera_flow_gains(
        model, base_frames, as_trained_frames, torch.cat(latents), target, media, settings, clips
    )
    return {"run": str(out), "model": model_name, "baseline": baseline_name, "gains_db": result} | camera | decode_only


def camera_flow_gains(
    model: refdecoder.RefDecoder,
    base: torch.Tensor,
    estimated: torch.Tensor,
    latents: torch.Tensor,
    target: torch.Tensor,
    media: Media,
    settings: Settings,
    clips: list,
) -> dict:
    """Gains on the rendered camera moves with the estimate, their exact flow and zero displacement; on all pixels
    and on those whose content the reference shows (:func:`shown_by_flow`; the rest entered the view after frame 0,
    and no reference holds their detail).

    ``base`` and ``estimated``: the plain variant's and the model's (with its own estimate) ``N, 3, T, H, W`` decodes
    of ``clips``; ``latents``, ``target``: every clip's latents and frames, in ``clips``' order. Gains are
    differences of :func:`~benchmarks.quality.evaluation.by_distance` means, as the benchmark's own.
    """
    rows = torch.tensor([c.part == "camera" for c in clips])
    if not rows.any():
        return {}
    flow = heldout_camera_flows(media, settings, [c for c, moved in zip(clips, rows) if moved])
    video, decoded = target[rows], {"estimate": estimated[rows]}
    trained = model.config.correspondence
    label, other = switched(trained)
    given = {
        "true flow": (flow, trained),
        f"true flow, {label}": (flow, other),
        "zero": (torch.zeros_like(flow), trained),
    }
    for name, (displacements, config) in given.items():
        model.config.correspondence = config
        decoded[name] = model.decode(latents[rows], video[:, :, :1], displacements=displacements)
    model.config.correspondence = trained
    every, shown = torch.ones(len(video), dtype=torch.bool), shown_by_flow(flow)
    tables: dict[str, dict] = {"camera_gains_db": {}, "camera_gains_shown_db": {}}
    for key, mask in (("camera_gains_db", None), ("camera_gains_shown_db", shown)):
        plain = by_distance({"psnr": psnr(base[rows], video, mask)}, every)
        for name, frames in decoded.items():
            gains = by_distance({"psnr": psnr(frames, video, mask)}, every)
            tables[key][name] = {k: v - plain[k] for k, v in gains.items()}
            print(
                f"camera moves, {'shown pixels, ' if mask is not None else ''}{name}: {tables[key][name]}", flush=True
            )
    last_frame_px = flow[:, :, -1].norm(dim=1).mean().item()
    return {
        "camera_moves": len(flow),
        "camera_flow_mean_px_last_frame": last_frame_px,
        "camera_gains_db": tables["camera_gains_db"],
        "camera_shown_share": by_distance({"share": shown.float().mean(dim=(2, 3))}, every),
        "camera_gains_shown_db": tables["camera_gains_shown_db"],
    }


def shown_by_flow(flow: torch.Tensor) -> torch.Tensor:
    """``B, T, H, W`` bool: pixels whose content lies inside the reference frame, by the ``B, 2, T, H, W`` flow."""
    h, w = flow.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32).reshape(h, 1) + 0.5  # pixel centres
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    y, x = ys + flow[:, 0], xs + flow[:, 1]
    return (y >= 0) & (y <= h) & (x >= 0) & (x <= w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=SHIPPED, help="diffusers AutoencoderKLWan folder")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the quality_small recipe")
    parser.add_argument("--shifts", default="0,1,-1,2,-2,4,-4", help="reference shifts in latent cells")
    parser.add_argument("--run", type=Path, help="a quality_small.py output folder: also the held-out gains")
    parser.add_argument("--model", default="corr", help="the correspondence variant in --run")
    parser.add_argument("--baseline", default="baseline", help="the plain variant in --run")
    parser.add_argument(
        "--untrained", help="a variant in --run trained without correspondence: also decoded with the estimate"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a recipe setting changed for this measurement (e.g. data.eval_motion.pan=0.9: faster camera moves)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.config, overrides=tuple(args.overrides))
    shifts = [int(s) for s in args.shifts.split(",")]
    estimate = estimate_errors(load_vae(args.vae).eval(), settings, shifts)
    doc = {"vae": str(args.vae.resolve().relative_to(ROOT)), "shift_cells": shifts, "estimate": estimate}
    if args.run is not None:
        doc["heldout"] = heldout_gains(settings, args.run, args.model, args.baseline, untrained_name=args.untrained)
    print(f"wrote {write_json('correspondence_estimate', doc, args.out)}")


if __name__ == "__main__":
    main()
