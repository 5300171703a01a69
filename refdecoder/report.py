"""A self-contained HTML report of decoded videos: synchronised players, a before/after slider, the metrics with
deltas, and the loss curves of training runs.

    from refdecoder.report import write_report
    write_report("out/")                                   # out/index.html
    write_report("runs/tiny/comparison", runs={"RefDecoder": "runs/tiny", "baseline": "runs/tiny/baseline"})

The folder is what ``refdecoder reconstruct --compare-base``, ``decode-latents --compare-base`` and the training
recipe's comparison write: per clip ``<name>.mp4`` (RefDecoder), ``<name>.base.mp4`` (the VAE as it was), and when
present ``<name>.baseline.mp4`` (an equal-budget plain decoder) and ``<name>.source.mp4`` (ground truth), plus
``metrics.csv`` (:mod:`refdecoder.inference.results`). Everything is embedded in the page (videos as base64 mp4,
frames as PNG, curves as SVG, no script or style from elsewhere), so ``index.html`` can be mailed or archived alone.
Needs the extras ``video`` (PyAV) and ``eval`` (matplotlib).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from refdecoder.errors import DataError
from refdecoder.inference.results import METRICS_CSV, read_clip_metrics, read_metrics_csv

__all__ = ["REPORT_NAME", "ROLES", "find_clips", "write_report"]

REPORT_NAME = "index.html"
# (prefix in metrics.csv, file suffix, label), in display order; "" is the RefDecoder.
ROLES = (
    ("source", ".source.mp4", "source"),
    ("base_", ".base.mp4", "base (VAE)"),
    ("baseline_", ".baseline.mp4", "baseline"),
    ("", ".mp4", "RefDecoder"),
)
_METRICS = (
    ("psnr", "PSNR all", 2),
    ("psnr_reference", "PSNR reference frame", 2),
    ("psnr_others", "PSNR other frames", 2),
    ("ssim", "SSIM", 3),
    ("lpips", "LPIPS", 3),
)
_DELTAS = (("delta_", "base"), ("gain_", "baseline"))  # RefDecoder minus base, minus baseline
_MIN_DISPLAY = 192  # small videos are shown enlarged (pixelated) to at least this width


def find_clips(folder: str | os.PathLike) -> list[str]:
    """Clip names of a report folder: the rows of ``metrics.csv``, else every ``<name>.base.mp4`` / ``<name>.mp4``."""
    folder = Path(folder)
    if (folder / METRICS_CSV).is_file():
        return [str(r["name"]) for r in read_clip_metrics(folder / METRICS_CSV) if "error" not in r]
    names = {p.name[: -len(".base.mp4")] for p in folder.glob("*.base.mp4")}
    return sorted(names or {p.stem for p in folder.glob("*.mp4") if "." not in p.stem})


def write_report(
    folder: str | os.PathLike,
    runs: dict[str, str | os.PathLike] | None = None,
    frame: int | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Write the report of ``folder`` to ``out`` (default ``folder/index.html``).

    Args:
        folder: the decoded videos and ``metrics.csv``.
        runs: training run folders by label, whose ``logs/csv/metrics.csv`` loss curves are drawn.
        frame: frame shown under the before/after slider; default: where base and RefDecoder differ most.
        out: the HTML file.

    Raises:
        DataError: the folder holds no decoded video.
    """
    folder = Path(folder)
    names = find_clips(folder)
    if not names:
        raise DataError(f"{folder} holds no decoded videos (<name>.mp4, <name>.base.mp4) to report on")
    table = folder / METRICS_CSV
    rows = {str(r["name"]): r for r in read_clip_metrics(table)} if table.is_file() else {}
    title = html.escape("/".join(folder.resolve().parts[-2:]))
    body = [f"<h1>refdecoder report: {title}</h1>", _metrics_table(names, rows)]
    if runs:
        body.append(_curves(runs))
    body += [_clip_section(folder, name, frame) for name in names]
    out = Path(out) if out is not None else folder / REPORT_NAME
    out.write_text(_PAGE.format(title=title, body="\n".join(body), script=_SCRIPT))
    return out


