"""Decode speed and memory where people decode: a CUDA GPU, bf16, fused attention, compiled. One prepared command.

    python benchmarks/gpu_decode.py [--dry-run] [--budget-s 400] [--repeats 5] [--out-dir DIR]

On CUDA, Wan2.1 at full width with random weights, bf16, 480x832, 17 and 81 frames:

1. Decode: diffusers ``vae.decode`` (eager), refdecoder's plain windowed loop (no reference), ``small`` and
   ``paper`` with a reference, eager and after ``model.compile()``. Median of ``--repeats`` runs after a warm-up,
   timed with CUDA events; peak ``torch.cuda.max_memory_allocated``; achieved TFLOP/s from the exact FLOP count
   (``FlopCounterMode`` on the meta device) and its share of the device's dense bf16 peak (``_gpu.BF16_PEAK_TFLOPS``).
2. Precision: PSNR of the bf16 decode (``model.to(torch.bfloat16)``) and of the bf16-autocast decode against the
   fp32 decode, on the bundled real clips (17 frames, 64x96), plain decoder and ``small`` with frame 0 as reference.
3. Training step at 17 frames 480x832: ``small`` (transformer activation checkpointing) against a plain decoder
   fine-tune, both under bf16 autocast with fp32 weights and AdamW (``benchmarks/train_step.py``'s steps).
4. The issue's targets, each with its measured value.

Sections run in the order above with the compiled ``paper`` rows last; each writes ``gpu_decode.json`` and the
table ``gpu_decode.md`` into ``--out-dir`` (default ``benchmarks/results``), so a run cut short keeps what
it measured. A step that would start with less than its share of ``--budget-s`` left is skipped and says so.

``--dry-run``: the same code on CPU at toy sizes (tiny Wan VAE; the presets' layouts with one 64-wide layer;
16x32, 5 and 13 frames in windows of 2 latent frames; 5-frame clips at 32x48; compiled with the ``eager`` backend, i.e.
the same dynamo graphs without code generation; memory = peak live tensors). It checks that the GPU call has no
surprises; its figures are not GPU figures. It writes ``gpu_decode_dry_run.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks import _gpu  # noqa: E402
from benchmarks.common import RESULTS, write_json  # noqa: E402
from benchmarks.decode_overhead import count_flops  # noqa: E402
from benchmarks.train_step import PlainStep, RefDecoderStep  # noqa: E402
from refdecoder.backbones.wan import WanAdapter  # noqa: E402
from refdecoder.blocks.attention import kernels_used  # noqa: E402
from refdecoder.data import bundled_clips, read_clip  # noqa: E402
from refdecoder.metrics import psnr  # noqa: E402

PRESETS = ("small", "paper")
PLAIN, VAE_DECODE = "plain loop", "vae.decode"
LR = 2e-4
# Seconds a step needs left in the budget to start: eager decodes, compiled ones (tracing + code generation), a
# training measurement.
START_EAGER, START_COMPILED, START_TRAIN = 20.0, 150.0, 60.0


@dataclass
class Run:
    """The settings of one run: the GPU sizes, or the dry run's toy ones."""

    device: torch.device
    dry_run: bool
    deadline: float  # time.monotonic() at which the budget ends
    repeats: int
    train_repeats: int
    compile_options: dict[str, Any]
    size: tuple[int, int] = (480, 832)  # decode and training (H, W)
    frames: tuple[int, int] = (17, 81)  # short, long
    window: int | None = None  # latent frames per decoder pass; None: the adapter's (the paper's 17 frames)
    clip_frames: int = 17  # precision section: frames of each real clip
    clip_size: tuple[int, int] | None = None  # and their size (None: their own 64x96)
    peak_tflops: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Run:
        deadline = time.monotonic() + args.budget_s
        if args.dry_run:
            # Windows of 2 latent frames: the long decode still has a first window and two later ones of one size.
            options = {"backend": "eager", "dynamic": False}
            toy = dict(size=(16, 32), frames=(5, 13), window=2, clip_frames=5, clip_size=(32, 48))
            return cls(torch.device("cpu"), True, deadline, 1, 1, options, **toy)
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run for the CPU check at toy sizes")
        device = torch.device("cuda")
        options = {"backend": args.compile_backend, "dynamic": False}
        run = cls(device, False, deadline, args.repeats, args.train_repeats, options)
        run.peak_tflops = _gpu.device_info(device)["bf16_peak_tflops"]
        return run

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def vae(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The backbone with seeded random weights: full Wan2.1 width, or the tiny test VAE in a dry run."""
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        with torch.device(device or self.device):
            vae = WanAdapter.build_tiny() if self.dry_run else AutoencoderKLWan()
        return vae.to(dtype).eval()

    def config(self, name: str, checkpointing: bool = False) -> refdecoder.RefDecoderConfig:
        """Preset ``name``; in a dry run with one 64-wide layer (its tokenizer and stage layout unchanged)."""
        config = refdecoder.preset(name)
        tf = config.transformer
        if self.dry_run:
            tf.depth, tf.num_heads, tf.head_dim, tf.ffn_dim = 1, 2, 32, None
        tf.gradient_checkpointing = checkpointing
        config.window.latent_frames = self.window
        return config

    def inputs(self, frames: int, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Latents ``1, 16, t, H/8, W/8`` for ``frames`` pixel frames and a ``1, 3, 1, H, W`` reference."""
        channels = 4 if self.dry_run else 16
        shape = (1, channels, 1 + (frames - 1) // 4, self.size[0] // 8, self.size[1] // 8)
        if torch.device(device).type == "meta":
            return torch.empty(shape, device="meta"), torch.empty(1, 3, 1, *self.size, device="meta")
        g = torch.Generator().manual_seed(frames)
        z = torch.randn(shape, generator=g).to(device, dtype)
        return z, (torch.rand(1, 3, 1, *self.size, generator=g) * 2 - 1).to(device, dtype)


# --- 1. decode ---------------------------------------------------------------------------------------------------
def flop_counts(run: Run) -> dict[str, dict[int, int]]:
    """Exact FLOPs of each contender's decode at each length (matmuls, convolutions, attention; meta device)."""
    vae = run.vae("meta")
    counts: dict[str, dict[int, int]] = {VAE_DECODE: {}, PLAIN: {}, **{name: {} for name in PRESETS}}
    for frames in run.frames:
        z, ref = run.inputs(frames, "meta", torch.float32)
        counts[VAE_DECODE][frames] = count_flops(lambda z=z: vae.decode(z))
        for name in PRESETS:
            model = refdecoder.wrap(vae, run.config(name))
            if name == "small":
                counts[PLAIN][frames] = count_flops(lambda m=model, z=z: m.decode(z))
            counts[name][frames] = count_flops(lambda m=model, z=z, r=ref: m.decode(z, reference=r))
            model.unwrap()
    return counts


def decode_row(run: Run, decode: Callable[[int], Any], flops: dict[int, int], warmup: int, start: float) -> dict:
    """Time and memory of ``decode(frames)`` at each length, with the achieved TFLOP/s."""
    row = {}
    for frames in run.frames:
        if run.seconds_left() < start:
            row[str(frames)] = {"skipped": f"less than {start:.0f} s of --budget-s left"}
            continue
        try:
            with torch.no_grad():
                m = _gpu.measure(lambda f=frames: decode(f), run.device, run.repeats, warmup)
        except _gpu.out_of_memory_errors():
            m = {"error": "out of memory"}
        _gpu.free_cached(run.device)
        if "median_s" in m:
            m["tflop"] = flops[frames] / 1e12
            m["tflops"] = m["tflop"] / m["median_s"]
            m["share_of_bf16_peak"] = None if run.peak_tflops is None else m["tflops"] / run.peak_tflops
        row[str(frames)] = m
    return row


def eager_rows(run: Run, vae: nn.Module, flops: dict, inputs: dict) -> dict:
    """``vae.decode``, the plain windowed loop, and each preset with a reference, uncompiled."""
    rows = {VAE_DECODE: decode_row(run, lambda f: vae.decode(inputs[f][0]).sample, flops[VAE_DECODE], 1, START_EAGER)}
    for name in PRESETS:
        model = refdecoder.wrap(vae, run.config(name))
        if name == "small":
            rows[PLAIN] = decode_row(run, lambda f, m=model: m.decode(inputs[f][0]), flops[PLAIN], 1, START_EAGER)
        rows[name] = decode_row(run, lambda f, m=model: m.decode(*inputs[f]), flops[name], 1, START_EAGER)
        model.unwrap()
    return rows


def compiled_row(run: Run, vae: nn.Module, name: str, flops: dict, inputs: dict) -> dict:
    """Preset ``name`` after ``model.compile()``; ``graphs``: how many the warm-up decodes traced."""
    if run.seconds_left() < START_COMPILED:
        return {"skipped": f"less than {START_COMPILED:.0f} s of --budget-s left"}
    model = refdecoder.wrap(vae, run.config(name))
    model.compile(**run.compile_options)
    graphs = _graph_count()
    with torch.no_grad():
        for frames in run.frames:  # traces every window shape once: the timed runs must trace nothing
            model.decode(*inputs[frames])
    traced = _graph_count() - graphs
    row = decode_row(run, lambda f: model.decode(*inputs[f]), flops[name], 1, START_EAGER)
    row["graphs"], row["traced_while_timed"] = traced, _graph_count() - graphs - traced
    model.unwrap()
    return row


def _graph_count() -> int:
    # Dynamo's own count of the graphs it has compiled in this process.
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --- 2. precision ------------------------------------------------------------------------------------------------
def precision_rows(run: Run) -> dict:
    """PSNR (dB, mean and minimum over frames and clips) of bf16 and of autocast decodes against fp32."""
    model = refdecoder.wrap(run.vae(), run.config("small"))
    with torch.no_grad():
        for projector in model.projectors.values():
            # Zero-initialised outputs would leave the reference path out of the decode; give it a typical init.
            nn.init.normal_(projector.out.weight, std=0.02)
        for key, param in model.named_parameters():
            if "norm" in key or key.endswith("gamma"):
                # Norm scales start at 1, exact in bf16; trained ones are not, and autocast keeps them in fp32.
                param.mul_(1 + 0.1 * torch.randn_like(param))
    paths = bundled_clips()
    clips = [read_clip(path, range(run.clip_frames), run.clip_size)[None].to(run.device) for path in paths]
    with torch.no_grad():
        cases = [(model.encode(video), video[:, :, :1]) for video in clips]
        fp32 = _decodes(model, cases)
        with torch.autocast(run.device.type, dtype=torch.bfloat16):
            autocast = _decodes(model, cases)
        bf16 = _decodes(model.to(torch.bfloat16), cases)
    rows = {}
    for kind in ("plain", "small"):
        rows[kind] = {}
        for mode, outputs in (("bf16", bf16), ("autocast_bf16", autocast)):
            values = torch.cat([psnr(out.float(), ref).flatten() for out, ref in zip(outputs[kind], fp32[kind])])
            rows[kind][mode] = {"mean_db": float(values.mean()), "min_db": float(values.min())}
    model.unwrap()
    return {"clips": [p.name for p in paths], "frames": run.clip_frames, "size": list(clips[0].shape[-2:]), **rows}


def _decodes(model: nn.Module, cases: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    return {
        "plain": [model.decode(z) for z, _ in cases],
        "small": [model.decode(z, reference=ref) for z, ref in cases],
    }


# --- 3. training step --------------------------------------------------------------------------------------------
def training_rows(run: Run) -> dict:
    """One optimizer step on a ``frames[0]``-frame clip, bf16 autocast over fp32 weights, plain vs ``small``."""
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, run.frames[0], *run.size, generator=g) * 2 - 1).to(run.device)
    makers = {
        "plain decoder fine-tune": lambda: PlainStep(run.vae(), LR),
        "small": lambda: RefDecoderStep(run.vae(), run.config("small", checkpointing=True), LR),
    }
    steps: dict[str, dict] = {}
    for name, make in makers.items():
        if run.seconds_left() < START_TRAIN:
            steps[name] = {"skipped": f"less than {START_TRAIN:.0f} s of --budget-s left"}
            continue
        try:
            step = make()
            with torch.autocast(run.device.type, dtype=torch.bfloat16):
                steps[name] = _gpu.measure(lambda s=step: s(video), run.device, run.train_repeats)
        except _gpu.out_of_memory_errors():
            steps[name] = {"error": "out of memory"}
        step = None  # release weights, gradients and AdamW states before the next variant
        _gpu.free_cached(run.device)
    return {"frames": run.frames[0], "size": list(run.size), "autocast": "bf16", "weights": "fp32", "steps": steps}


# --- 4. targets and tables ---------------------------------------------------------------------------------------
def targets(results: dict, run: Run) -> list[dict]:
    """The issue's targets from the measured rows (``met`` is None where a value is missing)."""
    short, long = (str(f) for f in run.frames)
    decode = results.get("decode", {})

    def get(name: str, frames: str, key: str) -> float | None:
        row = decode.get(name, {}).get(frames, {})
        return _memory(row) if key == "memory" else row.get(key)

    def ratio(name: str, other: str, frames: str, key: str = "median_s", other_frames: str | None = None):
        a, b = get(name, frames, key), get(other, other_frames or frames, key)
        return None if a is None or b is None else a / b

    def check(text: str, value: float | None, limit: float, at_least: bool = False) -> dict:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        return {"target": text, "value": value, "limit": limit, "met": met}

    return [
        check(f"plain loop / vae.decode time, {long} frames", ratio(PLAIN, VAE_DECODE, long), 1.0),
        check(f"plain loop / vae.decode time, {short} frames", ratio(PLAIN, VAE_DECODE, short), 1.0),
        check(f"small with a reference / plain loop time, {long} frames", ratio("small", PLAIN, long), 1.3),
        check(f"small peak memory, {long} / {short} frames", ratio("small", "small", long, "memory", short), 1.15),
        check(
            f"compiled small, share of the bf16 peak, {long} frames",
            get("small compiled", long, "share_of_bf16_peak"),
            0.35,
            at_least=True,
        ),
    ]


def markdown(results: dict, run: Run) -> str:
    """The tables of gpu_decode.md: decode rows, precision, the training step and the targets."""
    tables = [
        _decode_table(results, run),
        _precision_table(results),
        _training_table(results),
        _targets_table(results),
    ]
    return "\n\n".join(tables) + "\n"


def _decode_table(results: dict, run: Run) -> str:
    long = str(run.frames[1])
    lines = [
        f"| decode, bf16, {run.size[0]}x{run.size[1]} |"
        + "".join(f" {f} frames: s | GiB | TFLOP/s (% of peak) |" for f in run.frames)
        + f" {long} frames: time / plain loop |",
        "|---" * 8 + "|",
    ]
    plain = results["decode"].get(PLAIN, {}).get(long, {}).get("median_s")
    for name, row in results["decode"].items():
        cells = [_cells(row.get(str(f), row)) for f in run.frames]
        t = row.get(long, {}).get("median_s")
        if "graphs" in row:
            name += f" ({row['graphs']} graphs traced, {row['traced_while_timed']} while timed)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {f'{t / plain:.2f}x' if t and plain else '-'} |")
    return "\n".join(lines)


