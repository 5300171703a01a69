"""benchmarks/quality_small.py: settings, what is trained on vs held out, rendering, metrics by distance, and a
micro end-to-end run on the bundled clips."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import refdecoder
from benchmarks import quality_small as qs
from benchmarks import quality_small_table as qtable
from benchmarks.quality import data as qd
from benchmarks.quality import evaluation as qe
from benchmarks.quality import settings as qset
from refdecoder.blocks import CorrespondenceEstimate
from refdecoder.data import bundled_clips, read_clip, write_image
from refdecoder.errors import ConfigError
from tests.helpers import randomize_, tiny_wan

CROP, FRAMES, EVAL_FRAMES = 32, 5, 9


def micro_config(folder: Path) -> Path:
    """The real recipe shrunk to seconds: bundled 64x96 clips at 48x72, two photos cut from them, 3 / 2 steps."""
    raw = yaml.safe_load(qset.CONFIG.read_text())
    clips = {p.stem: str(p) for p in bundled_clips()}
    photos = []
    for name, frame in (("bikes", 3), ("bigbuckbunny", 20)):
        image = read_clip(clips[name], [frame], None, "resize")
        photos.append(str(write_image(folder / f"{name}_{frame}.png", image[:, 0])))
    raw["threads"] = 1
    raw["data"] |= {
        "short_side": 48,
        "photo_short_side": 48,
        "crop": CROP,
        "pretrain_frames": FRAMES,
        "train_frames": FRAMES,
        "eval_frames": EVAL_FRAMES,
        "frame_stride": 1,
        "photo_share": 0.3,
    }
    raw["data"]["sources"] = [
        {"name": "bikes", "file": clips["bikes"], "train": [[0, 15]], "heldout": [[16, 25]], "eval": "static"},
        {"name": "bigbuckbunny", "file": clips["bigbuckbunny"], "train": [[0, 15]], "heldout": [[16, 25]],
         "eval": "motion"},
        {"name": "carphone", "file": clips["carphone"], "train": [], "heldout": [[0, 10]], "eval": "static"},
    ]  # fmt: skip
    raw["data"]["photos"] = {"train": photos[:1], "heldout": photos[1:]}
    raw["vae"] = {"base_dim": 8, "z_dim": 4, "num_res_blocks": 1}
    raw["pretrain"] |= {"steps": 3, "warmup": 1}
    raw["finetune"] |= {"steps": 2, "warmup": 1, "reference_distance": 2}
    raw["eval"] |= {"max_clips_per_source": 2, "camera_clips_per_source": 2, "camera_clips_per_photo": 2}
    raw["eval"]["shift_probe"] = {"shifts": [0.5, 1], "crop": [CROP, CROP], "clips_per_source": 1, "token_pixels": 8}
    path = folder / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def micro_media(tmp_path_factory: pytest.TempPathFactory) -> tuple[qset.Settings, qd.Media]:
    settings = qset.load_settings(micro_config(tmp_path_factory.mktemp("media")))
    return settings, qd.load_media(settings.data)


def psnr_np(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-frame PSNR of ``3, T, H, W`` arrays in [-1, 1], by the textbook formula on [0, 1] values."""
    x, y = (np.clip(pred, -1, 1) + 1) / 2, (target + 1) / 2
    return 10 * np.log10(1.0 / ((x - y) ** 2).mean(axis=(0, 2, 3)))


# --- settings: what is trained on vs held out -------------------------------------------------------------------
def test_recipe_loads_quick_and_overrides_apply() -> None:
    full = qset.load_settings()
    quick = qset.load_settings(quick=True, overrides=("finetune.steps=7", "eval.grid_clips=1"))
    raw = yaml.safe_load(qset.CONFIG.read_text())
    assert full.data.crop == raw["data"]["crop"] and quick.data.crop == raw["quick"]["data.crop"]
    assert quick.finetune.steps == 7 and quick.eval.grid_clips == 1
    assert full.finetune.headline in full.finetune.default_variants
    assert full.data.camera.pan == raw["data"]["motion"]["pan"]
    with pytest.raises(ConfigError, match="finetune.stepz"):
        qset.load_settings(overrides=("finetune.stepz=7",))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        qset.load_settings(overrides=("finetune.steps",))


def _raw() -> dict:
    return yaml.safe_load(qset.CONFIG.read_text())


def _load(tmp_path: Path, raw: dict) -> qset.Settings:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return qset.load_settings(tmp_path / "c.yaml")


