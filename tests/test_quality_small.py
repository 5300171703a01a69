"""benchmarks/quality_small.py: settings, shot cuts, clip plans, and a micro end-to-end run on the bundled clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import refdecoder
from benchmarks import _quality_small_data as qd
from benchmarks import quality_small as qs
from refdecoder.data import bundled_clips, read_clip
from refdecoder.errors import ConfigError
from tests.helpers import randomize_, tiny_wan

CROP, FRAMES, EVAL_FRAMES = 32, 5, 9


def micro_config(folder: Path) -> Path:
    """The real recipe shrunk to seconds: bundled 64x96 clips at 32x48, 5 / 9-frame clips, 3 / 2 steps."""
    raw = yaml.safe_load(qd.CONFIG.read_text())
    clips = {p.stem: str(p) for p in bundled_clips()}
    raw["threads"] = 1
    raw["data"] |= {
        "short_side": 32,
        "crop": CROP,
        "pretrain_frames": FRAMES,
        "train_frames": FRAMES,
        "eval_frames": EVAL_FRAMES,
        "frame_stride": 1,
    }
    raw["data"]["sources"] = [
        {"name": "bikes", "file": clips["bikes"], "train": [[0, 15]], "heldout": [[16, 25]]},
        {"name": "bigbuckbunny", "file": clips["bigbuckbunny"], "train": [[0, 15]], "heldout": [[16, 25]]},
        {"name": "carphone", "file": clips["carphone"], "train": [], "heldout": [[0, 10]]},
    ]
    raw["vae"] = {"base_dim": 8, "z_dim": 4, "num_res_blocks": 1}
    raw["pretrain"] |= {"steps": 3, "warmup": 1}
    raw["finetune"] |= {"steps": 2, "warmup": 1}
    path = folder / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def psnr_np(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-frame PSNR of ``3, T, H, W`` arrays in [-1, 1], by the textbook formula on [0, 1] values."""
    x, y = (np.clip(pred, -1, 1) + 1) / 2, (target + 1) / 2
    return 10 * np.log10(1.0 / ((x - y) ** 2).mean(axis=(0, 2, 3)))


# --- settings and clips -------------------------------------------------------------------------------------------
def test_recipe_loads_quick_and_overrides_apply() -> None:
    full = qd.load_settings()
    quick = qd.load_settings(quick=True, overrides=("finetune.steps=7", "eval.grid_clips=1"))
    raw = yaml.safe_load(qd.CONFIG.read_text())
    assert full.data.crop == raw["data"]["crop"] and quick.data.crop == raw["quick"]["data.crop"]
    assert quick.finetune.steps == 7 and quick.eval.grid_clips == 1
    assert [v["name"] for v in full.finetune.variants] == [v["name"] for v in raw["finetune"]["variants"]]
    with pytest.raises(ConfigError, match="finetune.stepz"):
        qd.load_settings(overrides=("finetune.stepz=7",))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        qd.load_settings(overrides=("finetune.steps",))


def test_config_rejects_missing_keys_and_train_heldout_overlap(tmp_path: Path) -> None:
    raw = yaml.safe_load(qd.CONFIG.read_text())
    del raw["pretrain"]["lr"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="missing \\['lr'\\]"):
        qd.load_settings(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="overlaps"):
        qd.DataSettings(
            128, 64, 9, 5, 9, 2, 0.3, [{"name": "v", "file": "x", "train": [[0, 50]], "heldout": [[40, 60]]}]
        )


def test_find_cuts_and_shots() -> None:
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([40] * 7 + [200] * 5 + [90] * 8, dtype=torch.float32)  # shots start at 0, 7, 12
    frames = (levels.view(1, -1, 1, 1) + torch.randint(-3, 4, (3, 20, 8, 8), generator=g)).to(torch.uint8)
    assert qd.find_cuts(frames, threshold=0.3) == [7, 12]
    assert qd.shots([[0, 20]], [7, 12]) == [(0, 7), (7, 12), (12, 20)]
    assert qd.shots([[3, 10], [15, 18]], [7, 12]) == [(3, 7), (7, 10), (15, 18)]


def test_crop_positions_by_hand() -> None:
    assert qd.crop_positions(301, 64) == [0, 79, 158, 237]  # 4 crops, (301 - 64) / 3 = 79 apart
    assert qd.crop_positions(128, 64) == [0, 64]
    assert qd.crop_positions(100, 64) == [0]


def test_clip_plans_stay_in_their_ranges_and_shots(tmp_path: Path) -> None:
    settings = qd.load_settings(micro_config(tmp_path))
    frames = torch.zeros(3, 25, 32, 48, dtype=torch.uint8)
    videos = [qd.Video(s["name"], frames, cuts=[9]) for s in settings.data.sources]
    plan = qd.train_plan(videos, settings, "finetune", steps=50, batch=2, frames=FRAMES)
    assert plan == qd.train_plan(videos, settings, "finetune", steps=50, batch=2, frames=FRAMES)
    assert plan != qd.train_plan(videos, settings, "pretrain", steps=50, batch=2, frames=FRAMES)
    span = settings.data.span(FRAMES)
    for v, t0, top, left, ref in (clip for step in plan for clip in step):
        assert settings.data.sources[v]["name"] != "carphone"
        assert t0 + span <= 15 and (t0 + span <= 9 or t0 >= 9)  # inside the train range, never across the cut
        assert 0 <= top <= 32 - CROP and 0 <= left <= 48 - CROP and 0 <= ref < FRAMES
    clips = qd.eval_plan(videos, settings)
    assert clips == [(0, 16, 0, 0), (1, 16, 0, 0), (2, 0, 0, 0)]  # held-out only; carphone's cut at 9 ends a clip


