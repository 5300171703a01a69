"""Train a RefDecoder with Lightning Fabric: one YAML config, dotted overrides, exact resume.

    python recipes/train.py recipes/configs/tiny.yaml                        # CPU demo, a few minutes
    python recipes/train.py recipes/configs/wan2.1.yaml model.vae.path=/models/Wan2.1-I2V fabric.devices=8
    python recipes/train.py CONFIG optim.lr=1e-4 stages.1.frames=17 --resume auto

Flow, top to bottom: config -> Fabric -> sample shards and the VAE (saved as ``<run_dir>/vae``; a tiny VAE is
pretrained briefly on first run) -> wrap (or, for ``model.kind: plain``, the plain decoder) -> optimizer + schedule
-> resume (refused when the model config changed) -> the curriculum stages (video steps, with latent-finetuning
steps interleaved when enabled), logging, validation, image grids and checkpoints -> final checkpoint, export and a
summary. With ``compare.baseline`` the same budget then trains the plain decoder in ``<run_dir>/baseline``, and with
``compare.enabled`` the VAE, the baseline and the RefDecoder are compared on held-out clips
(``<run_dir>/comparison``: videos, ``metrics.csv``, ``index.html``). The closing lines print commands to go on with.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a clone without `pip install -e .`

from refdecoder.cli._progress import progress  # noqa: E402
from refdecoder.errors import CheckpointError, RefDecoderError  # noqa: E402
from refdecoder.training import CheckpointManager, StopSignal, load_config, warmup_cosine  # noqa: E402
from refdecoder.training.compare import baseline_config, closing_lines, compare_run, comparison_table  # noqa: E402
from refdecoder.training.config import TrainConfig, config_to_dict  # noqa: E402
from refdecoder.training.data import (  # noqa: E402
    BatchStream,
    StreamPosition,
    build_clip_dataset,
    build_latent_dataset,
    check_data_source,
    ensure_sample_shards,
    take_samples,
)
from refdecoder.training.loggers import (  # noqa: E402
    build_loggers,
    image_grid,
    log_image,
    print_summary,
    summarize,
    write_json,
)
from refdecoder.training.setup import (  # noqa: E402
    build_fabric,
    build_loss,
    build_metric_lpips,
    check_resume_config,
    export_run,
    gather_objects,
    restore_checkpoint,
    rng_state,
    saved_config,
    saved_model_keys,
    setup_model_and_optimizer,
    wrap_run_model,
)
from refdecoder.training.steps import NonFiniteGuard, latent_loss, step_generator, validate, video_loss  # noqa: E402
from refdecoder.training.vae import RUN_VAE_DIR, backbone_adapter, load_vae, pretrain_run_vae, save_run_vae  # noqa: E402


def main(argv: list[str] | None = None, callbacks: list[Any] | None = None) -> int:
    """Command-line entry point.

    ``callbacks`` are Fabric callbacks; the loop calls ``on_train_start`` and ``on_train_step_end`` on them with any
    of the keyword arguments ``fabric``, ``step`` (optimizer steps done) and ``model`` their signature names.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. recipes/configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 stages.0.frames=17")
    parser.add_argument("--resume", default="auto", help="auto (newest checkpoint of the run, if any), none, or PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        fabric = build_fabric(cfg, callbacks=callbacks)
        return fabric.launch(run_job, cfg, args.resume)
    except RefDecoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def run_job(fabric: Any, cfg: TrainConfig, resume: str) -> int:
    """The configured run, then the equal-budget baseline and the comparison when ``compare`` asks for them."""
    code = train(fabric, cfg, resume)
    baseline = baseline_config(cfg) if cfg.compare.baseline else None
    if code == 0 and baseline is not None:
        fabric.print(f"training the equal-budget baseline (the plain decoder alone) in {baseline.run_dir}")
        code = train(fabric, baseline, resume)
    if code != 0 or not fabric.is_global_zero:
        return code
    if cfg.compare.enabled:
        fabric.print("comparing on held-out clips: the VAE as it was, the baseline and the RefDecoder")
        rows, report = compare_run(cfg, Path(baseline.run_dir) if baseline else None, fabric.device)
        fabric.print(comparison_table(rows))
        fabric.print(f"report:      {report}  (videos, before/after slider, metrics, loss curves)")
    fabric.print(closing_lines(cfg))
    return code


def train(fabric: Any, cfg: TrainConfig, resume: str) -> int:
    """One run on one rank; returns the exit code (0 done, 128 + signal number when stopped by a signal)."""
    started = time.time()
    run_dir = Path(cfg.run_dir)
    if cfg.fabric.cpu_threads:
        torch.set_num_threads(cfg.fabric.cpu_threads)
    fabric.seed_everything(cfg.seed)
    if cfg.fabric.deterministic:
        torch.use_deterministic_algorithms(True)
    ckpts = CheckpointManager(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep_last)
    resume_path = ckpts.resolve(resume)
    if resume_path is None and ckpts.latest() is not None:
        raise CheckpointError(
            f"{ckpts.directory} already holds checkpoints; continue with --resume auto, or pick a new run_dir"
        )
    if resume_path is not None:  # before anything is built or written: a refused resume changes nothing
        check_resume_config(resume_path, saved_config(resume_path), config_to_dict(cfg))
    if fabric.is_global_zero:
        for dataset in (cfg.data.train, cfg.data.val):
            if dataset is not None:
                ensure_sample_shards(dataset)
    fabric.barrier()
    check_data_source(cfg.data.train, "data.train")
    if cfg.data.val is not None:
        check_data_source(cfg.data.val, "data.val")

    model = build_model(fabric, cfg, run_dir)
    model_keys = saved_model_keys(model)
    model, optimizer = setup_model_and_optimizer(fabric, cfg, model)
    scheduler = warmup_cosine(
        optimizer, cfg.total_steps, cfg.schedule.warmup_steps, cfg.schedule.warmup_start, cfg.schedule.min_ratio
    )
    loss_fn = fabric.to_device(build_loss(cfg))
    metric_lpips = build_metric_lpips(cfg.validation.lpips)
    metric_lpips = fabric.to_device(metric_lpips) if metric_lpips is not None else None

    progress_state = {"step": 0, "ranks": None, "nonfinite": None, "history": {"train": [], "val": []}}
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress_state}
    if resume_path is not None:
        fabric.print(f"resuming from {resume_path}")
        restore_checkpoint(fabric, resume_path, state, model_keys, config_to_dict(cfg))
    if fabric.is_global_zero:
        write_json(run_dir / "config.json", config_to_dict(cfg))
    loggers = build_loggers(cfg.logging.loggers, cfg.run_dir, cfg.logging.wandb_project)
    run = Run(fabric, cfg, state, loss_fn, metric_lpips, ckpts, model_keys, loggers)
    code = run.fit()
    if code == 0:
        run.finish(started)
    for logger in loggers:
        logger.finalize("success" if code == 0 else "interrupted")
    return code