def test_config_rejects_overlapping_or_reserved_material(tmp_path: Path) -> None:
    raw = _raw()
    del raw["pretrain"]["lr"]
    with pytest.raises(ConfigError, match="missing config key 'pretrain.lr'"):
        _load(tmp_path, raw)
    raw = _raw()
    raw["pretrain"]["lrr"] = 1e-3
    with pytest.raises(ConfigError, match="unknown config key 'pretrain.lrr'; did you mean 'pretrain.lr'"):
        _load(tmp_path, raw)
    raw = _raw()
    raw["data"]["sources"][0]["heldout"] = [[180, 242]]  # bikes trains on 0-187
    with pytest.raises(ConfigError, match="overlaps"):
        _load(tmp_path, raw)
    raw = _raw()
    raw["data"]["photos"]["heldout"].append(raw["data"]["photos"]["train"][0])
    with pytest.raises(ConfigError, match="more than one"):
        _load(tmp_path, raw)
    raw = _raw()
    raw["data"]["photos"]["train"].append("/x/site-packages/skimage/data/astronaut.png")
    with pytest.raises(ConfigError, match="reserved"):
        _load(tmp_path, raw)
    raw = _raw()
    raw["finetune"]["headline"] = "global"  # not in the default run
    with pytest.raises(ConfigError, match="default_variants"):
        _load(tmp_path, raw)
    raw = _raw()
    raw["finetune"]["variants"]["r0"]["reference"] = "last"
    with pytest.raises(ConfigError, match="finetune.variants.r0.reference"):
        _load(tmp_path, raw)
    raw = _raw()
    raw["finetune"]["variants"]["r0"]["added_lr"] = "fast"
    with pytest.raises(ConfigError, match="finetune.variants.r0.added_lr"):
        _load(tmp_path, raw)


def test_added_lr_moves_only_the_added_modules() -> None:
    ft = qset.load_settings().finetune
    model = refdecoder.wrap(
        tiny_wan(),
        refdecoder.RefDecoderConfig.from_dict({**refdecoder.preset("tiny").to_dict(), "train_decoder": True}),
    )
    for name, added in (("r2", ft.lr), ("lr_high", 1.5e-3)):
        variant = ft.resolved[name]
        groups = {g["name"]: g for g in qs.refdecoder_param_groups(model, variant, ft)}
        assert groups["refdecoder"]["lr"] == added
        # The decoder trains at the baseline's lr whatever the added modules' lr.
        assert groups["decoder"]["lr"] == ft.lr * ft.decoder_lr_ratio
        assert {id(p) for p in groups["refdecoder"]["params"]} == {id(p) for _, p in model.added_parameters()}


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


def test_training_clips_use_train_frames_and_held_out_clips_held_out_frames(micro_media) -> None:
    settings, media = micro_media
    far = settings.finetune.reference_distance
    plan = qd.train_plan(media, settings, "finetune", 60, 2, FRAMES, far)
    assert plan == qd.train_plan(media, settings, "finetune", 60, 2, FRAMES, far)
    assert plan != qd.train_plan(media, settings, "pretrain", 60, 2, FRAMES, far)
    kinds = [clip[0] for step in plan for clip in step]
    assert 0.1 < kinds.count("p") / len(kinds) < 0.5  # photo_share 0.3
    for kind, v, t0, *_ in (clip for step in plan for clip in step):
        if kind == "v":
            src = settings.data.sources[v]
            used = range(t0 - far, t0 + FRAMES + far)  # the clip and both possible far references
            assert any(a <= min(used) and max(used) < b for a, b in src["train"]), (src["name"], t0)
    for clip in qd.eval_plan(media, settings):
        if clip.kind == "v":
            src = settings.data.sources[clip.index]
            last = clip.t0 + (EVAL_FRAMES - 1 if clip.seed is None else 0)
            assert any(a <= clip.t0 and last < b for a, b in src["heldout"]), clip
        else:
            assert clip.group == "photos" and clip.source == media.heldout_photos[clip.index].name
    groups = {(c.group, c.part) for c in qd.eval_plan(media, settings)}
    assert groups == {("static", "natural"), ("motion", "natural"), ("motion", "camera"), ("photos", "photo")}


def test_rendered_training_clips_and_references(micro_media) -> None:
    settings, media = micro_media
    far, crop = settings.finetune.reference_distance, settings.data.crop
    window = settings.data.window(settings.data.camera)
    clip = ("v", 0, 6, 0, 10, 3, 0, 1234)  # bikes from frame 6, window at (0, 10), random index 3, far side "before"
    still, before = qd.render_training(media, settings, [clip], FRAMES, motion=False, reference="far")
    o = (window - crop) // 2
    source = media.videos[0].frames[:, :, o : o + crop, 10 + o : 10 + o + crop].float() / 127.5 - 1
    torch.testing.assert_close(still[0], source[:, 6 : 6 + FRAMES])  # without motion: the window's centre crop
    torch.testing.assert_close(before[0, :, 0], source[:, 6 - far])  # `far` clip frames before the clip
    _, first = qd.render_training(media, settings, [clip], FRAMES, motion=False, reference="first")
    _, random = qd.render_training(media, settings, [clip], FRAMES, motion=False, reference="random")
    torch.testing.assert_close(first[0, :, 0], still[0, :, 0])
    torch.testing.assert_close(random[0, :, 0], still[0, :, 3])
    photo = ("p", 0, 0, 0, 0, 3, 1, 99)  # without motion a photo makes a frozen clip of its window's centre
    frozen, _ = qd.render_training(media, settings, [photo, clip], FRAMES, motion=False, reference="far")
    assert frozen.shape == (2, 3, FRAMES, crop, crop) and torch.equal(frozen[0, :, :1].expand_as(frozen[0]), frozen[0])
    moving, ref = qd.render_training(media, settings, [clip], FRAMES, motion=True, reference="first")
    assert (moving - still).abs().mean() > 0.01  # the camera moved
    torch.testing.assert_close(ref[0, :, 0], moving[0, :, 0])