def test_evaluation_conditions_on_frame_zero() -> None:
    model = refdecoder.wrap(tiny_wan(), "tiny").eval()
    randomize_(model.projectors)  # leave the zero-init identity, so the reference changes the output
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode(video)
    out = qs.reconstruct(model, latents, video)
    assert torch.equal(out, model.decode(latents, reference=video[:, :, :1]))
    assert not torch.allclose(out, model.decode(latents, reference=video[:, :, 1:2]), atol=1e-4)
    assert torch.equal(qs.reconstruct(model.vae, latents, video), model.vae.decode(latents).sample)


def test_training_reference_is_the_planned_frame_or_frame_zero() -> None:
    video = torch.arange(2 * 3 * 5 * 2 * 2, dtype=torch.float32).reshape(2, 3, 5, 2, 2)
    step_plan = [(0, 0, 0, 0, 3), (1, 4, 0, 0, 1)]  # (video, t0, top, left, reference index)
    random = qs.training_reference(video, step_plan, "random")
    assert random.shape == (2, 3, 1, 2, 2)
    assert torch.equal(random[0, :, 0], video[0, :, 3]) and torch.equal(random[1, :, 0], video[1, :, 1])
    assert torch.equal(qs.training_reference(video, step_plan, "first"), video[:, :, :1])
    with pytest.raises(ConfigError, match=r"random\|first"):
        qd.load_settings(overrides=("finetune.reference=last",))


def test_results_copy_accepts_a_folder_or_a_file(tmp_path: Path) -> None:
    assert qs.results_file(str(tmp_path)) == tmp_path / "quality_small.json"
    assert qs.results_file(f"{tmp_path}/new/") == tmp_path / "new" / "quality_small.json"
    assert qs.results_file(f"{tmp_path}/mine.json") == tmp_path / "mine.json"


# --- micro end-to-end run -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("quality_small")
    config, out = micro_config(folder), folder / "out"
    return config, out, qs.main(["--config", str(config), "--out", str(out)])


def test_micro_run_writes_every_output(micro: tuple[Path, Path, dict]) -> None:
    _, out, doc = micro
    assert (out / "vae_pretrained" / "config.json").is_file() and (out / "baseline" / "config.json").is_file()
    for name, p_max in (("refdecoder_tiny", 0.7), ("refdecoder_tiny_nodrop", 0.0)):
        config = json.loads((out / name / "refdecoder_config.json").read_text())
        assert config["dropout"]["p_max"] == p_max and config["train_decoder"] is True
    assert (out / qs.GRID).stat().st_size > 0
    assert json.loads((out / qs.RESULTS).read_text())["eval"] == json.loads(json.dumps(doc["eval"]))
    assert len({log["data_order"] for log in doc["finetune"].values()}) == 1  # same clips, same order
    assert doc["eval"]["lpips"] in ("alex", "n/a (no trunk weights)", "n/a (lpips not installed)")
    models = doc["eval"]["models"]
    gain = doc["gains"]["refdecoder_tiny - baseline"]
    assert gain["psnr_reference"] == pytest.approx(
        models["refdecoder_tiny"]["psnr_reference"] - models["baseline"]["psnr_reference"]
    )


def test_saved_models_reproduce_the_reported_psnr(micro: tuple[Path, Path, dict]) -> None:
    from diffusers import AutoencoderKLWan

    _, out, doc = micro
    # The first held-out clip is bikes frames 16..24, crop (0, 0), read here independently of the benchmark.
    assert doc["data"]["eval_clips"][0] == [0, 16, 0, 0]
    bikes = next(p for p in bundled_clips() if p.stem == "bikes")
    clip = read_clip(bikes, range(16, 16 + EVAL_FRAMES), (32, 48), "resize")[None, :, :, :CROP, :CROP]
    vae = AutoencoderKLWan.from_pretrained(out / "vae_pretrained").eval()
    baseline = AutoencoderKLWan.from_pretrained(out / "baseline").eval()
    with torch.no_grad():
        latents = vae.encode(clip).latent_dist.mode()
        plain = baseline.decode(latents).sample
        conditioned = refdecoder.load(vae, out / "refdecoder_tiny").eval().decode(latents, reference=clip[:, :, :1])
    for name, pred in (("baseline", plain), ("refdecoder_tiny", conditioned)):
        per_frame = psnr_np(pred[0].numpy(), clip[0].numpy())
        assert doc["eval"]["models"][name]["per_clip_psnr"][0] == pytest.approx(per_frame.mean(), abs=2e-3)


def test_cached_phases_are_reused_and_deterministic(micro: tuple[Path, Path, dict], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config, out, doc = micro
    again = qs.main(["--config", str(config), "--out", str(out), "--phase", "eval"])
    assert again["eval"]["models"] == json.loads(json.dumps(doc["eval"]["models"]))
    with pytest.raises(ConfigError, match="other settings"):
        qs.main(["--config", str(config), "--out", str(out), "--phase", "eval", "--set", "pretrain.lr=0.5"])
    qs.main(["--config", str(config), "--out", str(tmp_path), "--phase", "pretrain"])
    first = load_file(out / "vae_pretrained" / "diffusion_pytorch_model.safetensors")
    second = load_file(tmp_path / "vae_pretrained" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
