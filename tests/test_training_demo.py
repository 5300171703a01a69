"""The main job as a newcomer runs it, shrunk to seconds: ``recipes/train.py recipes/configs/tiny.yaml`` trains a
RefDecoder and the equal-budget baseline, compares them with the VAE on the held-out clip, writes the report, and
prints commands that work when pasted; its run folder is what every CLI command takes. Also: exact resume with
validation and image logging on, and refused resumes that change nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refdecoder.inference.results import read_metrics_csv
from tests.test_training_recipe import RECIPE, TINY, _keep_thread_count, load_recipe, tiny_overrides  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def demo_overrides(root: Path) -> list[str]:
    """tiny.yaml with a random tiny VAE (pretrained 3 steps), 16x16 training clips, 4 steps, a 1-layer transformer."""
    return [
        f"run_dir={root / 'run'}",
        f"data.train.path={root / 'data' / 'train'}",
        f"data.val.path={root / 'data' / 'val'}",
        "model.vae.source=tiny",
        "model.vae.tiny={}",
        "model.vae.pretrain={steps: 3, lr: 1.0e-3, frames: 5, batch_size: 1}",
        "model.refdecoder.transformer.depth=1",
        "data.size=[16, 16]",
        "data.batch_size=1",
        "stages=[{steps: 4, frames: 5}]",
        "schedule.warmup_steps=1",
        "validation.every_steps=2",
        "validation.frames=5",
        "logging.every_steps=1",
        "logging.image_every_steps=2",
        "checkpoint.every_steps=3",
        "compare.frames=9",
        "compare.size=[32, 48]",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo job run once as a user runs it: a subprocess whose output is a pipe (not a terminal)."""
    root = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, str(RECIPE), TINY, *demo_overrides(root)],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


def test_demo_compares_vae_baseline_and_refdecoder(demo) -> None:
    root, proc = demo
    run = root / "run"
    rows = read_metrics_csv(run / "comparison" / "metrics.csv")
    assert [r["name"] for r in rows] == ["carphone"]  # the held-out clip
    row = rows[0]
    for prefix in ("", "base_", "baseline_"):
        assert {f"{prefix}psnr", f"{prefix}psnr_reference", f"{prefix}psnr_others"} <= row.keys()
    for key in ("psnr", "psnr_reference", "psnr_others"):
        assert row[f"gain_{key}"] == pytest.approx(row[key] - row[f"baseline_{key}"], abs=2e-5)
        assert row[f"delta_{key}"] == pytest.approx(row[key] - row[f"base_{key}"], abs=2e-5)
    table = proc.stdout[proc.stdout.index("held-out clips: carphone") :]
    for label, prefix in (
        ("VAE (no fine-tuning)", "base_"),
        ("baseline (plain decoder)", "baseline_"),
        ("RefDecoder", ""),
    ):
        line = next(x for x in table.splitlines() if x.startswith(label))
        assert f"{row[prefix + 'psnr_reference']:.2f} dB" in line
    assert f"{row['gain_psnr_reference']:+.2f} dB reference frame" in table
    for name in ("carphone.source.mp4", "carphone.base.mp4", "carphone.baseline.mp4", "carphone.mp4", "index.html"):
        assert (run / "comparison" / name).is_file(), name
    # The baseline had the same budget: same steps, and it started from the very VAE the RefDecoder run saved.
    base_config = json.loads((run / "baseline" / "config.json").read_text())
    assert (
        base_config["model"]["kind"] == "plain"
        and base_config["stages"] == json.loads((run / "config.json").read_text())["stages"]
    )
    assert base_config["model"]["vae"]["path"] == str(run / "vae")


