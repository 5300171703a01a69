"""The Fabric recipe end to end at tiny sizes: exact resume after SIGKILL, SIGTERM checkpointing, non-finite
steps, latent finetuning, config-registered components; and the recipe's validation and image grid helpers."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from refdecoder.training.loggers import image_grid
from refdecoder.training.steps import validate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"
TINY = str(ROOT / "recipes" / "configs" / "tiny.yaml")

# Launched as a script (Fabric's DDP launcher re-runs the script for the other ranks). The probe records the
# trained parameters after each step and can SIGKILL the process right after a given step's checkpoint.
WORKER = """
import importlib.util, os, signal, sys
import torch
torch.set_num_threads(int(os.environ["REFDECODER_TEST_THREADS"]))
spec = importlib.util.spec_from_file_location("train_recipe", {recipe!r})
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


class Probe:
    def on_train_step_end(self, fabric, step, model):
        out = os.environ.get("REFDECODER_TEST_RECORD")
        if out:
            flat = torch.cat([p.detach().flatten() for p in model.trainable_parameters()])
            torch.save(flat, os.path.join(out, f"rank{{fabric.global_rank}}-step{{step}}.pt"))
        if step == int(os.environ.get("REFDECODER_TEST_KILL_AT", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)


sys.exit(recipe.main(sys.argv[1:], callbacks=[Probe()]))
"""


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """In-process probe: trained parameters after every step."""

    def __init__(self) -> None:
        self.params: dict[int, torch.Tensor] = {}

    def on_train_start(self, step, model):
        self.on_train_step_end(step, model)

    def on_train_step_end(self, step, model):
        self.params[step] = torch.cat([p.detach().flatten().clone() for p in model.trainable_parameters()])


def tiny_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The tiny recipe shrunk to seconds: 16x16 clips, a random tiny VAE, the tiny preset with 1 layer and token
    dropout, no pretraining, no validation, no comparison."""
    return [
        f"run_dir={run_dir}",
        f"data.train.path={shards}",
        "data.val=null",
        "data.size=[16, 16]",
        "data.batch_size=1",
        "model.vae.source=tiny",
        "model.vae.tiny={}",
        "model.vae.pretrain.steps=0",
        "model.refdecoder={train_decoder: true, dropout: {p_max: 0.7}, transformer: {depth: 1}}",
        "compare.enabled=false",
        "compare.baseline=false",
        "stages=[{name: short, steps: 2, frames: 5}, {name: long, steps: 4, frames: 9}]",
        "schedule.warmup_steps=2",
        "checkpoint.every_steps=3",
        "logging.every_steps=1",
        "logging.image_every_steps=100",
        "logging.progress_bar=false",
        "logging.loggers=[csv]",
        *extra,
    ]


def run_worker(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(recipe=str(RECIPE)))
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REFDECODER_TEST_THREADS": str(torch.get_num_threads()),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(script), *args], env=full_env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The tiny config sets ``fabric.cpu_threads``; in-process runs must not change it for later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Sample shards of the bundled clips, built once by the recipe's own first-run logic."""
    from refdecoder.training.config import DatasetConfig
    from refdecoder.training.data import ensure_sample_shards

    out = tmp_path_factory.mktemp("data") / "train"
    ensure_sample_shards(DatasetConfig(kind="shards", path=str(out), samples=["bigbuckbunny", "bikes", "carphone"]))
    return out


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "refdecoder" / "refdecoder.safetensors")


def test_resume_after_sigkill_is_exact(tmp_path, shards):
    recipe = load_recipe()
    extra = ["optim.grad_accum=2"]  # accumulation, dropout draws and the stage switch all have to line up
    straight = tmp_path / "straight"
    assert recipe.main([TINY, *tiny_overrides(straight, shards, *extra)]) == 0

    killed = tmp_path / "killed"
    proc = run_worker(tmp_path, [TINY, *tiny_overrides(killed, shards, *extra)], {"REFDECODER_TEST_KILL_AT": "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000000003.ckpt"]
    assert not (killed / "refdecoder").exists()

    assert recipe.main([TINY, *tiny_overrides(killed, shards, *extra), "--resume", "auto"]) == 0
    a, b = exported(straight), exported(killed)
    assert a.keys() == b.keys() and any(k.startswith("vae.decoder.") for k in a)  # decoder trained too
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["projectors.stage0.out.weight"], torch.zeros_like(a["projectors.stage0.out.weight"]))


