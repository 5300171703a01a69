"""The Fabric recipe on the HunyuanVideo (v1 and 1.5), LTX-Video, CogVideoX, Stable Video Diffusion, Qwen-Image 2.1
(its RGB variant) and MiniMax-H3 backbones:
each tiny config in recipes/configs trains 5 steps on the bundled clips with a falling loss, and its exported weights
reload onto the run's VAE."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import refdecoder
from refdecoder.inference.loading import load_vae
from refdecoder.training.config import load_config
from tests.test_training_recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = (
    "hunyuan-video-1.5", "ltx-video", "cogvideox", "hunyuan-video", "stable-video-diffusion", "qwen-image-2.1",
    "minimax-h3",
)  # fmt: skip


def _config(name: str) -> str:
    return str(ROOT / "recipes" / "configs" / f"{name}-tiny.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from refdecoder.training.config import DatasetConfig
    from refdecoder.training.data import ensure_sample_shards

    out = tmp_path_factory.mktemp("data") / "train"
    ensure_sample_shards(DatasetConfig(kind="shards", path=str(out), samples=["bigbuckbunny", "bikes"]))
    return out


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", BACKBONES)
def test_tiny_config_trains_with_a_falling_loss_and_reloads(name, tmp_path, shards):
    run_dir = tmp_path / "run"
    assert load_recipe().main([_config(name), f"run_dir={run_dir}", f"data.train.path={shards}"]) == 0
    rows = list(csv.DictReader((run_dir / "logs" / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 5 and losses[-1] < losses[0], losses

    vae = load_vae(run_dir / "vae")  # the run's (random tiny) VAE, saved as a diffusers folder
    model = refdecoder.load(vae, run_dir / "refdecoder")
    assert model.adapter.name == name
    saved = load_file(run_dir / "refdecoder" / "refdecoder.safetensors")
    state = model.refdecoder_state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    rule = model.adapter.frame_rule
    z = model.encode(torch.zeros(1, 3, rule.first + rule.step, 32, 32))
    with torch.no_grad():
        trained = model.decode(z, reference=torch.zeros(1, 3, 32, 32))
    assert trained.shape[2] == rule.first + rule.step


@pytest.mark.parametrize("name", ("ltx-video", "cogvideox"))
def test_the_frame_rule_of_the_adapter_drives_the_clip_lengths(name, tmp_path, shards, capsys):
    cfg = load_config(_config(name), [])
    assert cfg.stages[0].frames == 9  # 1 + 8k for both
    args = [
        _config(name),
        f"run_dir={tmp_path / 'run'}",
        f"data.train.path={shards}",
        "stages=[{steps: 1, frames: 5}]",
    ]
    assert load_recipe().main(args) == 1
    assert "1 + 8k" in capsys.readouterr().err


def test_hunyuan_video_refuses_clip_lengths_off_1_plus_4k(tmp_path, shards, capsys):
    args = [
        _config("hunyuan-video"),
        f"run_dir={tmp_path / 'run'}",
        f"data.train.path={shards}",
        "stages=[{steps: 1, frames: 6}]",
    ]
    assert load_recipe().main(args) == 1
    err = capsys.readouterr().err
    assert "1 + 4k" in err and len(err.strip().splitlines()) == 1


def test_minimax_h3_refuses_clip_lengths_off_22_plus_17k(tmp_path, shards, capsys):
    cfg = load_config(_config("minimax-h3"), [])
    assert cfg.stages[0].frames == 22  # the shortest encoded clip: 7 latent frames
    args = [
        _config("minimax-h3"),
        f"run_dir={tmp_path / 'run'}",
        f"data.train.path={shards}",
        "stages=[{steps: 1, frames: 17}]",
    ]
    assert load_recipe().main(args) == 1
    err = capsys.readouterr().err
    assert "22 + 17k" in err and len(err.strip().splitlines()) == 1


def test_the_rgba_qwen_image_2_1_vae_refuses_rgb_clips_in_one_line(tmp_path, shards, capsys):
    args = [_config("qwen-image-2.1"), f"run_dir={tmp_path / 'run'}", f"data.train.path={shards}", "model.vae.tiny={}"]
    assert load_recipe().main(args) == 1  # the released layout: RGBA in and out, and the bundled clips are RGB
    err = capsys.readouterr().err
    assert "(B, 4, T, H, W)" in err and len(err.strip().splitlines()) == 1