# --- metrics --------------------------------------------------------------------------------------------------
def _metrics_table(names: list[str], rows: dict[str, dict[str, Any]]) -> str:
    if not rows:
        return "<p>No metrics: these videos have no ground truth (decoded from latents).</p>"
    metrics = [m for m in _METRICS if any(isinstance(r.get(m[0]), float) for r in rows.values())]
    head = "".join(f"<th>{label}</th>" for _, label, _ in metrics)
    lines = [f'<table id="metrics"><thead><tr><th>clip</th><th>decoder</th>{head}</tr></thead><tbody>']
    clips = [(n, rows[n]) for n in names if n in rows]
    overall = {k: sum(r[k] for _, r in clips) / len(clips) for k in clips[0][1] if _all_numbers(clips, k)}
    for clip, row in [("overall", overall), *clips]:
        for prefix, _, label in ROLES[1:]:
            if f"{prefix}psnr" in row:
                cells = "".join(_cell(row, prefix, key, digits) for key, _, digits in metrics)
                lines.append(
                    f'<tr data-clip="{html.escape(clip)}" data-decoder="{html.escape(label)}">'
                    f"<td>{html.escape(clip)}</td><td>{label}</td>{cells}</tr>"
                )
    lines.append("</tbody></table>")
    note = "overall = mean over the clips; RefDecoder deltas: vs base (the VAE as it was) and vs the baseline"
    return "<h2>Metrics</h2>\n" + "\n".join(lines) + f"<p class=note>{note}</p>"


def _all_numbers(clips: list[tuple[str, dict[str, Any]]], key: str) -> bool:
    return all(isinstance(r.get(key), float) for _, r in clips)


def _cell(row: dict[str, Any], prefix: str, key: str, digits: int) -> str:
    value = row.get(prefix + key)
    if not isinstance(value, float):
        return f'<td data-metric="{key}"></td>'
    deltas = []
    for delta, label in _DELTAS if prefix == "" else ():
        if isinstance(row.get(delta + key), float):
            deltas.append(f'<span class="delta" data-vs="{label}">{row[delta + key]:+.{digits}f} vs {label}</span>')
    return f'<td data-metric="{key}" data-value="{value!r}">{value:.{digits}f}{" ".join(deltas)}</td>'


# --- loss curves ----------------------------------------------------------------------------------------------
def _curves(runs: dict[str, str | os.PathLike]) -> str:
    """Inline SVG of each run's training loss and held-out PSNR (from ``<run>/logs/csv/metrics.csv``)."""
    from refdecoder._deps import require

    matplotlib = require("matplotlib", extra="eval")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra="eval", package="matplotlib")
    fig, (loss, val) = plt.subplots(1, 2, figsize=(9, 3.2))
    drawn = False
    for label, run in runs.items():
        path = Path(run) / "logs" / "csv" / METRICS_CSV
        if not path.is_file():
            continue
        rows = read_metrics_csv(path)
        for ax, key in ((loss, "train/loss"), (val, "val/psnr")):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
            if points:
                ax.plot(*zip(*points), marker="." if key == "val/psnr" else None, label=label)
                drawn = True
    loss.set(xlabel="step", ylabel="training loss")
    val.set(xlabel="step", ylabel="held-out PSNR (dB)")
    for ax in (loss, val):
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "refdecoder"}):
        fig.savefig(buffer, format="svg")
    plt.close(fig)
    if not drawn:
        return "<p>No loss curves: the runs have no logs/csv/metrics.csv.</p>"
    svg = buffer.getvalue()
    return '<h2>Training</h2>\n<div id="curves">' + svg[svg.index("<svg") :] + "</div>"


# --- videos and the slider ------------------------------------------------------------------------------------
def _clip_section(folder: Path, name: str, frame: int | None) -> str:
    from refdecoder.data import probe

    videos = [
        (p, label, folder / f"{name}{suffix}") for p, suffix, label in ROLES if (folder / f"{name}{suffix}").is_file()
    ]
    if not videos:
        return f"<section class=clip><h3>{html.escape(name)}</h3><p>no video found</p></section>"
    info = probe(videos[-1][2])
    scale = max(1, min(4, math.ceil(_MIN_DISPLAY / info.width)))
    size = f'width="{info.width * scale}" height="{info.height * scale}"'
    figures = "".join(
        f'<figure><video muted playsinline loop preload="auto" data-role="{label}" {size} '
        f'src="data:video/mp4;base64,{_b64(path.read_bytes())}"></video><figcaption>{label}</figcaption></figure>'
        for _, label, path in videos
    )
    player = (
        f'<div class="player" data-fps="{info.fps:.6g}"><div class="videos">{figures}</div>'
        '<button class="play">play</button> <input class="seek" type="range" min="0" max="1000" value="0">'
        ' <span class="time">0.00 s</span></div>'
    )
    slider = _slider(videos, frame, info.width * scale, info.height * scale)
    return (
        f'<section class="clip" data-clip="{html.escape(name)}"><h3>{html.escape(name)}</h3>{player}{slider}</section>'
    )