# --- metrics by distance ----------------------------------------------------------------------------------------
def test_summaries_by_group_part_source_and_distance() -> None:
    clips = [
        qd.HeldOut("static", "natural", "a", "v", 0, 0, 0, 0, None),
        qd.HeldOut("motion", "camera", "a", "v", 0, 0, 0, 0, 1),
        qd.HeldOut("motion", "natural", "b", "v", 1, 0, 0, 0, None),
    ]
    psnr = torch.arange(27, dtype=torch.float64).reshape(3, 9)  # clip c, frame f -> 9c + f
    out = qe.summarise({"psnr": psnr}, clips)
    assert out["static"]["psnr_0"] == 0 and out["static"]["psnr_1-3"] == 2 and out["static"]["psnr_4+"] == 6
    motion = psnr[1:]
    assert out["motion"]["psnr"] == motion.mean().item() and out["motion"]["clips"] == 2
    assert out["motion"]["psnr_4+"] == motion[:, 4:].mean().item()
    assert out["motion"]["by_part"]["camera"]["psnr_0"] == 9 and out["motion"]["by_source"]["b"]["psnr_0"] == 18
    assert out["per_clip_psnr"] == [4.0, 13.0, 22.0]


def test_evaluation_conditions_on_frame_zero() -> None:
    model = refdecoder.wrap(tiny_wan(), "tiny").eval()
    randomize_(model.projectors)  # leave the zero-init identity, so the reference changes the output
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode(video)
    out = qe.reconstruct(model, latents, video)
    assert torch.equal(out, model.decode(latents, reference=video[:, :, :1]))
    assert not torch.allclose(out, model.decode(latents, reference=video[:, :, 1:2]), atol=1e-4)
    assert torch.equal(qe.reconstruct(model.vae, latents, video), model.vae.decode(latents).sample)


def test_results_copy_accepts_a_folder_or_a_file(tmp_path: Path) -> None:
    assert qs.results_file(str(tmp_path)) == tmp_path / "quality_small.json"
    assert qs.results_file(f"{tmp_path}/new/") == tmp_path / "new" / "quality_small.json"
    assert qs.results_file(f"{tmp_path}/mine.json") == tmp_path / "mine.json"


def test_targets_read_the_camera_part_and_the_shown_columns() -> None:
    """Each target from its own rows: the camera part's frames 4+, the probe's whole frames and its shown columns."""
    settings = qset.load_settings(qset.CONFIG)
    head, base, versus = settings.finetune.headline, "baseline", settings.eval.targets["static_versus"]

    def stats(psnr_4: float, camera_4: float, static: float) -> dict:
        motion = {"psnr": 1.0, "psnr_0": 2.0, "psnr_4+": psnr_4, "by_part": {"camera": {"psnr_4+": camera_4}}}
        return {"motion": motion, "static": {"psnr": static}}

    models = {head: stats(0.5, 0.9, 20.0), base: stats(0.1, 0.2, 19.0), versus: stats(0.4, 0.3, 20.05)}
    deltas = {f"{head} - {base}": {"motion": {"psnr": 1.3, "psnr_0": 2.2, "psnr_4+": 0.4}}}
    whole = [0.5, 1.0, 1.6, 2.0, 1.8, 1.2, 0.8]  # shifts -4 -2 -1 0 1 2 4: worse of +-k over the in-place 2.0
    shown = [1.2, 1.7, 1.9, 2.0, 1.9, 1.8, 1.4]
    row = {"shift_tokens": [-4, -2, -1, 0, 1, 2, 4], "default": {"gain_frame0": whole, "gain_frame0_shared": shown}}
    out = qe.targets(models, deltas, settings, {"models": {head: row}})
    assert out["camera_psnr_4+"] == {"value": pytest.approx(0.7), "target": 0.8, "met": False}
    assert out["motion_psnr_0_gain"]["value"] == 2.2 and out["motion_psnr_0_gain"]["met"] is False  # 2.2 < 2.30
    assert out[f"static_psnr_vs_{versus}"]["value"] == pytest.approx(-0.05) and out[f"static_psnr_vs_{versus}"]["met"]
    assert out["shift_follow_near"]["value"] == pytest.approx(0.5) and out["shift_follow_far"]["value"] == 0.25
    assert out["shift_follow_near_shown"]["value"] == pytest.approx(0.85) and out["shift_follow_near_shown"]["met"]
    assert out["shift_follow_far_shown"]["value"] == pytest.approx(0.6) and out["shift_follow_far_shown"]["met"]
    del models[base]["motion"]["by_part"]  # no camera moves evaluated: no camera target, the others stay
    assert "camera_psnr_4+" not in qe.targets(models, deltas, settings, {"models": {head: row}})


