"""``refdecoder reconstruct`` and ``refdecoder decode-latents`` end to end, on the real sample clips."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import refdecoder
from refdecoder.cli import main
from refdecoder.data import bundled_clips, probe, read_clip, save_latents, write_image, write_video
from refdecoder.errors import CheckpointError
from refdecoder.losses._trunk import resolve_trunk_weights
from tests.helpers import save_random_model, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Wan VAE saved as a diffusers folder and random RefDecoder weights for it."""
    return save_random_model(tmp_path_factory.mktemp("models"))


def _args(folders: dict[str, Path], out: Path, *extra: str, weights: bool = True) -> list[str]:
    args = ["--out", str(out), "--vae", str(folders["vae"]), "--no-progress", *extra]
    return args + (["--weights", str(folders["weights"])] if weights else [])


def _read_mp4(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the per-frame PSNR of uint8 RGB frames (independent of refdecoder.metrics)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):  # identical frames: inf dB
        return float(np.mean(10 * np.log10(255.0**2 / mse)))


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_reconstruct_sample_clips(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clips = bundled_clips()[:2]
    # 11 frames is not 1 + 4k: the video is padded to 13 for the VAE and trimmed back to 11.
    code = main(
        [
            "reconstruct",
            *map(str, clips),
            *_args(folders, tmp_path, "--frames", "11", "--size", "32x48", "--compare-base"),
        ]
    )
    assert code == 0
    assert "psnr" in capsys.readouterr().out  # the summary table
    rows = _rows(tmp_path / "metrics.csv")
    for clip in clips:
        row = rows[clip.stem]
        written, fps = _read_mp4(tmp_path / f"{clip.stem}.mp4")
        assert written.shape == (11, 32, 48, 3) and fps == pytest.approx(probe(clip).fps, rel=1e-3)
        truth = ((read_clip(clip, range(11), size=(32, 48)).permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
        independent = _psnr(written, truth)
        assert float(row["psnr_written"]) == pytest.approx(independent, abs=0.05)
        # In-memory vs written: the codec loss, here of a noise-like random decoder output in 4:2:0 chroma.
        assert abs(float(row["psnr"]) - independent) < 1.0
        assert float(row["delta_psnr"]) == pytest.approx(float(row["psnr"]) - float(row["base_psnr"]), abs=1e-4)
        assert row["psnr_reference"] and row["psnr_others"] and row["ssim"]
        compare, _ = _read_mp4(tmp_path / f"{clip.stem}.compare.mp4")
        assert compare.shape[0] == 11 and compare.shape[2] == 4 * 48 + 3 * 2
        assert (tmp_path / f"{clip.stem}.base.mp4").is_file() and (tmp_path / f"{clip.stem}.grid.png").is_file()
        assert row["lpips"] == "" if _no_lpips_weights() else float(row["lpips"]) >= 0  # never a faked value


def _no_lpips_weights() -> bool:
    try:
        resolve_trunk_weights("alexnet")
    except CheckpointError:
        return True
    return False


def test_reconstruct_without_weights_is_the_base_decoder(folders: dict[str, Path], tmp_path: Path) -> None:
    clip = bundled_clips()[0]
    assert (
        main(["reconstruct", str(clip), *_args(folders, tmp_path, "--frames", "5", "--size", "16x16", weights=False)])
        == 0
    )
    row = _rows(tmp_path / "metrics.csv")[clip.stem]
    assert row["decoder"] == "base" and float(row["psnr"]) > 0
    assert _read_mp4(tmp_path / f"{clip.stem}.mp4")[0].shape == (5, 16, 16, 3)


def test_reconstruct_in_tiles(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clip = bundled_clips()[0]
    extra = ["--frames", "5", "--size", "32x48", "--tile", "32x32", "--tile-overlap", "16"]
    assert main(["reconstruct", str(clip), *_args(folders, tmp_path, *extra)]) == 0
    assert _read_mp4(tmp_path / f"{clip.stem}.mp4")[0].shape == (5, 32, 48, 3)
    # a stride off the 16-pixel token grid is refused once, before any file is read
    off_grid = _args(folders, tmp_path / "off", *extra[:4], "--tile", "32x32", "--tile-overlap", "8")
    assert main(["reconstruct", str(clip), *off_grid]) == 1
    assert not (tmp_path / "off").exists()
    assert "multiple of 16 pixels" in capsys.readouterr().err


def test_bad_inputs_fail_alone(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00garbage" * 100)
    good = bundled_clips()[0]
    out = tmp_path / "out"
    code = main(
        [
            "reconstruct",
            str(tmp_path / "missing.mp4"),
            str(broken),
            str(good),
            *_args(folders, out, "--frames", "5", "--size", "16x16"),
        ]
    )
    assert code == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "missing.mp4" in errors[0] and "not found" in errors[0] and "broken.mp4" in errors[1]
    rows = _rows(out / "metrics.csv")
    assert rows["missing"]["error"] and rows["broken"]["error"] and not rows[good.stem]["error"]
    assert (out / f"{good.stem}.mp4").is_file()


def test_reference_of_the_wrong_size(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = write_image(tmp_path / "ref.png", torch.zeros(3, 20, 20))
    clip = str(bundled_clips()[0])
    base = ["reconstruct", clip, "--reference", str(image)]
    assert main([*base, *_args(folders, tmp_path / "a", "--frames", "5", "--size", "16x16")]) == 1
    assert "--resize-reference" in capsys.readouterr().err
    assert (
        main([*base, *_args(folders, tmp_path / "b", "--frames", "5", "--size", "16x16", "--resize-reference")]) == 0
    )
    row = _rows(tmp_path / "b" / "metrics.csv")[Path(clip).stem]
    assert (
        row["reference"] == str(image) and row.get("psnr_reference", "") == ""
    )  # no frame of the video is the reference


def test_weights_for_another_backbone(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = shutil.copytree(folders["weights"], tmp_path / "weights")
    config = json.loads((weights / "refdecoder_config.json").read_text())
    config["backbone"] = "videovae+"
    (weights / "refdecoder_config.json").write_text(json.dumps(config))
    args = ["--out", str(tmp_path / "o"), "--vae", str(folders["vae"]), "--weights", str(weights), "--no-progress"]
    assert main(["reconstruct", str(bundled_clips()[0]), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "videovae+" in err and "Traceback" not in err


def test_named_lpips_without_weights_is_an_error(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    extra = ["--lpips", "alex", "--lpips-weights", str(tmp_path / "nope.pth")]
    assert main(["reconstruct", str(bundled_clips()[0]), *_args(folders, tmp_path, *extra)]) == 1
    assert "nope.pth" in capsys.readouterr().err


@pytest.fixture(scope="module")
def generated(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Latents of a real clip saved like a diffusion pipeline's (normalised) and raw, with reference images."""
    root = tmp_path_factory.mktemp("generated")
    model = refdecoder.load(tiny_wan(), folders["weights"]).eval()  # tiny_wan() is seeded: the saved VAE
    clip = read_clip(bundled_clips()[1], range(9), size=(32, 48))[None]
    latents = model.encode(clip)
    (root / "latents").mkdir()
    (root / "refs").mkdir()
    write_image(root / "refs" / "gen.png", clip[0, :, 0])
    save_latents(
        root / "latents" / "gen.safetensors", model.normalize(latents), height=32, width=48, seed=7, normalized=True
    )
    save_latents(root / "latents" / "raw.safetensors", latents, root / "refs" / "gen.png", height=32, width=48)
    with torch.no_grad():
        expected = model.decode(latents, reference=read_clip(root / "refs" / "gen.png", [0])[None])
    return {"root": root, "expected": expected}


def test_decode_latents_normalised_and_raw(folders: dict[str, Path], generated: dict, tmp_path: Path) -> None:
    root = generated["root"]
    args = ["decode-latents", str(root / "latents"), "--reference-dir", str(root / "refs"), "--compare-base"]
    assert main([*args, *_args(folders, tmp_path / "out", "--crf", "0")]) == 0
    # The in-memory decode through the same encoder settings: noise-like random outputs lose much in 4:2:0 chroma,
    # so the files are compared with an equally encoded copy rather than with the float frames.
    write_video(tmp_path / "expected.mp4", generated["expected"], fps=16, crf=0)
    expected, _ = _read_mp4(tmp_path / "expected.mp4")
    for name in ("gen", "raw"):  # normalised latents are de-normalised first: both decode the same video
        frames, fps = _read_mp4(tmp_path / "out" / f"{name}.mp4")
        assert frames.shape == (9, 32, 48, 3) and fps == 16.0
        assert _psnr(frames, expected) > 45
    assert (tmp_path / "out" / "gen.compare.mp4").is_file() and (tmp_path / "out" / "gen.grid.png").is_file()


def test_decode_latents_bad_files(
    folders: dict[str, Path], generated: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    latents = shutil.copytree(generated["root"] / "latents", tmp_path / "latents")
    save_latents(latents / "wide.safetensors", torch.zeros(7, 2, 4, 6), height=32, width=48, normalized=True)
    refs = shutil.copytree(generated["root"] / "refs", tmp_path / "refs")
    write_image(refs / "small.png", torch.zeros(3, 16, 16))
    save_latents(latents / "small.safetensors", torch.zeros(4, 2, 4, 6), height=32, width=48, normalized=True)
    args = ["decode-latents", str(latents), "--reference-dir", str(tmp_path / "refs")]
    assert main([*args, *_args(folders, tmp_path / "out")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "small" in errors[0] and "wide" in errors[1]
    assert any("--resize-reference" in line for line in errors) and any("(B, 4, T, h, w)" in line for line in errors)
    assert (tmp_path / "out" / "gen.mp4").is_file() and (tmp_path / "out" / "raw.mp4").is_file()
    assert main([*args, *_args(folders, tmp_path / "out2", "--resize-reference")]) == 1  # only `wide` fails now
    assert (tmp_path / "out2" / "small.mp4").is_file()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_decode_latents_refuses_a_reference_outside_its_folders(
    folders: dict[str, Path], generated: dict, tmp_path: Path, capsys: pytest.CaptureFixture, how: str
) -> None:
    """A latents file's metadata cannot make decode-latents read an image elsewhere on the machine."""
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    write_image(secret, torch.zeros(3, 32, 48))
    latents = tmp_path / "inbox" / "latents"
    latents.mkdir(parents=True)
    z = torch.zeros(4, 2, 4, 6)
    if how == "symlink":
        (latents / "link.png").symlink_to(secret)
    named = {"absolute": secret, "dotdot": latents / ".." / ".." / "private" / "secret.png", "symlink": None}[how]
    save_latents(latents / "evil.safetensors", z, named, height=32, width=48, normalized=False)
    if how == "symlink":  # save_latents resolves links itself; write the raw name like a hostile file would
        from safetensors.torch import save_file

        meta = {"height": "32", "width": "48", "normalized": "false", "reference": "link.png"}
        save_file({"latents": z}, str(latents / "evil.safetensors"), metadata=meta)
    out = tmp_path / "out"
    assert main(["decode-latents", str(latents), *_args(folders, out, "--compare-base")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err and "evil" in err
    assert not (out / "evil.mp4").exists() and not (out / "index.html").exists()
    # The same image inside --reference-dir is allowed (the documented latents/ + refs/ layout).
    assert main(["decode-latents", str(latents), "--reference-dir", str(secret.parent), *_args(folders, out)]) == 0