def _slider(videos: list[tuple[str, str, Path]], frame: int | None, width: int, height: int) -> str:
    """Before/after over one frame: a before decoder (chosen in a menu) on the left, RefDecoder on the right."""
    main = next((path for prefix, _, path in videos if prefix == ""), None)
    # The equal-budget baseline first when there is one: it is the comparison that isolates the reference.
    befores = [(label, path) for prefix, label, path in videos if prefix == "baseline_"]
    befores += [(label, path) for prefix, label, path in videos if prefix == "base_"]
    if main is None or not befores:
        return ""
    clips = {label: _read(path) for label, path in [*befores, ("RefDecoder", main)]}
    if frame is None:
        diff = (clips[befores[0][0]] - clips["RefDecoder"]).abs().mean(dim=(0, 2, 3))
        frame = int(diff.argmax())
    frame = min(max(frame, 0), clips["RefDecoder"].shape[1] - 1)
    size = f'width="{width}" height="{height}"'
    images = "".join(
        f'<img class="before" data-role="{label}" {size} src="{_png(clips[label][:, frame])}"'
        + (' style="display:none"' if i else "")
        + ">"
        for i, (label, _) in enumerate(befores)
    )
    after = (
        f'<img class="after" {size} style="clip-path: inset(0 0 0 50%)" src="{_png(clips["RefDecoder"][:, frame])}">'
    )
    options = "".join(f'<option value="{label}">{label}</option>' for label, _ in befores)
    return (
        f'<div class="slider" data-frame="{frame}"><div class="pair" style="width:{width}px;height:{height}px">'
        f'{images}{after}<div class="handle" style="left:50%"></div></div>'
        f'<input class="split" type="range" min="0" max="100" value="50" style="width:{width}px">'
        f'<p>frame {frame}: left <select class="before-choice">{options}</select>, right RefDecoder</p></div>'
    )


def _read(path: Path) -> torch.Tensor:
    from refdecoder.media import iter_frames

    return torch.cat(list(iter_frames(path, chunk=16)), dim=1)


def _png(frame: torch.Tensor) -> str:
    from refdecoder.data import write_image

    with tempfile.TemporaryDirectory() as tmp:
        path = write_image(Path(tmp) / "frame.png", frame)
        return "data:image/png;base64," + _b64(path.read_bytes())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>refdecoder report: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, td:nth-child(2) {{ text-align: left; }}
.delta {{ display: block; font-size: 80%; color: #555; }} .note {{ color: #666; font-size: 90%; }}
.videos {{ display: flex; gap: 8px; flex-wrap: wrap; }} figure {{ margin: 0; }} figcaption {{ text-align: center; }}
video, img {{ image-rendering: pixelated; }}
.pair {{ position: relative; margin-top: 1em; }} .pair img {{ position: absolute; top: 0; left: 0; }}
.handle {{ position: absolute; top: 0; bottom: 0; width: 2px; background: #f33; }}
section.clip {{ margin: 2em 0; }}
</style></head>
<body>
{body}
<script>{script}</script>
</body></html>
"""

_SCRIPT = """
for (const player of document.querySelectorAll('.player')) {
  const videos = [...player.querySelectorAll('video')], leader = videos[0];
  const button = player.querySelector('.play'), seek = player.querySelector('.seek');
  const time = player.querySelector('.time'), tolerance = 0.5 / Number(player.dataset.fps);
  const sync = () => {
    for (const v of videos.slice(1)) {
      if (Math.abs(v.currentTime - leader.currentTime) > tolerance) v.currentTime = leader.currentTime;
    }
    if (leader.duration) seek.value = Math.round(1000 * leader.currentTime / leader.duration);
    time.textContent = leader.currentTime.toFixed(2) + ' s';
  };
  button.addEventListener('click', () => {
    sync();
    if (leader.paused) { videos.forEach(v => v.play()); button.textContent = 'pause'; }
    else { videos.forEach(v => v.pause()); button.textContent = 'play'; }
  });
  seek.addEventListener('input', () => {
    const t = seek.value / 1000 * (leader.duration || 0);
    videos.forEach(v => { v.currentTime = t; });
  });
  leader.addEventListener('timeupdate', sync);
  const tick = () => { if (!leader.paused) sync(); requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
}
for (const slider of document.querySelectorAll('.slider')) {
  const after = slider.querySelector('.after'), handle = slider.querySelector('.handle');
  const split = slider.querySelector('.split'), choice = slider.querySelector('.before-choice');
  split.addEventListener('input', () => {
    after.style.clipPath = 'inset(0 0 0 ' + split.value + '%)';
    handle.style.left = split.value + '%';
  });
  choice.addEventListener('change', () => {
    for (const img of slider.querySelectorAll('.before')) {
      img.style.display = img.dataset.role === choice.value ? '' : 'none';
    }
  });
}
"""