class SignalAt:
    """Sends ``signum`` to this process after step ``step`` (the recipe's handler turns it into a stop request)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_step_end(self, step):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_checkpoints_and_stops(tmp_path, shards, capsys):
    recipe = load_recipe()
    run_dir = tmp_path / "run"
    args = [TINY, *tiny_overrides(run_dir, shards, "checkpoint.every_steps=100")]
    assert recipe.main(args, callbacks=[SignalAt(2)]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().out
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000000002.ckpt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the recipe's handler is gone again


def test_fresh_start_refuses_to_overwrite_checkpoints(tmp_path, shards, capsys):
    recipe = load_recipe()
    args = [TINY, *tiny_overrides(tmp_path / "run", shards, "stages=[{steps: 1, frames: 5}]")]
    assert recipe.main(args) == 0
    assert recipe.main([*args, "--resume", "none"]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err


class PoisonLatents(nn.Module):
    """A latent component (registered through the config) that makes the first ``count`` training steps NaN."""

    def __init__(self, count: int = 1) -> None:
        super().__init__()
        self.count, self.calls = count, 0

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self.training:
            return x
        self.calls += 1
        return x * float("nan") if self.calls <= self.count else x


POISON = "tests.test_training_recipe:PoisonLatents"


def test_non_finite_step_is_skipped_and_counted(tmp_path, shards):
    recipe = load_recipe()
    run_dir, probe = tmp_path / "run", Recorder()
    component = f"model.latent_components=[{{name: poison, target: '{POISON}', args: {{count: 1}}}}]"
    args = [TINY, *tiny_overrides(run_dir, shards, component, "stages=[{steps: 3, frames: 5}]")]
    assert recipe.main(args, callbacks=[probe]) == 0
    assert torch.equal(probe.params[1], probe.params[0])  # step 1 (NaN) changed nothing
    assert not torch.equal(probe.params[2], probe.params[1]) and torch.isfinite(probe.params[3]).all()
    import json

    assert json.loads((run_dir / "metrics.json").read_text())["nonfinite_steps"] == 1


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, shards, capsys):
    recipe = load_recipe()
    component = f"model.latent_components=[{{name: poison, target: '{POISON}', args: {{count: 10}}}}]"
    args = [TINY, *tiny_overrides(tmp_path / "run", shards, component, "optim.max_nonfinite=2")]
    assert recipe.main(args) == 1
    assert "2 optimizer steps in a row (up to step 1) had a non-finite" in capsys.readouterr().err


def test_latent_finetuning_alternates_with_video_steps(tmp_path, shards):
    from refdecoder.data import save_latents, write_image

    folder = tmp_path / "latents"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        image = write_image(folder / f"gen{i}.png", torch.rand(3, 16, 16, generator=g) * 2 - 1)
        save_latents(
            folder / f"gen{i}.safetensors",
            torch.randn(4, 2, 2, 2, generator=g),
            image,
            height=16,
            width=16,
            normalized=bool(i),
        )
    recipe = load_recipe()
    run_dir = tmp_path / "run"
    args = [
        TINY,
        *tiny_overrides(
            run_dir,
            shards,
            "latent_finetune.enabled=true",
            f"latent_finetune.path={folder}",
            "latent_finetune.reversed_prob=0.5",
            "stages=[{steps: 4, frames: 5}]",
        ),
    ]
    assert recipe.main(args) == 0
    import csv

    rows = list(csv.DictReader((run_dir / "logs" / "csv" / "metrics.csv").open()))
    latent_steps = [int(r["step"]) for r in rows if r.get("latent/loss")]
    video_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert latent_steps == [2, 4] and video_steps == [1, 3]  # every 2nd step is a latent step
    assert all(float(r["latent/loss"]) > 0 for r in rows if r.get("latent/loss"))


def test_latent_loss_compares_the_reference_frame_only():
    import refdecoder
    from refdecoder.losses import ReconstructionLoss
    from refdecoder.training.steps import latent_loss

    torch.manual_seed(0)
    vae = refdecoder.get_backbone("wan2.1").build_tiny()
    config = refdecoder.preset("tiny")
    config.dropout.p_max = 0.0
    model = refdecoder.wrap(vae, config)
    latents, reference = torch.randn(1, 4, 2, 2, 2), torch.rand(1, 3, 1, 16, 16) * 2 - 1
    batch = {"latents": latents, "reference": reference, "normalized": torch.tensor([False])}
    g = torch.Generator().manual_seed(0)
    parts, _ = latent_loss(model, batch, ReconstructionLoss(lpips_weight=0), g)
    with torch.no_grad():
        first = model.decode(latents, reference, clamp=False)[:, :, :1]
    assert parts["loss"].item() == pytest.approx((first - reference).abs().mean().item(), rel=1e-5)

    parts, sample = latent_loss(model, batch, ReconstructionLoss(lpips_weight=0), g, reversed_prob=1.0)
    with torch.no_grad():
        flipped = model.encode(vae.decode(latents).sample.clamp(-1, 1).flip(2))
        last = model.decode(flipped, reference, clamp=False)[:, :, -1:]
    assert parts["loss"].item() == pytest.approx((last - reference).abs().mean().item(), rel=1e-5)


class _ShiftModel(nn.Module):
    """Reconstruction = clip + 0.1 on the reference frame, + 0.02 elsewhere (in [-1, 1] units)."""

    def forward(self, video, reference_index=None):
        shift = torch.full_like(video, 0.02)
        shift[torch.arange(video.shape[0]), :, reference_index] = 0.1
        return SimpleNamespace(sample=video + shift)


def test_validate_splits_reference_and_other_frames():
    video = torch.rand(2, 3, 5, 16, 16) * 1.6 - 0.8  # stays inside [-1, 1] after the shift
    clips = {"video": video, "reference_index": torch.tensor([0, 3])}
    metrics, (reference, target, recon) = validate(_ShiftModel(), clips)

    def psnr(shift):  # metrics work on [0, 1] values: a shift s in [-1, 1] is s / 2 there
        return 10 * torch.log10(torch.tensor(1 / (shift / 2) ** 2)).item()

    assert metrics["psnr_reference"] == pytest.approx(psnr(0.1), abs=1e-3)
    assert metrics["psnr_others"] == pytest.approx(psnr(0.02), abs=1e-3)
    assert metrics["l1"] == pytest.approx((0.1 + 4 * 0.02) / 5, rel=1e-4)
    assert torch.equal(reference, video[0, :, 0]) and torch.equal(target, video[0])


def test_image_grid_layout():
    t, h, w = 9, 8, 10
    target, recon = torch.rand(3, t, h, w), torch.rand(3, t, h, w) * 4 - 2
    reference = torch.rand(3, 1, h, w)
    grid = image_grid(reference, target, recon, frames=3, min_width=w)
    header = grid.shape[1] - 3 * h
    assert grid.shape[::2] == (3, 3 * w) and header > 0  # a label strip above the frames
    for row, frame in enumerate([0, 4, 8]):  # evenly spaced frames
        block = grid[:, header + row * h : header + (row + 1) * h]
        assert torch.equal(block[:, :, :w], reference[:, 0])
        assert torch.equal(block[:, :, w : 2 * w], target[:, frame])
        assert torch.equal(block[:, :, 2 * w :], recon[:, frame].clamp(-1, 1))


def test_image_grid_is_labelled_and_enlarged():
    from refdecoder.media import label_strip

    t, h, w = 5, 8, 10
    target, recon, reference = torch.rand(3, t, h, w), torch.rand(3, t, h, w), torch.rand(3, h, w)
    grid = image_grid(reference, target, recon, frames=2, title="step 7, PSNR 21.50 dB", min_width=40)
    columns = label_strip(["reference", "target", "reconstruction"], [4 * w] * 3)
    title = label_strip(["step 7, PSNR 21.50 dB"], [12 * w])
    assert torch.equal(grid[:, : title.shape[1]], title)  # title line first, then the column labels
    assert torch.equal(grid[:, title.shape[1] : title.shape[1] + columns.shape[1]], columns)
    assert (title > 0).any() and (columns > 0).any()  # text drawn (the strip is dark elsewhere)
    body = grid[:, title.shape[1] + columns.shape[1] :]
    assert body.shape[1:] == (2 * 4 * h, 3 * 4 * w)  # columns enlarged 4x (nearest) to at least 40 px
    assert torch.equal(body[:, : 4 * h, : 4 * w], reference.repeat_interleave(4, 1).repeat_interleave(4, 2))


def test_config_components_are_registered_before_token_dropout():
    import refdecoder
    from refdecoder.errors import ConfigError
    from refdecoder.training.config import ComponentConfig
    from refdecoder.training.setup import attach_components, saved_model_keys

    torch.manual_seed(0)
    model = refdecoder.wrap(refdecoder.get_backbone("wan2.1").build_tiny(), "tiny")
    module = "refdecoder.blocks.latent_degradation"
    attach_components(
        model,
        [
            ComponentConfig("blur", f"{module}:LatentBlur", {"sigma_range": [0.0, 1.0]}),
            ComponentConfig("lmr", f"{module}.LatentMaskedReconstruction", {"channels": 4}),
        ],
    )
    assert list(model.latent_components) == ["blur", "lmr", "token_dropout"]
    token = model.latent_components["lmr"].mask_token
    assert any(p is token for p in model.param_groups(1e-3)[0]["params"])  # trained at the added modules' lr
    assert "latent_components.lmr.mask_token" in saved_model_keys(model)  # and checkpointed
    with pytest.raises(ConfigError, match="cannot import"):
        attach_components(model, [ComponentConfig("x", "refdecoder.nope:Thing")])
    with pytest.raises(ConfigError, match="used twice"):
        attach_components(model, [ComponentConfig("blur", f"{module}:LatentBlur")])
