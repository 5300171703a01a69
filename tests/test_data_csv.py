"""CSV dataset (the paper's format), fault handling and reproducibility across DataLoader workers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from refdecoder.data import ClipSampler, VideoCSVDataset, collate, make_loader, read_clip, read_image, write_image
from refdecoder.errors import DataError
from tests.data.builders import bad_files, copy_clips, decode_all, write_csv


def small_sampler(**kwargs) -> ClipSampler:
    return ClipSampler(frames=kwargs.pop("frames", 5), size=kwargs.pop("size", (32, 32)), **kwargs)


@pytest.fixture
def dataset_dir(tmp_path):
    clips = copy_clips(tmp_path / "videos")
    write_image(tmp_path / "ref.png", read_clip(clips[0], [0], size=(48, 48))[:, 0])
    rows = [
        {"path": f"videos/{c.name}", "caption": f"clip {c.stem}", "reference": "ref.png" if i == 0 else ""}
        for i, c in enumerate(clips)
    ]
    write_csv(tmp_path / "train.csv", rows)
    return tmp_path


def test_rows_resolve_relative_to_the_csv_folder(dataset_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ds = VideoCSVDataset(dataset_dir / "train.csv", small_sampler(), seed=0)
    assert len(ds) == 3
    sample = ds[1]
    assert sample["key"] == "videos/bikes.mp4" and sample["caption"] == "clip bikes"
    assert sample["video"].shape == (3, 5, 32, 32) and sample["skipped"] == 0
    assert 0 <= sample["reference_index"] < 5 and sample["fps"] == 25.0
    assert "reference" not in sample


def test_clip_content_is_a_run_of_consecutive_source_frames(dataset_dir):
    ds = VideoCSVDataset(dataset_dir / "train.csv", small_sampler(size=None), seed=3)
    sample = ds[2]
    frames = np.stack(decode_all(dataset_dir / "videos" / "carphone.mp4"))
    got = ((sample["video"].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    start = int(np.argmin([np.abs(f.astype(int) - got[0]).sum() for f in frames]))
    np.testing.assert_array_equal(got, frames[start : start + 5])


def test_reference_column_gives_a_resized_reference_image(dataset_dir):
    ds = VideoCSVDataset(dataset_dir / "train.csv", small_sampler(resize_mode="crop_random"), seed=0)
    sample = ds[0]
    assert sample["reference"].shape == (3, 1, 32, 32)
    expected = read_image(dataset_dir / "ref.png", (32, 32), "crop_center")
    torch.testing.assert_close(sample["reference"], expected, rtol=0, atol=0)


def test_root_overrides_the_csv_folder(dataset_dir, tmp_path):
    (tmp_path / "lists").mkdir()
    write_csv(tmp_path / "lists" / "a.csv", [{"path": "videos/bikes.mp4"}])
    ds = VideoCSVDataset(tmp_path / "lists" / "a.csv", small_sampler(), root=dataset_dir)
    assert ds[0]["skipped"] == 0 and "caption" not in ds[0]


def test_csv_format_errors(tmp_path):
    write_csv(tmp_path / "nopath.csv", [{"video": "a.mp4"}])
    with pytest.raises(DataError, match="'path' column"):
        VideoCSVDataset(tmp_path / "nopath.csv", small_sampler())
    write_csv(tmp_path / "empty.csv", [{"path": ""}])
    with pytest.raises(DataError, match="lists no video"):
        VideoCSVDataset(tmp_path / "empty.csv", small_sampler())
    with pytest.raises(DataError, match="cannot read"):
        VideoCSVDataset(tmp_path / "absent.csv", small_sampler())


def test_broken_rows_are_skipped_with_a_warning_and_counted(dataset_dir, caplog):
    bad = bad_files(dataset_dir / "bad")
    rows = [{"path": "videos/bikes.mp4"}] + [{"path": f"bad/{p.name}"} for p in bad.values()]
    with caplog.at_level(logging.WARNING, logger="refdecoder"):
        ds = VideoCSVDataset(write_csv(dataset_dir / "mixed.csv", rows), small_sampler(), seed=0, max_failures=50)
        assert len(ds) == len(rows) - 1  # the missing file is left out up front, with one warning
        assert len(caplog.records) == 1 and "1 of 5 files listed" in caplog.records[0].getMessage()
        samples = [ds[i] for i in range(len(ds))]
    assert all(s["key"] == "videos/bikes.mp4" and s["video"].shape == (3, 5, 32, 32) for s in samples)
    assert all(s["skipped"] >= 1 for s in samples[1:])
    # Every skip was logged and counted, and the per-sample counts add up to the process counter.
    assert ds.skips.count == sum(s["skipped"] for s in samples) == len(caplog.records) - 1
    warned = " ".join(r.getMessage() for r in caplog.records)
    for path in bad.values():
        assert path.name in warned


def test_every_row_failing_raises_after_a_bounded_number_of_tries(dataset_dir, caplog):
    bad = bad_files(dataset_dir / "bad")
    ds = VideoCSVDataset(
        write_csv(dataset_dir / "bad.csv", [{"path": f"bad/{p.name}"} for p in bad.values()]),
        small_sampler(),
        max_failures=7,
    )
    with caplog.at_level(logging.WARNING, logger="refdecoder"), pytest.raises(DataError, match="7 samples in a row"):
        ds[0]
    assert ds.skips.count == 7


def test_too_short_under_skip_policy_is_skipped(dataset_dir):
    rows = [{"path": "videos/bikes.mp4"}, {"path": "videos/carphone.mp4"}]
    ds = VideoCSVDataset(
        write_csv(dataset_dir / "two.csv", rows), small_sampler(frames=33, short="skip"), max_failures=3
    )
    with pytest.raises(DataError, match="too short"):
        ds[0]  # 25-frame clips cannot give 33 frames


def epoch_fingerprint(loader) -> list[tuple]:
    out = []
    for batch in loader:
        for key, ref, video in zip(batch["key"], batch["reference_index"].tolist(), batch["video"]):
            out.append((key, ref, round(float(video.double().sum()), 3)))
    return out


def test_same_seed_same_clips_and_references_with_two_workers(dataset_dir):
    rows = [{"path": f"videos/{name}.mp4"} for name in ("bikes", "carphone", "bigbuckbunny") * 2]
    csv_path = write_csv(dataset_dir / "six.csv", rows)

    def run(seed, workers=2):
        ds = VideoCSVDataset(csv_path, small_sampler(size=(16, 16), resize_mode="crop_random"), seed=seed)
        return epoch_fingerprint(make_loader(ds, batch_size=2, num_workers=workers, seed=seed))

    first, second, other = run(5), run(5), run(6)
    assert first == second
    assert len(first) == 6 and first != other
    # Draws depend on the sample, not on the process that loads it.
    assert run(5, workers=0) == first


def test_collate_batches_and_sums_skips(dataset_dir):
    ds = VideoCSVDataset(dataset_dir / "train.csv", small_sampler(), seed=0)
    batch = collate([ds[1], ds[2]])
    assert batch["video"].shape == (2, 3, 5, 32, 32)
    assert batch["reference_index"].dtype == torch.int64 and batch["skipped"].sum() == 0
    assert batch["caption"] == ["clip bikes", "clip carphone"]
    with pytest.raises(DataError, match="reference"):
        collate([ds[0], ds[1]])
    mixed = collate([{**ds[1], "caption": "a"}, {k: v for k, v in ds[2].items() if k != "caption"}])
    assert mixed["caption"] == ["a", ""]