def build_model(fabric: Any, cfg: TrainConfig, run_dir: Path) -> torch.nn.Module:
    """The run's VAE (saved as ``<run_dir>/vae`` on first run; a tiny one pretrained first), wrapped by RefDecoder
    with the configured extra components, or the plain decoder for ``model.kind: plain``."""
    if not (run_dir / RUN_VAE_DIR / "config.json").is_file() and cfg.model.vae.source in ("tiny", "demo"):
        if fabric.is_global_zero:
            vae = load_vae(cfg.model, run_dir)
            if cfg.model.vae.source == "tiny" and cfg.model.vae.pretrain.steps > 0:
                steps = cfg.model.vae.pretrain.steps
                fabric.print(f"pretraining the tiny VAE ({steps} steps, L1) so that reconstruction means something")
                bar = progress(steps, "VAE pretraining", unit="step", disable=not cfg.logging.progress_bar)
                losses = pretrain_run_vae(cfg, vae, run_dir, tick=lambda loss: _tick(bar, loss))
                bar.close()
                fabric.print(f"VAE pretraining L1: {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f}")
            save_run_vae(cfg.model, vae, run_dir)
        fabric.barrier()
    return wrap_run_model(cfg, load_vae(cfg.model, run_dir))  # every rank starts from the same saved weights