def _precision_table(results: dict) -> str:
    lines = [
        "| PSNR against the fp32 decode, real clips (mean / min dB) | bf16 weights | bf16 autocast |",
        "|---|---|---|",
    ]
    for kind in ("plain", "small"):
        row = results.get("precision", {}).get(kind)
        if row:
            cells = [f"{row[mode]['mean_db']:.1f} / {row[mode]['min_db']:.1f}" for mode in ("bf16", "autocast_bf16")]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _training_table(results: dict) -> str:
    training = results.get("training", {})
    lines = [f"| training step, {training.get('frames')} frames, bf16 autocast | s | GiB |", "|---|---|---|"]
    for name, row in training.get("steps", {}).items():
        if "median_s" in row:
            lines.append(f"| {name} | {row['median_s']:.3g} | {_memory(row):.3g} |")
        else:
            lines.append(f"| {name} | {_reason(row)} | |")
    return "\n".join(lines)


def _targets_table(results: dict) -> str:
    lines = ["| target | limit | measured | met |", "|---|---|---|---|"]
    for t in results.get("targets", []):
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {t['limit']} | {value} | {met} |")
    return "\n".join(lines)


def _cells(m: dict) -> str:
    if "median_s" not in m:
        return f"{_reason(m)} | | "
    share = m.get("share_of_bf16_peak")
    rate = f"{m['tflops']:.3g}" + ("" if share is None else f" ({100 * share:.0f}%)")
    return f"{m['median_s']:.3g} | {_memory(m):.3g} | {rate}"