# --- micro end-to-end run -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("quality_small")
    config, out = micro_config(folder), folder / "out"
    return config, out, qs.main(["--config", str(config), "--out", str(out)])


def test_micro_run_writes_every_output(micro: tuple[Path, Path, dict]) -> None:
    config, out, doc = micro
    settings = qset.load_settings(config)
    assert doc["headline"] == settings.finetune.headline
    baseline = settings.finetune.default_variants[0]  # the plain decoder trained on the headline's clips
    assert (out / "vae_pretrained" / "config.json").is_file() and (out / baseline / "config.json").is_file()
    for name in settings.finetune.default_variants[1:]:
        saved = json.loads((out / name / "refdecoder_config.json").read_text())
        assert saved["train_decoder"] is True and saved["dropout"]["p_max"] == 0.0
    headline = json.loads((out / doc["headline"] / "refdecoder_config.json").read_text())["transformer"]
    assert headline["locality_bias"] is True and headline["attention_radius"] == 2
    assert (out / qs.GRID).stat().st_size > 0
    assert json.loads((out / qs.RESULTS).read_text())["eval"] == json.loads(json.dumps(doc["eval"]))
    assert len({log["data_order"] for log in doc["finetune"].values()}) == 1  # same clips, same order
    models = doc["eval"]["models"]
    # Part timings: the fine-tune's encoding and training, and every evaluation job (each probe, each model's clips).
    timing = doc["timing"]
    assert timing["finetune_encode_s"] + timing["finetune_train_s"] <= timing["finetune_s"]
    probed = {settings.finetune.headline, settings.eval.targets["static_versus"]}
    assert set(timing["eval_jobs_s"]) == {f"probe {n}" for n in probed} | {f"heldout {n}" for n in models}
    assert all(seconds > 0 for seconds in timing["eval_jobs_s"].values())
    gain = doc["gains"][f"{doc['headline']} - {baseline}"]
    for group in ("static", "motion", "photos"):
        for metric in ("psnr", "psnr_0", "psnr_1-3", "psnr_4+", "ssim_4+"):
            expected = models[doc["headline"]][group][metric] - models[baseline][group][metric]
            assert gain[group][metric] == pytest.approx(expected)
    target = doc["targets"]["motion_psnr_4+_gain"]
    assert target["value"] == pytest.approx(gain["motion"]["psnr_4+"]) and target["met"] == (target["value"] >= 0.3)


def test_retarget_judges_a_finished_run_again_from_its_own_numbers(micro: tuple[Path, Path, dict], tmp_path) -> None:
    config, out, doc = micro
    run = tmp_path / "run.json"
    shutil.copyfile(out / qs.RESULTS, run)
    raw = yaml.safe_load(config.read_text())
    raw["eval"]["targets"] |= {"motion_psnr": 99.0, "camera_psnr_4+": -99.0}  # unreachable / always met
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(yaml.safe_dump(raw))
    before = json.loads(run.read_text())
    again = qs.main(["--config", str(stricter), "--retarget", str(run)])
    saved = json.loads(run.read_text())
    assert saved == json.loads(json.dumps(again)) and saved["retargeted"]["argv"][-1] == str(run)
    motion = before["targets"]["motion_psnr_gain"]
    assert saved["targets"]["motion_psnr_gain"] == {**motion, "target": 99.0, "met": False}
    assert saved["targets"]["camera_psnr_4+"]["met"] is True
    assert saved["settings"]["eval"]["targets"]["motion_psnr"] == 99
    kept = ("timing", "machine", "eval", "gains", "finetune")
    assert all(saved[k] == before[k] for k in kept)  # nothing measured is touched
    run.write_text("{")  # not a finished run: refused, the file left as it is
    with pytest.raises(ConfigError, match="not a finished quality_small run"):
        qs.main(["--config", str(stricter), "--retarget", str(run)])
    assert run.read_text() == "{"
    run.write_text(json.dumps({k: v for k, v in before.items() if k != "settings"}))  # no limits recorded
    with pytest.raises(ConfigError, match="not a finished quality_small run"):
        qs.main(["--config", str(stricter), "--retarget", str(run)])
    del before["eval"]["models"][doc["headline"]]
    run.write_text(json.dumps(before))
    with pytest.raises(ConfigError, match="evaluated no"):
        qs.main(["--config", str(stricter), "--retarget", str(run)])


def _baseline_of(doc: dict, name: str) -> str:
    """The plain variant a RefDecoder variant's gains are measured against (``"<name> - <baseline>"``)."""
    return next(key.split(" - ")[1] for key in doc["gains"] if key.split(" - ")[0] == name)


