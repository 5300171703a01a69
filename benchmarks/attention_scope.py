"""Cost of the attention scopes: CPU time of the shared transformer and attention memory at paper-size grids.

    python benchmarks/attention_scope.py [--repeats 3] [--threads 1] [--out benchmarks/results/attention_scope.json]
    python benchmarks/attention_scope.py --flops-only --out benchmarks/results/attention_scope_flops.json
    python benchmarks/attention_scope.py --dense-crossover --out benchmarks/results/attention_scope_crossover.json

1. Time: a 2-layer, 256-wide (4 heads x 64) shared transformer, forward only, on the stage-0 token grid of 17
   frames at 480x832 plus one reference frame (6 x 30 x 52 = 9,360 tokens), for every scope: global, per position
   (radius 0), neighbourhoods of radius 2 and 4, radius 2 in the reference with the own position in the video, and
   each with the locality bias. Rounds are interleaved (one run of every scope per round) and the median is kept.
2. Memory: peak live tensor bytes of one attention call (its output included) at the stage-2 grid of the same
   clip (18 x 30 x 52 = 28,080 tokens), on the meta device, for 4 x 64 and 8 x 128 heads, against the ``N^2``
   bytes of the dense boolean mask the neighbourhood computation replaces.
3. FLOPs of the ``small`` preset decoding 17 frames at 480x832 with a reference (Wan2.1, meta device), per scope
   and for the recommended configuration, against the plain decoder (``--flops-only``: this part alone); that
   configuration with correspondence-guided reference attention against the same without it (the counter's
   matmuls, convolutions and attention, plus the elementwise cost volume and bilinear taps counted by hand).
4. Dense against gathered, on CPU (``--dense-crossover``: this part alone): forward and backward seconds of one
   radius-2 attention call with the locality bias, computed dense (the ``N x N`` mask) and by the neighbourhood
   gather, on small grids, interleaved, median of ``--repeats`` rounds after a warm-up, under deterministic
   algorithms (as training runs). Where the dense computation wins decides ``DENSE_TOKENS``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks.common import LiveTensorMeter, write_json  # noqa: E402
from benchmarks.decode_overhead import build_wan, flops_row  # noqa: E402
from refdecoder.blocks import AttentionScope, LocalityBias, SharedTransformer, scoped_attention  # noqa: E402

SCOPES = {  # name -> (attention_radius, video_attention_radius)
    "global": (None, None),
    "radius 0": (0, None),
    "radius 2": (2, None),
    "radius 4": (4, None),
    "radius 2, video 0": (2, 0),
}


def scope_timings(grid: tuple[int, int, int], repeats: int) -> dict[str, float]:
    """Median forward seconds of the transformer per scope (with and without the locality bias)."""
    torch.manual_seed(0)
    models = {
        f"{name}{' + bias' if bias else ''}": SharedTransformer(
            256, 2, 4, attention_radius=r, video_attention_radius=rv, locality_bias=bias
        ).eval()
        for name, (r, rv) in SCOPES.items()
        for bias in (False, True)
    }
    tokens = torch.randn(1, math.prod(grid), 256)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, model in models.items():
                start = time.perf_counter()
                model(tokens, grid, num_reference=1)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def scope_memory(grid: tuple[int, int, int], heads: int, head_dim: int) -> dict[str, int]:
    """Peak live bytes of one attention call per local scope (with the bias), on the meta device."""
    n, out = math.prod(grid), {}
    for name, (r, rv) in SCOPES.items():
        if r is None:
            continue
        with torch.device("meta"):
            q, k, v = (torch.empty(1, heads, n, head_dim) for _ in range(3))
            bias = LocalityBias(heads, max(r, rv or 0))
        with torch.no_grad(), LiveTensorMeter() as meter:
            scoped_attention(q, k, v, AttentionScope(grid, 1, r, rv), bias)
        out[name] = meter.peak
    return out


CROSSOVER_GRIDS = ((10, 8, 8), (4, 12, 12), (6, 10, 12), (3, 16, 16), (8, 10, 12), (4, 16, 16), (6, 16, 16))
CROSSOVER_SHAPES = ((1, 4), (2, 4), (2, 8))  # (batch, heads), head_dim 64


def dense_crossover(repeats: int) -> list[dict]:
    """Per grid and (batch, heads): median fwd+bwd seconds of radius-2 attention with the bias, dense and gathered."""
    torch.use_deterministic_algorithms(True)  # as the training recipes and the quality benchmark run
    rows = []
    for batch, heads in CROSSOVER_SHAPES:
        for grid in CROSSOVER_GRIDS:
            scope, n = AttentionScope(grid, 1, 2), math.prod(grid)
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(batch, heads, n, 64, generator=generator) for _ in range(3))
            bias = LocalityBias(heads, 2)
            times: dict[str, list[float]] = {"dense": [], "gather": []}
            for _ in range(repeats + 1):  # the first round warms up
                for backend, seconds in times.items():
                    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                    start = time.perf_counter()
                    scoped_attention(*leaves, scope, bias, backend=backend).sum().backward()
                    seconds.append(time.perf_counter() - start)
            dense, gather = (statistics.median(times[backend][1:]) for backend in ("dense", "gather"))
            rows.append(
                {"batch": batch, "heads": heads, "grid": grid, "tokens": n, "dense_s": dense, "gather_s": gather}
            )
            print(
                f"batch {batch}, {heads} heads, grid {grid} ({n:4d} tokens): dense {dense * 1e3:6.1f} ms, "
                f"gather {gather * 1e3:6.1f} ms ({gather / dense:.2f}x dense)",
                flush=True,
            )
    return rows


def small_flops() -> dict:
    """``small`` at 17 frames, 480x832, with each scope (and the locality bias where it applies), and the
    recommended configuration (the ``small-local`` preset: radius 2, the bias, per-stage space-to-depth tokenizers)."""
    configs = {}
    for name, (r, rv) in SCOPES.items():
        for bias in (False, True):
            config = refdecoder.preset("small")
            tf = config.transformer
            tf.attention_radius, tf.video_attention_radius, tf.locality_bias = r, rv, bias
            configs[f"{name}{' + bias' if bias else ''}"] = config
    config = refdecoder.preset("small")
    config.transformer.attention_radius, config.transformer.locality_bias = 2, True
    config.tokenizer.per_stage, config.tokenizer.kind = True, "space_to_depth"
    configs["radius 2 + bias + per-stage space-to-depth tokenizers"] = config
    guided = {}
    for name, frame_spaces, shift, half_cell in (
        (CORRESPONDENCE, "still_clip", False, False),
        (CORRESPONDENCE_CHEAP, "fitted", False, False),
        (CORRESPONDENCE_SHIFT, "still_clip", True, False),
        (CORRESPONDENCE_HALF, "still_clip", True, True),
    ):
        guided[name] = config.copy()
        guided[name].correspondence.enabled = True
        guided[name].correspondence.frame_spaces = frame_spaces
        guided[name].correspondence.sub_token_shift = guided[name].correspondence.subcell = shift
        guided[name].correspondence.half_cell = half_cell
    row = flops_row(build_wan("meta"), 17, (480, 832), configs | guided)
    without = row["radius 2 + bias + per-stage space-to-depth tokenizers"]
    for name, with_correspondence in guided.items():
        extra = correspondence_elementwise_flops(with_correspondence, 17, (480, 832))
        row[name] |= {
            "elementwise_tflop_not_counted": extra / 1e12,
            "ratio_to_without": (row[name]["tflop"] + extra / 1e12) / without["tflop"],
        }
    return row


# The default correspondence (the reference encoded as a still clip of 4 latent frames) and its cheap form (one
# encoded image mapped into the later frames' feature spaces).
CORRESPONDENCE = "radius 2 + bias + per-stage space-to-depth tokenizers + correspondence"
CORRESPONDENCE_CHEAP = CORRESPONDENCE + " (frame_spaces fitted)"
CORRESPONDENCE_SHIFT = CORRESPONDENCE + " (sub_token_shift, subcell)"
CORRESPONDENCE_HALF = CORRESPONDENCE + " (sub_token_shift, subcell, half_cell)"


def correspondence_elementwise_flops(config: refdecoder.RefDecoderConfig, frames: int, size: tuple[int, int]) -> int:
    """What the FLOP counter (matmuls, convolutions, attention) leaves out of correspondence, counted by hand.

    The cost volume: per latent cell, reference frame and candidate, a C-channel dot product (2C), its patch
    average ((2m+1)^2) and the division by the share of the patch on the reference grid (1; that share is a patch
    average per cell and candidate, once). The guided attention, snapped (default): per video token and layer, the
    query turned by its displacement (RoPE, 6 x width; the keys and values are gathered, not computed); not
    snapped: per reference slot 4 bilinear taps of keys and values (4 x 2 x 2 x width) and the RoPE of the sampled
    key (6 x width). One reference frame. With ``smooth_radius``: per cell the top-2 candidates, the confidence
    (~5) and two box averages; with ``global_prior`` also the frame's robust translation (5 re-weighted means, ~12
    operations per cell each) and the gate (a gathered correlation, a difference and an exponential) and blend
    (~10 per cell). With ``subcell``: per cell the arg-max and, per axis, a parabola through three correlations
    (~8). With ``sub_token_shift``: per conditioned stage and video cell, C channels copied there and back (whole
    cells: 2 reads) plus the update's difference and sum (2). The encoder pass of the reference and the fitted
    frame-space maps' matrix products are counted by the FLOP counter.
    """
    model = refdecoder.wrap(build_wan("meta"), config)
    adapter, c, tf = model.adapter, config.correspondence, config.transformer
    t = adapter.frame_rule.latent_frames(frames)
    h, w = (s // adapter.spatial_factor for s in size)
    whole = (2 * c.search_radius + 1) ** 2
    candidates = whole * (4 if c.half_cell else 1)  # half_cell: each whole offset once per half-cell phase
    patch = (2 * c.match_radius + 1) ** 2 if c.match_radius else 0
    total = t * h * w * candidates * (2 * adapter.latent_channels + patch + (1 if patch else 0))
    total += h * w * whole * patch  # the share of each whole offset's patch on the grid (the same for every phase)
    if c.smooth_radius:  # per cell: the top-2 over the candidates, the confidence, 3 channels through two box averages
        total += t * h * w * (candidates + 5 + 2 * 3 * (2 * c.smooth_radius + 1) ** 2)
        if c.global_prior:
            total += t * h * w * (5 * 12 + 10)
    if c.subcell:
        total += t * h * w * (candidates + 2 * 8)
    slots = (2 * tf.attention_radius + 1) ** 2
    specs = adapter.stages()
    windows = adapter.plan_windows(t, model.window_size(torch.empty(1, 1, t, h, w, device="meta")))
    for k, (start, stop) in enumerate(windows):
        for i in model.stage_indices:
            video = adapter.stage_frames(i, stop - start, k == 0)
            grid_h, grid_w = (s * adapter.spatial_factor // specs[i].scale for s in (h, w))
            tokens = model.projectors[specs[i].name].token_count(video, grid_h, grid_w)
            per_token = 6 * tf.width if c.snap else slots * (16 * tf.width + 6 * tf.width)
            total += tokens * tf.depth * per_token
            if c.sub_token_shift:
                total += video * grid_h * grid_w * specs[i].channels * (2 + 2)
    model.unwrap()
    return total


def print_flops(flops: dict) -> None:
    for name, row in flops.items():
        if isinstance(row, dict):
            print(
                f"small, {name:24s} {row['tflop']:7.1f} TFLOP ({row['ratio_to_plain']:.3f}x the plain decoder), "
                f"{row['added_params_m']:.1f} M added parameters"
            )
            if "ratio_to_without" in row:
                print(
                    f"  + {row['elementwise_tflop_not_counted']:.3f} TFLOP elementwise (by hand): "
                    f"{row['ratio_to_without']:.4f}x the same configuration without correspondence"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--flops-only", action="store_true", help="only the FLOPs part (meta device, seconds)")
    parser.add_argument("--dense-crossover", action="store_true", help="only the dense-against-gather part (CPU)")
    args = parser.parse_args()
    if args.dense_crossover:
        torch.set_num_threads(args.threads)
        repeats = max(args.repeats, 5)  # small calls: fewer rounds leave the medians noisy
        payload = {
            "attention": "radius 2, locality bias, 1 reference frame, head_dim 64, forward and backward",
            "repeats": repeats,
            "rows": dense_crossover(repeats),
        }
        print(f"wrote {write_json('attention_scope_crossover', payload, args.out)}")
        return
    if args.flops_only:
        flops = small_flops()
        print_flops(flops)
        print(f"wrote {write_json('attention_scope_flops', {'small_flops_17f_480x832': flops}, args.out)}")
        return
    torch.set_num_threads(args.threads)
    time_grid, memory_grid = (6, 30, 52), (18, 30, 52)
    timings = scope_timings(time_grid, args.repeats)
    for name, seconds in timings.items():
        print(f"{name:24s} {seconds:7.3f} s  ({seconds / timings['global']:.2f}x global)")
    n = math.prod(memory_grid)
    memory = {}
    for heads, head_dim in ((4, 64), (8, 128)):
        peaks = scope_memory(memory_grid, heads, head_dim)
        output = n * heads * head_dim * 4
        memory[f"{heads}x{head_dim}"] = {"output_bytes": output, "peak_bytes": peaks}
        for name, peak in peaks.items():
            print(
                f"{heads}x{head_dim} {name:20s} peak {peak / 2**20:7.1f} MiB (output {output / 2**20:.1f} MiB), "
                f"{peak / n**2:.3f}x the {n**2 / 2**20:.0f} MiB dense mask"
            )
    flops = small_flops()
    print_flops(flops)
    payload = {
        "time_grid": time_grid,
        "time_model": "SharedTransformer(256, depth 2, 4 heads), forward, batch 1, reference frames 1",
        "repeats": args.repeats,
        "seconds": timings,
        "memory_grid": memory_grid,
        "dense_mask_bytes": n * n,
        "memory": memory,
        "small_flops_17f_480x832": flops,
    }
    print(f"wrote {write_json('attention_scope', payload, args.out)}")


if __name__ == "__main__":
    main()
