"""``refdecoder convert``: official checkpoint -> our folder (+ base VAE), loadable with no other file."""

from __future__ import annotations

import json

import pytest
import torch

import refdecoder
from refdecoder.backbones.videovaeplus import VideoVAEPlus, VideoVAEPlusConfig
from refdecoder.cli import main
from refdecoder.convert import load_official
from refdecoder.inference.loading import VIDEOVAEPLUS_CONFIG, VIDEOVAEPLUS_WEIGHTS
from refdecoder.model import CONFIG_NAME, WEIGHTS_NAME
from tests.test_convert_videovaeplus import write_tiny_official


def test_videovaeplus_round_trip_with_base_out(tmp_path, capsys):
    ckpt = write_tiny_official(tmp_path / "vvp_ref.ckpt")
    out, base = tmp_path / "converted", tmp_path / "base"
    assert main(["convert", str(ckpt), "--out", str(out), "--base-out", str(base)]) == 0
    printed = capsys.readouterr().out
    assert "refdecoder.load(vae" in printed and str(base / VIDEOVAEPLUS_WEIGHTS) in printed
    assert {p.name for p in out.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    assert {p.name for p in base.iterdir()} == {VIDEOVAEPLUS_WEIGHTS, VIDEOVAEPLUS_CONFIG}

    # Follow the printed instructions: only the two written folders are needed.
    config = VideoVAEPlusConfig(**json.loads((base / VIDEOVAEPLUS_CONFIG).read_text()))
    model = refdecoder.load(VideoVAEPlus.from_checkpoint(base / VIDEOVAEPLUS_WEIGHTS, config), out).eval()
    direct = load_official(ckpt).eval()
    g = torch.Generator().manual_seed(4)
    z, reference = torch.randn(1, 16, 1, 2, 2, generator=g), torch.rand(1, 3, 1, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        got = model.decode(z, reference=reference, clamp=False)
        expected = direct.decode(z, reference=reference, clamp=False)
    assert torch.equal(got, expected)
    saved = model.vae.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in direct.vae.state_dict().items())


def test_without_base_out_points_to_the_official_base(tmp_path, capsys):
    ckpt = write_tiny_official(tmp_path / "vvp_ref.ckpt")
    assert main(["convert", str(ckpt), "--out", str(tmp_path / "out"), "--backbone", "videovae+"]) == 0
    assert "sota-4-16z.ckpt" in capsys.readouterr().out


def test_errors_exit_1_with_the_message(tmp_path, capsys):
    fake_wan = {"ae.decoder.ref_conv_in.proj.weight": torch.zeros(1), "transformer.proj_outs.0.bias": torch.zeros(1)}
    torch.save({"state_dict": fake_wan}, tmp_path / "wan.ckpt")
    assert main(["convert", str(tmp_path / "wan.ckpt"), "--out", str(tmp_path / "o"), "--backbone", "videovae+"]) == 1
    assert "wan2.1 RefDecoder checkpoint, not videovae+" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    assert all(option in text for option in ("--out", "--backbone", "--allow-pickle", "--base-out"))


@pytest.mark.slow
def test_wan_round_trip_with_base_out(official_fixtures, tmp_path):
    from diffusers import AutoencoderKLWan

    from tests.official_fill import fill_state_dict, load_manifest

    entries = load_manifest(official_fixtures / "wan21_refdecoder_small" / "manifest.json")
    torch.save({"state_dict": fill_state_dict(entries)}, tmp_path / "wan.ckpt")
    out, base = tmp_path / "converted", tmp_path / "base"
    assert main(["convert", str(tmp_path / "wan.ckpt"), "--out", str(out), "--base-out", str(base)]) == 0
    model = refdecoder.load(AutoencoderKLWan.from_pretrained(base), out).eval()
    direct = load_official(tmp_path / "wan.ckpt").eval()
    g = torch.Generator().manual_seed(4)
    z, reference = torch.randn(1, 16, 2, 4, 6, generator=g), torch.rand(1, 3, 1, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.decode(z, reference=reference), direct.decode(z, reference=reference))