def test_table_rows_are_the_evaluation_numbers_with_the_gains(micro: tuple[Path, Path, dict]) -> None:
    _, _, doc = micro
    doc = json.loads(json.dumps(doc))
    headline, models = doc["headline"], doc["eval"]["models"]
    row = qtable.rows(doc, "motion", [headline])[0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == headline
    baseline = _baseline_of(doc, headline)
    gain = doc["gains"][f"{headline} - {baseline}"]["motion"]
    for cell, key in zip(cells[1:5], qtable.COLUMNS):
        value, delta = cell.split(" (")
        assert float(value) == pytest.approx(models[headline]["motion"][key], abs=0.005)
        assert float(delta.rstrip(")")) == pytest.approx(gain[key], abs=0.005)
    assert "(" not in qtable.rows(doc, "static", [baseline])[0]  # a plain decoder has no gain column
    part = qtable.rows(doc, "motion/camera", [headline])[0]
    assert f"{models[headline]['motion']['by_part']['camera']['psnr']:.2f}" in part


def test_saved_models_reproduce_the_reported_psnr(micro: tuple[Path, Path, dict]) -> None:
    from diffusers import AutoencoderKLWan

    _, out, doc = micro
    # The first held-out clip is bikes frames 16..24, crop (0, 0), read here independently of the benchmark.
    assert list(doc["eval"]["heldout"][0][:8]) == ["static", "natural", "bikes", "v", 0, 16, 0, 0]
    bikes = next(p for p in bundled_clips() if p.stem == "bikes")
    clip = read_clip(bikes, range(16, 16 + EVAL_FRAMES), (48, 72), "resize")[None, :, :, :CROP, :CROP]
    vae = AutoencoderKLWan.from_pretrained(out / "vae_pretrained").eval()
    base_name = _baseline_of(doc, doc["headline"])
    baseline = AutoencoderKLWan.from_pretrained(out / base_name).eval()
    with torch.no_grad():
        latents = vae.encode(clip).latent_dist.mode()
        plain = baseline.decode(latents).sample
        headline = refdecoder.load(vae, out / doc["headline"]).eval().decode(latents, reference=clip[:, :, :1])
    for name, pred in ((base_name, plain), (doc["headline"], headline)):
        per_frame = psnr_np(pred[0].numpy(), clip[0].numpy())
        assert doc["eval"]["models"][name]["per_clip_psnr"][0] == pytest.approx(per_frame.mean(), abs=2e-3)


def test_cached_phases_are_reused_and_deterministic(micro: tuple[Path, Path, dict], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config, out, doc = micro
    again = qs.main(["--config", str(config), "--out", str(out), "--phase", "eval"])
    assert again["eval"]["models"] == json.loads(json.dumps(doc["eval"]["models"]))
    with pytest.raises(ConfigError, match="other settings"):
        qs.main(["--config", str(config), "--out", str(out), "--phase", "eval", "--set", "pretrain.lr=0.5"])
    # The held-out camera moves are evaluation settings: changing them keeps the cached weights.
    qs.main(["--config", str(config), "--out", str(out), "--phase", "eval", "--set", "data.eval_motion.pan=0.1"])
    qs.main(["--config", str(config), "--out", str(tmp_path), "--phase", "pretrain"])
    first = load_file(out / "vae_pretrained" / "diffusion_pytorch_model.safetensors")
    second = load_file(tmp_path / "vae_pretrained" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_side_by_side_fine_tuning_saves_the_same_weights_as_one_by_one(
    micro: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file

    config, out, doc = micro
    assert qset.load_settings(config).workers == 2  # the micro run trained its variants in two worker processes
    shutil.copytree(out / "vae_pretrained", tmp_path / "vae_pretrained")
    qs.main(["--config", str(config), "--out", str(tmp_path), "--phase", "finetune", "--set", "workers=1"])
    for name in doc["finetune"]:
        (file,) = (out / name).glob("*.safetensors")
        side, alone = load_file(file), load_file(tmp_path / name / file.name)
        assert side.keys() == alone.keys() and all(torch.equal(side[k], alone[k]) for k in side), name
    with pytest.raises(ConfigError, match="workers"):
        qset.load_settings(config, overrides=("workers=0",))


def test_training_on_kept_estimates_saves_the_same_weights_as_estimating_each_step(
    micro: tuple[Path, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    config, out, doc = micro
    head = doc["headline"]
    assert qs.estimate_key(qs.select_variants(qset.load_settings(config), head)[0]) is not None
    assert doc["timing"]["finetune_estimate_s"] > 0  # the micro run kept its estimates (in two workers)
    (file,) = (out / head).glob("*.safetensors")
    kept, estimate = load_file(file), qs.estimate_training_correspondence

    def train(estimates: Callable[..., dict], folder: Path) -> dict[str, torch.Tensor]:
        shutil.copytree(out / "vae_pretrained", folder / "vae_pretrained")
        monkeypatch.setattr(qs, "estimate_training_correspondence", estimates)
        argv = ["--config", str(config), "--out", str(folder), "--phase", "finetune", "--variants", head]
        qs.main([*argv, "--set", "workers=1"])
        return load_file(folder / head / file.name)

    each_step = train(lambda *args: {}, tmp_path / "each_step")  # no kept estimates: every decode estimates
    assert kept.keys() == each_step.keys() and all(torch.equal(kept[k], each_step[k]) for k in kept)

    def zero(settings, media, out, plan, variants, latents):  # kept but wrong: the training must follow them
        made = estimate(settings, media, out, plan, variants, latents)
        return {k: [CorrespondenceEstimate(torch.zeros_like(e.pixels)) for e in v] for k, v in made.items()}

    wrong = train(zero, tmp_path / "zero")
    assert any(not torch.equal(kept[k], wrong[k]) for k in kept)


def test_side_by_side_evaluation_gives_the_same_numbers_as_one_by_one(micro: tuple[Path, Path, dict]) -> None:
    config, out, doc = micro
    settings = qset.load_settings(config)
    assert settings.workers == 2  # the micro run evaluated in two worker processes
    probed = {settings.finetune.headline, settings.eval.targets["static_versus"]}
    assert set(doc["eval"]["shift_probe"]["models"]) == probed and len(probed) == 2
    for rows in doc["eval"]["shift_probe"]["models"].values():  # half a token (4 px) probed beside whole ones
        assert rows["shift_tokens"] == [-1, -0.5, 0, 0.5, 1] and len(rows["default"]["gain_frame0"]) == 5
    assert set(doc["eval"]["models"]) == {"pretrained", *settings.finetune.default_variants}
    alone = qs.main(["--config", str(config), "--out", str(out), "--phase", "eval", "--set", "workers=1"])
    assert json.loads(json.dumps(alone["eval"])) == json.loads(json.dumps(doc["eval"]))


# --- the correspondence probe (benchmarks/reference_probe.py) -----------------------------------------------------
def test_shifted_references_show_the_clip_displaced(micro_media) -> None:
    from benchmarks import reference_probe as rp

    settings, media = micro_media
    probe = rp.shifted_clips(settings, media, shift=8, per_source=1)
    clips, references = probe.clips, probe.references
    assert clips.shape[1:] == (3, EVAL_FRAMES, CROP, CROP) and sorted(references) == list(range(-8, 9))
    torch.testing.assert_close(references[0][:, :, 0], clips[:, :, 0])
    # bikes (frames 48 x 72): the clip is cut at columns 20..52, the +8 reference at 28..60 of frame 16.
    frame = media.videos[0].frames[:, 16, 8:40].float() / 127.5 - 1
    torch.testing.assert_close(clips[0, :, 0], frame[..., 20:52])
    torch.testing.assert_close(references[8][0, :, 0], frame[..., 28:60])
    with pytest.raises(ValueError, match="no room"):
        rp.shifted_clips(settings, media, shift=40, per_source=1)


def test_correspondence_settings_of_the_probe_are_parsed_and_checked() -> None:
    import argparse

    from benchmarks import reference_probe as rp

    parser = argparse.ArgumentParser()
    settings = rp.parse_assignments(["sub_token_shift=true", " global_prior = 3.0", "frame_spaces=fitted"], parser)
    assert settings == {"sub_token_shift": True, "global_prior": 3.0, "frame_spaces": "fitted"}
    for bad in ("sub_token_shift", "sub_token_shfit=true"):
        with pytest.raises(SystemExit):
            rp.parse_assignments([bad], parser)


def test_correspondence_gains_are_zero_for_a_decoder_that_ignores_its_reference(micro, micro_media) -> None:
    from benchmarks import reference_probe as rp

    config, out, _ = micro
    vae = qs.load_vae(out / qs.PRETRAINED)
    config_r1 = refdecoder.preset("tiny")
    config_r1.transformer.attention_radius = 1  # a local scope, which displacements can steer
    refdecoder.wrap(vae, config_r1).save_pretrained(out / "fresh")  # zero-initialised stage updates: identity
    doc = rp.correspondence(out, ["fresh"], config, shifts=[0, 1], token=8, per_source=1, true_displacements=True)
    rows = doc["models"]["fresh"]
    assert rows["shift_tokens"] == [-1, 0, 1]
    for mode in ("default", "true_displacements"):
        gains = [
            g for key in ("gain_frame0", "gain_all", "gain_frame0_shared", "gain_all_shared") for g in rows[mode][key]
        ]
        assert len(gains) == 12 and all(abs(g) < 1e-4 for g in gains)


def test_the_estimate_benchmark_scores_against_the_true_shift(micro, micro_media, monkeypatch) -> None:
    """The scoring of ``benchmarks/correspondence_estimate.py``: an estimate that returns the true shift is exact
    everywhere with no error; one that stays in place is exact only at shift 0 and misses by k cells."""
    from benchmarks import correspondence_estimate as ce

    _, out, _ = micro
    settings, media = micro_media
    vae = qs.load_vae(out / qs.PRETRAINED)
    doc = ce.estimate_errors(vae, settings, [0, 1, -1], media)  # the real estimate runs on every setting
    assert set(doc["frame0"]) == set(ce.FRAME0) and set(doc["later_frames"]) == set(ce.LATER)
    assert set(doc["subcell"]) == set(ce.SUBCELL) | {"pixels"}
    current: dict = {}

    def fake(adapter, latents, reference, **settings):
        b, _, t, h, w = latents.shape
        cells = torch.zeros(b, 2, t, h, w)
        cells[:, 1] = current["dx"]
        return cells

    monkeypatch.setattr(ce, "estimate_cells", fake)
    for k in (0, 1, -1):
        current["dx"] = -k  # video cell x shows reference cell x - k
        row = ce.estimate_errors(vae, settings, [k], media)
        assert all(r["exact"] == [1.0] and r["mean_error"] == [0.0] for r in row["frame0"].values())
        assert all(r == [0.0] for r in row["later_frames"].values())
        current["dx"] = 0.0  # in place
        row = ce.estimate_errors(vae, settings, [k], media)
        assert all(r["exact"] == [float(k == 0)] and r["mean_error"] == [abs(k)] for r in row["frame0"].values())
    # Below a cell, an estimate in place misses each shift by its fraction of a cell.
    cell = settings.eval.shift_probe.token_pixels
    for name in ce.SUBCELL:
        assert row["subcell"][name]["median"] == [0.0] * len(ce.SUBCELL_PIXELS)
        assert row["subcell"][name]["mean_error"] == pytest.approx([px / cell for px in ce.SUBCELL_PIXELS])


def test_the_estimate_benchmark_reproduces_the_runs_gains_as_trained(micro, micro_media) -> None:
    from benchmarks import correspondence_estimate as ce

    config, out, doc = micro
    settings, media = micro_media
    baseline, headline = settings.finetune.default_variants[0], doc["headline"]
    untrained = settings.eval.targets["static_versus"]  # the same architecture trained without correspondence
    with qs.deterministic(settings.threads):  # as the run's own eval decoded (the sums' order follows the threads)
        measured = ce.heldout_gains(qset.load_settings(config), out, headline, baseline, media, untrained)
    gains, decode_only = measured["gains_db"], measured["decode_only"]
    switched = "per_frame on"  # the headline trained with per_frame off, so switching it turns it on
    assert set(gains) == set(ce.HELDOUT) | {switched}
    assert decode_only["model"] == untrained
    assert set(decode_only["gains_db"]) == {"without", "with the estimate"}
    for name, row in ((headline, gains["as trained"]), (untrained, decode_only["gains_db"]["without"])):
        run = doc["gains"][f"{name} - {baseline}"]
        for group in ("static", "motion"):  # the settings it trained with: what the run's own eval measured
            for key in ("psnr", "psnr_0", "psnr_4+"):
                assert row[group][key] == pytest.approx(run[group][key], abs=1e-6)
    with pytest.raises(ConfigError, match="trained with correspondence"):
        ce.heldout_gains(qset.load_settings(config), out, headline, baseline, media, headline)
    # The camera moves decoded with the estimate are the run's own camera part too; the exact flow and zero differ.
    models = doc["eval"]["models"]
    parts = [models[name]["motion"]["by_part"]["camera"]["psnr"] for name in (headline, baseline)]
    rows = measured["camera_gains_db"]
    assert set(rows) == {"estimate", "true flow", f"true flow, {switched}", "zero"}
    assert rows["estimate"]["psnr"] == pytest.approx(parts[0] - parts[1], abs=1e-5)
    assert rows[f"true flow, {switched}"]["psnr_4+"] != rows["true flow"]["psnr_4+"]  # moves within latent frames
    # On the pixels the reference shows: frame 0 is all shown (the reference is frame 0), later frames lose some.
    shown, share = measured["camera_gains_shown_db"], measured["camera_shown_share"]
    assert set(shown) == set(rows) and share["share_0"] == 1.0 and 0 < share["share_4+"] < 1
    for name in rows:
        assert shown[name]["psnr_0"] == pytest.approx(rows[name]["psnr_0"], abs=1e-4)


def test_shown_pixels_follow_the_flow() -> None:
    from benchmarks import correspondence_estimate as ce

    flow = torch.zeros(2, 2, 3, 8, 16)
    flow[1, 1, 2] = 10.0  # frame 2 of clip 1 shows the reference 10 px further right: its last 10 columns left it
    flow[1, 0, 1] = -3.0  # frame 1 of clip 1 shows it 3 px higher: its first 3 rows are not in the reference
    mask = ce.shown_by_flow(flow)
    assert mask[0].all() and mask[1, 0].all()
    assert mask[1, 2, :, :6].all() and not mask[1, 2, :, 6:].any()
    assert not mask[1, 1, :3].any() and mask[1, 1, 3:].all()


def test_heldout_camera_flows_are_for_camera_moves_only(micro_media) -> None:
    settings, media = micro_media
    clips = qd.eval_plan(media, settings)
    moves = [c for c in clips if c.part == "camera"]
    flows = qd.heldout_camera_flows(media, settings, moves)
    assert flows.shape == (len(moves), 2, EVAL_FRAMES, CROP, CROP) and flows[:, :, 0].abs().max() < 1e-4
    assert flows[:, :, -1].abs().amax(dim=(1, 2, 3)).min() > 0  # every move moves by its last frame
    with pytest.raises(ValueError, match="not a camera move"):
        qd.heldout_camera_flows(media, settings, [c for c in clips if c.seed is None][:1])


# --- the shipped pretrained VAE -----------------------------------------------------------------------------------
def test_the_shipped_vae_serves_the_default_settings_only(tmp_path) -> None:
    settings = qset.load_settings(qset.CONFIG)
    assert qs.use_shipped_vae(settings, tmp_path / "default")
    copied = tmp_path / "default" / qs.PRETRAINED
    for name in ("config.json", "diffusion_pytorch_model.safetensors", qs.META):
        assert (copied / name).read_bytes() == (qs.SHIPPED / name).read_bytes()
    assert not qs.use_shipped_vae(settings, tmp_path / "default")  # already there: left alone
    other = qset.load_settings(qset.CONFIG, overrides=("pretrain.steps=10",))
    assert not qs.use_shipped_vae(other, tmp_path / "other") and not (tmp_path / "other").exists()


def test_a_shift_probe_the_footage_cannot_give_fails_before_training(micro_media) -> None:
    settings, media = micro_media
    assert qs.shift_probe_clips(settings, media).clips.shape[-2:] == (CROP, CROP)
    too_wide = dataclasses.replace(settings.eval.shift_probe, crop=[CROP, 80])  # the bundled frames are 72 wide
    broken = dataclasses.replace(settings, eval=dataclasses.replace(settings.eval, shift_probe=too_wide))
    with pytest.raises(ConfigError, match="eval.shift_probe: no source leaves room"):
        qs.shift_probe_clips(broken, media)


def test_a_half_token_shift_is_reported_not_judged() -> None:
    """A shift of half a token (whole pixels) is probed and reported; the near target reads 1-2 tokens only. A
    fraction that is not whole pixels is refused."""
    settings = qset.load_settings(qset.CONFIG)
    head = settings.finetune.headline
    whole = [0.5, 1.0, 1.6, 0.1, 2.0, 0.2, 1.8, 1.2, 0.8]  # shifts -4 -2 -1 -0.5 0 0.5 1 2 4
    row = {
        "shift_tokens": [-4, -2, -1, -0.5, 0, 0.5, 1, 2, 4],
        "default": {"gain_frame0": whole, "gain_frame0_shared": whole},
    }
    models = {name: {"motion": {"psnr": 1.0, "psnr_0": 2.0, "psnr_4+": 0.5}} for name in (head, "baseline")}
    deltas = {f"{head} - baseline": {"motion": {"psnr": 1.3, "psnr_0": 2.2, "psnr_4+": 0.4}}}
    out = qe.targets(models, deltas, settings, {"models": {head: row}})
    assert out["shift_follow_near"]["value"] == pytest.approx(0.5) and out["shift_follow_far"]["value"] == 0.25
    probe = dict(shifts=[0.5, 1], crop=[32, 32], clips_per_source=1, token_pixels=8)
    assert qset.ShiftProbeSettings(**probe).shifts == [0.5, 1]
    with pytest.raises(ConfigError, match="not whole pixels"):
        qset.ShiftProbeSettings(**(probe | {"shifts": [0.3, 1]}))
    with pytest.raises(ConfigError, match="shifts > 0"):
        qset.ShiftProbeSettings(**(probe | {"shifts": [0, 1]}))


def test_follow_ratios_take_the_worse_direction_of_each_shift() -> None:
    from benchmarks.quality.shift_probe import follow_ratios

    row = {"shift_tokens": [-2, -1, 0, 1, 2], "default": {"gain_frame0": [0.5, 1.8, 2.0, 1.6, 1.0]}}
    assert follow_ratios(row) == pytest.approx({1: 0.8, 2: 0.25})


def test_the_probe_decodes_correspondence_variants_with_a_given_global_prior(micro, monkeypatch) -> None:
    from benchmarks import reference_probe as rp

    config, out, doc = micro
    headline, seen = doc["headline"], {}
    monkeypatch.setattr(rp, "shift_probe", lambda encoder, models, *args, **kwargs: seen.update(models) or {})
    for given, expected in ((None, 0.0), (2.5, 2.5)):  # None: as saved (the default, off)
        rp.correspondence(out, [headline], config, shifts=[0, 1], token=8, per_source=1, global_prior=given)
        settings = seen[headline].config.correspondence
        assert settings.enabled and settings.global_prior == expected
