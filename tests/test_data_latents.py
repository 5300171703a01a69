"""Saved-latents files and the latent dataset (generation decode path, latent finetuning)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from refdecoder.data import (
    LatentDataset,
    bundled_clips,
    load_latents,
    read_clip,
    read_image,
    save_latents,
    write_image,
)
from refdecoder.errors import DataError, InputError


@pytest.fixture
def reference_png(tmp_path):
    (tmp_path / "refs").mkdir()
    return write_image(tmp_path / "refs" / "gen0.png", read_clip(bundled_clips()[0], [4])[:, 0])


def test_save_and_load_round_trip(tmp_path, reference_png):
    latents = torch.randn(1, 4, 3, 8, 12)
    path = save_latents(
        tmp_path / "lat" / "gen0.safetensors",
        latents,
        reference_png,
        height=64,
        width=96,
        seed=11,
        prompt="a bike race",
        normalized=True,
        sampler="unipc",
    )
    back, meta = load_latents(path)
    torch.testing.assert_close(back, latents[0], rtol=0, atol=0)
    assert meta["height"] == "64" and meta["width"] == "96" and meta["seed"] == "11"
    assert meta["prompt"] == "a bike race" and meta["normalized"] == "true" and meta["sampler"] == "unipc"
    assert meta["reference"] == "../refs/gen0.png"  # relative to the latents file
    with safe_open(str(path), framework="pt") as handle:  # a plain safetensors file any tool can read
        assert list(handle.keys()) == ["latents"]


def test_save_rejects_bad_shapes(tmp_path):
    with pytest.raises(InputError, match=r"\(C, t, h, w\)"):
        save_latents(tmp_path / "x.safetensors", torch.zeros(2, 4, 3, 8, 8), height=64, width=64)


def test_dataset_items_with_reference_from_metadata_and_from_reference_dir(tmp_path, reference_png):
    save_latents(
        tmp_path / "lat" / "gen0.safetensors",
        torch.randn(4, 3, 8, 12),
        reference_png,
        height=64,
        width=96,
        seed=1,
        prompt="p0",
    )
    save_latents(tmp_path / "lat" / "gen1.safetensors", torch.randn(4, 3, 4, 4), height=32, width=32, prompt="p1")
    write_image(tmp_path / "refs" / "gen1.jpg", torch.zeros(3, 40, 40))
    ds = LatentDataset(tmp_path / "lat", reference_dir=tmp_path / "refs")
    first, second = ds[0], ds[1]
    assert first["key"] == "gen0" and first["latents"].shape == (4, 3, 8, 12)
    torch.testing.assert_close(first["reference"], read_image(reference_png), rtol=0, atol=0)
    assert (first["height"], first["width"], first["seed"], first["prompt"], first["normalized"]) == (
        64,
        96,
        1,
        "p0",
        False,
    )
    assert second["reference"].shape == (3, 1, 32, 32) and second["seed"] == -1
    assert second["reference"].abs().max() < 0.02  # the black 40x40 image, centre-cropped to 32x32
    assert first["skipped"] == second["skipped"] == 0


def test_broken_files_and_missing_references_are_skipped(tmp_path, reference_png, caplog):
    save_latents(tmp_path / "lat" / "a.safetensors", torch.randn(4, 1, 2, 2), reference_png, height=16, width=16)
    (tmp_path / "lat" / "b.safetensors").write_bytes(b"not a safetensors file")
    save_latents(tmp_path / "lat" / "c.safetensors", torch.randn(4, 1, 2, 2), height=16, width=16)  # no reference
    # a.safetensors names ../refs/gen0.png: readable only with that folder given as the reference folder
    with pytest.raises(DataError, match=r"'reference' metadata '\.\./refs/gen0\.png' points outside"):
        LatentDataset(tmp_path / "lat", seed=0, max_failures=1)[0]
    ds = LatentDataset(tmp_path / "lat", reference_dir=reference_png.parent, seed=0)
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        items = [ds[i] for i in range(3)]
    assert [i["key"] for i in items] == ["a", "a", "a"]
    assert ds.skips.count == sum(i["skipped"] for i in items) >= 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "b.safetensors" in warned and "no reference image for c.safetensors" in warned


def test_empty_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no .safetensors"):
        LatentDataset(tmp_path)