def test_demo_prints_commands_that_work_when_pasted(demo) -> None:
    root, proc = demo
    command = shlex.split(re.search(r"decode a clip:\s+(refdecoder reconstruct .*)", proc.stdout).group(1))
    script = Path(sys.executable).with_name("refdecoder")  # the console script of this environment
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "refdecoder"]
    pasted = subprocess.run(
        [*program, *command[1:]], cwd=root, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert pasted.returncode == 0, pasted.stderr[-3000:]
    out = root / command[command.index("--out") + 1]
    assert (out / "carphone.mp4").is_file() and (out / "index.html").is_file()
    assert "1 ok, 0 failed" in pasted.stdout
    tensorboard = re.search(r"loss curves:\s+tensorboard --logdir (\S+)", proc.stdout).group(1)
    events = list((root / tensorboard).rglob("events.out.tfevents.*"))
    assert {p.relative_to(root / tensorboard).parts[0] for p in events} == {"logs", "baseline"}


def test_a_run_folder_works_with_every_cli_command(demo) -> None:
    from refdecoder.cli import main
    from refdecoder.data import bundled_clips, save_latents, write_image

    root, _ = demo
    run, clip = root / "run", [p for p in bundled_clips() if p.stem == "carphone"][0]
    common = ["--vae", str(run), "--weights", str(run), "--no-progress"]
    assert main(["reconstruct", str(clip), "--out", str(root / "r"), "--frames", "5", *common]) == 0
    latents_dir = root / "latents"
    latents_dir.mkdir()
    image = write_image(latents_dir / "gen.png", torch.rand(3, 32, 32) * 2 - 1)
    save_latents(latents_dir / "gen.safetensors", torch.randn(4, 2, 4, 4), image, height=32, width=32, normalized=True)
    assert main(["decode-latents", str(latents_dir), "--out", str(root / "d"), *common, "--compare-base"]) == 0
    report = (root / "d" / "index.html").read_text()  # no ground truth: videos and slider, no metrics
    assert 'data-role="base (VAE)"' in report and 'class="slider"' in report and "No metrics" in report
    assert main(["analyze-latents", str(clip), "--vae", str(run), "--out", str(root / "a"), "--no-plots"]) == 0
    assert json.loads((root / "a" / "report.json").read_text())["files"] == [str(clip)]
    # The baseline's run folder is a plain decoder: --vae takes it, --weights says why not.
    assert (
        main(["reconstruct", str(clip), "--out", str(root / "b"), "--frames", "5", "--vae", str(run / "baseline")])
        == 0
    )
    assert (
        main(
            ["reconstruct", str(clip), "--out", str(root / "c"), "--vae", str(run), "--weights", str(run / "baseline")]
        )
        == 1
    )


def test_progress_is_plain_lines_when_not_a_terminal(demo) -> None:
    _, proc = demo
    assert "\r" not in proc.stderr
    assert "VAE pretraining: 3/3 step (100%)" in proc.stderr
    assert re.search(r"train RefDecoder: 4/4 step \(100%\).*loss=", proc.stderr)
    assert re.search(r"train baseline: 4/4 step \(100%\)", proc.stderr)


def test_image_grid_is_labelled_with_step_and_psnr(demo) -> None:
    from refdecoder.data import read_image

    root, _ = demo
    grid = read_image(root / "run" / "images" / "step-000000004.png")
    assert grid.shape[-1] == 3 * 160  # three 16-px columns, enlarged to 160 px for legible labels
    assert grid.shape[-2] > 4 * 160  # four frames under the title and label strips


# --- resume ---------------------------------------------------------------------------------------------------
class StopAt:
    """Sends SIGINT to this process after step ``step`` (the recipe checkpoints and exits 130)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _with_validation(run_dir: Path, shards: Path, val: Path) -> list[str]:
    return [
        TINY,
        *tiny_overrides(
            run_dir,
            shards,
            "stages=[{name: short, steps: 4, frames: 5}, {name: long, steps: 4, frames: 9}]",
            "checkpoint.every_steps=3",
            f"data.val={{kind: shards, path: '{val}', samples: [carphone], reference: 0}}",
            "validation.every_steps=2",
            "validation.frames=5",
            "logging.image_every_steps=2",
        ),
    ]


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from refdecoder.training.config import DatasetConfig
    from refdecoder.training.data import ensure_sample_shards

    out = tmp_path_factory.mktemp("val") / "val"
    ensure_sample_shards(DatasetConfig(kind="shards", path=str(out), samples=["carphone"]))
    return out


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from refdecoder.training.config import DatasetConfig
    from refdecoder.training.data import ensure_sample_shards

    out = tmp_path_factory.mktemp("train") / "train"
    ensure_sample_shards(DatasetConfig(kind="shards", path=str(out), samples=["bigbuckbunny", "bikes"]))
    return out


def test_resume_after_sigint_is_exact_with_validation_and_images(tmp_path, train_shards, val_shards) -> None:
    recipe = load_recipe()
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert recipe.main(_with_validation(straight, train_shards, val_shards)) == 0
    # Step 5 is no multiple of the checkpoint period (3), and lies in the second stage.
    assert recipe.main(_with_validation(stopped, train_shards, val_shards), callbacks=[StopAt(5)]) == 128 + 2
    assert recipe.main([*_with_validation(stopped, train_shards, val_shards), "--resume", "auto"]) == 0
    a, b = (load_file(d / "refdecoder" / "refdecoder.safetensors") for d in (straight, stopped))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    final_a, final_b = (json.loads((d / "metrics.json").read_text())["final"] for d in (straight, stopped))
    assert final_a == final_b and "psnr_reference" in final_a
    grids = sorted(p.name for p in (stopped / "images").iterdir())
    assert grids == sorted(p.name for p in (straight / "images").iterdir())


def test_resume_with_a_changed_model_is_refused_in_one_line(tmp_path, train_shards, val_shards, capfd) -> None:
    recipe = load_recipe()
    run = tmp_path / "run"
    args = _with_validation(run, train_shards, val_shards)
    assert recipe.main([*args, "stages=[{steps: 2, frames: 5}]"]) == 0
    saved = (run / "config.json").read_bytes()
    capfd.readouterr()
    code = recipe.main([*args, "stages=[{steps: 4, frames: 5}]", "model.refdecoder.transformer.depth=3"])
    err = capfd.readouterr().err.strip()
    assert code == 1
    assert err.splitlines() == [err] and "Traceback" not in err  # one line, no traceback
    assert "model.refdecoder.transformer.depth: 1 -> 3" in err
    assert (run / "config.json").read_bytes() == saved  # the refused resume wrote nothing


@pytest.mark.slow
def test_readme_command_1_shows_a_reference_frame_gain(tmp_path) -> None:
    """The README's demo as it is (about 7 minutes on 2 shared CPU cores)."""
    proc = subprocess.run(
        [sys.executable, str(RECIPE), TINY], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = read_metrics_csv(tmp_path / "runs" / "tiny" / "comparison" / "metrics.csv")[0]
    assert row["gain_psnr_reference"] > 0 and row["delta_psnr_reference"] > 0


def test_documented_demo_figures_are_the_recorded_run() -> None:
    """docs/training.md quotes recipes/results/tiny_demo.json (README command 1's output); the README refers to it."""
    record = json.loads((ROOT / "recipes" / "results" / "tiny_demo.json").read_text())
    row = record["comparison"][0]
    docs = (ROOT / "docs" / "training.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for prefix, label in (("base_", "VAE"), ("baseline_", "baseline"), ("", "RefDecoder")):
        cells = " | ".join(f"{row[prefix + k]:.2f}" for k in ("psnr", "psnr_reference", "psnr_others"))
        assert cells in docs and cells not in readme, label  # one source for each figure
    gain = f"{row['gain_psnr_reference']:+.2f} dB"
    assert gain in docs
    minutes = f"{record['seconds'] // 60:.0f} min {record['seconds'] % 60:.0f} s"
    assert minutes in docs and minutes not in readme
    assert "docs/training.md" in readme