class Run:
    """The training loop's state on one rank: streams, counters, and what happens between steps."""

    def __init__(
        self,
        fabric: Any,
        cfg: TrainConfig,
        state: dict[str, Any],
        loss_fn: torch.nn.Module,
        metric_lpips: torch.nn.Module | None,
        ckpts: CheckpointManager,
        model_keys: set[str],
        loggers: list[Any],
    ) -> None:
        self.fabric, self.cfg, self.state, self.ckpts, self.model_keys = fabric, cfg, state, ckpts, model_keys
        self.loggers = loggers
        self.model, self.optimizer, self.scheduler = state["model"], state["optimizer"], state["scheduler"]
        self.loss_fn, self.metric_lpips = loss_fn, metric_lpips
        self.progress = state["progress"]
        self.step = self.progress["step"]
        self.guard = NonFiniteGuard(cfg.optim.max_nonfinite)
        if self.progress["nonfinite"] is not None:
            self.guard.load_state_dict(self.progress["nonfinite"])
        ranks = self.progress["ranks"] or [{}]
        self.saved = ranks[fabric.global_rank if fabric.global_rank < len(ranks) else 0]
        self.frame_rule = backbone_adapter(cfg.model.backbone).frame_rule
        self.latents = self._latent_stream()
        self.videos: BatchStream | None = None
        self.stage_index = 0
        self.meter: dict[str, list[float]] = {}
        self.skipped_total = int(self.progress.get("skipped", 0))
        self.last_log = time.time()
        self.preview: dict[tuple[int, tuple[int, int]], dict[str, Any]] = {}
        self.paths: dict[str, Path] = {}

    # --- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, fabric = self.cfg, self.fabric
        # wrap() returns an eval-mode model; Fabric does not switch it. In eval, token dropout would stay off until
        # the first validation switched the model to train mode, so a resumed run would differ from a straight one.
        self.model.train()
        bar = _progress_bar(fabric, cfg, self.step)
        fabric.call("on_train_start", fabric=fabric, step=self.step, model=self.model)
        if self.step == 0 and cfg.validation.at_start and cfg.data.val is not None:
            self.validate(tag="start")
        with StopSignal() as stop:
            try:
                for index, stage in enumerate(cfg.stages):
                    end = sum(s.steps for s in cfg.stages[: index + 1])
                    if self.step >= end:
                        continue
                    self.open_stage(index)
                    fabric.print(f"stage {index} {stage.name!r}: steps {self.step}..{end}, {self._clip_shape()}")
                    while self.step < end:
                        parts = self.optimizer_step()
                        self.step += 1
                        self.after_step(parts, bar)
                        if fabric.strategy.reduce_boolean_decision(stop.requested, all=False):
                            return self.stop(stop)
            finally:
                if bar is not None:
                    bar.close()
        return 0

    def stop(self, stop: StopSignal) -> int:
        """Checkpoint after a SIGTERM/SIGINT (on any rank) and return the exit code 128 + signal number."""
        path = self.save_checkpoint()
        self.fabric.print(
            f"stopped by {stop.name or 'a signal on another rank'} at step {self.step}; checkpoint: {path}; "
            "continue with --resume auto"
        )
        return 128 + int(stop.received or signal.SIGTERM)

    def open_stage(self, index: int) -> None:
        cfg, fabric = self.cfg, self.fabric
        self.stage_index = index
        frames, size, batch_size = self._stage_geometry(index)
        dataset = build_clip_dataset(cfg.data.train, frames, size, self.frame_rule, cfg.seed + index)
        saved = self.saved.get("video")
        position = StreamPosition(saved["epoch"], saved["consumed"]) if saved and saved["stage"] == index else None
        self.videos = BatchStream(
            dataset,
            batch_size,
            cfg.optim.grad_accum,
            fabric.global_rank,
            fabric.world_size,
            seed=cfg.seed + index,
            num_workers=cfg.data.train.num_workers,
            position=position,
        )

    def optimizer_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; a non-finite loss or gradient skips the update."""
        cfg, fabric, model = self.cfg, self.fabric, self.model
        latent = self.latents is not None and self.step % cfg.latent_finetune.every == cfg.latent_finetune.every - 1
        stream = self.latents if latent else self.videos
        accum, finite = cfg.optim.grad_accum, True
        out = {"samples": 0.0, "frames": 0.0, "skipped": 0.0}
        for m in range(accum):
            batch = fabric.to_device(next(stream))
            out["skipped"] += float(batch["skipped"].sum())
            if not finite:  # the step is lost anyway; keep consuming data so the layout stays aligned
                continue
            generator = step_generator(cfg.seed, self.step, fabric.global_rank * accum + m)
            with fabric.no_backward_sync(model, enabled=m < accum - 1):
                if latent:
                    parts, sample = latent_loss(
                        model, batch, self.loss_fn, generator, cfg.latent_finetune.reversed_prob
                    )
                    loss = parts["loss"] * cfg.latent_finetune.weight
                else:
                    parts, sample = video_loss(model, batch, self.loss_fn, generator)
                    loss = parts["loss"]
                finite = fabric.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
                if finite:
                    fabric.backward(loss / accum)
            prefix = "latent/" if latent else "train/"
            for key, value in parts.items():
                out[prefix + key] = out.get(prefix + key, 0.0) + value.item() / accum
            out["samples"] += sample.shape[0]
            out["frames"] += sample.shape[0] * sample.shape[2]
        if finite:
            finite = self._clip_and_step(out)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn that the schedule runs ahead
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.guard.update(finite, self.step, "loss or gradient norm")
        return out

    def _clip_and_step(self, out: dict[str, float]) -> bool:
        if not self.cfg.fabric.strategy.startswith("deepspeed"):  # DeepSpeed clips inside its own step
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else float("inf")
            norm = self.fabric.clip_gradients(self.model, self.optimizer, max_norm=max_norm, error_if_nonfinite=False)
            out["train/grad_norm"] = float(norm)
            if not torch.isfinite(norm):
                return False
        self.optimizer.step()
        return True

    # --- between steps ----------------------------------------------------------------------------------------
    def after_step(self, parts: dict[str, float], bar: Any) -> None:
        cfg, step = self.cfg, self.step
        for key, value in parts.items():
            self.meter.setdefault(key, []).append(value)
        if bar is not None:
            _tick(bar, parts.get("train/loss", parts.get("latent/loss", float("nan"))))
        if step % cfg.logging.every_steps == 0:
            self.log_metrics()
        if cfg.data.val is not None and step % cfg.validation.every_steps == 0:
            self.validate(tag="step")
        if step % cfg.logging.image_every_steps == 0:
            self.image()
        if step % cfg.checkpoint.every_steps == 0:
            self.save_checkpoint()
        self.fabric.call("on_train_step_end", fabric=self.fabric, step=step, model=self.model)

    def log_metrics(self) -> None:
        """Means since the last log (averaged over ranks), learning rates, throughput, skipped samples."""
        fabric, meter = self.fabric, self.meter
        elapsed, self.last_log = time.time() - self.last_log, time.time()
        counts = torch.tensor(
            [sum(meter.get(k, [0.0])) for k in ("samples", "frames", "skipped")], device=fabric.device
        )
        samples, frames, skipped = fabric.all_reduce(counts, reduce_op="sum").tolist()
        names = sorted(k for k in meter if "/" in k)
        means = torch.tensor([sum(meter[k]) / len(meter[k]) for k in names], device=fabric.device)
        metrics = dict(zip(names, fabric.all_reduce(means, reduce_op="mean").tolist()))
        self.skipped_total += int(skipped)
        metrics.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)})
        metrics.update(
            {
                "throughput/samples_per_s": samples / elapsed,
                "throughput/frames_per_s": frames / elapsed,
                "time/step_s": elapsed / max(1, len(meter.get("samples", []))),
                "data/skipped_samples": float(self.skipped_total),
                "train/nonfinite_steps": float(self.guard.total),
                "stage": float(self.stage_index),
            }
        )
        self._log(metrics)
        if "train/loss" in metrics:
            self.progress["history"]["train"].append([self.step, metrics["train/loss"]])
        self.meter = {}

    def validate(self, tag: str) -> dict[str, float]:
        clips = self._preview_clips()
        metrics, _ = validate(self.model, clips, self.metric_lpips, self.fabric.device)
        self._log({f"val/{k}": v for k, v in metrics.items()})
        self.progress["history"]["val"].append({"step": self.step, "tag": tag, **metrics})
        self.fabric.print(
            f"validation at step {self.step}: "
            + ", ".join(
                f"{k} {v:.4f}"
                for k, v in metrics.items()
                if k in ("psnr", "psnr_reference", "psnr_others", "ssim", "l1")
            )
        )
        return metrics

    def image(self) -> None:
        clips = self._preview_clips()
        first = {key: value[:1] for key, value in clips.items()}
        metrics, (reference, target, recon) = validate(self.model, first, None, self.fabric.device)
        if self.fabric.is_global_zero:
            title = f"step {self.step}, PSNR {metrics['psnr']:.2f} dB"
            grid = image_grid(reference, target, recon, self.cfg.logging.image_frames, title=title)
            path = Path(self.cfg.run_dir) / "images" / f"step-{self.step:09d}.png"
            self.paths["image"] = log_image(self.loggers, "reconstruction", grid, self.step, path)

    def save_checkpoint(self) -> Path:
        fabric = self.fabric
        if self.meter:  # counters in the checkpoint must include every step it covers
            self.log_metrics()
        mine = {"rng": rng_state(), "video": None, "latent": None}
        if self.videos is not None:
            mine["video"] = {"stage": self.stage_index, **self.videos.state()}
        if self.latents is not None:
            mine["latent"] = self.latents.state()
        self.progress.update(
            step=self.step,
            ranks=gather_objects(fabric, mine),
            nonfinite=self.guard.state_dict(),
            skipped=self.skipped_total,
            model_keys=sorted(self.model_keys),
            config=config_to_dict(self.cfg),
        )
        keys = self.model_keys
        path = self.ckpts.save(
            self.step,
            lambda target: fabric.save(target, self.state, filter={"model": lambda key, _: key in keys}),
            fabric.is_global_zero,
            fabric.barrier,
        )
        self.paths["checkpoint"] = path
        return path

    # --- the end ------------------------------------------------------------------------------------------------
    def finish(self, started: float) -> None:
        """Final checkpoint, validation and image, ``save_pretrained`` export, ``metrics.json``; print the paths."""
        fabric, cfg, run_dir = self.fabric, self.cfg, Path(self.cfg.run_dir)
        self.save_checkpoint()
        final = {}
        if cfg.data.val is not None:
            last = self.progress["history"]["val"][-1] if self.progress["history"]["val"] else {}
            final = last if last.get("step") == self.step else self.validate(tag="end")
            final = {k: v for k, v in final.items() if k not in ("step", "tag")}
        if "image" not in self.paths or self.step % cfg.logging.image_every_steps != 0:
            self.image()
        if fabric.is_global_zero:
            export = export_run(cfg, self.model, self.paths["checkpoint"])
            ends = [sum(s.steps for s in cfg.stages[: i + 1]) for i in range(len(cfg.stages))]
            summary = summarize(self.progress["history"], ends, final, self.guard.total, time.time() - started)
            self.paths["metrics"] = write_json(run_dir / "metrics.json", summary)
            paths = {**self.paths, "weights": export, "logs": run_dir / "logs"}
            fabric.print(print_summary(summary, paths, cfg.model.kind))

    # --- helpers ------------------------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)

    def _latent_stream(self) -> BatchStream | None:
        lf, fabric = self.cfg.latent_finetune, self.fabric
        if not lf.enabled:
            return None
        saved = self.saved.get("latent")
        return BatchStream(
            build_latent_dataset(lf, self.cfg.seed),
            lf.batch_size,
            self.cfg.optim.grad_accum,
            fabric.global_rank,
            fabric.world_size,
            seed=self.cfg.seed,
            position=StreamPosition(**saved) if saved else None,
        )

    def _stage_geometry(self, index: int) -> tuple[int, tuple[int, int], int]:
        stage, data = self.cfg.stages[index], self.cfg.data
        return stage.frames, tuple(stage.size or data.size), stage.batch_size or data.batch_size

    def _clip_shape(self) -> str:
        frames, (h, w), batch = self._stage_geometry(self.stage_index)
        return f"clips {batch} x {frames} x {h}x{w} per device"

    def _preview_clips(self) -> dict[str, Any]:
        """Held-out clips (or, without validation data, a fixed training batch) at the current clip geometry."""
        cfg = self.cfg
        frames, size, _ = self._stage_geometry(self.stage_index)
        frames = cfg.validation.frames or frames
        key = (frames, size)
        if key not in self.preview:
            source = cfg.data.val or cfg.data.train
            clips = None
            if self.fabric.is_global_zero:  # shards split by rank, so rank 0 reads and shares the same clips
                dataset = build_clip_dataset(source, frames, size, self.frame_rule, cfg.seed)
                clips = take_samples(dataset, cfg.validation.clips)
            self.preview[key] = self.fabric.broadcast(clips)
        return self.preview[key]


def _tick(bar: Any, loss: float) -> None:
    bar.set_postfix(loss=f"{loss:.4f}")
    bar.update(1)


def _progress_bar(fabric: Any, cfg: TrainConfig, step: int) -> Any:
    if not (fabric.is_global_zero and cfg.logging.progress_bar):
        return None
    what = "baseline" if cfg.model.kind == "plain" else "RefDecoder"
    return progress(cfg.total_steps, f"train {what}", unit="step", initial=step)


if __name__ == "__main__":
    sys.exit(main())
