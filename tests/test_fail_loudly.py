"""Nothing fails silently and nothing is lost: truncated videos, existing outputs, a file as --out, bad checkpoints,
mismatched latent statistics, CSVs of missing files, channels-last references, a single-file VAE of another family;
and the command line's --version and help text."""

from __future__ import annotations

import csv
import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import refdecoder
from refdecoder.cli import build_parser, main
from refdecoder.data import bundled_clips, read_clip
from refdecoder.errors import ConfigError, DataError, InputError
from tests.helpers import tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "vae"
    tiny_wan().save_pretrained(folder)
    return folder


def truncated_mp4(path: Path, frames: int = 25) -> Path:
    """An mp4 with its index first (``faststart``), cut at half its bytes: the header still says ``frames``."""
    clip = read_clip(bundled_clips()[0], range(frames))
    pixels = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    whole = path.with_name("whole.mp4")
    with av.open(str(whole), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.height, stream.width, stream.pix_fmt = pixels.shape[1], pixels.shape[2], "yuv420p"
        stream.options = {"g": "8"}
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --- truncated videos ----------------------------------------------------------------------------------------
def test_reconstructing_a_truncated_video_warns_and_counts(vae_dir, tmp_path, capsys, caplog) -> None:
    from refdecoder.data import probe

    video = truncated_mp4(tmp_path / "cut.mp4")
    assert probe(video).frames == 25  # what the container promises
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        code = main(
            ["reconstruct", str(video), "--out", str(tmp_path / "out"), "--vae", str(vae_dir), "--no-progress"]
        )
    assert code == 0
    warning = next(r.getMessage() for r in caplog.records if "container promises" in r.getMessage())
    row = next(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    decoded = int(row["frames"])
    assert (
        decoded < 25 and str(video) in warning and f"decoded {decoded} frames" in warning and "promises 25" in warning
    )
    assert row["frames_header"] == "25" and row["truncated"] == "True"
    assert "1 ok, 0 failed, 1 truncated" in capsys.readouterr().out


def test_shards_build_skips_and_counts_a_truncated_video(tmp_path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    truncated_mp4(folder / "cut.mp4")  # leaves the whole file beside it, as whole.mp4
    code = main(["shards", "build", "--input", str(folder), "--out", str(tmp_path / "shards")])
    out = capsys.readouterr().out
    assert code == 1 and "wrote 1 samples" in out and "skipped 1" in out
    meta = (tmp_path / "shards" / "000000.meta.jsonl").read_text().splitlines()
    assert len(meta) == 1 and '"frames": 25' in meta[0] and '"key": "whole"' in meta[0]


# --- outputs that exist --------------------------------------------------------------------------------------
def test_reconstruct_keeps_earlier_rows_and_refuses_to_replace_without_overwrite(vae_dir, tmp_path, capsys) -> None:
    first, second = (str(p) for p in bundled_clips()[:2])
    out = tmp_path / "out"
    args = ["--out", str(out), "--vae", str(vae_dir), "--frames", "5", "--no-progress"]
    assert main(["reconstruct", first, *args]) == 0
    assert main(["reconstruct", second, *args]) == 0
    names = [r["name"] for r in csv.DictReader((out / "metrics.csv").open())]
    assert names == [Path(first).stem, Path(second).stem]  # the first clip's row is still there
    capsys.readouterr()
    assert main(["reconstruct", first, *args]) == 1
    err = capsys.readouterr().err
    assert "already holds results of " + Path(first).stem in err and "--overwrite" in err
    assert main(["reconstruct", first, *args, "--overwrite"]) == 0
    names = [r["name"] for r in csv.DictReader((out / "metrics.csv").open())]
    assert sorted(names) == sorted([Path(first).stem, Path(second).stem])


def test_out_that_is_a_file_fails_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "taken"
    out.write_text("not a folder")
    # The VAE does not even exist: the --out check must come first, before anything is loaded or decoded.
    code = main(["reconstruct", str(bundled_clips()[0]), "--out", str(out), "--vae", str(tmp_path / "none")])
    assert code == 1
    assert (
        capsys.readouterr().err.strip()
        == f"error: --out {out} is an existing file; give a folder (it is created if missing)"
    )
    assert out.read_text() == "not a folder"


# --- checkpoints ---------------------------------------------------------------------------------------------
def _convert(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(["convert", str(path), "--out", str(tmp_path / "converted")])
    return code, capsys.readouterr().err


def test_convert_refuses_a_text_file_in_one_line(tmp_path, capsys) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch,loss\n1,0.5\n")
    code, err = _convert(text, tmp_path, capsys)
    assert code == 1
    assert err.strip() == f"error: {text} is a text file (it starts with 'epoch,loss'), not a checkpoint"


def test_convert_of_random_bytes_names_the_allow_pickle_flag_in_one_line(tmp_path, capsys) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    code, err = _convert(noise, tmp_path, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--allow-pickle" in err and "neither a torch checkpoint" in err


def test_single_file_vae_of_another_family_names_what_was_found(tmp_path) -> None:
    from safetensors.torch import save_file

    from refdecoder.inference import load_vae

    path = tmp_path / "vae_pretrained.safetensors"  # a Wan VAE saved as a bare state dict
    save_file({k: v.contiguous() for k, v in tiny_wan().state_dict().items()}, str(path))
    with pytest.raises(refdecoder.CheckpointError) as err:
        load_vae(path)
    message = str(err.value)
    assert "AutoencoderKLWan (Wan2.1) state dict" in message and "read as a VideoVAE+ checkpoint" in message
    assert "\n" not in message


# --- latents, references, CSVs -------------------------------------------------------------------------------
def test_latent_statistics_of_the_wrong_length_fail_at_wrap() -> None:
    vae = tiny_wan(latents_mean=[0.0] * 3, latents_std=[1.0] * 3)  # z_dim is 4
    with pytest.raises(ConfigError, match="has 4 latent channels, but its latent statistics") as err:
        refdecoder.wrap(vae, "tiny")
    assert "\n" not in str(err.value)
    refdecoder.wrap(tiny_wan(latents_mean=[0.0] * 4, latents_std=[1.0] * 4), "tiny")  # the right length wraps


def test_channels_last_reference_error_shows_the_shape_passed() -> None:
    model = refdecoder.wrap(tiny_wan(), "tiny")
    latents = torch.zeros(1, 4, 1, 2, 2)
    with pytest.raises(InputError, match=r"got \(1, 16, 16, 3\); channels must come second"):
        model.decode(latents, reference=torch.zeros(1, 16, 16, 3))


def test_csv_of_missing_files_is_one_line(tmp_path, capsys, caplog) -> None:
    from refdecoder.data import VideoCSVDataset

    listing = tmp_path / "all_missing.csv"
    listing.write_text("path\n" + "".join(f"gone/{i}.mp4\n" for i in range(54)))
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        code = main(["shards", "build", "--input", str(listing), "--out", str(tmp_path / "s")])
    assert code == 1 and not caplog.records  # no warning per file
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: none of the 54 files listed in {listing} exists (e.g. {tmp_path / 'gone' / '0.mp4'}); relative paths"
        f" are resolved against {tmp_path} (the CSV folder)"
    ]
    with pytest.raises(DataError, match="none of the 54 files"):
        VideoCSVDataset(listing, sampler=None)


# --- the command line itself ---------------------------------------------------------------------------------
def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"refdecoder {refdecoder.__version__}"


def _helps() -> dict[str, str]:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    texts = {"": parser.format_help()} | {name: sub.format_help() for name, sub in commands.items()}
    texts |= {
        f"shards {n}": p.format_help() for n, p in commands["shards"]._subparsers._group_actions[0].choices.items()
    }
    return texts


def test_help_has_no_markup_and_shows_defaults() -> None:
    helps = _helps()
    assert {"reconstruct", "decode-latents", "analyze-latents", "convert", "shards", "report"} <= helps.keys()
    for name, text in helps.items():
        assert "``" not in text and ":func:" not in text and ":class:" not in text, name
    reconstruct = " ".join(helps["reconstruct"].split())
    assert "(default: 15)" in reconstruct and "(default: fp32)" in reconstruct and "(default: auto)" in reconstruct
    assert "--overwrite" in reconstruct and "(default: False)" not in reconstruct
    assert "(default: 1000)" in " ".join(helps["shards build"].split())
