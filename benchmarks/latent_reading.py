"""What reading pre-encoded latents (``refdecoder encode``) saves per training step, against encoding every step.

    python benchmarks/latent_reading.py [--vae wan2.1|tiny] [--size 64] [--frames 9] [--repeats 5] [--threads 1]

A training step from video reads a clip (decoding the video file) and encodes it with the frozen encoder before the
decoder's forward and backward; a step from latents reads the clip's latents and reference frame from a latent
shard instead. Measured per step (batch 1), median over ``--repeats``, the two kinds interleaved:

- ``data_video_s``: read the clip's frames from the mp4 + frozen encode (no gradients): the work latents replace;
- ``data_latents_s``: read one sample of a latent shard (:class:`refdecoder.data.LatentDataset`: tar member,
  safetensors, reference PNG);
- ``train_s``: the rest of a step, the same for both (RefDecoder ``tiny`` preset decoding the latents with the
  reference, L1 loss, backward, AdamW step);
- ``step_video_s`` / ``step_latents_s``: data + train, and the saving per step in seconds and as a fraction.

The VAE is the Wan2.1 architecture at full width with random weights (``--vae tiny`` for a quick check); the
clips are the bundled sample clips, encoded once with ``encode_dataset`` before the timing.

Writes ``benchmarks/results/latent_reading.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from benchmarks.train_step import build_vae  # noqa: E402
from refdecoder.backbones.registry import find_backbone  # noqa: E402
from refdecoder.data import LatentDataset, bundled_clips, read_clip  # noqa: E402
from refdecoder.inference.distributed import RankContext  # noqa: E402
from refdecoder.inference.encode import EncodeOptions, encode_dataset  # noqa: E402
from refdecoder.inference.loading import Decoder  # noqa: E402


def measure(args: argparse.Namespace, folder: Path) -> dict:
    vae = build_vae(args.vae).eval()
    size = (args.size, args.size)
    clips = bundled_clips()
    encode_dataset(
        Decoder(find_backbone(vae)(vae)), clips[0].parent, folder / "latents",
        EncodeOptions(frames=args.frames, stride=100, size=size), RankContext(), quiet=True,
    )  # fmt: skip
    dataset = LatentDataset(folder / "latents")
    model = refdecoder.wrap(vae, "tiny").train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)

    def data_video(step: int) -> torch.Tensor:
        video = read_clip(clips[step % len(clips)], range(args.frames), size=size)[None]
        with torch.no_grad():
            return model.encode(video)

    def data_latents(step: int) -> torch.Tensor:
        return dataset[step % len(dataset)]["latents"][None]

    def train(latents: torch.Tensor) -> None:
        reference = dataset[0]["reference"][None]
        out = model.decode(latents, reference=reference, clamp=False)
        F.l1_loss(out[:, :, :1], reference).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed: dict[str, list[float]] = {"data_video_s": [], "data_latents_s": [], "train_s": []}
    for step in range(args.repeats + 1):  # step 0 warms up
        for name, fn in (("data_video_s", data_video), ("data_latents_s", data_latents)):
            seconds, latents = _time(fn, step)
            if step:
                timed[name].append(seconds)
        seconds, _ = _time(train, latents)
        if step:
            timed["train_s"].append(seconds)
    out = {name: statistics.median(values) for name, values in timed.items()}
    out.update({f"{name}_all": values for name, values in timed.items()})
    out["step_video_s"] = out["data_video_s"] + out["train_s"]
    out["step_latents_s"] = out["data_latents_s"] + out["train_s"]
    out["saved_per_step_s"] = out["step_video_s"] - out["step_latents_s"]
    out["saved_fraction"] = out["saved_per_step_s"] / out["step_video_s"]
    return out


def _time(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", choices=("wan2.1", "tiny"), default="wan2.1", help="Wan2.1 width or a tiny VAE")
    parser.add_argument("--size", type=int, default=64, help="frame height = width")
    parser.add_argument("--frames", type=int, default=9, help="clip length (1 + 4k)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="refdecoder-latent-bench-") as tmp:
        result = measure(args, Path(tmp))
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": os.getloadavg(),
        "per_step": result,
    }
    path = write_json("latent_reading", payload, args.out)
    print(
        f"per step: read + encode {result['data_video_s']:.3f}s vs read latents {result['data_latents_s']:.4f}s; "
        f"train {result['train_s']:.3f}s; step {result['step_video_s']:.3f}s -> {result['step_latents_s']:.3f}s "
        f"(saves {result['saved_per_step_s']:.3f}s, {100 * result['saved_fraction']:.0f}%); wrote {path}"
    )


if __name__ == "__main__":
    main()