def _memory(m: dict) -> float | None:
    """``torch.cuda.max_memory_allocated`` on CUDA; the peak of live tensors on CPU."""
    return m.get("peak_gib") if m.get("peak_gib") is not None else m.get("above_resident_gib")


def _reason(m: dict) -> str:
    return m.get("error") or m.get("skipped") or "-"


# --- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check the code paths, not speed")
    parser.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of the sections (s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode runs (median), >= 5 on a GPU")
    parser.add_argument("--train-repeats", type=int, default=5, help="timed training steps (median)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend on CUDA")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and the table go")
    args = parser.parse_args(argv)
    run = Run.from_args(args)
    threads = torch.get_num_threads()
    if run.dry_run:
        # Toy-sized ops on a shared CPU: with two threads each op waits for the slower one (timings varied 20x).
        torch.set_num_threads(1)
    try:
        results = run_sections(run, args.out_dir)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(results["targets"], indent=1))
    print(markdown(results, run))
    return results


def run_sections(run: Run, out_dir: Path) -> dict:
    """Every section in order, rewriting the JSON and the table after each."""
    name = "gpu_decode_dry_run" if run.dry_run else "gpu_decode"
    results: dict[str, Any] = {"settings": _settings(run), "device": _gpu.device_info(run.device), "section_s": {}}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        out = fn()
        results["section_s"][key] = time.monotonic() - start
        return out

    def save() -> None:
        results["attention_kernels"] = kernels_used()
        results["targets"] = targets(results, run)
        write_json(name, results, out_dir / f"{name}.json")
        (out_dir / f"{name}.md").write_text(markdown(results, run))

    flops = timed("flops", lambda: flop_counts(run))
    vae = run.vae(dtype=torch.bfloat16)
    inputs = {f: run.inputs(f, run.device, torch.bfloat16) for f in run.frames}
    results["decode"] = timed("eager", lambda: eager_rows(run, vae, flops, inputs))
    save()
    results["decode"]["small compiled"] = timed(
        "small compiled", lambda: compiled_row(run, vae, "small", flops, inputs)
    )
    save()
    results["precision"] = timed("precision", lambda: precision_rows(run))
    save()
    results["training"] = timed("training", lambda: training_rows(run))
    save()
    results["decode"]["paper compiled"] = timed(
        "paper compiled", lambda: compiled_row(run, vae, "paper", flops, inputs)
    )
    save()
    print("wrote", out_dir / f"{name}.json", "and", out_dir / f"{name}.md")
    return results


def _settings(run: Run) -> dict[str, Any]:
    return {
        "dry_run": run.dry_run,
        "size": list(run.size),
        "frames": list(run.frames),
        "repeats": run.repeats,
        "train_repeats": run.train_repeats,
        "compile": run.compile_options,
        "dtype": "bfloat16",
        "weights": "random (seeded)",
    }


if __name__ == "__main__":
    main()
