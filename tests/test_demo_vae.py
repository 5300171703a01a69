"""The demo VAE shipped as package data: small, loadable as a diffusers AutoencoderKLWan, recorded, and made
reproducibly by ``recipes/make_demo_vae.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from refdecoder.data import demo_vae_dir
from refdecoder.inference import load_vae

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _script():
    if "make_demo_vae" not in sys.modules:  # registered first: its dataclass looks its module up while it is built
        spec = importlib.util.spec_from_file_location("make_demo_vae", ROOT / "recipes" / "make_demo_vae.py")
        sys.modules["make_demo_vae"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["make_demo_vae"])
    return sys.modules["make_demo_vae"]


def test_demo_vae_is_small_and_loads() -> None:
    folder = demo_vae_dir()
    assert (folder / WEIGHTS).stat().st_size <= 10 * 1000 * 1000
    vae = load_vae(folder)
    assert type(vae).__name__ == "AutoencoderKLWan" and vae.config.z_dim == 16 and vae.config.base_dim == 16
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == 16


def test_demo_vae_record_matches_the_shipped_weights_and_their_quality() -> None:
    script = _script()
    folder = demo_vae_dir()
    record = json.loads((folder / "demo_vae.json").read_text())
    assert record["sha256"] == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    assert record["settings"] == {**script.Settings().__dict__, "videos": list(script.Settings().videos)}
    assert "carphone" not in record["settings"]["videos"]  # the demo's held-out clip was never trained on
    measured = script.bundled_psnr(load_vae(folder))
    for name, value in record["psnr_bundled_clips"].items():
        assert measured[name] == pytest.approx(value, abs=0.01), name


def test_make_demo_vae_is_reproducible(tmp_path, monkeypatch) -> None:
    script = _script()
    frames = script.load_frames(script.Settings())  # decoded once: the videos are fixed files
    monkeypatch.setattr(script, "load_frames", lambda settings: frames)
    settings = dataclasses.replace(script.Settings(), steps=2, stat_clips=2)
    first, second = (script.make(settings, tmp_path / name) for name in ("a", "b"))
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()
    assert first["sha256"] == second["sha256"] and first["settings"]["steps"] == 2
